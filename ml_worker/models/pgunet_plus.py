"""PGU-net+ (Zhao et al. 2019): U-Net+ trained by progressive growing.

**U-Net+** = U-Net with residual modules in the expansive path: every decoder level has
its own 1×1 output head, and the prediction of the coarser level is up-sampled ×2 and
*added* to the finer level's head output, so each finer level only learns the residual
(the detail the coarser prediction misses)::

    pred_l = head_l(dec_l) + up×2(pred_{l+1})

**Progressive growing.** Training runs ``num_stages`` stages (default 4) at input sizes
32, 64, 128, 256 (image and mask resampled by the training loop). Stage 1 trains the
innermost ``core_depth`` level(s) + bottleneck on 32×32 inputs; each later stage adds one
outer (finer) down/up level — new encoder block, decoder block and head at the new full
resolution — and keeps ("carries") every earlier layer: the old sub-network now runs on the
2×-down-sampled features of the new level, its head still produces the coarse prediction
the new level refines. New layers train at lr 1e-4, earlier ones at 1e-6 (RMSprop) — see
:meth:`PGUNetPlus.stage_param_groups`. Inference uses the full model (the last stage,
the default after construction).

Level ``l`` (0 = finest, ``L = num_stages - 1 + core_depth`` levels + bottleneck) has
``width·2^l`` channels, so at the last stage this is a depth-``L`` U-Net (depth 4 by
default, like the baseline). The outermost active level reads the image through a 1×1
"from-RGB" conv (as in progressive GANs); every inner level reads the max-pooled features of
the level outside it. So the stage-1 core reads the 32×32 image, and once a level is added
around it, it reads that level's features instead: with ``pyramid_input=False`` (the paper
preset) its from-RGB conv is then unused and frozen; with ``pyramid_input=True`` (the
default, Karyo's addition, the ``fast`` preset) every active level adds its own from-RGB view
of the image resampled to its scale to those features.

Shapes at the last stage for input (B, C, H, W) and width w:
    level l encoder:  (B, w·2^l, H/2^l, W/2^l),  bottleneck (B, w·2^L, H/2^L, W/2^L)
    level l decoder:  (B, w·2^l, H/2^l, W/2^l) → head_l (B, K, H/2^l, W/2^l)
    output pred_0:    (B, K, H, W)

Against the paper (``preset="paper"`` in ``ml_worker.presets``):

* Follows it: U-Net+ residual heads between scales; training from the coarsest part with
  one finer level added per stage, 4 stages × 40 epochs at 32→256 px; RMSprop with the new
  layers at 1e-4 and the carried ones at 1e-6; no image-pyramid input.
* Chosen where the paper (as we have it) is not specific: the per-level widths. The paper
  reports about 13 M parameters; with the U-Net's doubling widths, ``width=42`` gives
  13.4 M (width 64, the ``fast`` preset, gives 31.1 M — the pyramid input itself adds only
  ~1 k parameters, it is not why the fast model is larger). How a stage's outermost level
  reads the image (the 1×1 from-RGB conv) is our choice.
* Not checked against the paper text: the loss (CE + Dice, Karyo's default, kept) and the
  normalisation (BatchNorm in every conv block, as in all Karyo U-Nets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import KaryoModel
from .blocks import DoubleConv


@register("pgunet_plus")
class PGUNetPlus(KaryoModel):
    """PGU-net+; see module docstring. Default loss: CE + Dice."""

    default_loss = "ce_dice"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 64,
        num_stages: int = 4,
        core_depth: int = 1,
        base_size: int = 32,
        pyramid_input: bool = True,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if num_stages < 1 or core_depth < 1:
            raise ValueError("num_stages and core_depth must be >= 1")
        self.num_stages = num_stages
        self.core_depth = core_depth
        self.base_size = base_size
        self.pyramid_input = bool(pyramid_input)
        self.num_levels = num_stages - 1 + core_depth  # L
        L = self.num_levels
        ch = [width * 2**i for i in range(L + 1)]  # ch[L] = bottleneck
        half = [max(c // 2, 1) for c in ch]  # input width of level l's encoder

        # One entry per level 0..L-1 (0 = finest, added last).
        self.from_rgb = nn.ModuleList([nn.Conv2d(in_channels, half[i], 1) for i in range(L)])
        self.enc = nn.ModuleList([DoubleConv(half[i], ch[i]) for i in range(L)])
        self.bottleneck_block = DoubleConv(ch[L - 1], ch[L])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(L)])
        self.dec = nn.ModuleList([DoubleConv(2 * ch[i], ch[i]) for i in range(L)])
        self.head = nn.ModuleList([nn.Conv2d(ch[i], num_classes, 1) for i in range(L)])
        self.embed_dim = ch[L]

        self.stage = num_stages
        self.set_stage(num_stages)

    # ------------------------------------------------------------------ growing API
    def first_level(self, stage: int) -> int:
        """Index of the outermost (finest) level active at ``stage`` (1-based)."""
        self._check_stage(stage)
        return self.num_stages - stage

    def set_stage(self, stage: int) -> None:
        """Activate levels ``first_level(stage)..L-1``. Parameters are never re-created, so
        every earlier layer (and its weights) is carried into later stages. Stage
        ``num_stages`` is the full model used for inference."""
        self._check_stage(stage)
        self.stage = stage
        self.size_divisor = 2 ** (self.num_levels - self.first_level(stage))
        if not self.pyramid_input:
            # Without the pyramid only the outermost active level reads the image; the
            # from-RGB layers of inner levels served earlier stages and are frozen (no gradient).
            a = self.first_level(stage)
            for lvl, conv in enumerate(self.from_rgb):
                conv.requires_grad_(lvl == a)

    def stage_input_size(self, stage: int) -> int:
        """Training tile size of ``stage``: 32, 64, 128, 256 by default."""
        self._check_stage(stage)
        return self.base_size * 2 ** (stage - 1)

    def level_modules(self, level: int) -> list[nn.Module]:
        """The modules that belong to one level (encoder, decoder and head side)."""
        return [self.from_rgb[level], self.enc[level], self.up[level], self.dec[level], self.head[level]]

    def stage_parameters(self, stage: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(new, earlier) parameters at ``stage``: the layers added at this stage (for
        stage 1, the whole core incl. the bottleneck) and those carried from earlier stages.
        Parameters of levels not yet active are in neither list."""
        a = self.first_level(stage)
        new_mods = self.level_modules(a)
        old_mods = [m for lvl in range(a + 1, self.num_levels) for m in self.level_modules(lvl)]
        if stage == 1:
            new_mods = new_mods + old_mods + [self.bottleneck_block]
            old_mods = []
        else:
            old_mods.append(self.bottleneck_block)
        new = [p for m in new_mods for p in m.parameters()]
        old = [p for m in old_mods for p in m.parameters()]
        return new, old

    def stage_param_groups(self, stage: int, lr_old: float = 1e-6, lr_new: float = 1e-4) -> list[dict[str, object]]:
        """Optimizer parameter groups for ``stage``: new layers at ``lr_new``, carried ones
        at ``lr_old`` (empty groups omitted; stage 1 has only new layers). Use with
        ``torch.optim.RMSprop(model.stage_param_groups(s))`` after ``set_stage(s)``."""
        new, old = self.stage_parameters(stage)
        groups: list[dict[str, object]] = [{"params": new, "lr": lr_new, "name": "new"}]
        if old:
            groups.append({"params": old, "lr": lr_old, "name": "old"})
        return groups

    def _check_stage(self, stage: int) -> None:
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage must be in 1..{self.num_stages}, got {stage}")

    # ------------------------------------------------------------------ forward
    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Encoder features of the active levels (finest first) and the bottleneck."""
        self.check_input(x)
        a = self.first_level(self.stage)
        img = x
        feats: list[torch.Tensor] = []
        for lvl in range(a, self.num_levels):
            if lvl == a:
                h = self.from_rgb[lvl](img)  # (B, w·2^(l-1), H, W): the stage's input level
            else:
                h = F.max_pool2d(feats[-1], 2)  # features of the finer level (U-Net path)
                if self.pyramid_input:
                    img = F.avg_pool2d(img, 2)  # image pyramid: (B, C_in, H/2^(l-a), W/2^(l-a))
                    h = h + self.from_rgb[lvl](img)
            feats.append(self.enc[lvl](h))  # (B, w·2^l, ·, ·)
        bottom = self.bottleneck_block(F.max_pool2d(feats[-1], 2))  # (B, w·2^L, ·, ·)
        return feats, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, d = self._encode(x)
        a = self.first_level(self.stage)
        pred: torch.Tensor | None = None
        for lvl in reversed(range(a, self.num_levels)):
            d = self.up[lvl](d)  # (B, w·2^l, H_l, W_l)
            d = self.dec[lvl](torch.cat([d, feats[lvl - a]], dim=1))
            out = self.head[lvl](d)  # (B, K, H_l, W_l)
            if pred is not None:
                # Residual module: the finer level refines the up-sampled coarse prediction.
                out = out + F.interpolate(pred, scale_factor=2, mode="bilinear", align_corners=False)
            pred = out
        assert pred is not None
        return pred  # (B, K, H, W)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[1]
