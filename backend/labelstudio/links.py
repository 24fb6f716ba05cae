"""The link between a Karyo project and its Label Studio project: lookup, the per-link sync
lease, errors recorded on the link, and the names Karyo gives Label Studio (model version tags,
callback URLs). Used by every other module of this app."""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time

from django.conf import settings
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from backend.common.errors import Conflict
from backend.ml.models import ModelStatus, ModelVersion
from backend.projects.models import Project

from .models import LabelStudioLink, SyncError

log = logging.getLogger(__name__)

LEASE = dt.timedelta(minutes=10)


def model_version_tag(model_version: ModelVersion) -> str:
    return f"karyo-v{model_version.version}"


def karyo_url(name: str) -> str:
    return settings.KARYO_PUBLIC_URL.rstrip("/") + reverse(name)


def ml_backend_url() -> str:
    """The ML-backend root Label Studio appends ``health``, ``setup``, ``predict``... to."""
    return karyo_url("labelstudio-ml-health").removesuffix("health")


def link_for_ls_project(ls_project) -> LabelStudioLink | None:
    """``ls_project``: an id, or the ML-backend protocol's ``"<id>.<created timestamp>"``."""
    try:
        ls_id = int(str(ls_project).split(".")[0])
    except (TypeError, ValueError):
        return None
    return LabelStudioLink.objects.select_related("project").filter(ls_project_id=ls_id).first()


def current_model_version(project: Project) -> ModelVersion | None:
    """The active model, else the newest version that has predictions."""
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    if active is not None:
        return active
    return ModelVersion.objects.filter(project=project, predictions__isnull=False).order_by("-version").first()


def record_error(*, link: LabelStudioLink, operation: str, error: Exception | str, details: dict | None = None) -> SyncError:
    message = str(error)
    log.warning("label studio %s for project %s: %s", operation, link.project_id, message)
    now = timezone.now()
    LabelStudioLink.objects.filter(pk=link.pk).update(last_error=message, last_error_at=now)
    link.last_error, link.last_error_at = message, now
    return SyncError.objects.create(link=link, operation=operation, message=message, details=details or {})


def resolve_errors(*, link: LabelStudioLink, operations: tuple[str, ...]) -> None:
    now = timezone.now()
    SyncError.objects.filter(link=link, operation__in=operations, resolved_at__isnull=True).update(resolved_at=now)
    if not SyncError.objects.filter(link=link, resolved_at__isnull=True).exists():
        LabelStudioLink.objects.filter(pk=link.pk).update(last_error="")
        link.last_error = ""


@contextlib.contextmanager
def lease(link: LabelStudioLink, *, wait: float = 120.0):
    """One sync of a project at a time, across processes (a row-level compare-and-set)."""
    deadline = time.monotonic() + wait
    while True:
        now = timezone.now()
        won = LabelStudioLink.objects.filter(pk=link.pk).filter(
            Q(sync_lock_until__isnull=True) | Q(sync_lock_until__lt=now)
        ).update(sync_lock_until=now + LEASE)
        if won:
            break
        if time.monotonic() > deadline:
            raise Conflict(f"another Label Studio sync of project {link.project_id} is running")
        time.sleep(0.2)
    try:
        yield
    finally:
        LabelStudioLink.objects.filter(pk=link.pk).update(sync_lock_until=None)


def get_link(*, project: Project) -> LabelStudioLink:
    link, _ = LabelStudioLink.objects.get_or_create(project=project)
    return link


def payload_ls_project(payload: dict):
    """The Label Studio project id a webhook or ML-backend payload is about (None if it names none)."""
    for key in ("project", "annotation", "task"):
        value = payload.get(key)
        if isinstance(value, dict):
            project = value.get("id") if key == "project" else value.get("project")
            if project is not None:
                return project
    annotations = payload.get("annotations")
    if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
        return annotations[0].get("project")
    return None

