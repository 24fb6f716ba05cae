"""The long-running work behind the Celery tasks: training, prediction, ranking.

These run in the worker process. They take ids, pull pixels and masks from storage, call
``ml_worker`` (which knows nothing of Django), and write results back with
``StagedWrites`` so a crash leaves no half-written rows or files.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Max
from django.utils import timezone

from backend.common.storage import StagedWrites, encode_png, read_bytes
from backend.images.models import Tile
from backend.images.pixels import read_tile_rgb
from backend.projects.models import Project
from ml_worker import catalog

from . import coldstart, events, ssl
from .context_prediction import ContextPredictor, OwnedPrediction
from .lifecycle import Heartbeat, claim
from .models import ModelStatus, ModelVersion, Prediction, QueueEntry, RunStatus, TrainingRun
from .services import after_promotion, gate, promote, replace_queue, unlabelled_tiles
from .signals import queue_ranked

log = logging.getLogger(__name__)
# Set by the worker's shutdown signal (tasks.py): a training run stops at its next step and is failed
# with a reason, instead of holding Ctrl-C for minutes or being left `running`.
WORKER_STOPPING = threading.Event()
STOPPED_BY_SHUTDOWN = "Karyo's worker was stopped during training (shut down or restarted); start the run again"
_model_cache: dict[str, tuple[Any, Any, dict]] = {}


def runs_dir() -> Path:
    path = Path(settings.VAR_DIR) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_classes(project: Project) -> list[dict]:
    """The nucleus classes a model of ``project`` learns, in model order (model class i+1 =
    entry i): the project's classes when it has more than one, else none (a binary model)."""
    classes = list(project.nucleus_classes or [])
    if len(classes) < 2:
        return []
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in classes]


def class_map(instances: np.ndarray, classes: dict | None, *, model_ids: dict[int, int]) -> np.ndarray:
    """Per-pixel model class ids (1..K, 0 = background) of a label map whose nuclei have project
    class ids ``classes`` (instance id -> class id); a nucleus without one, or with a class the
    model does not know, gets the project's first class (as the editor shows it)."""
    n = int(instances.max(initial=0))
    default = min(model_ids.values())
    lut = np.full(n + 1, default, np.uint8)
    lut[0] = 0
    for label, class_id in (classes or {}).items():
        if str(label).isdigit() and 0 < int(label) <= n:
            lut[int(label)] = model_ids.get(int(class_id), default)
    return lut[instances]


def load_samples(*, project: Project) -> tuple[list, list]:
    """The image-level truth of the project's annotated regions, as ml_worker Samples split by the
    frozen split (``training_data.image_samples``): per image, the rectangles its tiles with an
    accepted version cover, with the image's stitched nuclei (whole across tile borders); pixels
    outside them are in no sample. In a project with several nucleus classes each sample carries
    its per-pixel class map (model class ids of :func:`model_classes`)."""
    from .training_data import image_samples

    typed = model_classes(project)
    model_ids = {c["id"]: i for i, c in enumerate(typed, start=1)}
    return image_samples(project=project, model_ids=model_ids if typed else None)


def learns_classes(architecture: str) -> bool:
    """Does the architecture predict nucleus classes (a softmax over background + K classes)?"""
    from ml_worker.models import MODELS, KaryoModel

    return MODELS[architecture].activation is KaryoModel.activation


def untyped(samples: list) -> list:
    from ml_worker.data import Sample

    return [Sample(s.name, s.image, s.instances) for s in samples]


def typed_metrics(metrics: dict, classes: list[dict]) -> dict:
    """The engine's per-class PQ (``pq_class<i>``, model class i) also as ``per_class_pq``
    keyed by the project's class names; unchanged for a binary model."""
    per_class = {}
    for i, c in enumerate(classes, start=1):
        if f"pq_class{i}" in metrics:
            per_class[c["name"]] = metrics[f"pq_class{i}"]
    return {**metrics, "per_class_pq": per_class} if per_class else metrics


