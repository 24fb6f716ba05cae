"""HSP-Net: ResNet encoder + vertical and horizontal spatial pyramids of DS-Blocks.

* **Encoder**: ResNet-34 (``depth=34``, default) or ResNet-101 (``depth=101``) in plain
  torch, optional local weights (``encoder_weights``), giving four scales x/4 … x/32.
* **DS-Block**: global-average-pooling branch + 1×1 + three atrous 3×3 (dilations 6, 12,
  18), concatenated, 1×1 reduce (the ASPP layout; :class:`~.blocks.ASPP`).
* **V-HSP** (vertical pyramid): one DS-Block per encoder scale reduces it to
  ``ds_channels`` (or to ``ds_widths[i]`` when given); the four results are bilinearly
  up-sampled to x/4 and concatenated.
* **H-HSP** (horizontal pyramid): one more DS-Block over the concatenation.
* **Head**: three 3×3 convs (the last one to class logits), then ×4 bilinear
  up-sampling to the input size.
* **Any input size**: the input is mirror-padded at the bottom/right to a multiple of 32
  (the encoder's stride) and the logits are cropped back, so ``size_divisor`` is 1 and the
  paper's 400-px tiles work for training and inference.

Against the paper (``preset="paper"`` in ``ml_worker.presets``):

* Follows it: ResNet-101 encoder (``depth=101``, torchvision's layout, so ImageNet weights
  load through ``encoder_weights``); V-HSP DS-Blocks 32, 64, 128 and 256 wide at x/4 … x/32
  (``ds_widths``); the encoder trained at 0.1× the learning rate (``encoder_lr_factor``: its
  own optimizer parameter group); 400-px tiles stitched every 100 px (overlap 300) with
  Gaussian weights (``ml_worker.inference.predict_probs``; ``python -m ml_worker predict
  --overlap 300`` — the overlap is not stored in the checkpoint, the training tile size is).
* Chosen where the paper (as we have it) is not specific: the H-HSP block's output width
  (``ds_channels``, 128), the head width (64), the dilation rates (6, 12, 18, DeepLab's), the
  optimizer and base learning rate (Karyo's Adam 1e-3) and the loss (CE + Dice).
* Karyo's ``fast`` preset departs from it on purpose: ResNet-34 and all DS-Blocks 128 wide.

Shapes for input (B, C, H, W), ResNet-34 at base 64, ds_channels r:
    c2 (B, 64, H/4, W/4), c3 (B, 128, H/8, W/8), c4 (B, 256, H/16, W/16), c5 (B, 512, H/32, W/32)
    V-HSP: 4 × (B, r, H/4, W/4) → concat (B, 4r, H/4, W/4); H-HSP → (B, r, H/4, W/4)
    head → (B, K, H/4, W/4) → ×4 → (B, K, H, W)
"""

from __future__ import annotations

from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import KaryoModel
from .blocks import ASPP, ConvBNAct, resize_to
from .encoders import resnet_encoder


class DSBlock(ASPP):
    """HSP-Net's DS-Block: GAP branch + 1×1 + atrous 3×3 (6, 12, 18) → concat → 1×1.
    (B, C_in, H, W) → (B, C_out, H, W). Same layout as ASPP, named as in the paper."""


@register("hspnet")
class HSPNet(KaryoModel):
    """HSP-Net; see module docstring. Default loss: CE + Dice."""

    default_loss = "ce_dice"
    # Any input size: forward pads to a multiple of 32 (the encoder's stride) and crops back,
    # so the paper's 400-px tiles work.
    size_divisor = 1
    #: the encoder's total stride; inputs are padded to a multiple of it
    pad_multiple = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        depth: int = 34,
        base_channels: int = 64,
        layers: tuple[int, int, int, int] | None = None,
        ds_channels: int = 128,
        head_channels: int = 64,
        rates: tuple[int, ...] = (6, 12, 18),
        ds_widths: tuple[int, int, int, int] | None = None,
        encoder_weights: str | PathLike[str] | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes)
        # The paper's configurations are depth 34 and 101; 18/50/152 work as well.
        self.encoder = resnet_encoder(
            depth,
            in_channels=in_channels,
            base_channels=base_channels,
            layers=layers,
            weights=encoder_weights,
        )
        scales = self.encoder.channels[1:]  # x/4, x/8, x/16, x/32
        r = ds_channels
        widths = [r] * len(scales) if ds_widths is None else [int(w) for w in ds_widths]
        if len(widths) != len(scales):
            raise ValueError(f"ds_widths needs one width per encoder scale ({len(scales)}), got {ds_widths}")
        self.v_hsp = nn.ModuleList([DSBlock(c, w, rates=tuple(rates)) for c, w in zip(scales, widths, strict=True)])
        self.h_hsp = DSBlock(sum(widths), r, rates=tuple(rates))
        self.head = nn.Sequential(
            ConvBNAct(r, head_channels, 3),
            ConvBNAct(head_channels, head_channels, 3),
            nn.Conv2d(head_channels, num_classes, 3, padding=1),
        )
        self.embed_dim = scales[-1]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the bottom/right to a multiple of :attr:`pad_multiple` by mirroring (what the
        tiler does beyond an image border); replicate when the input is too small to mirror."""
        self.check_input(x)
        h, w = x.shape[-2:]
        m = self.pad_multiple
        ph, pw = -h % m, -w % m
        if not ph and not pw:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        xp = self._pad(x)  # (B, C, H', W'), H' and W' multiples of 32
        feats = self.encoder(xp)[1:]  # x/4 .. x/32
        ref = feats[0]
        pyramid = [resize_to(ds(f), ref) for ds, f in zip(self.v_hsp, feats, strict=True)]  # 4 × (B, w_i, H'/4, W'/4)
        y = self.h_hsp(torch.cat(pyramid, dim=1))  # (B, r, H'/4, W'/4)
        logits = self.head(y)  # (B, K, H'/4, W'/4)
        logits = F.interpolate(logits, size=xp.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]  # (B, K, H, W)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self._pad(x))[-1]  # (B, 8·base·e, H'/32, W'/32)
