"""The worker side of a project's self-supervised encoder pretraining (task ``karyo.gpu.pretrain``).

SimSiam (``ml_worker.ssl.pretrain``) on a seeded sample of the project's unlabelled tiles, with
the project's default architecture and width and its training runs' input standardisation. Like
a training run it sends heartbeats (a killed worker's pretraining is failed by
``services.fail_stale_pretrainings``), stops at its next step when cancelled or when the worker
shuts down, and stores its checkpoint with ``StagedWrites`` in the same transaction that marks
it succeeded: never a half-written checkpoint nor a succeeded row without one.

Its checkpoint serves twice: :func:`encoder_for_training` makes it the starting weights of the
project's first training run (no active model to warm-start from), and ``coldstart`` embeds
the tiles with it before the first model exists.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backend.common.jobs import enqueue_on_commit
from backend.common.storage import StagedWrites, read_bytes
from backend.images.pixels import read_tile_rgb
from ml_worker import catalog

from . import events
from .lifecycle import Heartbeat, claim
from .models import EncoderPretraining, ModelStatus, ModelVersion, RunStatus, TrainingRun
from .services import ready_encoder, unlabelled_tiles

log = logging.getLogger(__name__)
# Set by the worker's shutdown signal (tasks.py), as workflows.WORKER_STOPPING for training runs.
WORKER_STOPPING = threading.Event()
STOPPED_BY_SHUTDOWN = "Karyo's worker was stopped during the pretraining (shut down or restarted); start it again"


def _cache_dir() -> Path:
    path = Path(settings.VAR_DIR) / "runs" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_checkpoint(pretraining: EncoderPretraining) -> Path:
    """The pretraining's checkpoint as a local file (copied from storage once, by rename)."""
    local = _cache_dir() / f"ssl-{pretraining.pk}-{pretraining.checkpoint_sha256[:16]}.pt"
    if not local.exists():
        tmp = local.with_suffix(f".part{threading.get_ident()}")
        tmp.write_bytes(read_bytes(pretraining.checkpoint.name))
        tmp.replace(local)
    return local


def model_setup(project) -> tuple[str, dict, str]:
    """(architecture, model kwargs, input_norm) the project's training runs default to."""
    from ml_worker.train_config import TrainConfig

    defaults = dict(project.training_defaults or {})
    architecture = project.default_architecture
    kwargs = catalog.model_kwargs_for(architecture, defaults.get("width"))
    return architecture, kwargs, str(defaults.get("input_norm") or TrainConfig.input_norm)


def _stopped(run: EncoderPretraining, why: str) -> str:
    if why == "shutdown":
        EncoderPretraining.objects.filter(pk=run.pk).update(status=RunStatus.FAILED, finished_at=timezone.now(),
                                                           error=STOPPED_BY_SHUTDOWN)
        events.record(run.project_id, "ssl.failed", f"encoder pretraining {run.pk} failed: {STOPPED_BY_SHUTDOWN}",
                      pretraining=run.pk)
        return "failed"
    EncoderPretraining.objects.filter(pk=run.pk).update(status=RunStatus.CANCELLED, finished_at=timezone.now())
    events.record(run.project_id, "ssl.cancelled", f"encoder pretraining {run.pk} stopped on request",
                  pretraining=run.pk)
    return "cancelled"


def run_pretraining(*, pretraining_id: int, task_id: str = "") -> str:
    """Body of ``karyo.gpu.pretrain``: ``succeeded`` / ``cancelled`` / ``failed`` / ``skipped``."""
    run = claim(EncoderPretraining, pretraining_id, task_id)
    if run is None:
        return "skipped"
    project = run.project
    events.record(project.pk, "ssl.started", f"encoder pretraining {run.pk} started", pretraining=run.pk)
    last = [0.0, False]

    def should_stop() -> bool:
        if WORKER_STOPPING.is_set():
            return True
        if time.monotonic() - last[0] > 1.0:
            last[0] = time.monotonic()
            last[1] = EncoderPretraining.objects.filter(pk=run.pk, cancel_requested=True).exists()
        return last[1]

    def progress(event: dict) -> None:
        EncoderPretraining.objects.filter(pk=run.pk).update(progress=float(event["progress"]),
                                                           heartbeat_at=timezone.now())
        events.publish(project.pk, "ssl.step", pretraining=run.pk,
                       **{k: v for k, v in event.items() if k != "event"})

    try:
        with Heartbeat(EncoderPretraining, run.pk):
            return _pretrain_and_store(run=run, project=project, progress=progress, should_stop=should_stop)
    except Exception as exc:
        log.exception("encoder pretraining %s failed", run.pk)
        reason = str(exc)[:300] if isinstance(exc, ValueError) else (
            f"pretraining failed with an internal error ({type(exc).__name__}); the server log has the details")
        EncoderPretraining.objects.filter(pk=run.pk).update(status=RunStatus.FAILED, finished_at=timezone.now(),
                                                           error=reason)
        events.record(project.pk, "ssl.failed", f"encoder pretraining {run.pk} failed: {reason}", pretraining=run.pk)
        return "failed"


