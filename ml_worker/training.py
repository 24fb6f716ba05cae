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
* **Learning rate** (``ml_worker.schedule``): linear warm-up, then constant, cosine or step decay,
  applied every step to each parameter group's own base rate.
* **What is validated and exported** (``ml_worker.stabilize``): the EMA of the weights when
  ``ema_decay`` is set, with BatchNorm statistics recomputed over training patches
  (``bn_recalibrate``, on by default); the optimised weights themselves go to ``last.pt`` only.

Inputs: the run fits one :class:`~ml_worker.data.Preprocessing` (stain normaliser + per-channel
statistics of the training images) used for the training patches, validation and, through the
checkpoint's ``preprocess`` entry, every later prediction.

Code layout: :mod:`ml_worker.train_config` (what defines a run), :mod:`ml_worker.schedule`
(stages, phases, optimizers, learning rates), :mod:`ml_worker.stabilize` (EMA, precise BN), this
module (the loop: :class:`_Run`).

Checkpoints carry the model (name, constructor kwargs, weights), ``config`` (the
:class:`TrainConfig` as a dict), ``history`` (per-epoch metrics), ``metrics`` (validation
metrics of that checkpoint's epoch), ``stain`` (the fitted stain normaliser), ``preprocess``
(:meth:`Preprocessing.to_dict`), ``stage`` and,
in ``last.pt``, ``train_state`` (optimizer state, epoch, torch RNG, best score,
early-stopping counter, the weight average). Resuming from ``last.pt`` continues at the next epoch and
reproduces the uninterrupted run (patches depend only on (seed, epoch, index); the RNG and
optimizer state are restored).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ml_worker.checkpoint import load_checkpoint, save_checkpoint
from ml_worker.data import DataError, Preprocessing, Sample, load_folder, split_by_image
from ml_worker.inference import pick_device, predict_probs
from ml_worker.instances import class_map, instance_classes
from ml_worker.metrics import all_metrics, typed_panoptic_quality
from ml_worker.models import KaryoModel, create_model
from ml_worker.stain import StainNormalizer, make_normalizer, normalizer_from_dict, tissue_mask
from ml_worker.schedule import (
    apply_lr,
    configure,
    configure_model_only,
    lr_factor,
    make_optimizer,
    make_plan,
    stage_sizes,
)
from ml_worker.stabilize import WeightEMA, recalibrate_batchnorm_on, swapped_state
from ml_worker.train_config import OPTIMIZERS, STAIN_NORMS, TrainConfig, TrainingError, TrainResult

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
    "STAIN_NORMS",
]

log = logging.getLogger(__name__)


ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]


