"""U-Net baseline (Ronneberger et al. 2015) with BatchNorm and "same" padding.

``depth`` down/up levels (default 4); level ``i`` has ``width · 2^i`` channels; max-pool
down-sampling, 2×2 transposed-conv up-sampling, skip concatenation. At width 64 / depth 4
it has ≈31.0M parameters (the classic configuration).

    x (B, C_in, H, W)
    enc0 DoubleConv → (B, w, H, W) ─────────────────────────────── skip ─┐
    enc1 pool+DoubleConv → (B, 2w, H/2, W/2) ──────────────── skip ─┐    │
    ...                                                             │    │
    bottleneck → (B, 2^depth·w, H/2^depth, W/2^depth)               │    │
    up: ConvT ×2, concat skip, DoubleConv ... ──────────────────────┘────┘
    head 1×1 → (B, num_classes, H, W)

Against the paper (no ``paper`` preset; this is Karyo's baseline): the layout (two 3×3 convs
per level, max-pool down, 2×2 up-convolutions, skip concatenation, 64→1024 channels) follows
it; BatchNorm, "same" padding (the paper uses unpadded convs and an overlap-tile input), the
CE + Dice loss (the paper's border-weighted cross-entropy is available as ``border_ce``) and
Adam (the paper: SGD with momentum 0.99, batch 1) are Karyo's.
"""

from __future__ import annotations

import torch
from torch import nn

from . import register
from .base import KaryoModel
from .blocks import DoubleConv


@register("unet")
class UNet(KaryoModel):
    """Baseline U-Net. Default loss: CE + Dice."""

    default_loss = "ce_dice"

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4) -> None:
        super().__init__(in_channels, num_classes)
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.depth = depth
        self.size_divisor = 2**depth
        ch = [width * 2**i for i in range(depth + 1)]  # w, 2w, ..., 2^depth·w

        self.inc = DoubleConv(in_channels, ch[0])
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList([DoubleConv(ch[i], ch[i + 1]) for i in range(depth)])
        # up[i] goes from level i+1 to level i
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(depth)])
        self.dec = nn.ModuleList([DoubleConv(2 * ch[i], ch[i]) for i in range(depth)])
        self.head = nn.Conv2d(ch[0], num_classes, 1)
        self.embed_dim = ch[-1]

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        feats = [self.inc(x)]  # (B, w, H, W)
        for down in self.down:
            feats.append(down(self.pool(feats[-1])))  # (B, 2^i·w, H/2^i, W/2^i)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._encode(x)
        d = feats[-1]  # bottleneck (B, 2^depth·w, H/2^depth, W/2^depth)
        for i in reversed(range(self.depth)):
            d = self.up[i](d)  # (B, 2^i·w, H/2^i, W/2^i)
            d = self.dec[i](torch.cat([d, feats[i]], dim=1))  # (B, 2^i·w, H/2^i, W/2^i)
        return self.head(d)  # (B, num_classes, H, W)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[-1]