def _finite(value):
    """NaN/inf -> None, recursively (a class absent from the validation tiles has no PQ; JSON
    columns refuse NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def load_model(model_version: ModelVersion):
    """(model, normalizer, meta) for a stored version; cached per worker process."""
    from ml_worker.training import load_for_inference

    # Keyed by creation time too (as a run's folder): ids restart with a new database (or a rolled
    # back test), and a model cached for another version with the same id must not be predicted with.
    key = f"{model_version.pk}-{model_version.created_at:%Y%m%dT%H%M%S%f}"
    cached = _model_cache.get(key)
    if cached is not None:
        return cached
    local = runs_dir() / "cache" / f"model-{key}.pt"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(".part")
        tmp.write_bytes(read_bytes(model_version.weights.name))
        tmp.replace(local)
    loaded = load_for_inference(local)
    _model_cache.clear()  # one model in memory at a time: the worker's memory is bounded
    _model_cache[key] = loaded
    return loaded


def run_training(*, run_id: int, task_id: str = "") -> str:
    run = claim(TrainingRun, run_id, task_id, related=("project", "warm_start"))
    if run is None:
        return "skipped"
    project = run.project
    # Keyed by creation time too: ids restart with a new database, and a stale last.pt must not be resumed.
    out_dir = runs_dir() / f"run-{run.pk}-{run.created_at:%Y%m%dT%H%M%S%f}"
    events.record(project.pk, "run.started", f"training run {run.pk} started", run=run.pk)
    last_check = [0.0, False]

    def should_stop() -> bool:
        if WORKER_STOPPING.is_set():
            return True
        if time.monotonic() - last_check[0] > 1.0:
            last_check[0] = time.monotonic()
            last_check[1] = TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists()
        return last_check[1]

    def progress(event: dict) -> None:
        if event.get("event") == "epoch":
            entry = {k: v for k, v in event.items() if k != "event"}
            current = TrainingRun.objects.get(pk=run.pk)
            TrainingRun.objects.filter(pk=run.pk).update(
                epoch_metrics=[*current.epoch_metrics, entry], progress=float(event.get("progress", 0.0)),
                heartbeat_at=timezone.now(),
            )
            events.publish(project.pk, "run.epoch", run=run.pk, **entry)
        elif event.get("event") == "step":
            events.publish(project.pk, "run.step", run=run.pk, **{k: v for k, v in event.items() if k != "event"})

    try:
        # The heartbeat covers gating and storing too: a worker killed at any moment of the run
        # leaves a stale heartbeat that fail_stale_runs notices, and a slow gating is never taken for one.
        with Heartbeat(TrainingRun, run.pk):
            return _train_and_gate(run=run, project=project, out_dir=out_dir, progress=progress,
                                   should_stop=should_stop)
    except Exception as exc:
        # The traceback goes to the server log only: viewers see the run's error, which must not
        # reveal server paths or code.
        log.exception("training run %s failed", run.pk)
        reason = user_facing_reason(exc)
        TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.FAILED, finished_at=timezone.now(), error=reason)
        events.record(project.pk, "run.failed", f"training run {run.pk} failed: {reason}", run=run.pk)
        return "failed"


class RunFailure(Exception):
    """A failure whose message is written for the project's members (shown as the run's error)."""


def user_facing_reason(exc: BaseException) -> str:
    """A short reason without paths or tracebacks; the details are in the worker's log."""
    if isinstance(exc, RunFailure):
        return str(exc)[:500]
    if isinstance(exc, MemoryError):
        return "the worker ran out of memory; use a smaller model width, batch size or tile size"
    text = str(exc).lower()
    if "out of memory" in text:
        return "the GPU ran out of memory; use a smaller model width, batch size or tile size"
    return f"training failed with an internal error ({type(exc).__name__}); the server log has the details"


def _cancelled_or_stopping(run: TrainingRun) -> str | None:
    if WORKER_STOPPING.is_set():
        return "shutdown"
    if TrainingRun.objects.filter(pk=run.pk, cancel_requested=True).exists():
        return "cancelled"
    return None


def _finish_stopped(*, run: TrainingRun, project: Project, why: str) -> str:
    if why == "shutdown":
        TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.FAILED, finished_at=timezone.now(),
                                                     error=STOPPED_BY_SHUTDOWN)
        events.record(project.pk, "run.failed", f"training run {run.pk} failed: {STOPPED_BY_SHUTDOWN}", run=run.pk)
        return "failed"
    TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED, finished_at=timezone.now())
    events.record(project.pk, "run.cancelled", f"training run {run.pk} stopped on request", run=run.pk)
    return "cancelled"


