"""Training loop: one entry point for every architecture.

:func:`train` takes in-memory :class:`~ml_worker.data.Sample` lists (the Celery worker passes
data it pulled from storage; nothing here assumes a file layout) and a :class:`TrainConfig`;
:func:`train_from_folder` is the convenience wrapper for the common on-disk layout.

Per epoch:

1. ``steps_per_epoch`` random patches (:class:`~ml_worker.data.PatchDataset`: augmented,
   stain-normalised, z-scored) in whole batches; ``model.forward_train`` →
   ``model.compute_loss`` → optimizer step. ``should_stop()`` is polled before every step.
2. Validation (when there are validation images): tiled, Gaussian-blended inference on each
   whole image (:func:`ml_worker.inference.predict_probs`), the model's own instance
   post-processing, :func:`ml_worker.metrics.all_metrics`, averaged over images.
3. ``out_dir/last.pt`` (every epoch; everything needed to resume) and ``out_dir/best.pt``
   (best validation Dice so far; the last epoch when there is no validation set), both via
   :func:`ml_worker.checkpoint.save_checkpoint` (atomic).
4. Early stopping when validation Dice has not improved for ``early_stopping_patience``
   epochs.

Schedules:

* **PGU-net+ progressive growing** (``progressive``, default on for ``pgunet_plus``): stage
  ``s`` = 1..``num_stages`` lasts ``epochs_per_stage`` epochs. Patches are cut at
  ``tile_size`` and resampled (image: area, masks: nearest) to the stage size
  ``min(model.stage_input_size(s), tile_size)`` — 32, 64, 128, 256 by default — except the
  last stage, which always trains at ``tile_size`` (the scale used at inference). Each stage
  calls ``model.set_stage(s)`` (one more level; every earlier layer keeps its weights) and
  builds a fresh RMSprop over ``model.stage_param_groups(s)``: new layers at
  ``stage_lr_new`` (1e-4), earlier layers at ``stage_lr_old`` (1e-6). Validation at an
  early stage runs on images resampled by the same factor; ``best.pt`` and early stopping
  only consider the last stage (the full model).
* **U-Net# two-phase fine-tuning** (``two_phase``, default on when ``encoder_weights`` is
  given): phase 1 (``phase1_epochs``) trains the decoder on a frozen pre-trained encoder
  (its weights stay; its BatchNorm statistics adapt to the new images); phase 2 trains
  everything but BatchNorm (parameters and statistics frozen) at ``lr * phase2_lr_factor``.
* **Warm start** (``init_weights``): a new run initialised from another checkpoint's weights.

Checkpoints carry the model (name, constructor kwargs, weights), ``config`` (the
:class:`TrainConfig` as a dict), ``history`` (per-epoch metrics), ``metrics`` (validation
metrics of that checkpoint's epoch), ``stain`` (the fitted stain normaliser), ``stage`` and,
in ``last.pt``, ``train_state`` (optimizer state, epoch, torch RNG, best score,
early-stopping counter). Resuming from ``last.pt`` continues at the next epoch and
reproduces the uninterrupted run (patches depend only on (seed, epoch, index); the RNG and
optimizer state are restored).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml_worker.checkpoint import load_checkpoint, save_checkpoint
from ml_worker.data import DataError, Sample, load_folder, split_by_image
from ml_worker.inference import pick_device, predict_probs
from ml_worker.metrics import all_metrics
from ml_worker.models import MODELS, KaryoModel, create_model
from ml_worker.stain import StainNormalizer, make_normalizer, normalizer_from_dict, tissue_mask

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "train",
    "train_from_folder",
    "load_for_inference",
    "evaluate_samples",
    "stage_sizes",
    "OPTIMIZERS",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
STAIN_NORMS = ("none", "macenko", "reinhard")

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, inconsistent resume checkpoint...)."""


