from __future__ import annotations

from django.db.models import OuterRef, QuerySet, Subquery

from backend.projects.models import Project

from .models import Annotation, Tile
from .services import accepted_statuses


def latest_annotation(*, tile: Tile) -> Annotation | None:
    return tile.annotations.order_by("-version").first()


def tiles_with_status(*, project: Project) -> QuerySet[Tile]:
    """Tiles annotated with their latest annotation's id, version and status (None when unlabelled)."""
    latest = Annotation.objects.filter(tile=OuterRef("pk")).order_by("-version")
    return (
        Tile.objects.filter(project=project)
        .select_related("image")
        .annotate(
            latest_annotation_id=Subquery(latest.values("id")[:1]),
            latest_version=Subquery(latest.values("version")[:1]),
            annotation_status=Subquery(latest.values("status")[:1]),
        )
    )


def training_annotations(*, project: Project) -> QuerySet[Annotation]:
    """Per tile, the latest accepted version: what training uses."""
    statuses = accepted_statuses(project)
    newest_accepted = (
        Annotation.objects.filter(tile=OuterRef("tile"), status__in=statuses).order_by("-version").values("id")[:1]
    )
    return (
        Annotation.objects.filter(tile__project=project, status__in=statuses)
        .filter(id=Subquery(newest_accepted))
        .select_related("tile", "tile__image")
    )