def _train_and_gate(*, run: TrainingRun, project: Project, out_dir: Path, progress, should_stop) -> str:
    from ml_worker.training import TrainConfig, evaluate_samples, load_for_inference, train

    train_samples, val_samples = load_samples(project=project)
    if not train_samples:
        raise RunFailure("no accepted annotations on training images")
    note = ""
    if not val_samples:
        val_samples = train_samples
        note = " (no validation images are annotated yet: metrics are on training data)"
    typed = model_classes(project)
    if typed and not learns_classes(run.architecture):
        # Its output is not a class distribution: it learns nuclei vs background, and says so.
        typed = []
        class_note = f" ({run.architecture} predicts no nucleus classes: it learnt nuclei vs background)"
    else:
        class_note = ""
    if not typed:
        train_samples, val_samples = untyped(train_samples), untyped(val_samples)
    options = dict(run.config)
    width = options.pop("width", None)
    preset = options.pop("preset", None)
    head = options.pop("instance_head", None)
    model_kwargs = catalog.model_kwargs_for(run.architecture, width)  # e.g. HSP-Net's width is base_channels
    if head:
        model_kwargs["instance_head"] = head
    from ml_worker.presets import apply_preset

    # A preset sets the architecture's recipe; the run's own options (and the project's defaults
    # folded into them) win over it.
    kwargs = apply_preset(run.architecture, preset, model_kwargs=model_kwargs, **options) if preset else {
        "arch": run.architecture, "model_kwargs": model_kwargs, **options}
    config = TrainConfig(
        **kwargs,
        out_dir=str(out_dir),
        resume=str(out_dir / "last.pt") if (out_dir / "last.pt").exists() else None,
        classes=[c["name"] for c in typed] or None,
    )
    init = None
    if run.warm_start_id and run.warm_start.weights:
        init = runs_dir() / "cache" / f"warm-{run.warm_start_id}.pt"
        init.parent.mkdir(parents=True, exist_ok=True)
        data = read_bytes(run.warm_start.weights.name)
        init.write_bytes(data)
        config = config.replace(init_weights=str(init))
        init_record = {"source": "model_version", "id": run.warm_start_id, "sha256": ssl.sha256_of(data)}
        TrainingRun.objects.filter(pk=run.pk).update(init_weights=init_record)
    elif (encoder := ssl.encoder_for_training(run=run, architecture=config.arch, model_kwargs=config.model_kwargs)):
        # No model to warm-start from: the project's self-supervised encoder starts the run.
        config = config.replace(init_weights=str(encoder[0]))
        TrainingRun.objects.filter(pk=run.pk).update(init_weights=encoder[1])
    result = train(config, train_samples, val_samples, progress=progress, should_stop=should_stop)
    if result.status == "cancelled":
        return _finish_stopped(run=run, project=project, why=_cancelled_or_stopping(run) or "cancelled")
    metrics = _finite(typed_metrics(dict(result.best_metrics), typed))
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    active_metrics = None
    if active is not None:
        # Re-measured now, on the same frozen split, so the comparison is fair.
        model, normalizer, _meta = load_model(active)
        # Its class ids are comparable only when it learnt the same classes in the same order.
        same_classes = [c["id"] for c in (active.classes or [])] == [c["id"] for c in typed]
        active_metrics, _ = evaluate_samples(model, val_samples if same_classes else untyped(val_samples),
                                             tile_size=config.tile_size, normalizer=normalizer)
        active_metrics = _finite(typed_metrics(active_metrics, active.classes or []))
    ok, reason = gate(candidate=metrics, active=active_metrics)
    weights_bytes = Path(result.best_path).read_bytes()
    trained, _normalizer, _meta = load_for_inference(result.best_path)
    # One temperature per version, on the frozen validation split: scores comparable across versions.
    from ml_worker.active_learning.calibration import fit_model_temperature

    temperature = fit_model_temperature(trained, val_samples, normalizer=_normalizer, tile_size=config.tile_size)
    with StagedWrites() as staged, transaction.atomic():
        # Cancel is honoured up to promotion: checked under the run's row lock, in the same
        # transaction that would store and promote the model (cancel_run updates that row).
        locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if locked.status != RunStatus.RUNNING:
            log.warning("training run %s became %s while it was gated; its model is not stored", run.pk, locked.status)
            return "skipped"
        if locked.cancel_requested or WORKER_STOPPING.is_set():
            why = "shutdown" if WORKER_STOPPING.is_set() else "cancelled"
        else:
            why = None
        if why is None:
            version = (ModelVersion.objects.filter(project=project).aggregate(v=Max("version"))["v"] or 0) + 1
            name = staged.save(f"models/{project.pk}/v{version}-run{run.pk}.pt", weights_bytes)
            model_version = ModelVersion.objects.create(
                project=project, version=version, architecture=run.architecture,
                init_kwargs=dict(trained.init_kwargs), weights=name, classes=typed,
                metrics={**metrics, "validation_note": note.strip(), "active_at_gating": active_metrics,
                         "calibration": {"temperature": temperature}},
                training_run=run, status=ModelStatus.CANDIDATE, status_reason=reason + note + class_note,
            )
            TrainingRun.objects.filter(pk=run.pk).update(
                status=RunStatus.SUCCEEDED, progress=1.0, finished_at=timezone.now(), model_version=model_version
            )
            if ok:
                promote(model_version=model_version, reason=reason + note + class_note)
                after_promotion(project=project, model_version=model_version)
    if why is not None:
        return _finish_stopped(run=run, project=project, why=why)
    events.record(project.pk, "run.succeeded", f"training run {run.pk} produced model v{version}: {reason}",
                  run=run.pk, model_version=model_version.pk, promoted=ok, metrics=metrics)
    return "promoted" if ok else "candidate"