def _pretrain_and_store(*, run: EncoderPretraining, project, progress, should_stop) -> str:
    from ml_worker.ssl import SSLConfig, pretrain

    options = dict(run.config)
    max_tiles = int(options.pop("max_tiles", 512))
    ids = list(unlabelled_tiles(project=project).order_by("id").values_list("id", flat=True))
    if len(ids) < 2:  # everything is labelled: the pixels still carry no labels for SimSiam
        ids = list(project.tiles.order_by("id").values_list("id", flat=True))
    if len(ids) > max_tiles:
        ids = sorted(np.random.default_rng(run.pk).choice(ids, max_tiles, replace=False).tolist())
    from backend.images.models import Tile

    tiles = list(Tile.objects.filter(pk__in=ids).select_related("image", "project").order_by("id"))
    pixels = [read_tile_rgb(t) for t in tiles]
    architecture, model_kwargs, input_norm = model_setup(project)
    config = SSLConfig(arch=architecture, model_kwargs=model_kwargs, seed=0, input_norm=input_norm,
                       threads=getattr(settings, "KARYO_SSL_THREADS", None), **options)
    out = _cache_dir() / f"ssl-run-{run.pk}-{run.created_at:%Y%m%dT%H%M%S%f}.pt"
    result = pretrain(pixels, out, config, progress=progress, should_stop=should_stop)
    if result["status"] == "cancelled":
        return _stopped(run, "shutdown" if WORKER_STOPPING.is_set() else "cancelled")
    data = Path(result["path"]).read_bytes()
    digest = sha256_of(data)
    info = {k: result[k] for k in ("loss_first", "loss_last", "steps", "seconds")}
    info.update(tiles=len(tiles), model_kwargs=model_kwargs, input_norm=input_norm)
    with StagedWrites() as staged, transaction.atomic():
        locked = EncoderPretraining.objects.select_for_update().get(pk=run.pk)
        if locked.status != RunStatus.RUNNING:
            log.warning("encoder pretraining %s became %s; its checkpoint is not stored", run.pk, locked.status)
            return "skipped"
        if locked.cancel_requested or WORKER_STOPPING.is_set():
            why = "shutdown" if WORKER_STOPPING.is_set() else "cancelled"
        else:
            why = None
            name = staged.save(f"encoders/{project.pk}/ssl-{run.pk}.pt", data)
            EncoderPretraining.objects.filter(pk=run.pk).update(
                status=RunStatus.SUCCEEDED, progress=1.0, finished_at=timezone.now(), checkpoint=name,
                checkpoint_sha256=digest, info=info)
            if not ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).exists():
                # The first queue was ranked on fixed features: rank it again on the new encoder's.
                enqueue_on_commit("karyo.gpu.rank", project.pk)  # ml.tasks.rank
    Path(result["path"]).unlink(missing_ok=True)
    if why is not None:
        return _stopped(run, why)
    events.record(project.pk, "ssl.succeeded",
                  f"encoder pretraining {run.pk} finished: loss {info['loss_first']:.3f} -> {info['loss_last']:.3f} "
                  f"on {len(tiles)} tiles in {info['seconds']:.0f} s", pretraining=run.pk, sha256=digest)
    return "succeeded"


def encoder_for_training(*, run: TrainingRun, architecture: str, model_kwargs: dict) -> tuple[Path, dict] | None:
    """(local checkpoint, the ``init_weights`` record) of the project's finished encoder when
    ``run`` starts without a model to warm-start from and the encoder was pretrained for the
    same architecture and constructor options; None otherwise (a fresh initialisation)."""
    if run.warm_start_id:
        return None
    encoder = ready_encoder(project=run.project)
    if encoder is None or encoder.architecture != architecture:
        return None
    if dict((encoder.info or {}).get("model_kwargs") or {}) != dict(model_kwargs or {}):
        return None
    path = local_checkpoint(encoder)
    return path, {"source": "ssl", "id": encoder.pk, "sha256": encoder.checkpoint_sha256,
                  "checkpoint": encoder.checkpoint.name}
