"""What a long-running job row (a ``TrainingRun``, an ``EncoderPretraining``) shares while a worker
runs it: claiming it once, and a heartbeat that lets ``fail_stale_*`` notice a killed worker."""
from __future__ import annotations

import logging
import threading
from typing import Self, TypeVar

from django.db import models
from django.utils import timezone

from .models import RunStatus

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0

Job = TypeVar("Job", bound=models.Model)


class Heartbeat:
    """Touches ``heartbeat_at`` from a thread while the job works, so a killed worker is noticed
    even while the job is busy in one long step."""

    def __init__(self, model: type[models.Model], pk: int):
        self.model, self.pk = model, pk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"heartbeat-{model.__name__}-{pk}")

    def _beat(self) -> None:
        from django.db import connection

        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                self.model.objects.filter(pk=self.pk, status=RunStatus.RUNNING).update(heartbeat_at=timezone.now())
        finally:
            connection.close()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def claim(model: type[Job], pk: int, task_id: str, *, related: tuple[str, ...] = ("project",)) -> Job | None:
    """The queued job, now ``running`` under ``task_id``; or the same job again when the broker
    redelivered our own task after a worker crash; ``None`` when it is gone or someone else's."""
    now = timezone.now()
    claimed = model.objects.filter(pk=pk, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=now, heartbeat_at=now, celery_task_id=task_id)
    job = model.objects.filter(pk=pk).select_related(*related).first()
    name = model._meta.verbose_name
    if job is None:
        log.warning("%s %s does not exist; nothing to do", name, pk)
        return None
    if claimed or (job.status == RunStatus.RUNNING and job.celery_task_id == task_id):
        return job
    log.info("%s %s is %s; not starting it again", name, pk, job.status)
    return None
