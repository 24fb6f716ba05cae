"""Plain-torch ResNet / ResNeXt encoders with optional local weights.

The module and parameter names follow torchvision's ``ResNet`` (``conv1``, ``bn1``,
``layer1``..``layer4``, blocks with ``conv1/bn1/.../downsample.0/1``), so a torchvision
``resnet34`` / ``resnet101`` / ``resnext50_32x4d`` state dict saved to a local file loads
directly (its ``fc.*`` classifier keys are ignored). Nothing is ever downloaded.

Widths are configurable (``base_channels``; ``layers`` overrides the block counts) so tests
can build tiny encoders.
"""

from __future__ import annotations

from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from .blocks import make_act

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNetEncoder",
    "resnet_encoder",
    "resnext_encoder",
    "load_local_weights",
]

_RESNET_LAYERS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {}


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3×3 convs + identity (or 1×1 projection) skip.

    (B, C_in, H, W) → (B, planes, H/stride, W/stride).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        act: str = "relu",
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError("BasicBlock does not support grouped convolutions (use depth>=50)")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = make_act(act)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 bottleneck; with ``groups > 1`` the ResNeXt block (aggregated
    transformations = grouped 3×3 conv, e.g. 32×4d: 32 groups of 4 channels per 64 planes).

    Inner width = ``groups * max(1, planes * width_per_group // 64)`` (torchvision's formula
    for standard sizes, clamped so tiny test widths stay valid).
    (B, C_in, H, W) → (B, 4·planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        act: str = "relu",
    ) -> None:
        super().__init__()
        width = groups * max(1, planes * width_per_group // 64)
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act = make_act(act)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + identity)


_RESNET_LAYERS.update(
    {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }
)


class ResNetEncoder(nn.Module):
    """ResNet/ResNeXt trunk returning five feature maps.

    ``forward(x (B, C_in, H, W))`` returns ``[stem, c2, c3, c4, c5]`` with strides
    2, 4, 8, 16, 32 and channels ``self.channels`` =
    ``[base, base·e, 2·base·e, 4·base·e, 8·base·e]`` (e = 1 for BasicBlock, 4 for
    Bottleneck), i.e. for ResNet-34 at base 64: 64, 64, 128, 256, 512 and for ResNet-101 /
    ResNeXt-50: 64, 256, 512, 1024, 2048.
    """

    def __init__(
        self,
        depth: int = 34,
        in_channels: int = 3,
        base_channels: int = 64,
        layers: tuple[int, int, int, int] | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        act: str = "relu",
        weights: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if depth not in _RESNET_LAYERS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(_RESNET_LAYERS)}")
        block, default_layers = _RESNET_LAYERS[depth]
        layers = tuple(layers) if layers is not None else default_layers
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 block counts, got {layers}")
        self.depth = depth
        self._block = block
        self._groups = groups
        self._width_per_group = width_per_group
        self._act = act

        b = base_channels
        self.conv1 = nn.Conv2d(in_channels, b, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.act = make_act(act)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = b
        self.layer1 = self._make_layer(b, layers[0], stride=1)
        self.layer2 = self._make_layer(2 * b, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * b, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * b, layers[3], stride=2)
        e = block.expansion
        self.channels: list[int] = [b, b * e, 2 * b * e, 4 * b * e, 8 * b * e]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity,
        # which makes from-scratch training of deep trunks noticeably more stable.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

        if weights is not None:
            load_local_weights(self, weights)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        block = self._block
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        kw = dict(groups=self._groups, width_per_group=self._width_per_group, act=self._act)
        mods = [block(self._inplanes, planes, stride, downsample, **kw)]
        self._inplanes = out
        mods += [block(out, planes, 1, None, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.act(self.bn1(self.conv1(x)))  # (B, base, H/2, W/2)
        c2 = self.layer1(self.maxpool(stem))  # (B, base·e, H/4, W/4)
        c3 = self.layer2(c2)  # (B, 2·base·e, H/8, W/8)
        c4 = self.layer3(c3)  # (B, 4·base·e, H/16, W/16)
        c5 = self.layer4(c4)  # (B, 8·base·e, H/32, W/32)
        return [stem, c2, c3, c4, c5]


def resnet_encoder(depth: int = 34, **kw: object) -> ResNetEncoder:
    """Plain ResNet encoder (``depth`` 18, 34, 50, 101 or 152)."""
    return ResNetEncoder(depth=depth, **kw)  # type: ignore[arg-type]


def resnext_encoder(depth: int = 50, cardinality: int = 32, width_per_group: int = 4, **kw: object) -> ResNetEncoder:
    """ResNeXt encoder, e.g. the defaults give ResNeXt-50 32×4d."""
    if depth < 50:
        raise ValueError("ResNeXt needs bottleneck blocks (depth >= 50)")
    return ResNetEncoder(
        depth=depth, groups=cardinality, width_per_group=width_per_group, **kw  # type: ignore[arg-type]
    )


# Prefixes commonly found in saved state dicts (DataParallel, a wrapping model, timm-style
# backbones); stripped so a user can point at whatever file they have.
_STRIP_PREFIXES = ("module.", "encoder.", "backbone.")
# Classification heads are not part of an encoder.
_IGNORED_PREFIXES = ("fc.", "classifier.", "head.")


def load_local_weights(module: nn.Module, path: str | PathLike[str]) -> None:
    """Load encoder weights from a local file into ``module`` (strictly).

    Accepts a bare state dict or a dict with a ``"state_dict"`` entry; strips ``module.``,
    ``encoder.`` and ``backbone.`` prefixes and ignores classifier keys (``fc.*``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read as a state dict, or its keys/shapes do not match
            the encoder (the message lists the first offending keys).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {p}")
    try:
        # weights_only: a weights file must never be able to run code when loaded.
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"could not read encoder weights from {p}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"encoder weights file {p} does not contain a state dict of tensors")

    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith(_IGNORED_PREFIXES):
            continue
        state[key] = value

    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if bad_shapes:
            problems.append(f"{len(bad_shapes)} shape mismatches (e.g. {bad_shapes[:3]})")
        raise ValueError(
            f"encoder weights {p} do not match {type(module).__name__}: "
            + "; ".join(problems)
            + ". Check depth/base_channels/cardinality/in_channels against the file."
        )
    module.load_state_dict(state, strict=True)