# ============================================================================ config
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
        grad_clip: clip the gradient norm to this value; None = off.
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
    grad_clip: float | None = None
    num_threads: int | None = None
    num_workers: int = 0
    resume: str | None = None
    init_weights: str | None = None
    out_dir: str = "runs/latest"

    def __post_init__(self) -> None:
        # Web forms send "" for "not set".
        for name in ("optimizer", "loss", "encoder_weights", "resume", "init_weights", "steps_per_epoch",
                     "epochs_per_stage", "phase1_epochs", "num_threads", "grad_clip"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if self.model_kwargs is None:
            self.model_kwargs = {}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for an inconsistent config."""
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


# ============================================================================ helpers
def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"expected an (H, W, 3) or (H, W) image, got shape {a.shape}")
    return a if a.dtype == np.uint8 else np.clip(a, 0, 255).astype(np.uint8)


def _clean_samples(samples: Sequence[Sample], what: str) -> list[Sample]:
    out = []
    for s in samples:
        img = _rgb(s.image)
        inst = np.asarray(s.instances)
        if img.shape[:2] != inst.shape:
            raise DataError(f"{what} sample {s.name!r}: image {img.shape[:2]} and mask {inst.shape} differ")
        out.append(Sample(s.name, img, inst.astype(np.int32, copy=False)))
    return out


def _emit(progress: ProgressFn | None, event: dict[str, Any]) -> None:
    if progress is None:
        return
    try:
        progress(event)
    except Exception:  # noqa: BLE001 - a broken UI callback must not kill training
        log.exception("progress callback failed")


def _fit_normalizer(name: str, samples: Sequence[Sample]) -> StainNormalizer | None:
    """Normaliser fitted on the training image with the most tissue (None for ``none``)."""
    if str(name).lower() == "none":
        return None
    norm = make_normalizer(name)
    areas = [int(tissue_mask(s.image).sum()) for s in samples]
    ref = samples[int(np.argmax(areas))]
    norm.fit(ref.image)
    return norm


def stage_sizes(num_stages: int, stage_input_size: Callable[[int], int], tile_size: int) -> list[int]:
    """Training input side per progressive stage: ``min(stage_input_size(s), tile_size)``,
    the last stage always at ``tile_size``."""
    sizes = [min(int(stage_input_size(s)), int(tile_size)) for s in range(1, num_stages + 1)]
    sizes[-1] = int(tile_size)
    return sizes


@dataclass
class _Plan:
    """Pure function of the epoch index: which stage / phase / input size / optimizer."""

    total_epochs: int
    progressive: bool
    num_stages: int
    epochs_per_stage: int
    sizes: list[int]
    two_phase: bool
    phase1_epochs: int

    def stage(self, epoch: int) -> int | None:
        if not self.progressive:
            return None
        return min(self.num_stages, epoch // self.epochs_per_stage + 1)

    def phase(self, epoch: int) -> int | None:
        if not self.two_phase:
            return None
        return 1 if epoch < self.phase1_epochs else 2

    def size(self, epoch: int, tile_size: int) -> int:
        s = self.stage(epoch)
        return tile_size if s is None else self.sizes[s - 1]

    def key(self, epoch: int) -> str:
        """Identifies the optimizer layout; a new key means a fresh optimizer."""
        if self.progressive:
            return f"stage{self.stage(epoch)}"
        if self.two_phase:
            return f"phase{self.phase(epoch)}"
        return "all"

    def final(self, epoch: int) -> bool:
        """Whether epoch's model is the full (inference) model."""
        return not self.progressive or self.stage(epoch) == self.num_stages


def _make_plan(config: TrainConfig, model: KaryoModel) -> _Plan:
    can_grow = callable(getattr(model, "set_stage", None)) and hasattr(model, "num_stages")
    progressive = can_grow if config.progressive is None else bool(config.progressive)
    if progressive and not can_grow:
        raise ValueError(f"progressive growing needs a model with set_stage (e.g. pgunet_plus), not {config.arch!r}")
    has_encoder = any(True for _ in model.encoder_parameters())
    two_phase = bool(config.encoder_weights) if config.two_phase is None else bool(config.two_phase)
    if two_phase and not has_encoder:
        raise ValueError(f"two-phase training needs a model with an encoder (unet_sharp, hspnet), not {config.arch!r}")
    if progressive and two_phase:
        raise ValueError("progressive growing and two-phase training cannot be combined")
    if progressive:
        S = int(model.num_stages)  # type: ignore[attr-defined]
        eps = int(config.epochs_per_stage or math.ceil(config.epochs / S))
        sizes = stage_sizes(S, model.stage_input_size, config.tile_size)  # type: ignore[attr-defined]
        for s, t in enumerate(sizes, start=1):
            model.set_stage(s)  # type: ignore[attr-defined]
            if t % model.size_divisor:
                raise ValueError(
                    f"stage {s} input size {t} is not a multiple of {model.size_divisor}; "
                    f"use a tile_size that is a multiple of {model.size_divisor}"
                )
        model.set_stage(S)  # type: ignore[attr-defined]
        return _Plan(S * eps, True, S, eps, sizes, False, 0)
    if config.tile_size % model.size_divisor:
        raise ValueError(
            f"tile_size {config.tile_size} must be a multiple of {model.size_divisor} for {config.arch!r}"
        )
    p1 = int(config.phase1_epochs) if config.phase1_epochs is not None else max(1, config.epochs // 4)
    if two_phase and not 0 < p1 < config.epochs:
        raise ValueError(f"phase1_epochs must be in 1..epochs-1, got {p1} for {config.epochs} epochs")
    return _Plan(int(config.epochs), False, 1, int(config.epochs), [config.tile_size], two_phase, p1)


def _configure(model: KaryoModel, plan: _Plan, epoch: int, config: TrainConfig) -> list[dict[str, Any]]:
    """Put the model in the state of ``epoch`` and return its optimizer param groups."""
    wd = float(config.weight_decay)
    if plan.progressive:
        s = plan.stage(epoch)
        model.set_stage(s)  # type: ignore[attr-defined]
        groups = model.stage_param_groups(  # type: ignore[attr-defined]
            s, lr_old=config.stage_lr_old, lr_new=config.stage_lr_new
        )
        # Parameters of levels not active yet take no part (they get no gradient).
        return [dict(g, weight_decay=wd) for g in groups]
    if plan.two_phase:
        if plan.phase(epoch) == 1:
            model.freeze_batchnorm(False)
            model.set_encoder_trainable(False)
            params = [p for p in model.non_encoder_parameters() if p.requires_grad]
            return [{"params": params, "lr": float(config.lr), "weight_decay": wd, "name": "decoder"}]
        model.set_encoder_trainable(True)
        model.freeze_batchnorm(True)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = float(config.lr) * float(config.phase2_lr_factor)
        return [{"params": params, "lr": lr, "weight_decay": wd, "name": "all_but_bn"}]
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(config.lr),
             "weight_decay": wd, "name": "all"}]