def uncertainty_name(mask_name: str) -> str:
    """Storage name of a prediction's per-pixel uncertainty map (8-bit PNG, 255 = most uncertain)."""
    return mask_name[: -len(".png")] + "-uncertainty.png" if mask_name.endswith(".png") else mask_name + "-uncertainty.png"


def uncertainty_png(analysis) -> bytes | None:
    """Where the fixes are, as an 8-bit grayscale PNG (255 = surely to fix): each predicted
    nucleus shows its probability of needing a fix, a blob the model half-sees its mean
    probability, the rest of the tile a quarter of its pixel entropy
    (``ml_worker.active_learning.expected_fixes_heatmap``)."""
    import io

    from PIL import Image as PILImage

    from ml_worker.active_learning import expected_fixes_heatmap

    if getattr(analysis, "probs", None) is None:
        return None
    instances = getattr(analysis, "instances", None)
    if instances is None:
        instances = np.zeros(analysis.probs.shape[1:], np.int32)
    heat = expected_fixes_heatmap(analysis.probs, instances, kind=analysis.kind)
    buffer = io.BytesIO()
    PILImage.fromarray(np.round(heat * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def run_prediction(*, project_id: int, model_version_id: int, tile_ids: list[int] | None = None) -> int:
    from ml_worker.active_learning import analyze_tiles

    model_version = ModelVersion.objects.select_related("project").get(pk=model_version_id)
    project = model_version.project
    model, normalizer, meta = load_model(model_version)
    tiles = Tile.objects.filter(project_id=project_id).exclude(predictions__model_version=model_version).order_by("id")
    if tile_ids is not None:
        tiles = tiles.filter(pk__in=tile_ids)
    tiles = list(tiles.select_related("image", "project"))
    # The extra passes (MC dropout, TTA) only when the project's strategy ranks by their scores.
    extra = catalog.analysis_kwargs(project.al_strategy) if project.al_strategy in catalog.strategy_names() else {}
    tile_size = int(meta.get("config", {}).get("tile_size", 256))
    temperature = ((model_version.metrics or {}).get("calibration") or {}).get("temperature")
    done = seen = 0
    slide_totals = _slide_totals(tiles)
    # The nuclei each tile owns, whole (issue 12): predicted on the image (or the tile's context).
    whole = ContextPredictor(model=model, normalizer=normalizer, tile_size=tile_size, classes=model_version.classes or [],
                             tiles=tiles)
    for batch in _batches(prefetched_pixels(tiles), PREDICT_BATCH):
        # Tiles of one shape go through the network together; reads of the next ones overlap.
        analyses = analyze_tiles(model, [rgb for _, rgb in batch], normalizer=normalizer, tile_size=tile_size,
                                 batch_size=PREDICT_BATCH, temperature=temperature, **extra)
        for tile, analysis in zip([t for t, _ in batch], analyses):
            owned = whole(tile)
            done += _store_prediction(tile=tile, analysis=analysis, model_version=model_version,
                                      classes=owned.classes, owned=owned)
        seen += len(batch)
        events.publish(project_id, "predict.progress", model_version=model_version.pk, done=seen, total=len(tiles))
        _publish_slide_progress(project_id, model_version, slide_totals, tiles[:seen])
    return done


PREDICT_BATCH = 8


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def nucleus_classes(model, analysis, classes: list[dict]) -> dict[str, list]:
    """Instance id -> [project class id, confidence] for a typed model (``classes``: the model
    version's classes in model order): each nucleus' soft-majority class over its pixels and that
    class' share of its foreground probability (``ml_worker.instances.instance_classes``).
    Empty for a binary model."""
    if not classes or getattr(analysis, "probs", None) is None:
        return {}
    from ml_worker.instances import instance_classes

    labels, confidence = instance_classes(analysis.instances, model.class_probabilities(analysis.probs))
    present = [int(v) for v in np.unique(analysis.instances) if v]
    return {
        str(i): [int(classes[int(labels[i]) - 1]["id"]), round(float(confidence[i]), 4)]
        for i in present if 0 < int(labels[i]) <= len(classes)
    }


def _store_prediction(*, tile: Tile, analysis, model_version: ModelVersion, classes: dict | None = None,
                      owned: OwnedPrediction | None = None) -> int:
    """Store one tile's prediction (mask + heat map + scores + class per nucleus); 0 when a
    retried task already did. ``owned``: the nuclei the tile owns, whole (``context_prediction``),
    stored as ``context_mask`` with their tile-box crop as ``mask`` (``classes`` name their ids);
    without it the tile analysis' own instance map is the mask."""
    png = encode_png(owned.tile_box(w=tile.w, h=tile.h) if owned is not None else analysis.instances)
    context_png = encode_png(owned.instances) if owned is not None else None
    heat = uncertainty_png(analysis)
    try:
        with StagedWrites() as staged, transaction.atomic():
            name = staged.save(f"predictions/{model_version.pk}/{tile.pk}.png", png)
            if heat is not None:
                # Next to the mask, by name: the browser's queue shows it as a heat map.
                staged.save(uncertainty_name(name), heat)
            context_name = (staged.save(f"predictions/{model_version.pk}/{tile.pk}-context.png", context_png)
                            if context_png is not None else "")
            Prediction.objects.create(
                tile=tile, model_version=model_version, mask=name, context_mask=context_name,
                context_x=owned.dx if owned is not None else 0, context_y=owned.dy if owned is not None else 0,
                nucleus_count=owned.nucleus_count if owned is not None else int(analysis.nucleus_count),
                uncertainty={k: float(v) for k, v in analysis.scores.items()},
                embedding=[float(x) for x in np.asarray(analysis.embedding).ravel()], classes=classes or {},
            )
        return 1
    except IntegrityError:
        return 0  # a retried task already stored this tile's prediction: nothing to duplicate


def prediction_chunks(*, project_id: int, model_version_id: int, tile_ids: list[int] | None = None,
                      chunk_size: int | None = None) -> list[list[int]]:
    """The tiles still to predict, in chunks that workers take in parallel (one slide region per
    chunk: ordered by image and position, so a chunk reads neighbouring tiles of one pyramid)."""
    size = chunk_size or int(getattr(settings, "KARYO_PREDICT_CHUNK_TILES", 256))
    tiles = Tile.objects.filter(project_id=project_id).exclude(predictions__model_version_id=model_version_id)
    if tile_ids is not None:
        tiles = tiles.filter(pk__in=tile_ids)
    ids = list(tiles.order_by("image_id", "y", "x").values_list("pk", flat=True))
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def prefetched_pixels(tiles: list[Tile], *, ahead: int = 4):
    """(tile, pixels) in order, the next ``ahead`` tiles read by a thread while the model runs."""
    from concurrent.futures import ThreadPoolExecutor

    # The thread makes no queries: ``tiles`` come with their image and project loaded.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-prefetch") as pool:
        pending = [pool.submit(read_tile_rgb, t) for t in tiles[:ahead]]
        for i, tile in enumerate(tiles):
            if i + ahead < len(tiles):
                pending.append(pool.submit(read_tile_rgb, tiles[i + ahead]))
            yield tile, pending[i].result()
            pending[i] = None  # let the pixels go


def _slide_totals(tiles: list[Tile]) -> dict[int, int]:
    image_ids = {t.image_id for t in tiles}
    return dict(Tile.objects.filter(image_id__in=image_ids).values_list("image_id").annotate(n=Count("id")))


def _publish_slide_progress(project_id: int, model_version: ModelVersion, totals: dict[int, int], seen: list[Tile]) -> None:
    """Per image: how many of its tiles have this model's prediction (all workers together)."""
    image_ids = {t.image_id for t in seen[-4:]}
    done = dict(Prediction.objects.filter(model_version=model_version, tile__image_id__in=image_ids)
                .values_list("tile__image_id").annotate(n=Count("id")))
    for image_id in sorted(image_ids):
        events.publish(project_id, "slide.predict", image_id=image_id, model_version=model_version.pk,
                       done=done.get(image_id, 0), total=totals.get(image_id, 0))


def run_ranking(*, project_id: int, strategy: str | None = None, batch_size: int = 8, seed: int = 0) -> int:
    project = Project.objects.get(pk=project_id)
    strategy = strategy or project.al_strategy
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    pool = list(unlabelled_tiles(project=project).order_by("id").values_list("id", flat=True))
    if active is None and strategy != "random":
        # No model yet: nothing to be uncertain about; typical and diverse tiles first (coldstart.py).
        labelled = list(Tile.objects.filter(project=project).exclude(pk__in=pool).order_by("id")
                        .values_list("id", flat=True))
        ordered, source = coldstart.rank_without_model(project=project, pool=pool, labelled=labelled,
                                                       batch_size=batch_size, seed=seed)
        with transaction.atomic():
            count = replace_queue(project=project, ordered=ordered, strategy="typical", model_version=None)
            queue_ranked.send(sender=QueueEntry, project=project, strategy="typical", model_version=None)
        events.record(project_id, "queue.ranked", f"queue ranked by typicality before the first model "
                      f"({source['features']} features)", strategy="typical", size=count, model_version=None,
                      top=[t for t, _ in ordered[:5]], **source)
        return count
    if active is None:
        # The random baseline, before the first model: a seeded random order.
        rng = np.random.default_rng(seed)
        order = [pool[i] for i in rng.permutation(len(pool))]
        count = replace_queue(project=project, ordered=[(t, 0.0) for t in order], strategy="random", model_version=None)
        queue_ranked.send(sender=QueueEntry, project=project, strategy="random", model_version=None)
        events.publish(project_id, "queue.ranked", strategy="random", size=count, model_version=None)
        return count
    predictions = {p.tile_id: p for p in Prediction.objects.filter(model_version=active, tile_id__in=pool)}
    ranked_ids = [t for t in pool if t in predictions]
    missing = [t for t in pool if t not in predictions]
    scores = [predictions[t].uncertainty for t in ranked_ids]
    embeddings = np.array([predictions[t].embedding for t in ranked_ids], dtype=np.float32) if ranked_ids else None
    costs = np.array([predictions[t].nucleus_count for t in ranked_ids], dtype=np.float32) if ranked_ids else None
    labelled = Prediction.objects.filter(model_version=active).exclude(tile_id__in=pool).values_list("embedding", flat=True)
    labelled_embeddings = np.array(list(labelled), dtype=np.float32) if labelled else None
    # While labels are few part of the batch is typical tiles (coldstart.py, warmup.budgeted_rank).
    n_labelled = Tile.objects.filter(project=project).count() - len(pool)
    order, picked_by, share = coldstart.rank_with_model(
        strategy=strategy, scores=scores, embeddings=embeddings, costs=costs, labelled=n_labelled,
        labelled_embeddings=labelled_embeddings, batch_size=min(batch_size, len(ranked_ids)),
        seed=seed) if ranked_ids else ([], [], 1.0)
    key = catalog.score_key(strategy)  # the score the strategy ranked by is the one the queue shows
    ordered = [(ranked_ids[i], float(scores[i].get(key, 0.0))) for i in order] + [(t, 0.0) for t in missing]
    with transaction.atomic():
        count = replace_queue(project=project, ordered=ordered, strategy=strategy, model_version=active,
                              strategies=picked_by + [strategy] * len(missing))
        # Inside the transaction: a subscriber's on_commit work (Label Studio's push) follows the new queue.
        queue_ranked.send(sender=QueueEntry, project=project, strategy=strategy, model_version=active)
    events.publish(project_id, "queue.ranked", strategy=strategy, size=count, model_version=active.pk,
                   top=[t for t, _ in ordered[:5]], strategy_share=share, labelled=n_labelled)
    return count
