"""Celery tasks: thin shims that take ids. The work lives in ``workflows``."""
from __future__ import annotations

from celery import chord, shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from . import ssl, workflows
from .services import fail_stale_pretrainings, fail_stale_runs, record_correction_effort


@worker_shutting_down.connect
def _stop_training_on_shutdown(**_kwargs) -> None:
    # Runs in the worker's main process on Ctrl-C/SIGTERM: with the solo pool that is where the
    # training loop runs, and it stops at its next step instead of finishing every epoch.
    workflows.WORKER_STOPPING.set()
    ssl.WORKER_STOPPING.set()


def _not_while_stopping() -> None:
    """A worker shutting down may still be handed the message it had fetched (solo pool, polling
    broker): give it back to the queue, so the run stays queued for the next worker instead of
    being started only to be failed as stopped by the shutdown (it happened to a demo run on Ctrl-C)."""
    if workflows.WORKER_STOPPING.is_set() or ssl.WORKER_STOPPING.is_set():
        raise Reject("the worker is shutting down; the task goes back to the queue", requeue=True)


@shared_task(name="karyo.cpu.correction_effort", acks_late=True)
def correction_effort(annotation_id: int) -> bool:
    """What the author of a stored correction had to change (``services.record_correction_effort``);
    enqueued by the annotation_saved subscriber. Idempotent."""
    from backend.images.models import Annotation

    annotation = Annotation.objects.filter(pk=annotation_id).select_related("tile", "prediction").first()
    return annotation is not None and record_correction_effort(annotation=annotation) is not None


@shared_task(name="karyo.gpu.train", bind=True, acks_late=True)
def train(self, run_id: int) -> str:
    _not_while_stopping()
    return workflows.run_training(run_id=run_id, task_id=self.request.id or "")


@shared_task(name="karyo.gpu.pretrain", bind=True, acks_late=True)
def pretrain(self, pretraining_id: int) -> str:
    """Self-supervised pretraining of a project's encoder (``ml.ssl``)."""
    _not_while_stopping()
    return ssl.run_pretraining(pretraining_id=pretraining_id, task_id=self.request.id or "")


@shared_task(name="karyo.gpu.predict", acks_late=True)
def predict(project_id: int, model_version_id: int, tile_ids: list[int] | None = None, then_rank: bool = False) -> int:
    """Predict the tiles; more than one chunk of them (a slide) fans out as a chord of chunks
    that any number of gpu workers take in parallel."""
    chunks = workflows.prediction_chunks(project_id=project_id, model_version_id=model_version_id, tile_ids=tile_ids)
    if len(chunks) > 1:
        header = [predict_chunk.s(project_id, model_version_id, chunk) for chunk in chunks]
        chord(header)(predict_done.s(project_id, then_rank))
        return 0
    done = workflows.run_prediction(project_id=project_id, model_version_id=model_version_id,
                                    tile_ids=chunks[0] if chunks else [])
    if then_rank:
        rank.delay(project_id)
    return done


# acks_late + the global reject-on-worker-lost: a worker that dies mid-chunk loses only that
# chunk, which the broker hands to another worker; run_prediction skips tiles already predicted.
@shared_task(name="karyo.gpu.predict_chunk", acks_late=True, autoretry_for=(OSError,), max_retries=3,
             retry_backoff=True)
def predict_chunk(project_id: int, model_version_id: int, tile_ids: list[int]) -> int:
    return workflows.run_prediction(project_id=project_id, model_version_id=model_version_id, tile_ids=tile_ids)


@shared_task(name="karyo.gpu.predict_done", acks_late=True)
def predict_done(results: list[int], project_id: int, then_rank: bool = False) -> int:
    if then_rank:
        rank.delay(project_id)
    return sum(results)


@shared_task(name="karyo.gpu.rank", acks_late=True)
def rank(project_id: int, strategy: str | None = None) -> int:
    return workflows.run_ranking(project_id=project_id, strategy=strategy)


@shared_task(name="karyo.cpu.check_stale_runs")
def check_stale_runs() -> int:
    return fail_stale_runs() + fail_stale_pretrainings()