def _make_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


def _resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()[None]
    t = F.interpolate(t, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return t[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def evaluate_samples(
    model: KaryoModel,
    samples: Sequence[Sample],
    tile_size: int = 256,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    normalizer: StainNormalizer | None = None,
    scale: float = 1.0,
    overlap: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Tiled inference + instances + :func:`all_metrics` on whole images.

    Args:
        scale: images are resampled by this factor before inference and the probabilities
            resampled back (validation of early PGU-net+ stages).

    Returns:
        (mean of every metric over images, per-image dicts with ``name`` and the metrics).
    """
    per_image: list[dict[str, Any]] = []
    ov = max(0, tile_size // 8) if overlap is None else overlap
    for s in samples:
        img = _rgb(s.image)
        H, W = img.shape[:2]
        if scale != 1.0:
            small = _resize_image(img, (max(1, round(H * scale)), max(1, round(W * scale))))
            probs = predict_probs(model, small, tile_size=tile_size, overlap=ov, batch_size=batch_size,
                                  device=device, normalizer=normalizer)
            probs = F.interpolate(torch.from_numpy(probs)[None], size=(H, W), mode="bilinear",
                                  align_corners=False)[0].numpy()
        else:
            probs = predict_probs(model, img, tile_size=tile_size, overlap=ov, batch_size=batch_size,
                                  device=device, normalizer=normalizer)
        inst = np.asarray(model.to_instances(probs), dtype=np.int32)
        m = all_metrics(inst, np.asarray(s.instances))
        per_image.append({"name": s.name, **{k: float(v) for k, v in m.items()}})
    keys = [k for k in per_image[0] if k != "name"] if per_image else []
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in keys}
    return mean, per_image


def _set_threads(n: int | None) -> int:
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    return prev


# ============================================================================ train
def train(
    config: TrainConfig,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample] = (),
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TrainResult:
    """Train ``config.arch`` on ``train_samples``; validate on ``val_samples``.

    Args:
        config: the run definition (``config.resume`` continues a run from its ``last.pt``).
        train_samples: annotated images (any sizes; grayscale is replicated to RGB).
        val_samples: whole images for per-epoch validation (may be empty: then ``best.pt``
            is the last epoch and early stopping is off).
        progress: called with event dicts — ``{"event": "start", ...}``, ``{"event":
            "step", "epoch", "epochs", "step", "steps", "loss", "progress"}``, ``{"event":
            "epoch", "epoch", "epochs", "train_loss", "train_parts", "val", "stage",
            "progress", ...}``, ``{"event": "end", "status", ...}``. ``progress`` is the
            fraction (0..1) of all optimizer steps done. Exceptions in it are logged, not
            raised.
        should_stop: polled before every step; when it returns True training stops at once
            (the epoch in progress is discarded: ``last.pt`` stays at the last completed
            epoch, ready to resume) and the result has status ``cancelled``.

    Returns:
        :class:`TrainResult`.

    Raises:
        DataError: no training images / bad samples.
        ValueError: inconsistent config (unknown arch, tile size not a multiple of the
            model's stride...).
        FileNotFoundError / CheckpointError: ``config.resume`` missing or corrupt.
        TrainingError: the loss became non-finite.
    """
    t_start = time.perf_counter()
    config.validate()
    train_samples = _clean_samples(train_samples, "training")
    val_samples = _clean_samples(val_samples, "validation")
    if not train_samples:
        raise DataError("no training images")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    device = pick_device(None if config.device in (None, "", "auto") else config.device)
    prev_threads = _set_threads(config.num_threads)
    try:
        return _train(config, train_samples, val_samples, progress, should_stop, out_dir, last_path,
                      best_path, device, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _train(
    config: TrainConfig,
    train_samples: list[Sample],
    val_samples: list[Sample],
    progress: ProgressFn | None,
    should_stop: StopFn | None,
    out_dir: Path,
    last_path: Path,
    best_path: Path,
    device: torch.device,
    t_start: float,
) -> TrainResult:
    from torch.utils.data import DataLoader

    from ml_worker.data import PatchDataset

    # ------------------------------------------------------------------ model / resume
    resume_state: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []
    if config.resume:
        model, meta = load_checkpoint(config.resume, map_location="cpu")
        if meta.get("arch") != config.arch:
            raise ValueError(
                f"cannot resume: {config.resume} is a {meta.get('arch')!r} run, config says {config.arch!r}"
            )
        resume_state = meta.get("train_state")
        if not isinstance(resume_state, dict):
            raise TrainingError(f"{config.resume} has no training state (resume from a last.pt)")
        history = list(meta.get("history") or [])
        normalizer = normalizer_from_dict(meta["stain"]) if meta.get("stain") else None
        if normalizer is not None and normalizer.name == "none":
            normalizer = None
    else:
        torch.manual_seed(int(config.seed))
        kwargs = dict(config.model_kwargs)
        if config.encoder_weights:
            kwargs["encoder_weights"] = config.encoder_weights
        try:
            model = create_model(config.arch, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad model_kwargs for {config.arch!r}: {e}") from e
        if config.init_weights:
            _warm_start(model, config.init_weights, config.arch)
        normalizer = _fit_normalizer(config.stain_norm, train_samples)
    stain_dict = normalizer.to_dict() if normalizer is not None else None
    plan = _make_plan(config, model)
    model.to(device)

    # ------------------------------------------------------------------ data
    tile = int(config.tile_size)
    bs = int(config.batch_size)
    dataset = PatchDataset(
        train_samples,
        tile_size=tile,
        augment=config.augment,
        normalizer=normalizer,
        length=None,
        seed=int(config.seed),
        foreground_bias=float(config.foreground_bias),
    )
    n_patches = int(config.steps_per_epoch or len(dataset))
    n_steps = max(1, math.ceil(n_patches / bs))
    dataset.length = n_steps * bs  # whole batches only (BatchNorm needs > 1 sample)
    loader_kwargs: dict[str, Any] = {"batch_size": bs, "shuffle": False, "drop_last": True,
                                     "num_workers": int(config.num_workers)}
    if config.num_workers:
        loader_kwargs["persistent_workers"] = False
    if device.type == "cuda":
        loader_kwargs["pin_memory"] = True
    loader = DataLoader(dataset, **loader_kwargs)

    # ------------------------------------------------------------------ state
    start_epoch = 0
    best_score: float | None = None
    best_epoch: int | None = None
    best_metrics: dict[str, float] = {}
    bad_epochs = 0
    optimizer: torch.optim.Optimizer | None = None
    opt_key: str | None = None
    opt_name = (config.optimizer or ("rmsprop" if plan.progressive else "adam")).lower()
    if resume_state is not None:
        start_epoch = int(resume_state["epoch"])
        best_score = resume_state.get("best_score")
        best_epoch = resume_state.get("best_epoch")
        best_metrics = dict(resume_state.get("best_metrics") or {})
        bad_epochs = int(resume_state.get("bad_epochs", 0))
        if resume_state.get("rng") is not None:
            torch.set_rng_state(resume_state["rng"])
        if start_epoch < plan.total_epochs and resume_state.get("opt_key") == plan.key(start_epoch):
            groups = _configure(model, plan, start_epoch, config)
            optimizer = _make_optimizer(opt_name, groups)
            optimizer.load_state_dict(resume_state["optimizer"])
            opt_key = plan.key(start_epoch)
        if resume_state.get("stopped") == "early_stopped":
            start_epoch = plan.total_epochs  # nothing left to do
        # The resumed run may live in a new folder: bring its best.pt along.
        src_best = Path(config.resume).with_name("best.pt")
        if best_epoch is not None and not best_path.exists() and src_best.is_file():
            shutil.copyfile(src_best, best_path)

    total_steps = plan.total_epochs * n_steps
    patience = int(config.early_stopping_patience or 0)
    has_val = bool(val_samples)
    status = "completed"
    _emit(progress, {
        "event": "start", "arch": config.arch, "epochs": plan.total_epochs, "start_epoch": start_epoch,
        "steps_per_epoch": n_steps, "batch_size": bs, "n_train": len(train_samples), "n_val": len(val_samples),
        "parameters": model.num_parameters(), "device": str(device), "progressive": plan.progressive,
        "two_phase": plan.two_phase, "progress": start_epoch / max(plan.total_epochs, 1),
    })

    def base_extra() -> dict[str, Any]:
        return {"config": config.to_dict(), "history": history, "stain": stain_dict}

    epoch = start_epoch
    for epoch in range(start_epoch, plan.total_epochs):
        t_epoch = time.perf_counter()
        key = plan.key(epoch)
        if key != opt_key or optimizer is None:
            optimizer = _make_optimizer(opt_name, _configure(model, plan, epoch, config))
            opt_key = key
        else:
            _configure_model_only(model, plan, epoch)
        size = plan.size(epoch, tile)
        stage = plan.stage(epoch)
        dataset.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        n_done = 0
        cancelled = False
        for step, batch in enumerate(loader):
            if should_stop is not None and should_stop():
                cancelled = True
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if size != tile:
                batch = _resample_batch(batch, size)
            outputs = model.forward_train(batch["image"])
            loss, parts = model.compute_loss(outputs, batch, config.loss)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                    f"try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.grad_clip))
            optimizer.step()
            n_done += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            done = epoch * n_steps + step + 1
            _emit(progress, {
                "event": "step", "epoch": epoch + 1, "epochs": plan.total_epochs, "step": step + 1,
                "steps": n_steps, "loss": float(parts.get("loss", float(loss.detach()))),
                "stage": stage, "progress": done / total_steps,
            })
        if cancelled or (should_stop is not None and should_stop()):
            status = "cancelled"
            break
        train_parts = {k: v / max(n_done, 1) for k, v in sums.items()}
        train_loss = train_parts.get("loss", float("nan"))

        # -------------------------------------------------------------- validation
        final = plan.final(epoch)
        is_last = epoch + 1 == plan.total_epochs
        val: dict[str, float] = {}
        if has_val and ((epoch + 1) % int(config.val_every) == 0 or is_last):
            val, _ = evaluate_samples(
                model, val_samples, tile_size=tile, batch_size=bs, device=device, normalizer=normalizer,
                scale=size / tile,
            )
        record = {
            "epoch": epoch + 1, "train_loss": train_loss, "train_parts": train_parts, "val": val,
            "stage": stage, "phase": plan.phase(epoch), "input_size": size,
            "lr": [float(g["lr"]) for g in optimizer.param_groups], "time_s": time.perf_counter() - t_epoch,
        }
        history.append(record)

        improved = False
        if final:
            if has_val and val:
                score = float(val["dice"])
                if best_score is None or score > best_score:
                    best_score, best_epoch, best_metrics, improved = score, epoch + 1, val, True
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            elif not has_val:
                best_epoch, best_metrics, improved = epoch + 1, {}, True
        stop_early = bool(final and has_val and patience and bad_epochs >= patience and not is_last)

        stage_now = getattr(model, "stage", None)
        if improved:
            # best.pt is the full model: for PGU-net+ this is only reached at the last stage.
            save_checkpoint(best_path, model, **base_extra(), metrics=best_metrics, epoch=epoch + 1,
                            stage=stage_now)
        train_state = {
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "opt_key": opt_key,
            "rng": torch.get_rng_state(), "best_score": best_score, "best_epoch": best_epoch,
            "best_metrics": best_metrics, "bad_epochs": bad_epochs,
            "stopped": "early_stopped" if stop_early else None,
        }
        save_checkpoint(last_path, model, **base_extra(), metrics=val, epoch=epoch + 1, stage=stage_now,
                        train_state=train_state)
        _emit(progress, {
            "event": "epoch", "epoch": epoch + 1, "epochs": plan.total_epochs, "train_loss": train_loss,
            "train_parts": train_parts, "val": val, "stage": stage, "phase": plan.phase(epoch),
            "input_size": size, "best_epoch": best_epoch, "best_score": best_score, "improved": improved,
            "time_s": record["time_s"], "progress": (epoch + 1) / plan.total_epochs,
        })
        if stop_early:
            status = "early_stopped"
            break

    if resume_state is not None and resume_state.get("stopped") == "early_stopped":
        status = "early_stopped"
    epochs_completed = len(history)
    elapsed = time.perf_counter() - t_start
    _emit(progress, {"event": "end", "status": status, "epochs_completed": epochs_completed,
                     "best_epoch": best_epoch, "best_score": best_score, "elapsed_s": elapsed,
                     "progress": 1.0 if status != "cancelled" else epochs_completed / max(plan.total_epochs, 1)})
    return TrainResult(
        status=status,
        epochs_completed=epochs_completed,
        best_epoch=best_epoch,
        best_score=best_score,
        best_metrics=best_metrics,
        history=history,
        best_path=str(best_path) if best_path.exists() else None,
        last_path=str(last_path) if last_path.exists() else None,
        config=config.to_dict(),
        elapsed_s=elapsed,
    )


def _warm_start(model: KaryoModel, path: str, arch: str) -> None:
    """Copy the weights of checkpoint ``path`` into ``model`` where names and shapes match."""
    src, meta = load_checkpoint(path, map_location="cpu")
    if meta.get("arch") != arch:
        raise ValueError(f"cannot warm-start {arch!r} from {path}: it holds a {meta.get('arch')!r} model")
    own = model.state_dict()
    fitting = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
    if not any(k in fitting for k, _ in model.named_parameters()):
        raise ValueError(f"cannot warm-start from {path}: no weights fit the model (different width?)")
    skipped = len(own) - len(fitting)
    if skipped:
        log.warning("warm start from %s: %d of %d tensors did not fit and keep their initialisation",
                    path, skipped, len(own))
    model.load_state_dict(fitting, strict=False)


def _configure_model_only(model: KaryoModel, plan: _Plan, epoch: int) -> None:
    """Model state of ``epoch`` when the optimizer is reused (same key)."""
    if plan.progressive:
        model.set_stage(plan.stage(epoch))  # type: ignore[attr-defined]


def _resample_batch(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Progressive growing: image (area) and instance maps (nearest) down to ``size``."""
    image = F.interpolate(batch["image"], size=(size, size), mode="area")
    inst = F.interpolate(batch["instances"][:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return {"image": image, "mask": (inst > 0).long(), "instances": inst}


def train_from_folder(
    config: TrainConfig,
    data_dir: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TrainResult:
    """:func:`ml_worker.data.load_folder` + :func:`split_by_image` (``config.val_fraction``,
    ``config.split_seed``) + :func:`train`."""
    samples = load_folder(data_dir)
    train_s, val_s = split_by_image(samples, config.val_fraction, seed=int(config.split_seed))
    return train(config, train_s, val_s, progress=progress, should_stop=should_stop)


def load_for_inference(
    checkpoint_path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[KaryoModel, StainNormalizer | None, dict[str, Any]]:
    """Load a checkpoint written by :func:`train` for prediction.

    Returns:
        ``(model, normalizer, meta)``: the full model in eval mode (PGU-net+ at its last
        stage), the fitted stain normaliser (None when training used none) and the
        checkpoint metadata (``config``, ``history``, ``metrics``, ...). Pass
        ``meta["config"]["tile_size"]`` as the inference tile size.

    Raises:
        FileNotFoundError: no file.
        CheckpointError: corrupt file / unknown architecture / mismatched weights.
    """
    model, meta = load_checkpoint(checkpoint_path, map_location=map_location)
    if callable(getattr(model, "set_stage", None)) and hasattr(model, "num_stages"):
        model.set_stage(int(model.num_stages))  # type: ignore[attr-defined]
    normalizer: StainNormalizer | None = None
    if meta.get("stain"):
        normalizer = normalizer_from_dict(meta["stain"])
        if normalizer.name == "none":
            normalizer = None
    model.eval()
    return model, normalizer, meta
