"""What a long-running job row (a ``TrainingRun``, an ``EncoderPretraining``) shares while a worker
runs it: claiming it once, a heartbeat, failing the jobs whose heartbeat stopped (a killed
worker), and cancelling. The callers (``services``) add their own messages and events."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Self, TypeVar

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from backend.common.errors import Conflict

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


def fail_stale(model: type[Job], *, reason: Callable[[Job], str], project=None,
               timeout_seconds: int | None = None) -> list[Job]:
    """Running jobs whose heartbeat stopped more than ``timeout_seconds`` ago (default
    ``KARYO_HEARTBEAT_TIMEOUT_SECONDS``) are marked failed with ``reason(job)``, so nothing stays
    ``running`` forever. Returns the jobs this call failed (another caller may fail some first)."""
    timeout = settings.KARYO_HEARTBEAT_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
    cutoff = timezone.now() - timedelta(seconds=timeout)
    stale = model.objects.filter(status=RunStatus.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff))
    if project is not None:
        stale = stale.filter(project=project)
    return [job for job in stale
            if model.objects.filter(pk=job.pk, status=RunStatus.RUNNING).update(
                status=RunStatus.FAILED, finished_at=timezone.now(), error=reason(job))]


def request_cancel(model: type[Job], job: Job, *, label: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next step. A job
    that finished meanwhile is a ``Conflict`` ("``label`` is already ..."), never silently marked."""
    if not job.is_live:
        raise Conflict(f"{label} is already {job.status}")
    cancelled = model.objects.filter(pk=job.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED, cancel_requested=True, finished_at=timezone.now())
    if not cancelled and not model.objects.filter(pk=job.pk, status=RunStatus.RUNNING).update(cancel_requested=True):
        job.refresh_from_db()
        raise Conflict(f"{label} is already {job.status}")
    job.refresh_from_db()
    return job
