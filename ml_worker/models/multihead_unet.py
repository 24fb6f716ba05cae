"""Multi-head U-Net: Inception + Squeeze-and-Excitation decoder, three sigmoid outputs.

Separating touching nuclei is the hard part of nucleus instance segmentation; instead of
post-hoc splitting of a foreground mask, this model predicts three **independent sigmoid
channels** (``out_channels`` is always 3, whatever ``num_classes`` is — it has no class
channels; ``num_classes`` is accepted for the common constructor signature only):

    0 nucleus      — the whole nucleus mask
    1 borderless   — nuclei shrunk by ``target_radius`` px (separated cores)
    2 borders      — pixels where the dilations of two different nuclei meet

Targets are derived from the instance maps in torch (``losses.multihead_targets``); the
loss is BCE + soft Dice per channel; instances come from a marker watershed on the nucleus
channel with markers = borderless − borders (``instances.multihead_to_instances``).

Encoder (``encoder``): ``unet`` — DoubleConv levels (``width·2^i`` channels, ``depth``
max-pool levels); ``xception`` — a 3×3 conv + separable conv at full resolution, then one
Xception entry-flow block per level (two depthwise-separable convs, 3×3 max-pool stride 2, a
strided 1×1 shortcut), same channels per level. Decoder block: transposed-conv ×2, concat
skip, then an Inception-like block — parallel 1×1, 3×3 and 3×3-dilation-2 (5×5 receptive
field) branches, concatenated, fused by 1×1, re-weighted by SE, plus a 1×1 projected
residual. ``act`` (ReLU or SELU...) everywhere but inside the SE gates. Post-processing
(``postprocess``): marker watershed, or scikit-image's random walker growing the same
markers on ``nucleus - borders``.

Shapes for input (B, C, H, W): level i (B, w·2^i, H/2^i, W/2^i); output (B, 3, H, W).

Against the DSB 2018 multi-head model (``preset="paper"`` in ``ml_worker.presets``):

* Follows it: three sigmoid heads (nucleus, core, touching borders) and a marker-based split;
  an Xception-style encoder; SELU activations; step decay of the learning rate; the random
  walker as the alternative to the watershed (the paper preset uses it).
* Departs from it: the encoder is Xception-*style* — entry-flow blocks at the U-Net's
  doubling widths, no middle/exit flow, so ImageNet Xception weights do not load; BatchNorm is
  kept next to SELU (SELU's self-normalisation is meant to replace it; kept so both encoders
  share the decoder).
* Chosen where the description is not specific: the step schedule (×0.1 every third of the
  run, ``TrainConfig`` defaults), the random walker's β (130, scikit-image's default) and
  everything else of the recipe (Adam 1e-3, BCE + Dice).
* Observed: at the contract test's tiny width (8), the Xception + SELU model reaches Dice 0.97
  on one batch before its core channel separates two touching discs (Xception + ReLU does
  both), so the paper preset may need longer training than the fast one for the split.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from . import register
from .base import KaryoModel
from .blocks import ConvBNAct, DoubleConv, SEBlock, make_act

#: channel order of the multi-head output
HEADS = ("nucleus", "borderless", "borders")


class InceptionSEBlock(nn.Module):
    """Parallel 1×1 / 3×3 / dilated 3×3 branches → concat → 1×1 fuse → SE, + residual.

    (B, C_in, H, W) → (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu") -> None:
        super().__init__()
        b = max(out_channels // 2, 1)
        self.branches = nn.ModuleList(
            [
                ConvBNAct(in_channels, b, 1, act=act),
                ConvBNAct(in_channels, b, 3, act=act),
                ConvBNAct(in_channels, b, 3, dilation=2, act=act),  # 5×5 receptive field, 9 weights
            ]
        )
        self.fuse = ConvBNAct(3 * b, out_channels, 1, act=None)
        self.se = SEBlock(out_channels)
        self.skip = ConvBNAct(in_channels, out_channels, 1, act=None)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([br(x) for br in self.branches], dim=1))  # (B, C_out, H, W)
        return self.act(self.se(y) + self.skip(x))


class SeparableConvBN(nn.Sequential):
    """Depthwise 3×3 conv → pointwise 1×1 conv → BatchNorm (Xception's separable conv).
    (B, C_in, H, W) → (B, C_out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class XceptionDown(nn.Module):
    """Xception entry-flow block (Chollet 2017): act → separable conv → act → separable conv →
    3×3 max-pool stride 2, plus a strided 1×1 conv + BN shortcut.
    (B, C_in, H, W) → (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "relu") -> None:
        super().__init__()
        self.body = nn.Sequential(
            make_act(act), SeparableConvBN(in_channels, out_channels),
            make_act(act), SeparableConvBN(out_channels, out_channels),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


#: ``encoder`` choices of the multi-head U-Net
ENCODERS = ("unet", "xception")
#: ``postprocess`` choices (``ml_worker.instances.MULTIHEAD_METHODS``)
POSTPROCESS = ("watershed", "random_walker")


@register("multihead_unet")
class MultiHeadUNet(KaryoModel):
    """Multi-head U-Net; see module docstring. ``out_channels`` == 3 always."""

    default_loss = "bce_dice"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 32,
        depth: int = 4,
        target_radius: int = 2,
        encoder: str = "unet",
        act: str = "relu",
        postprocess: str = "watershed",
    ) -> None:
        super().__init__(in_channels, num_classes)
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose from {', '.join(ENCODERS)}")
        if postprocess not in POSTPROCESS:
            raise ValueError(f"unknown postprocess {postprocess!r}; choose from {', '.join(POSTPROCESS)}")
        self.out_channels = len(HEADS)
        self.depth = depth
        self.size_divisor = 2**depth
        self.target_radius = target_radius
        self.encoder_kind = encoder
        self.postprocess = postprocess
        ch = [width * 2**i for i in range(depth + 1)]
        if encoder == "xception":
            # Entry: a plain 3×3 conv then a separable conv at full resolution (the skip of level 0).
            self.inc = nn.Sequential(ConvBNAct(in_channels, ch[0], 3, act=act), SeparableConvBN(ch[0], ch[0]),
                                     make_act(act))
            self.pool = nn.Identity()  # the Xception blocks stride themselves
            self.down = nn.ModuleList([XceptionDown(ch[i], ch[i + 1], act=act) for i in range(depth)])
        else:
            self.inc = DoubleConv(in_channels, ch[0], act=act)
            self.pool = nn.MaxPool2d(2)
            self.down = nn.ModuleList([DoubleConv(ch[i], ch[i + 1], act=act) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([InceptionSEBlock(2 * ch[i], ch[i], act=act) for i in range(depth)])
        self.head = nn.Conv2d(ch[0], self.out_channels, 1)
        self.embed_dim = ch[-1]

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        feats = [self.inc(x)]  # (B, w, H, W)
        for down in self.down:
            feats.append(down(self.pool(feats[-1])))  # (B, w·2^i, H/2^i, W/2^i)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._encode(x)
        d = feats[-1]
        for i in reversed(range(self.depth)):
            d = self.up[i](d)  # (B, w·2^i, H/2^i, W/2^i)
            d = self.dec[i](torch.cat([d, feats[i]], dim=1))
        return self.head(d)  # (B, 3, H, W) logits of nucleus / borderless / borders

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[-1]

    def loss_target(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) float targets [nucleus, borderless, borders] from ``instances``."""
        from ml_worker.losses import multihead_targets

        return multihead_targets(batch["instances"], self.target_radius)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Independent sigmoids (the three maps overlap by construction)."""
        return torch.sigmoid(logits)

    def to_instances(self, probs: np.ndarray) -> np.ndarray:
        """(3, H, W) sigmoid probabilities → int32 (H, W) by marker watershed."""
        from ml_worker.instances import multihead_to_instances

        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[0] != 3:
            raise ValueError(f"expected probs of shape (3, H, W), got {probs.shape}")
        nucleus, borderless, borders = (probs[i].astype(np.float32) for i in range(3))
        return np.asarray(multihead_to_instances(nucleus, borderless, borders, method=self.postprocess),
                          dtype=np.int32)
