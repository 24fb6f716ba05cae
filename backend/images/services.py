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
from ml_worker.data import tile_grid

from .models import Annotation, AnnotationSource, AnnotationStatus, Image, Tile
from .validation import DecodedImage


@dataclass(frozen=True)
class IngestResult:
    image: Image
    created: bool


def ingest_images(
    *, project: Project, images: list[DecodedImage], uploaded_by, microns_per_pixel: float | None = None
) -> list[IngestResult]:
    """Store decoded images and cut them into tiles; all or nothing.

    The same bytes uploaded again to the project return the existing image (``created=False``).
    """
    results: list[IngestResult] = []
    with StagedWrites() as staged, transaction.atomic():
        for decoded in images:
            existing = Image.objects.filter(project=project, sha256=decoded.sha256).first()
            if existing is not None:
                results.append(IngestResult(existing, created=False))
                continue
            ext = {"jpeg": "jpg", "tiff": "tif"}.get(decoded.format, decoded.format)
            name = staged.save(f"images/{decoded.sha256[:2]}/{decoded.sha256}.{ext}", decoded.data, reuse_existing=True)
            image = Image.objects.create(
                project=project,
                name=decoded.name,
                file=name,
                sha256=decoded.sha256,
                format=decoded.format,
                width=decoded.width,
                height=decoded.height,
                microns_per_pixel=microns_per_pixel,
                uploaded_by=uploaded_by,
            )
            _cut_tiles(image=image, pixels=decoded.pixels, project=project, staged=staged)
            results.append(IngestResult(image, created=True))
    return results


def _cut_tiles(*, image: Image, pixels: np.ndarray, project: Project, staged: StagedWrites) -> None:
    tiles = []
    # The same grid the engine uses for tiled inference: the last tile of a row or column is
    # shifted back to end at the border, and a side shorter than a tile is one tile of that size.
    h, w = min(project.tile_size, image.height), min(project.tile_size, image.width)
    for y, x in tile_grid(image.height, image.width, project.tile_size, project.tile_overlap):
        name = staged.save(f"tiles/{image.pk}/{x}_{y}_{w}x{h}.png", encode_png(pixels[y : y + h, x : x + w]))
        tiles.append(Tile(image=image, project=project, x=x, y=y, w=w, h=h, file=name))
    Tile.objects.bulk_create(tiles)


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
    from backend.ml.services import on_annotation_saved

    on_annotation_saved(annotation=annotation)
