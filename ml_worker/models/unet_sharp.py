"""U-Net# (UNet-sharp): ResNeXt encoder, full-scale skips, attention gates, ASPP bridge.

* **Encoder**: ResNeXt (default ResNeXt-50 32×4d — grouped 3×3 convolutions, plain torch,
  optional local weights via ``encoder_weights``) giving features at strides 2..32, plus a
  light full-resolution stem (two 3×3 convs) so the decoder has stride-1 detail.
* **Bridge**: ASPP on the stride-32 features (1×1 + 3×3 dilations 6/12/18 + image pooling).
* **Decoder** (UNet 3+ full-scale skips): decoder stage ``i`` (stride 2^i, i = 4..0)
  gathers *every* encoder scale at or finer than ``i`` (max-pooled down) and *every*
  coarser decoder output including the bridge (bilinearly up-sampled) — the coarser
  encoder scales reach it through those decoder outputs. Each branch is a 3×3
  conv to ``branch_channels`` (applied before up-sampling for coarser sources, which is
  much cheaper at full resolution); each encoder branch passes an additive **attention gate**
  whose gating signal is the next-coarser decoder output. The branches (always 6) are
  concatenated and fused by a 3×3 conv to ``decoder_channels``.
* **Activations**: ``act`` (Mish by default) in the decoder, bridge and stem, and in the
  encoder too unless ``encoder_act`` is set (the paper preset sets ReLU there).
* **Loss**: Focal Tversky (β = 0.7, α = 1 - β, γ = 4/3) by default.

Two-phase fine-tuning when encoder weights are given (driven by the training loop):
``set_encoder_trainable(False)`` and train the decoder (``non_encoder_parameters()``), then
``set_encoder_trainable(True); freeze_batchnorm()`` and train everything but BatchNorm.

Against the paper (``preset="paper"`` in ``ml_worker.presets``):

* Follows it: ResNeXt-101 32×4d encoder (``depth=101``; 42.1 M parameters in the trunk, in
  torchvision's / timm's key layout, so timm's ImageNet ``resnext101_32x4d`` state dict loads
  through ``encoder_weights``);
  full-scale skips with attention gates and an ASPP bridge; Focal Tversky loss; Macenko
  stain normalisation; frozen-encoder then unfrozen-but-BatchNorm fine-tuning — which, as
  in the paper, presupposes pre-trained encoder weights: it runs when ``encoder_weights``
  is given (``two_phase`` left at its default), otherwise the whole network trains from
  scratch.
* Departs from it: AdamW instead of AdaBound — PyPI's AdaBound implementations (``adabound``
  0.0.5, 2019; ``torch-optimizer`` 0.3.0, 2021) are unmaintained, and AdamW is the adaptive
  optimizer AdaBound starts as (its bound towards SGD is not reproduced).
* Chosen where the paper is ambiguous: Mish in the decoder only. ImageNet ResNeXt weights
  were trained with ReLU, so the paper preset keeps ReLU inside the encoder
  (``encoder_act="relu"``); the ``fast`` preset keeps Mish everywhere. β = 0.7 and γ = 4/3 are
  the Focal Tversky values of Abraham & Khan (2019), which we take as the paper's (not
  re-checked against its text here). The full-resolution stem is Karyo's (ResNeXt's first
  feature map is at stride 2).

Shapes for input (B, C, H, W), ResNeXt-50 at base 64 (channels e_i):
    e0 stem (B, 32, H, W); e1 (B, 64, H/2, W/2); e2 (B, 256, H/4, W/4);
    e3 (B, 512, H/8, W/8); e4 (B, 1024, H/16, W/16); e5 (B, 2048, H/32, W/32)
    bridge ASPP(e5) (B, A, H/32, W/32)
    d4 (B, D, H/16, W/16) ... d0 (B, D, H, W) → head (B, K, H, W)
"""

from __future__ import annotations

from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import KaryoModel
from .blocks import ASPP, AttentionGate, ConvBNAct, resize_to
from .encoders import resnext_encoder


