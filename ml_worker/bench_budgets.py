"""Benchmark budgets (``python -m ml_worker.bench --budget NAME``): everything a run depends on, as data."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

PEER = "monai_unet"



# ============================================================================ budgets
@dataclass(frozen=True)
class Budget:
    """Everything a benchmark run depends on (printed and stored in the JSON)."""

    name: str
    description: str
    tile_size: int  # training patch side
    batch_size: int
    epochs: int
    patches_per_epoch: int
    lr: float
    augment: str
    model_kwargs: dict[str, dict[str, Any]]
    epochs_per_stage: int | None  # PGU-net+ (its run lasts num_stages * epochs_per_stage epochs)
    stage_lr_new: float
    stage_lr_old: float
    test_fraction: float
    val_fraction: float  # of the training images, for early stopping (0 = none; best = last)
    patience: int
    eval_tile: int
    throughput_sizes: tuple[int, int]
    throughput_batches: tuple[int, int]  # batch size at each throughput size
    throughput_max_iters: int  # timed batches: until min_time is reached or max_iters done
    throughput_min_time_s: float
    warmup_batch: int
    warmup_iters: int
    reference_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    split_seed: int = 0
    # Typed nuclei: every softmax model is also trained on a generated typed set
    # (``synth.write_dataset(typed=True)``) with the same schedule and scored by mPQ / bPQ; 0 = off.
    typed_images: int = 0
    typed_size: int = 128
    typed_kind: str = "he"

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        d["summary"] = self.summary()
        return d

    def summary(self) -> str:
        """One line describing the training schedule, built from the fields."""
        steps = math.ceil(self.patches_per_epoch / self.batch_size)
        pg = self.model_kwargs.get("pgunet_plus", {})
        n_st = int(pg.get("num_stages", 4))
        text = (
            f"{self.epochs} epochs x {steps * self.batch_size} patches of {self.tile_size}px "
            f"({self.epochs * steps} steps of batch {self.batch_size}), Adam lr {self.lr:g}, augmentation "
            f"'{self.augment}'; PGU-net+: RMSprop, {n_st} stages x {self.epochs_per_stage} epoch(s), "
            f"lr new/old {self.stage_lr_new:g}/{self.stage_lr_old:g}; "
        )
        text += (f"validation {self.val_fraction:g} of the training images, early stopping patience {self.patience}"
                 if self.val_fraction > 0 else "no validation (last epoch evaluated)")
        text += f"; test {self.test_fraction:g} of the images"
        if self.typed_images:
            text += (f"; typed set: {self.typed_images} generated '{self.typed_kind}' images of {self.typed_size}px "
                     f"(same split and schedule), mPQ / bPQ")
        return text


_REFERENCE = {"unet": {"width": 64}, "dssnet": {}}

BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        name="quick",
        description=(
            "small models (U-Nets width 8, reduced encoders / DSSNet / MONAI UNet) and a short "
            "training run; PGU-net+ learning rates are 10x the paper's because of the short run; "
            "no validation split (the last epoch is evaluated); 512px throughput at batch 2 to fit "
            "the time budget"
        ),
        tile_size=128,
        batch_size=4,
        epochs=3,
        patches_per_epoch=32,
        lr=2e-3,
        augment="default",
        model_kwargs={
            "unet": {"width": 8, "depth": 4},
            "pgunet_plus": {"width": 8, "num_stages": 3, "core_depth": 2},
            "unet_sharp": {"base_channels": 8, "layers": [1, 1, 1, 1], "cardinality": 4, "width_per_group": 4,
                           "stem_channels": 8, "branch_channels": 8, "decoder_channels": 16, "aspp_channels": 16},
            "dssnet": {"width": 16, "feature_channels": 32, "expand_channels": 48, "num_blocks": 4,
                       "decoder_channels": 16, "sr_channels": 16, "sr_blocks": 1},
            "hspnet": {"depth": 18, "base_channels": 16, "layers": [1, 1, 1, 1], "ds_channels": 32,
                       "head_channels": 16},
            "multihead_unet": {"width": 8, "depth": 4},
            PEER: {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        epochs_per_stage=1,
        stage_lr_new=1e-3,
        stage_lr_old=1e-5,
        test_fraction=0.2,
        val_fraction=0.0,
        patience=0,
        eval_tile=256,
        throughput_sizes=(256, 512),
        throughput_batches=(8, 2),
        throughput_max_iters=2,
        throughput_min_time_s=0.5,
        warmup_batch=1,
        warmup_iters=1,
        reference_kwargs=_REFERENCE,
    ),
    "standard": Budget(
        name="standard",
        description=(
            "about 35-40 min on an idle 2-core CPU with --preset fast (measured 2026-12-01): mid-size "
            "models, 10 epochs x 64 patches of 128px with a validation split and early stopping, "
            "PGU-net+ learning rates 10x the paper's because of the short run, and a generated typed set for mPQ"
        ),
        tile_size=128,
        batch_size=4,
        epochs=10,
        patches_per_epoch=64,
        lr=1e-3,
        augment="default",
        model_kwargs={
            "unet": {"width": 16, "depth": 4},
            "pgunet_plus": {"width": 16, "num_stages": 3, "core_depth": 2},
            "unet_sharp": {"base_channels": 16, "layers": [1, 1, 2, 1], "cardinality": 8, "width_per_group": 4,
                           "stem_channels": 16, "branch_channels": 16, "decoder_channels": 32, "aspp_channels": 32},
            "dssnet": {},
            "hspnet": {"depth": 18, "base_channels": 32, "layers": [2, 2, 2, 2], "ds_channels": 64,
                       "head_channels": 32},
            "multihead_unet": {"width": 16, "depth": 4},
            PEER: {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        epochs_per_stage=3,
        stage_lr_new=1e-3,
        stage_lr_old=1e-5,
        test_fraction=0.2,
        val_fraction=0.2,
        patience=4,
        eval_tile=256,
        throughput_sizes=(256, 512),
        throughput_batches=(8, 4),
        throughput_max_iters=3,
        throughput_min_time_s=1.0,
        warmup_batch=1,
        warmup_iters=1,
        reference_kwargs=_REFERENCE,
        typed_images=24,
        typed_size=192,
    ),
    "full": Budget(
        name="full",
        description=(
            "reference configurations (U-Net width 64, paper-sized models, MONAI UNet channels "
            "16..256), long training with a validation split and early stopping; for a GPU or a "
            "long run"
        ),
        tile_size=256,
        batch_size=8,
        epochs=100,
        patches_per_epoch=256,
        lr=1e-3,
        augment="default",
        model_kwargs={
            "unet": {"width": 64},
            "pgunet_plus": {"width": 64},
            "unet_sharp": {},
            "dssnet": {},
            "hspnet": {},
            "multihead_unet": {},
            PEER: {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        epochs_per_stage=25,
        stage_lr_new=1e-4,
        stage_lr_old=1e-6,
        test_fraction=0.2,
        val_fraction=0.2,
        patience=15,
        eval_tile=256,
        throughput_sizes=(256, 512),
        throughput_batches=(8, 8),
        throughput_max_iters=10,
        throughput_min_time_s=5.0,
        warmup_batch=8,
        warmup_iters=2,
        reference_kwargs=_REFERENCE,
        typed_images=48,
        typed_size=256,
    ),
    "smoke": Budget(
        name="smoke",
        description="tests only: tiny models, throughput at 64/128px",
        tile_size=64,
        batch_size=2,
        epochs=1,
        patches_per_epoch=4,
        lr=1e-3,
        augment="light",
        model_kwargs={
            "unet": {"width": 4, "depth": 2},
            "pgunet_plus": {"width": 4, "num_stages": 2, "core_depth": 1},
            "unet_sharp": {"base_channels": 8, "layers": [1, 1, 1, 1], "cardinality": 4, "width_per_group": 2,
                           "stem_channels": 4, "branch_channels": 4, "decoder_channels": 8, "aspp_channels": 8},
            "dssnet": {"width": 8, "feature_channels": 8, "expand_channels": 8, "num_blocks": 1,
                       "decoder_channels": 8, "sr_channels": 8, "sr_blocks": 1},
            "hspnet": {"depth": 18, "base_channels": 8, "layers": [1, 1, 1, 1], "ds_channels": 8, "head_channels": 8},
            "multihead_unet": {"width": 4, "depth": 2},
            PEER: {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        },
        epochs_per_stage=1,
        stage_lr_new=1e-3,
        stage_lr_old=1e-5,
        test_fraction=0.34,
        val_fraction=0.0,
        patience=0,
        eval_tile=64,
        throughput_sizes=(64, 128),
        throughput_batches=(2, 2),
        throughput_max_iters=1,
        throughput_min_time_s=0.0,
        warmup_batch=1,
        warmup_iters=1,
        reference_kwargs={"unet": {"width": 64, "depth": 2}, "dssnet": {}},
        typed_images=3,
        typed_size=64,
    ),
}
