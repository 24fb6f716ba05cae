"""Label Studio sync: projects, tasks and predictions out; corrections back as annotation versions.

Network calls to Label Studio never run inside a database transaction (SQLite takes its write
lock at the start of one). A per-link lease keeps two syncs of one project apart; everything
else is idempotent through unique constraints, so a repeated or interrupted sync converges.

The work is split along its seams; this module holds the whole-project sync and re-exports the
entry points, so callers (API views, tasks, tests) import them from here:

- :mod:`.links`: the project <-> Label Studio link, its lease and recorded errors;
- :mod:`.push` (out): :func:`push_predictions` after Karyo ranks its queue, :func:`schedule_push`;
- :mod:`.ingest` (in): :func:`ingest_annotations` for webhook deliveries, :func:`reconcile`;
- :mod:`.webhook`: :func:`handle_webhook`;
- :mod:`.ml_backend`: the ML-backend protocol (:func:`ml_setup`, :func:`ml_predict`,
  :func:`ml_webhook`, :func:`ml_versions`);
- here: :func:`sync_project` (the periodic reconcile and the "sync now" button), :func:`reconcile_all`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from django.utils import timezone

from backend.common.errors import KaryoError
from backend.projects.models import Project

from . import conversions  # noqa: F401  (re-exported)
from .client import LabelStudioClient, LabelStudioError, is_configured
from .ingest import ingest_annotation, ingest_annotations, mark_deleted, reconcile
from .links import (
    current_model_version,
    get_link,
    karyo_url,
    lease,
    link_for_ls_project,
    ml_backend_url,
    model_version_tag,
    record_error,
    resolve_errors,
)
from .members import push_annotations, sync_members
from .ml_backend import ml_predict, ml_setup, ml_versions, ml_webhook
from .push import _push, ensure_ls_project, prediction_scores, push_predictions, schedule_push, sync_tasks, task_data
from .webhook import SECRET_HEADER, WEBHOOK_ACTIONS, handle_webhook

__all__ = [
    "SECRET_HEADER", "WEBHOOK_ACTIONS", "SyncReport", "current_model_version", "ensure_ls_project", "get_link",
    "handle_webhook", "ingest_annotation", "ingest_annotations", "karyo_url", "lease", "link_for_ls_project",
    "mark_deleted", "ml_backend_url", "ml_predict", "ml_setup", "ml_versions", "ml_webhook", "model_version_tag",
    "prediction_scores", "push_predictions", "reconcile", "reconcile_all", "record_error", "resolve_errors",
    "schedule_push", "sync_project", "sync_tasks", "task_data",
]


@dataclass
class SyncReport:
    project: int
    ok: bool = True
    tasks_created: int = 0
    predictions_pushed: int = 0
    annotations_stored: int = 0
    annotations_deleted: int = 0
    error: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def sync_project(*, project: Project) -> SyncReport | None:
    """Bring a project's Label Studio side up to date and pull what changed there. Errors are
    recorded on the project (and reported), never lost: the next run starts where this stopped.
    None when Label Studio is not configured."""
    if not is_configured():
        return None
    started = time.monotonic()
    report = SyncReport(project=project.pk)
    link = get_link(project=project)
    with lease(link):
        link.refresh_from_db()
        try:
            client = LabelStudioClient()
            ensure_ls_project(link=link, client=client)
            report.tasks_created = sync_tasks(link=link, client=client)
            report.predictions_pushed = _push(link=link, client=client)
            report.extra["accounts_created"] = sync_members(link=link, client=client)
            report.extra["annotations_pushed"] = push_annotations(link=link, client=client)
            pulled = reconcile(link=link, client=client)
        except LabelStudioError as exc:
            record_error(link=link, operation="sync", error=exc)
            report.ok, report.error = False, str(exc)
        else:
            report.annotations_stored, report.annotations_deleted = pulled["stored"], pulled["deleted"]
            link.last_synced_at = timezone.now()
            link.save(update_fields=["last_synced_at"])
            resolve_errors(link=link, operations=("sync", "push", "ingest"))
    report.seconds = round(time.monotonic() - started, 3)
    return report


def reconcile_all() -> list[dict]:
    """The periodic task: every project, one after the other; one failing does not stop the rest."""
    if not is_configured():
        return []
    reports = []
    for project in Project.objects.order_by("pk"):
        try:
            report = sync_project(project=project)
        except KaryoError as exc:  # a sync of this project is already running
            reports.append({"project": project.pk, "ok": False, "error": str(exc)})
            continue
        if report is not None:
            reports.append(report.as_dict())
    return reports

