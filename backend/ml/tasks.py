"""Celery tasks: thin shims that take ids. The work lives in ``workflows``."""
from __future__ import annotations

from celery import shared_task
from celery.signals import worker_shutting_down

from . import workflows
from .services import fail_stale_runs


@worker_shutting_down.connect
def _stop_training_on_shutdown(**_kwargs) -> None:
    # Runs in the worker's main process on Ctrl-C/SIGTERM: with the solo pool that is where the
    # training loop runs, and it stops at its next step instead of finishing every epoch.
    workflows.WORKER_STOPPING.set()


@shared_task(name="karyo.gpu.train", bind=True, acks_late=True)
def train(self, run_id: int) -> str:
    return workflows.run_training(run_id=run_id, task_id=self.request.id or "")


@shared_task(name="karyo.gpu.predict", acks_late=True)
def predict(project_id: int, model_version_id: int, tile_ids: list[int] | None = None, then_rank: bool = False) -> int:
    done = workflows.run_prediction(project_id=project_id, model_version_id=model_version_id, tile_ids=tile_ids)
    if then_rank:
        rank.delay(project_id)
    return done


@shared_task(name="karyo.gpu.rank", acks_late=True)
def rank(project_id: int, strategy: str | None = None) -> int:
    return workflows.run_ranking(project_id=project_id, strategy=strategy)


@shared_task(name="karyo.cpu.check_stale_runs")
def check_stale_runs() -> int:
    return fail_stale_runs()
