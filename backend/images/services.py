from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from django.db import IntegrityError, transaction
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
    context: tuple[np.ndarray, int, int] | None = None,
) -> tuple[Annotation, bool]:
    """Append a new annotation version to ``tile``. Returns ``(annotation, created)``.

    ``instances`` is an (h, w) integer label map of the tile. The same ``external_id`` (a Label
    Studio annotation delivered twice) returns the existing version instead of a duplicate.
    ``context``: (label map, dx, dy) of the nuclei the tile owns, whole (``margins``), its origin at
    (dx, dy) <= 0 from the tile's; ``instances`` is then its tile box. Prefer
    :func:`create_frame_annotation`, which applies the ownership rule.
    """
    if instances.shape != (tile.h, tile.w):
        raise InvalidUpload(
            f"mask is {instances.shape[1]}x{instances.shape[0]} but the tile is {tile.w}x{tile.h}", code="mask_size_mismatch"
        )
    if context is not None:
        whole, dx, dy = context
        if dx > 0 or dy > 0 or whole.shape[0] < tile.h - dy or whole.shape[1] < tile.w - dx:
            raise InvalidUpload("the context map must cover the tile", code="mask_size_mismatch")
    if status not in (AnnotationStatus.DRAFT, AnnotationStatus.SUBMITTED) and source != AnnotationSource.IMPORTED:
        raise InvalidUpload("new annotations are draft or submitted; reviews set the other states", code="invalid_status")
    if parent is not None and parent.tile_id != tile.pk:
        raise InvalidUpload("the parent annotation belongs to another tile", code="invalid_parent")
    if external_id:
        existing = Annotation.objects.filter(tile=tile, external_id=external_id).first()
        if existing is not None:
            return existing, False
    labels = np.unique(instances if context is None else context[0])
    nucleus_count = int((labels != 0).sum())
    if classes:
        unknown = {int(k) for k in classes} - {int(v) for v in labels if v != 0}
        if unknown:
            raise InvalidUpload(f"class map names instances not in the mask: {sorted(unknown)[:10]}", code="invalid_classes")
    png = encode_png(instances)
    context_png = encode_png(context[0]) if context is not None else None
    with StagedWrites() as staged:
        # Files first, outside the transaction: on SQLite the transaction holds the database's one
        # write lock, which every other submission and lease waits for (and with S3 a write is a
        # network round trip). A version that is never stored removes them again.
        stem = f"annotations/{tile.pk}/{uuid.uuid4().hex}"
        mask_name = staged.save(f"{stem}.png", png)
        context_name = staged.save(f"{stem}-context.png", context_png) if context_png is not None else ""
        for attempt in range(3):
            try:
                with transaction.atomic():
                    latest_pk, latest = (
                        Annotation.objects.filter(tile=tile).order_by("-version").values_list("pk", "version").first()
                        or (None, 0)
                    )
                    annotation = Annotation.objects.create(
                        tile=tile,
                        version=latest + 1,
                        mask=mask_name,
                        context_mask=context_name,
                        context_x=int(context[1]) if context is not None else 0,
                        context_y=int(context[2]) if context is not None else 0,
                        classes={str(k): int(v) for k, v in (classes or {}).items()},
                        nucleus_count=nucleus_count,
                        source=source,
                        status=status,
                        author=author,
                        **({"parent": parent} if parent is not None else {"parent_id": latest_pk}),
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
                        staged.remove_all()
                        return existing, False
                if attempt == 2:
                    raise Conflict("the tile was annotated concurrently; try again") from None
    raise AssertionError("unreachable")


def create_frame_annotation(*, tile: Tile, frame, instances: np.ndarray, classes: dict[str, int] | None = None,
                            **kwargs) -> tuple[Annotation, bool]:
    """Append a version drawn in ``tile``'s context frame (``margins.Frame``; ``instances`` is the
    frame's label map): the nuclei the tile owns are kept whole, margin parts included; nuclei
    owned by other tiles are dropped (ownership rule, ``margins``). Other arguments as
    :func:`create_annotation`."""
    from . import margins

    instances = np.asarray(instances)
    if instances.shape != (frame.h, frame.w):
        raise InvalidUpload(f"mask is {instances.shape[1]}x{instances.shape[0]} but the context frame is "
                            f"{frame.w}x{frame.h}", code="mask_size_mismatch")
    rects, owner = margins.tile_rects(tile=tile)
    owned = margins.keep_owned(instances, frame=frame, rects=rects, owner=owner)
    present = {str(v) for v in np.unique(owned) if v}
    kept_classes = {k: v for k, v in (classes or {}).items() if str(k) in present}
    return create_annotation(
        tile=tile, instances=margins.crop_to_tile(owned, frame=frame), classes=kept_classes,
        context=(owned, -frame.tile_x, -frame.tile_y), **kwargs,
    )


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