@register("unet_sharp")
class UNetSharp(KaryoModel):
    """U-Net#; see module docstring."""

    default_loss = "focal_tversky"
    size_divisor = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 64,
        depth: int = 50,
        layers: tuple[int, int, int, int] | None = None,
        cardinality: int = 32,
        width_per_group: int = 4,
        stem_channels: int = 32,
        branch_channels: int = 32,
        decoder_channels: int = 128,
        aspp_channels: int = 256,
        act: str = "mish",
        encoder_act: str | None = None,
        encoder_weights: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.encoder = resnext_encoder(
            depth=depth,
            cardinality=cardinality,
            width_per_group=width_per_group,
            in_channels=in_channels,
            base_channels=base_channels,
            layers=layers,
            act=encoder_act or act,
            weights=encoder_weights,
        )
        # Full-resolution stem: the ResNeXt's first output is already at stride 2.
        self.stem = nn.Sequential(
            ConvBNAct(in_channels, stem_channels, 3, act=act),
            ConvBNAct(stem_channels, stem_channels, 3, act=act),
        )
        enc_ch = [stem_channels, *self.encoder.channels]  # strides 1, 2, 4, 8, 16, 32
        self.num_scales = len(enc_ch)  # 6
        top = self.num_scales - 1  # index of the stride-32 scale (the bridge)
        self.bridge = ASPP(enc_ch[top], aspp_channels, branch_channels=aspp_channels // 2, act=act)

        # Decoder stages i = top-1 .. 0. Branch modules are keyed "i_j": source scale j.
        self.enc_branch = nn.ModuleDict()
        self.gate = nn.ModuleDict()
        self.dec_branch = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        for i in range(top - 1, -1, -1):
            gate_ch = aspp_channels if i == top - 1 else decoder_channels
            for j in range(i + 1):  # encoder scales at or finer than i
                self.enc_branch[f"{i}_{j}"] = ConvBNAct(enc_ch[j], branch_channels, 3, act=act)
                self.gate[f"{i}_{j}"] = AttentionGate(branch_channels, gate_ch, max(branch_channels // 2, 1))
            for k in range(i + 1, top + 1):  # coarser decoder outputs (k == top: bridge)
                src = aspp_channels if k == top else decoder_channels
                self.dec_branch[f"{i}_{k}"] = ConvBNAct(src, branch_channels, 3, act=act)
            self.fuse[str(i)] = ConvBNAct(branch_channels * (top + 1), decoder_channels, 3, act=act)
        self.head = nn.Conv2d(decoder_channels, num_classes, 1)
        self.embed_dim = aspp_channels

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features e0..e5 (strides 1..32) with e5 replaced by the ASPP bridge."""
        self.check_input(x)
        feats = [self.stem(x), *self.encoder(x)]
        feats[-1] = self.bridge(feats[-1])  # (B, A, H/32, W/32)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self._features(x)
        top = self.num_scales - 1
        dec: dict[int, torch.Tensor] = {top: enc[top]}  # decoder outputs by scale
        for i in range(top - 1, -1, -1):
            target = enc[i]
            gating = dec[i + 1]
            branches = []
            for j in range(i + 1):
                # finer encoder scale j → stride 2^i by max-pooling (UNet 3+), then gate.
                e = enc[j] if j == i else F.max_pool2d(enc[j], 2 ** (i - j))
                e = self.enc_branch[f"{i}_{j}"](e)  # (B, branch, H/2^i, W/2^i)
                branches.append(self.gate[f"{i}_{j}"](e, gating))
            for k in range(i + 1, top + 1):
                # coarser decoder output: conv at its own (cheaper) resolution, then
                # bilinear up-sampling to stride 2^i.
                d = self.dec_branch[f"{i}_{k}"](dec[k])  # (B, branch, H/2^k, W/2^k)
                branches.append(resize_to(d, target))  # (B, branch, H/2^i, W/2^i)
            dec[i] = self.fuse[str(i)](torch.cat(branches, dim=1))  # (B, D, H/2^i, W/2^i)
        return self.head(dec[0])  # (B, K, H, W)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.bridge(self.encoder(x)[-1])  # (B, A, H/32, W/32)
