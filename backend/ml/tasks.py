"""Celery tasks: thin shims that take ids. The work lives in ``workflows``."""
from __future__ import annotations

from celery import shared_task

from . import workflows
from .services import fail_stale_runs


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