# ============================================================================ helpers
def _rgb(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DataError(f"expected an (H, W, 3) or (H, W) image, got shape {a.shape}")
    return a if a.dtype == np.uint8 else np.clip(a, 0, 255).astype(np.uint8)


def _typed(config: TrainConfig, samples: list[Sample]) -> list[Sample]:
    """Samples as the run sees them: class maps dropped for a binary run, checked against the
    class list for a typed one."""
    if not config.classes:
        return [Sample(s.name, s.image, s.instances) if s.classes is not None else s for s in samples]
    k = len(config.classes)
    for s in samples:
        if s.classes is not None and int(np.asarray(s.classes).max(initial=0)) > k:
            raise DataError(f"sample {s.name!r} has class id {int(np.asarray(s.classes).max())}, "
                            f"but the run has {k} classes")
    return samples


def _clean_samples(samples: Sequence[Sample], what: str) -> list[Sample]:
    out = []
    for s in samples:
        img = _rgb(s.image)
        inst = np.asarray(s.instances)
        if img.shape[:2] != inst.shape:
            raise DataError(f"{what} sample {s.name!r}: image {img.shape[:2]} and mask {inst.shape} differ")
        classes = None if s.classes is None else np.asarray(s.classes)
        if classes is not None and classes.shape != inst.shape:
            raise DataError(f"{what} sample {s.name!r}: class map {classes.shape} and mask {inst.shape} differ")
        out.append(Sample(s.name, img, inst.astype(np.int32, copy=False), classes))
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
        m: dict[str, Any] = {k: float(v) for k, v in all_metrics(inst, np.asarray(s.instances)).items()}
        k_classes = int(getattr(model, "num_classes", 2)) - 1
        if s.classes is not None and k_classes > 1 and _is_softmax(model):
            cls_probs = model.class_probabilities(probs)
            classes, _ = instance_classes(inst, cls_probs)
            pred_cls = class_map(inst, classes)
            true_cls = class_map(s.instances, s.instance_classes())
            t = typed_panoptic_quality(inst, pred_cls, np.asarray(s.instances), true_cls, k_classes)
            m["mpq"], m["bpq"] = t["mpq"], t["bpq"]
            m.update({f"pq_class{c}": v for c, v in t["per_class"].items()})
        per_image.append({"name": s.name, **m})
    keys = sorted({k for p in per_image for k in p if k != "name"}, key=lambda k: (k.startswith("pq_class"), k))
    # nanmean: a class absent from an image (nan) does not count for that image (PanNuke).
    mean = {}
    for k in keys:
        vals = [p[k] for p in per_image if k in p and not math.isnan(p[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    return mean, per_image


def _is_softmax(model: KaryoModel) -> bool:
    return type(model).activation is KaryoModel.activation


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
    train_samples = _typed(config, _clean_samples(train_samples, "training"))
    val_samples = _typed(config, _clean_samples(val_samples, "validation"))
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
    run = _Run(config, train_samples, val_samples, progress, should_stop, last_path, best_path, device)
    status = run.loop()
    elapsed = time.perf_counter() - t_start
    epochs_completed = len(run.history)
    _emit(progress, {"event": "end", "status": status, "epochs_completed": epochs_completed,
                     "best_epoch": run.best_epoch, "best_score": run.best_score, "elapsed_s": elapsed,
                     "progress": 1.0 if status != "cancelled" else epochs_completed / max(run.plan.total_epochs, 1)})
    return TrainResult(
        status=status,
        epochs_completed=epochs_completed,
        best_epoch=run.best_epoch,
        best_score=run.best_score,
        best_metrics=run.best_metrics,
        history=run.history,
        best_path=str(best_path) if best_path.exists() else None,
        last_path=str(last_path) if last_path.exists() else None,
        config=config.to_dict(),
        elapsed_s=elapsed,
    )


def _build_model(config: TrainConfig) -> KaryoModel:
    torch.manual_seed(int(config.seed))
    kwargs = dict(config.model_kwargs)
    if config.classes:
        from ml_worker.models import MODELS, KaryoModel as _Base

        if MODELS[config.arch].activation is not _Base.activation:
            raise ValueError(f"{config.arch!r} predicts no nucleus classes; train it without classes "
                             f"or choose a softmax architecture")
        kwargs["num_classes"] = len(config.classes) + 1
    if config.encoder_weights:
        kwargs["encoder_weights"] = config.encoder_weights
    try:
        model = create_model(config.arch, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad model_kwargs for {config.arch!r}: {e}") from e
    if config.init_weights:
        _warm_start(model, config.init_weights, config.arch)
    return model


def _fit_preprocessing(config: TrainConfig, train_samples: Sequence[Sample]) -> Preprocessing:
    stain = _fit_normalizer(config.stain_norm, train_samples)
    if str(config.input_norm).lower() == "image":
        return Preprocessing(stain)
    return Preprocessing.fit([s.image for s in train_samples], stain)


def _preprocessing_from_meta(meta: dict[str, Any]) -> Preprocessing:
    if meta.get("preprocess"):
        return Preprocessing.from_dict(meta["preprocess"])
    stain = normalizer_from_dict(meta["stain"]) if meta.get("stain") else None
    return Preprocessing(None if stain is None or stain.name == "none" else stain)


class _Run:
    """One call of :func:`train`: model, data, optimizer, schedule and bookkeeping; ``loop``
    runs the remaining epochs and returns the status."""

    def __init__(self, config: TrainConfig, train_samples: list[Sample], val_samples: list[Sample],
                 progress: ProgressFn | None, should_stop: StopFn | None, last_path: Path, best_path: Path,
                 device: torch.device) -> None:
        self.config = config
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.progress = progress
        self.should_stop = should_stop
        self.last_path, self.best_path = last_path, best_path
        self.device = device
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.bad_epochs = 0
        self.start_epoch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.opt_key: str | None = None
        self.ema: WeightEMA | None = None
        self._bn_datasets: dict[int, Any] = {}
        resume_state = self._load_or_build()
        self.plan = make_plan(config, self.model)
        self.model.to(device)
        if config.ema_decay:
            self.ema = WeightEMA(self.model, float(config.ema_decay))
        self._build_loader()
        self.opt_name = (config.optimizer or ("rmsprop" if self.plan.progressive else "adam")).lower()
        self.resumed_early_stop = False
        if resume_state is not None:
            self._restore(resume_state)

    # ------------------------------------------------------------------ set-up
    def _load_or_build(self) -> dict[str, Any] | None:
        config = self.config
        if not config.resume:
            self.model = _build_model(config)
            self.prep = _fit_preprocessing(config, self.train_samples)
            return None
        model, meta = load_checkpoint(config.resume, map_location="cpu")
        if meta.get("arch") != config.arch:
            raise ValueError(f"cannot resume: {config.resume} is a {meta.get('arch')!r} run, config says {config.arch!r}")
        resume_state = meta.get("train_state")
        if not isinstance(resume_state, dict):
            raise TrainingError(f"{config.resume} has no training state (resume from a last.pt)")
        self.model = model
        self.history = list(meta.get("history") or [])
        self.prep = _preprocessing_from_meta(meta)
        return resume_state

    def _build_loader(self) -> None:
        from torch.utils.data import DataLoader

        from ml_worker.data import PatchDataset

        config = self.config
        self.tile, self.bs = int(config.tile_size), int(config.batch_size)
        self.dataset = PatchDataset(self.train_samples, tile_size=self.tile, augment=config.augment,
                                    normalizer=self.prep, length=None, seed=int(config.seed),
                                    foreground_bias=float(config.foreground_bias))
        n_patches = int(config.steps_per_epoch or len(self.dataset))
        self.n_steps = max(1, math.ceil(n_patches / self.bs))
        self.dataset.length = self.n_steps * self.bs  # whole batches only (BatchNorm needs > 1 sample)
        kw: dict[str, Any] = {"batch_size": self.bs, "shuffle": False, "drop_last": True,
                              "num_workers": int(config.num_workers)}
        if config.num_workers:
            kw["persistent_workers"] = False
        if self.device.type == "cuda":
            kw["pin_memory"] = True
        self.loader = DataLoader(self.dataset, **kw)

    def _restore(self, state: dict[str, Any]) -> None:
        self.start_epoch = int(state["epoch"])
        self.best_score = state.get("best_score")
        self.best_epoch = state.get("best_epoch")
        self.best_metrics = dict(state.get("best_metrics") or {})
        self.bad_epochs = int(state.get("bad_epochs", 0))
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.start_epoch < self.plan.total_epochs and state.get("opt_key") == self.plan.key(self.start_epoch):
            self.optimizer = make_optimizer(self.opt_name, configure(self.model, self.plan, self.start_epoch, self.config))
            self.optimizer.load_state_dict(state["optimizer"])
            self.opt_key = self.plan.key(self.start_epoch)
        if state.get("stopped") == "early_stopped":
            self.start_epoch = self.plan.total_epochs  # nothing left to do
            self.resumed_early_stop = True
        # The resumed run may live in a new folder: bring its best.pt along.
        src_best = Path(self.config.resume).with_name("best.pt")  # type: ignore[arg-type]
        if self.best_epoch is not None and not self.best_path.exists() and src_best.is_file():
            shutil.copyfile(src_best, self.best_path)

    def _extra(self) -> dict[str, Any]:
        stain = self.prep.stain.to_dict() if self.prep.stain is not None else None
        return {"config": self.config.to_dict(), "history": self.history, "stain": stain,
                "preprocess": self.prep.to_dict(), "classes": list(self.config.classes or [])}

    # ------------------------------------------------------------------ the loop
    def loop(self) -> str:
        plan, config = self.plan, self.config
        _emit(self.progress, {
            "event": "start", "arch": config.arch, "epochs": plan.total_epochs, "start_epoch": self.start_epoch,
            "steps_per_epoch": self.n_steps, "batch_size": self.bs, "n_train": len(self.train_samples),
            "n_val": len(self.val_samples), "parameters": self.model.num_parameters(), "device": str(self.device),
            "progressive": plan.progressive, "two_phase": plan.two_phase,
            "progress": self.start_epoch / max(plan.total_epochs, 1),
        })
        status = "early_stopped" if self.resumed_early_stop else "completed"
        for epoch in range(self.start_epoch, plan.total_epochs):
            t_epoch = time.perf_counter()
            parts = self._train_epoch(epoch)
            if parts is None or (self.should_stop is not None and self.should_stop()):
                return "cancelled"
            if self._end_epoch(epoch, parts, time.perf_counter() - t_epoch):
                return "early_stopped"
        return status

    def _train_epoch(self, epoch: int) -> dict[str, float] | None:
        """One epoch of optimizer steps; the mean loss parts, or None when cancelled."""
        plan, config, model = self.plan, self.config, self.model
        key = plan.key(epoch)
        if key != self.opt_key or self.optimizer is None:
            self.optimizer = make_optimizer(self.opt_name, configure(model, plan, epoch, config))
            self.opt_key = key
        else:
            configure_model_only(model, plan, epoch)
        optimizer = self.optimizer
        size = plan.size(epoch, self.tile)
        self.dataset.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = {}
        n_done = 0
        total_steps = plan.total_epochs * self.n_steps
        for step, batch in enumerate(self.loader):
            if self.should_stop is not None and self.should_stop():
                return None
            apply_lr(optimizer, lr_factor(config, plan, epoch, step, self.n_steps))
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            if size != self.tile:
                batch = _resample_batch(batch, size)
            outputs = model.forward_train(batch["image"])
            loss, loss_parts = model.compute_loss(outputs, batch, config.loss)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step + 1}; "
                                    f"try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.grad_clip))
            optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            n_done += 1
            for k, v in loss_parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            _emit(self.progress, {
                "event": "step", "epoch": epoch + 1, "epochs": plan.total_epochs, "step": step + 1,
                "steps": self.n_steps, "loss": float(loss_parts.get("loss", float(loss.detach()))),
                "stage": plan.stage(epoch), "progress": (epoch * self.n_steps + step + 1) / total_steps,
            })
        return {k: v / max(n_done, 1) for k, v in sums.items()}

    def _bn_dataset(self, size: int) -> Any:
        """The un-augmented patches precise BN reads at input ``size``, built once per size (it
        stain-normalises and measures every training image)."""
        from ml_worker.data import PatchDataset

        cache = self._bn_datasets
        if size not in cache:
            # Never more patches than an epoch trains on: short runs (tests, tiny budgets) would
            # otherwise spend more time recalibrating than training.
            n = min(int(self.config.bn_recalibrate_patches), max(2 * self.bs, self.n_steps * self.bs))
            cache[size] = PatchDataset(self.train_samples, tile_size=size, augment=None, normalizer=self.prep,
                                       length=n, seed=int(self.config.seed))
        return cache[size]

    def _evaluated_state(self, epoch: int) -> dict[str, torch.Tensor] | None:
        """The weights that are validated and exported: the EMA (when on) with precise-BN
        statistics (when on); None = the model as it is."""
        config, model = self.config, self.model
        if self.ema is None and not config.bn_recalibrate:
            return None
        with swapped_state(model, self.ema.state if self.ema is not None else None):
            if config.bn_recalibrate:
                ds = self._bn_dataset(self.plan.size(epoch, self.tile))
                ds.seed = int(config.seed) + epoch  # new patches each epoch, as a fresh dataset would draw
                recalibrate_batchnorm_on(model, ds, batch_size=self.bs, device=self.device)
            return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _end_epoch(self, epoch: int, train_parts: dict[str, float], seconds: float) -> bool:
        """Validate, record, checkpoint; True when training should stop early."""
        plan, config, model = self.plan, self.config, self.model
        assert self.optimizer is not None
        size = plan.size(epoch, self.tile)
        final, is_last = plan.final(epoch), epoch + 1 == plan.total_epochs
        has_val = bool(self.val_samples)
        evaluated: dict[str, torch.Tensor] | None = None
        val: dict[str, float] = {}
        if has_val and ((epoch + 1) % int(config.val_every) == 0 or is_last):
            evaluated = self._evaluated_state(epoch)
            with swapped_state(model, evaluated):
                val, _ = evaluate_samples(model, self.val_samples, tile_size=self.tile, batch_size=self.bs,
                                          device=self.device, normalizer=self.prep, scale=size / self.tile)
        train_loss = train_parts.get("loss", float("nan"))
        record = {
            "epoch": epoch + 1, "train_loss": train_loss, "train_parts": train_parts, "val": val,
            "stage": plan.stage(epoch), "phase": plan.phase(epoch), "input_size": size,
            "lr": [float(g["lr"]) for g in self.optimizer.param_groups], "time_s": seconds,
        }
        self.history.append(record)
        improved = False
        if final:
            if has_val and val:
                score = float(val["dice"])
                if self.best_score is None or score > self.best_score:
                    self.best_score, self.best_epoch, self.best_metrics, improved = score, epoch + 1, val, True
                    self.bad_epochs = 0
                else:
                    self.bad_epochs += 1
            elif not has_val:
                self.best_epoch, self.best_metrics, improved = epoch + 1, {}, True
        patience = int(config.early_stopping_patience or 0)
        stop_early = bool(final and has_val and patience and self.bad_epochs >= patience and not is_last)
        stage_now = getattr(model, "stage", None)
        if improved:
            # best.pt is the full model (PGU-net+: only at the last stage), as validated.
            if evaluated is None:
                evaluated = self._evaluated_state(epoch)
            with swapped_state(model, evaluated):
                save_checkpoint(self.best_path, model, **self._extra(), metrics=self.best_metrics,
                                epoch=epoch + 1, stage=stage_now)
        train_state = {
            "epoch": epoch + 1, "optimizer": self.optimizer.state_dict(), "opt_key": self.opt_key,
            "rng": torch.get_rng_state(), "best_score": self.best_score, "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics, "bad_epochs": self.bad_epochs,
            "stopped": "early_stopped" if stop_early else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        save_checkpoint(self.last_path, model, **self._extra(), metrics=val, epoch=epoch + 1, stage=stage_now,
                        train_state=train_state)
        _emit(self.progress, {
            "event": "epoch", "epoch": epoch + 1, "epochs": plan.total_epochs, "train_loss": train_loss,
            "train_parts": train_parts, "val": val, "stage": plan.stage(epoch), "phase": plan.phase(epoch),
            "input_size": size, "best_epoch": self.best_epoch, "best_score": self.best_score, "improved": improved,
            "time_s": seconds, "progress": (epoch + 1) / plan.total_epochs,
        })
        return stop_early


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


def _resample_batch(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Progressive growing: image (area) and instance maps (nearest) down to ``size``."""
    image = F.interpolate(batch["image"], size=(size, size), mode="area")
    inst = F.interpolate(batch["instances"][:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    mask = F.interpolate(batch["mask"][:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return {"image": image, "mask": mask, "instances": inst}


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
        stage), the run's :class:`~ml_worker.data.Preprocessing` (stain normaliser + input
        statistics; for checkpoints written before it existed, the stain normaliser or None)
        and the
        checkpoint metadata (``config``, ``history``, ``metrics``, ...). Pass
        ``meta["config"]["tile_size"]`` as the inference tile size.

    Raises:
        FileNotFoundError: no file.
        CheckpointError: corrupt file / unknown architecture / mismatched weights.
    """
    model, meta = load_checkpoint(checkpoint_path, map_location=map_location)
    if callable(getattr(model, "set_stage", None)) and hasattr(model, "num_stages"):
        model.set_stage(int(model.num_stages))  # type: ignore[attr-defined]
    normalizer: Preprocessing | StainNormalizer | None
    if meta.get("preprocess"):
        normalizer = Preprocessing.from_dict(meta["preprocess"])
    else:  # written before the input statistics were stored: stain only, per-image z-score
        normalizer = normalizer_from_dict(meta["stain"]) if meta.get("stain") else None
        if normalizer is not None and normalizer.name == "none":
            normalizer = None
    model.eval()
    return model, normalizer, meta
