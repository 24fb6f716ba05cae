from __future__ import annotations

from datetime import datetime

from django.db.models import OuterRef, QuerySet, Subquery

from backend.images.models import Annotation, AnnotationStatus
from backend.ml.models import Prediction
from backend.projects.models import Project

from .models import Export

STATUS_FILTERS = {
    "reviewed": (AnnotationStatus.REVIEWED,),
    "submitted": (AnnotationStatus.SUBMITTED, AnnotationStatus.REVIEWED),
    "any": None,  # the latest version whatever its status
}


def export_annotations(
    *,
    project: Project,
    status: str = "reviewed",
    annotators: list[str] | None = None,
    created_from: datetime | None = None,
    created_before: datetime | None = None,
    image_ids: list[int] | None = None,
) -> QuerySet[Annotation]:
    """Per tile, the version an export takes, in image/row/column order.

    ``status``: ``reviewed`` = the latest reviewed version; ``submitted`` = the latest submitted or
    reviewed one; ``any`` = the latest version, whatever its status. The version is chosen first;
    the annotator and date filters then keep or drop the tile (an older version by someone else
    is never exported instead of a newer correction).
    """
    statuses = STATUS_FILTERS[status]
    newest = Annotation.objects.filter(tile=OuterRef("tile"))
    if statuses is not None:
        newest = newest.filter(status__in=statuses)
    queryset = Annotation.objects.filter(tile__project=project).filter(
        id=Subquery(newest.order_by("-version").values("id")[:1])
    )
    if annotators:
        queryset = queryset.filter(author__username__in=annotators)
    if created_from is not None:
        queryset = queryset.filter(created_at__gte=created_from)
    if created_before is not None:
        queryset = queryset.filter(created_at__lt=created_before)
    if image_ids:
        queryset = queryset.filter(tile__image_id__in=image_ids)
    return queryset.select_related("tile", "tile__image", "author", "reviewed_by").order_by(
        "tile__image_id", "tile__y", "tile__x", "tile_id"
    )


def annotation_history(*, tile_ids: list[int]) -> dict[int, dict]:
    """Every version of these tiles: id -> {parent_id, author, prediction_id, created_at}."""
    rows: dict[int, dict] = {}
    for start in range(0, len(tile_ids), 500):
        chunk = tile_ids[start : start + 500]
        for row in Annotation.objects.filter(tile_id__in=chunk).values(
            "id", "parent_id", "author__username", "prediction_id", "created_at"
        ):
            rows[row["id"]] = row
    return rows


def predictions_by_id(*, ids: set[int]) -> dict[int, Prediction]:
    found: dict[int, Prediction] = {}
    ids_list = sorted(ids)
    for start in range(0, len(ids_list), 500):
        for prediction in Prediction.objects.filter(id__in=ids_list[start : start + 500]).select_related("model_version"):
            found[prediction.pk] = prediction
    return found


def project_exports(*, project: Project) -> QuerySet[Export]:
    return Export.objects.filter(project=project).select_related("created_by")
