from __future__ import annotations

from django.conf import settings

from backend.projects.models import Project

from .client import is_configured
from .models import AnnotationSync, LabelStudioLink, PushedPrediction, SyncError, TaskLink


def sync_status(*, project: Project, errors: int = 20) -> dict:
    """What the project page shows: is it linked, how far the sync got, what went wrong."""
    link = LabelStudioLink.objects.filter(project=project).first()
    url = None
    if link is not None and link.ls_project_id and settings.LABEL_STUDIO_URL:
        url = f"{settings.LABEL_STUDIO_URL.rstrip('/')}/projects/{link.ls_project_id}/data"
    return {
        "configured": is_configured(),
        "linked": bool(link and link.ls_project_id),
        "label_studio_project": link.ls_project_id if link else None,
        "label_studio_url": url,
        "webhook": bool(link and link.webhook_id),
        "ml_backend": bool(link and link.ml_backend_id),
        "model_version": link.model_version if link else "",
        "tasks": TaskLink.objects.filter(link=link).count() if link else 0,
        "pushed_predictions": PushedPrediction.objects.filter(task__link=link).count() if link else 0,
        "synced_annotations": AnnotationSync.objects.filter(link=link, deleted=False).count() if link else 0,
        "last_synced_at": link.last_synced_at if link else None,
        "reconciled_until": link.reconciled_until if link else None,
        "last_error": link.last_error if link else "",
        "errors": list(SyncError.objects.filter(link=link, resolved_at__isnull=True)[:errors]) if link else [],
    }
