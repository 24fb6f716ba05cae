"""What defines a training run (:class:`TrainConfig`, stored in every checkpoint) and what it
returns (:class:`TrainResult`). Torch-free: the backend validates run configs with it without
loading the engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "OPTIMIZERS", "STAIN_NORMS", "LR_SCHEDULES", "INPUT_NORMS"]

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
STAIN_NORMS = ("none", "macenko", "reinhard")
LR_SCHEDULES = ("constant", "cosine", "step")
INPUT_NORMS = ("dataset", "image")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, inconsistent resume checkpoint...)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    Attributes:
        arch: registered architecture name (``ml_worker.models.model_names()``).
        model_kwargs: extra constructor kwargs (e.g. ``{"width": 16}``).
        epochs: number of epochs (progressive growing: see ``epochs_per_stage``).
        batch_size: patches per optimizer step.
        lr: learning rate (not used by progressive growing, see ``stage_lr_*``).
        weight_decay: L2 / decoupled weight decay.
        optimizer: ``adam`` / ``adamw`` / ``rmsprop`` / ``sgd`` (momentum 0.9, Nesterov);
            None = ``rmsprop`` for progressive growing, ``adam`` otherwise.
        loss: overrides the model's default loss (``ml_worker.losses.LOSSES`` name).
        tile_size: training patch side (and inference tile for validation).
        steps_per_epoch: training *patches* per epoch, rounded up to whole batches (so the
            number of optimizer steps is ``ceil(steps_per_epoch / batch_size)``); None = the
            number of tiles needed to cover the training images once.
        val_fraction: validation share of the images for :func:`train_from_folder`.
        split_seed: seed of that image-level split (fixed, independent of ``seed``).
        seed: model initialisation and patch sampling.
        stain_norm: ``none`` / ``macenko`` / ``reinhard``, fitted on a reference training
            image (the one with the most tissue) and stored in the checkpoint.
        augment: augmentation preset name (``none`` / ``light`` / ``default``) or a dict for
            ``AugmentConfig.from_dict``.
        foreground_bias: probability of centring a patch on a nucleus.
        early_stopping_patience: stop after this many epochs without a better validation
            Dice; 0 / None disables.
        val_every: validate every N epochs (and always at the last epoch).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        progressive: PGU-net+ growing; None = on for models with ``set_stage``.
        epochs_per_stage: epochs per growing stage (the paper uses 40); None =
            ``ceil(epochs / num_stages)``. A progressive run lasts
            ``num_stages * epochs_per_stage`` epochs.
        stage_lr_new, stage_lr_old: learning rates of the new / carried layers while growing.
        two_phase: U-Net# schedule; None = on when ``encoder_weights`` is given.
        encoder_weights: local file of pre-trained encoder weights (``unet_sharp``,
            ``hspnet``).
        phase1_epochs: decoder-only epochs of the two-phase schedule; None =
            ``max(1, epochs // 4)``.
        phase2_lr_factor: learning-rate multiplier of phase 2.
        encoder_lr_factor: the encoder's learning rate relative to ``lr`` (its own parameter
            group; HSP-Net's paper trains its pre-trained ResNet at 0.1x). 1 = one group.
        grad_clip: clip the gradient norm to this value; None = off.
        lr_schedule: ``constant``, ``cosine`` (from the base rate down to 1 % of it over the
            run) or ``step`` (times ``lr_step_gamma`` every ``lr_step_epochs`` epochs); applied
            per optimizer step to every parameter group's own base rate, so the PGU-net+ and
            U-Net# rates keep their ratios.
        warmup_epochs: linear warm-up from ~0 to the base rate over these epochs (0 = none).
        lr_step_epochs: period of the ``step`` schedule; None = a third of the epochs.
        lr_step_gamma: factor of the ``step`` schedule.
        ema_decay: exponential moving average of the weights (and BatchNorm buffers), used for
            validation and written to ``best.pt``; None / 0 = off. 0.99-0.999 for short runs.
        bn_recalibrate: before each validation, recompute the BatchNorm running statistics
            over ``bn_recalibrate_patches`` un-augmented training patches with the weights being
            validated ("precise BN"); the statistics then saved are those.
        bn_recalibrate_patches: patches for that recalibration (at most as many as an epoch
            trains on).
        classes: names of the nucleus types (class ids 1..K of the samples' class maps); the
            model then predicts background + K classes (softmax architectures only). None:
            one "nucleus" class (binary), whatever class maps the samples carry.
        input_norm: ``image`` (default: channel statistics of the image being processed —
            in training the whole sample image a patch is cut from, at inference the image or
            tile given; robust to stain and brightness differences between images) or
            ``dataset`` (per-channel mean / std of the stain-normalised training images, fixed
            and stored in the checkpoint: a pixel gets the same input value in a patch, a tile
            and a whole slide). Measured on CPM-15 with 4 labelled 128-px tiles: held-out Dice
            0.833 with ``image``, 0.433 with ``dataset`` (statistics of 4 tiles do not fit
            other images), hence the default.
        num_threads: ``torch.set_num_threads`` during training (restored afterwards).
        num_workers: DataLoader worker processes (0 = in process).
        resume: path of a ``last.pt`` to continue from (same run: optimizer, epoch, RNG...).
        init_weights: warm start — a Karyo checkpoint of the same architecture whose weights
            initialise the model (parameters whose shapes differ are left at their
            initialisation); training itself starts at epoch 1 with a fresh optimizer.
            Ignored when resuming.
        out_dir: where ``last.pt`` and ``best.pt`` are written.
    """

    arch: str = "dssnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str | None = None
    loss: str | None = None
    tile_size: int = 256
    steps_per_epoch: int | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    stain_norm: str = "none"
    augment: str | dict[str, Any] = "default"
    foreground_bias: float = 0.0
    early_stopping_patience: int | None = 10
    val_every: int = 1
    device: str = "auto"
    progressive: bool | None = None
    epochs_per_stage: int | None = None
    stage_lr_new: float = 1e-4
    stage_lr_old: float = 1e-6
    two_phase: bool | None = None
    encoder_weights: str | None = None
    phase1_epochs: int | None = None
    phase2_lr_factor: float = 0.1
    encoder_lr_factor: float = 1.0
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    warmup_epochs: int = 0
    lr_step_epochs: int | None = None
    lr_step_gamma: float = 0.1
    ema_decay: float | None = None
    bn_recalibrate: bool = True
    bn_recalibrate_patches: int = 32
    input_norm: str = "image"
    classes: list[str] | None = None
    num_threads: int | None = None
    num_workers: int = 0
    resume: str | None = None
    init_weights: str | None = None
    out_dir: str = "runs/latest"

    def __post_init__(self) -> None:
        # Web forms send "" for "not set".
        for name in ("optimizer", "loss", "encoder_weights", "resume", "init_weights", "steps_per_epoch",
                     "epochs_per_stage", "phase1_epochs", "num_threads", "grad_clip", "lr_step_epochs", "ema_decay"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if self.model_kwargs is None:
            self.model_kwargs = {}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for an inconsistent config."""
        from ml_worker.models import MODELS

        if self.arch not in MODELS:
            raise ValueError(f"unknown architecture {self.arch!r}; available: {', '.join(sorted(MODELS))}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError("model_kwargs must be a dict")
        for name in ("epochs", "batch_size", "tile_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.epochs_per_stage is not None and int(self.epochs_per_stage) < 1:
            raise ValueError(f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")
        if self.optimizer is not None and self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if str(self.stain_norm).lower() not in STAIN_NORMS:
            raise ValueError(f"unknown stain_norm {self.stain_norm!r}; choose from {', '.join(STAIN_NORMS)}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if str(self.lr_schedule).lower() not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {', '.join(LR_SCHEDULES)}")
        if str(self.input_norm).lower() not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {self.input_norm!r}; choose from {', '.join(INPUT_NORMS)}")
        if int(self.warmup_epochs) < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.lr_step_epochs is not None and int(self.lr_step_epochs) < 1:
            raise ValueError(f"lr_step_epochs must be >= 1, got {self.lr_step_epochs}")
        if not 0.0 < float(self.lr_step_gamma) <= 1.0:
            raise ValueError(f"lr_step_gamma must be in (0, 1], got {self.lr_step_gamma}")
        if self.ema_decay is not None and not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.classes is not None:
            if not isinstance(self.classes, list | tuple) or not self.classes or len(self.classes) > 254 or not all(
                    isinstance(c, str) and c for c in self.classes):
                raise ValueError("classes must be a non-empty list of at most 254 class names")
            if "num_classes" in self.model_kwargs and int(self.model_kwargs["num_classes"]) != len(self.classes) + 1:
                raise ValueError("model_kwargs num_classes disagrees with classes (background + one per class)")
            self.classes = [str(c) for c in self.classes]
        if int(self.bn_recalibrate_patches) < 2:
            raise ValueError(f"bn_recalibrate_patches must be >= 2, got {self.bn_recalibrate_patches}")
        if not 0.0 < float(self.encoder_lr_factor) <= 1.0:
            raise ValueError(f"encoder_lr_factor must be in (0, 1], got {self.encoder_lr_factor}")
        if float(self.lr) <= 0 or float(self.stage_lr_new) <= 0 or float(self.stage_lr_old) < 0:
            raise ValueError("learning rates must be positive")
        if self.loss is not None:
            from ml_worker.losses import LOSSES

            if self.loss not in LOSSES:
                raise ValueError(f"unknown loss {self.loss!r}; available: {', '.join(sorted(LOSSES))}")
        if isinstance(self.augment, str):
            from ml_worker.augment import AugmentConfig

            AugmentConfig.preset(self.augment)  # raises ValueError on an unknown preset

    def to_dict(self) -> dict[str, Any]:
        """Plain-data dict (JSON / checkpoint friendly)."""
        d = dataclasses.asdict(self)
        d["model_kwargs"] = _plain(d["model_kwargs"])
        d["augment"] = _plain(d["augment"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _plain(obj: Any) -> Any:
    """Tuples → lists, recursively (JSON-friendly copies)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        status: ``completed``, ``early_stopped`` or ``cancelled``.
        epochs_completed: epochs finished in total (including those of a resumed run).
        best_epoch: 1-based epoch of ``best.pt`` (None when none was written).
        best_score: its validation Dice (None without validation).
        best_metrics: its validation metrics.
        history: one dict per epoch (``epoch``, ``train_loss``, ``train_parts``, ``val``,
            ``stage``, ``phase``, ``lr``, ``time_s``...).
        best_path, last_path: checkpoint files (None if not written).
        elapsed_s: wall time of this call.
    """

    status: str
    epochs_completed: int
    best_epoch: int | None
    best_score: float | None
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    best_path: str | None
    last_path: str | None
    config: dict[str, Any]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
