"""Celery shims (cpu queue): they take ids; the work is in ``services``."""
from __future__ import annotations

from celery import shared_task

from backend.projects.models import Project

from . import services
from .client import LabelStudioError
from .models import LabelStudioLink


@shared_task(name="karyo.cpu.labelstudio_reconcile")
def reconcile() -> list[dict]:
    """Periodic (CELERY_BEAT_SCHEDULE): every project's Label Studio side, and what changed there."""
    return services.reconcile_all()


@shared_task(name="karyo.cpu.labelstudio_sync")
def sync_project(project_id: int) -> dict | None:
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return None
    report = services.sync_project(project=project)
    return report.as_dict() if report else None


@shared_task(name="karyo.cpu.labelstudio_push")
def push_predictions(project_id: int, tile_ids: list[int] | None = None) -> int:
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0
    try:
        return services.push_predictions(project=project, tiles=tile_ids)
    except LabelStudioError:
        return 0  # recorded on the project; the periodic sync pushes them later


@shared_task(name="karyo.cpu.labelstudio_ingest")
def ingest_annotations(link_id: int, annotation_ids: list[int], deleted_ids: list[int]) -> dict | None:
    link = LabelStudioLink.objects.select_related("project").filter(pk=link_id).first()
    if link is None:
        return None
    try:
        return services.ingest_annotations(link=link, annotation_ids=annotation_ids, deleted_ids=deleted_ids)
    except LabelStudioError as exc:
        return {"error": str(exc)}  # recorded on the project; the periodic reconcile pulls it later


@shared_task(name="karyo.cpu.labelstudio_push_annotations")
def push_annotations(project_id: int) -> int:
    """Annotations made in Karyo appear in Label Studio as annotations of their authors."""
    from backend.common.errors import KaryoError

    from .members import push_member_annotations

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0
    try:
        return push_member_annotations(project=project)
    except (LabelStudioError, KaryoError):
        return 0  # recorded on the project (or a sync holds it): the periodic sync pushes them


@shared_task(name="karyo.cpu.labelstudio_members")
def sync_member_accounts(project_id: int) -> int:
    """A Label Studio user for each editing member of the project (after its members changed)."""
    from .members import sync_project_members

    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return 0
    try:
        return sync_project_members(project=project)
    except LabelStudioError:
        return 0  # recorded on the project: the periodic sync creates them
