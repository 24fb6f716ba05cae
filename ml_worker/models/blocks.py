"""Shared building blocks for the architectures in :mod:`ml_worker.models`.

All blocks take and return NCHW float tensors. Shapes in comments use ``B`` for the batch,
``C``/``C_out`` for channels and ``H``/``W`` for the spatial size of the block's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "make_act",
    "ConvBNAct",
    "DoubleConv",
    "ResidualBlock",
    "SEBlock",
    "ASPP",
    "AttentionGate",
    "resize_to",
]


def make_act(name: str = "relu") -> nn.Module:
    """Activation module by name: ``relu``, ``mish`` (x·tanh(softplus(x))), ``silu``,
    ``leaky_relu``, ``gelu``, ``selu`` (self-normalising, Klambauer 2017) or ``prelu``
    (one learned slope, as in DSSNet's reference code).

    ReLU is in-place-free on purpose: in-place activations save little memory at our sizes
    and break autograd when a block output is reused (residual/skip connections).
    """
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "mish":
        return nn.Mish()
    if name == "silu":
        return nn.SiLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "gelu":
        return nn.GELU()
    if name == "selu":
        return nn.SELU()
    if name == "prelu":
        return nn.PReLU()
    raise ValueError(f"unknown activation {name!r} (relu, mish, silu, leaky_relu, gelu, selu, prelu)")


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, BatchNorm follows) → BatchNorm2d → activation, "same" padding.

    (B, C_in, H, W) → (B, C_out, H/stride, W/stride).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if act is not None:
            layers.append(make_act(act))
        super().__init__(*layers)


class DoubleConv(nn.Sequential):
    """The U-Net unit: two 3×3 ConvBNAct. (B, C_in, H, W) → (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, act: str = "relu") -> None:
        mid = mid_channels or out_channels
        super().__init__(ConvBNAct(in_channels, mid, 3, act=act), ConvBNAct(mid, out_channels, 3, act=act))


class ResidualBlock(nn.Module):
    """Two 3×3 convs with an identity skip (EDSR/ResNet style). (B, C, H, W) → same."""

    def __init__(self, channels: int, act: str = "relu") -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(channels, channels, 3, act=act), ConvBNAct(channels, channels, 3, act=None))
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class SEBlock(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): re-weights channels by a gate computed from
    their global average. (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # (B, C, 1, 1)
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),  # (B, C, 1, 1) in (0, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLab v3): a 1×1 branch, three 3×3 atrous branches
    (dilations ``rates``, default 6/12/18) and an image-pooling branch, concatenated and
    projected by a 1×1 conv. Used as the U-Net# bridge and as HSP-Net's DS-Block.

    (B, C_in, H, W) → (B, C_out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        branch_channels: int | None = None,
        rates: tuple[int, ...] = (6, 12, 18),
        act: str = "relu",
    ) -> None:
        super().__init__()
        branch = branch_channels or out_channels
        self.branches = nn.ModuleList(
            [ConvBNAct(in_channels, branch, 1, act=act)]
            + [ConvBNAct(in_channels, branch, 3, dilation=r, act=act) for r in rates]
        )
        # No BatchNorm after global pooling: a (B, C, 1, 1) tensor has a single value per
        # channel per sample, so BN in training mode fails for batch size 1 and is noisy
        # otherwise. A biased conv + activation is the usual fix.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, branch, 1), make_act(act))
        self.project = ConvBNAct(branch * (len(rates) + 2), out_channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [b(x) for b in self.branches]  # each (B, branch, H, W)
        pooled = self.pool(x)  # (B, branch, 1, 1)
        feats.append(pooled.expand(-1, -1, size[0], size[1]))
        return self.project(torch.cat(feats, dim=1))  # (B, C_out, H, W)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, Attention U-Net).

    The skip feature ``x`` (B, C_x, H, W) is multiplied by per-pixel coefficients in (0, 1)
    computed from ``x`` and a coarser gating signal ``g`` (B, C_g, H_g, W_g) — the decoder
    feature — so that the decoder suppresses skip activations in irrelevant regions.
    Returns (B, C_x, H, W).
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int | None = None) -> None:
        super().__init__()
        inter = inter_channels or max(x_channels // 2, 1)
        self.theta_x = nn.Conv2d(x_channels, inter, 1, bias=False)
        self.phi_g = nn.Conv2d(g_channels, inter, 1, bias=True)
        self.psi = nn.Sequential(nn.ReLU(), nn.Conv2d(inter, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g_proj = resize_to(self.phi_g(g), x)  # (B, inter, H, W)
        alpha = self.psi(self.theta_x(x) + g_proj)  # (B, 1, H, W)
        return x * alpha


def resize_to(x: torch.Tensor, ref: torch.Tensor | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Bilinearly resize ``x`` (B, C, h, w) to the spatial size of ``ref`` (a tensor or an
    (H, W) tuple); a no-op when the sizes already match."""
    size = tuple(ref.shape[-2:]) if isinstance(ref, torch.Tensor) else tuple(ref)
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode=mode)
