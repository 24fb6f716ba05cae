from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from backend.common.errors import Conflict, InvalidUpload
from backend.common.storage import StagedWrites, encode_png
from backend.projects.models import Project

from .models import Annotation, AnnotationSource, AnnotationStatus, Image, ImageState, Tile
from .signals import annotation_saved
from .validation import DecodedImage


@dataclass(frozen=True)
class IngestResult:
    image: Image
    created: bool


def ingest_images(
    *, project: Project, images: list[DecodedImage], uploaded_by, microns_per_pixel: float | None = None,
    background: bool = False,
) -> list[IngestResult]:
    """Store images and register them; all or nothing.

    ``background`` (uploads): answer at once with each image ``ingesting``; the cpu worker builds
    thumbnail and tiles (``tasks.ingest_image``, enqueued on commit). Otherwise (dataset import)
    the same ``ingest.build_image`` runs here, in this transaction. The same bytes uploaded again
    to the project return the existing image (``created=False``) unless that one failed.
    """
    from .ingest import IngestError, build_image, enqueue_ingest

    results: list[IngestResult] = []
    with StagedWrites() as staged, transaction.atomic():
        for decoded in images:
            existing = Image.objects.filter(project=project, sha256=decoded.sha256).first()
            if existing is not None and existing.state != ImageState.FAILED:
                results.append(IngestResult(existing, created=False))
                continue
            if existing is not None:
                existing.delete()  # a failed attempt holds no tiles; the new upload replaces it
            ext = {"jpeg": "jpg", "tiff": "tif"}.get(decoded.format, decoded.format)
            name = staged.save(f"images/{decoded.sha256[:2]}/{decoded.sha256}.{ext}", decoded.data, reuse_existing=True)
            image = Image.objects.create(
                project=project, name=decoded.name, file=name, sha256=decoded.sha256, format=decoded.format,
                width=decoded.width, height=decoded.height, microns_per_pixel=microns_per_pixel, uploaded_by=uploaded_by,
                state=ImageState.INGESTING, ingest_progress=0.0,
            )
            if background:
                enqueue_ingest(image)
            else:
                try:
                    build_image(image=image)
                except IngestError as exc:
                    raise InvalidUpload(f"{decoded.name}: {exc}", code="corrupt_image") from None
            results.append(IngestResult(image, created=True))
    return results


def accepted_statuses(project: Project) -> tuple[str, ...]:
    if project.require_review:
        return (AnnotationStatus.REVIEWED,)
    return (AnnotationStatus.SUBMITTED, AnnotationStatus.REVIEWED)


def create_annotation(
    *,
    tile: Tile,
    instances: np.ndarray,
    author,
    source: str = AnnotationSource.MANUAL,
    status: str = AnnotationStatus.SUBMITTED,
    parent: Annotation | None = None,
    prediction=None,
    external_id: str = "",
    classes: dict[str, int] | None = None,
) -> tuple[Annotation, bool]:
    """Append a new annotation version to ``tile``. Returns ``(annotation, created)``.

    ``instances`` is an (h, w) integer label map of the tile. The same ``external_id`` (a Label
    Studio annotation delivered twice) returns the existing version instead of a duplicate.
    """
    if instances.shape != (tile.h, tile.w):
        raise InvalidUpload(
            f"mask is {instances.shape[1]}x{instances.shape[0]} but the tile is {tile.w}x{tile.h}", code="mask_size_mismatch"
        )
    if status not in (AnnotationStatus.DRAFT, AnnotationStatus.SUBMITTED) and source != AnnotationSource.IMPORTED:
        raise InvalidUpload("new annotations are draft or submitted; reviews set the other states", code="invalid_status")
    if parent is not None and parent.tile_id != tile.pk:
        raise InvalidUpload("the parent annotation belongs to another tile", code="invalid_parent")
    if external_id:
        existing = Annotation.objects.filter(tile=tile, external_id=external_id).first()
        if existing is not None:
            return existing, False
    labels = np.unique(instances)
    nucleus_count = int((labels != 0).sum())
    if classes:
        unknown = {int(k) for k in classes} - {int(v) for v in labels if v != 0}
        if unknown:
            raise InvalidUpload(f"class map names instances not in the mask: {sorted(unknown)[:10]}", code="invalid_classes")
    png = encode_png(instances)
    for attempt in range(3):
        try:
            with StagedWrites() as staged, transaction.atomic():
                latest = Annotation.objects.filter(tile=tile).aggregate(v=Max("version"))["v"] or 0
                chosen_parent = parent
                if chosen_parent is None and latest:
                    chosen_parent = Annotation.objects.get(tile=tile, version=latest)
                mask_name = staged.save(f"annotations/{tile.pk}/v{latest + 1}-{uuid.uuid4().hex[:8]}.png", png)
                annotation = Annotation.objects.create(
                    tile=tile,
                    version=latest + 1,
                    mask=mask_name,
                    classes={str(k): int(v) for k, v in (classes or {}).items()},
                    nucleus_count=nucleus_count,
                    source=source,
                    status=status,
                    author=author,
                    parent=chosen_parent,
                    prediction=prediction,
                    external_id=external_id,
                )
                if source != AnnotationSource.IMPORTED:
                    # Bulk imports are an admin action: they do not count towards auto-retrain.
                    transaction.on_commit(lambda: _annotation_hook(annotation))
            return annotation, True
        except IntegrityError:
            # Another writer took this version number (or the external id) first: re-read and retry.
            if external_id:
                existing = Annotation.objects.filter(tile=tile, external_id=external_id).first()
                if existing is not None:
                    return existing, False
            if attempt == 2:
                raise Conflict("the tile was annotated concurrently; try again") from None
    raise AssertionError("unreachable")


@transaction.atomic
def review_annotation(*, annotation: Annotation, reviewer, accept: bool, comment: str = "") -> Annotation:
    if annotation.status != AnnotationStatus.SUBMITTED:
        raise Conflict(f"only submitted annotations can be reviewed; this one is {annotation.status}")
    annotation.status = AnnotationStatus.REVIEWED if accept else AnnotationStatus.REJECTED
    annotation.reviewed_by = reviewer
    annotation.reviewed_at = timezone.now()
    annotation.review_comment = comment
    annotation.save(update_fields=["status", "reviewed_by", "reviewed_at", "review_comment"])
    transaction.on_commit(lambda: _annotation_hook(annotation))
    return annotation


def _annotation_hook(annotation: Annotation) -> None:
    # Announced, not called: ml (a higher app) subscribes in its AppConfig.ready().
    annotation_saved.send(sender=Annotation, annotation=annotation)
