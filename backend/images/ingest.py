"""Ingest: turn a stored image or slide file into a ready Image with its thumbnail and Tile rows.

Runs in the ``cpu`` worker (``tasks.ingest_image``) for uploads, inline for ``import_dataset``.
Reads the file through ``ml_worker.slides`` (OpenSlide, tifffile, Pillow) and never decodes
level 0 whole: the thumbnail and the tissue mask come from a low-resolution read, and tiles are
only rows (their pixels are read on demand, ``pixels.py``).

Tiles: the project's grid (``tile_size``, ``tile_overlap``) is laid over the image at the
project's working resolution; each cell's origin is stored in level-0 pixels. On slides
(``kind=slide``: a file with a pyramid) only cells whose tissue fraction reaches the project's
``min_tissue_fraction`` become Tile rows; a single image (PNG/JPEG/flat TIFF) is a region someone
chose, so every cell is kept. ``tiles_grid`` / ``tiles_kept`` record both counts.

All or nothing: rows are written in one transaction and the thumbnail through ``StagedWrites``;
a failure leaves the image ``failed`` with a short reason, no tiles, and its file removed.
"""
from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

import numpy as np
from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image as PILImage

from backend.common.events import publish
from backend.common.jobs import enqueue_on_commit
from backend.common.storage import StagedWrites
from ml_worker.data import tile_grid

from .models import Image, ImageKind, ImageState, Tile

log = logging.getLogger(__name__)
THUMBNAIL_SIZE = 512
TISSUE_MASK_MAX_SIDE = 4096
MASK_PIXELS_PER_TILE = 16  # tissue mask resolution: each tile spans at least this many mask pixels a side
BULK_BATCH = 2000


class IngestError(Exception):
    """A problem with the file itself, explained in words the uploader can act on."""


def publish_ingest(image: Image, message: str = "") -> None:
    """Live progress on the project's WebSocket (best effort: the Image row is the truth)."""
    publish(
        image.project_id, "image.ingest", image_id=image.pk, state=image.state, progress=round(image.ingest_progress, 3),
        tiles_kept=image.tiles_kept, tiles_grid=image.tiles_grid, message=message or image.state_reason,
    )


def _progress(image: Image, value: float, message: str) -> None:
    image.ingest_progress = value
    Image.objects.filter(pk=image.pk).update(ingest_progress=value)
    publish_ingest(image, message)


def grid_rects(*, width: int, height: int, tile_size: int, overlap: int, scale: float) -> list[tuple[int, int, int, int, int, int]]:
    """The project's grid over an image: ``(x0, y0, w0, h0, w, h)`` per cell, origin and extent in
    level-0 pixels, size in working pixels (``scale`` = level-0 pixels per working pixel)."""
    work_w, work_h = max(1, int(width / scale)), max(1, int(height / scale))
    tw, th = min(tile_size, work_w), min(tile_size, work_h)
    rects = []
    for y, x in tile_grid(work_h, work_w, tile_size, overlap):
        x0, y0 = round(x * scale), round(y * scale)
        rects.append((x0, y0, math.ceil(tw * scale), math.ceil(th * scale), tw, th))
    return rects


def _jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _tissue_fractions(reader, rects, *, tile_level0: float) -> list[float]:
    from ml_worker.tissue import tile_tissue_fractions, tissue_mask

    width, height = reader.dimensions
    target_downsample = max(1.0, tile_level0 / MASK_PIXELS_PER_TILE)
    side = int(min(TISSUE_MASK_MAX_SIDE, max(64, math.ceil(max(width, height) / target_downsample))))
    lowres = reader.thumbnail(side)
    mask = tissue_mask(lowres)
    downsample = (width / mask.shape[1], height / mask.shape[0])
    return list(tile_tissue_fractions(mask, downsample=downsample, grid=[r[:4] for r in rects]))


def build_image(*, image: Image, progress: Callable[[float, str], None] | None = None) -> Image:
    """Read ``image``'s file, store its thumbnail, create its Tile rows and mark it ready.

    Raises on any problem (the caller decides what failure means); writes nothing then.
    """
    from ml_worker.slides import SlideError

    from .pixels import forget_image, open_image_reader

    report = progress or (lambda value, message: None)
    project = image.project
    try:
        forget_image(image)
        reader, reader_lock = open_image_reader(image)
    except SlideError as exc:
        raise IngestError(str(exc)) from None
    except FileNotFoundError:
        raise IngestError("the uploaded file is missing from storage") from None
    with reader_lock:
        width, height = reader.dimensions
        mpp = image.microns_per_pixel or (float(reader.mpp) if reader.mpp else None)
        kind = ImageKind.SLIDE if reader.level_count > 1 else ImageKind.IMAGE
        report(0.1, f"opened {reader.format} {width}x{height}, {reader.level_count} level(s)")
        try:
            thumbnail = reader.thumbnail(THUMBNAIL_SIZE)
        except SlideError as exc:
            raise IngestError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for a broken file
            raise IngestError(f"the file could not be decoded (truncated or corrupt?): {exc}") from None
        effective_mpp = mpp or project.working_mpp
        scale = project.working_mpp / effective_mpp
        if abs(scale - 1.0) < 0.02:
            scale = 1.0
        rects = grid_rects(width=width, height=height, tile_size=project.tile_size, overlap=project.tile_overlap,
                           scale=scale)
        if kind == ImageKind.SLIDE:
            try:
                fractions = _tissue_fractions(reader, rects, tile_level0=project.tile_size * scale)
            except Exception as exc:  # noqa: BLE001 - decoders raise many types for a broken file
                raise IngestError(f"the slide could not be decoded (truncated or corrupt?): {exc}") from None
            kept = [r for r, f in zip(rects, fractions) if f >= project.min_tissue_fraction]
        else:
            kept = rects
        report(0.4, f"tissue in {len(kept)} of {len(rects)} tiles")
        if kind == ImageKind.IMAGE:
            # A flat image is decoded whole by its reader anyway; reading one tile proves the
            # pixel data is complete (a truncated PNG fails here, not later in the editor).
            try:
                reader.read_region(0, max(0, height - 1), width, 1, level=0)
            except Exception as exc:  # noqa: BLE001 - decoders raise many types for a broken file
                raise IngestError(f"the image could not be decoded (truncated or corrupt?): {exc}") from None
        levels = int(reader.level_count)
    with StagedWrites() as staged, transaction.atomic():
        thumb_name = staged.save(f"thumbnails/{image.sha256[:2]}/{image.sha256}-{image.pk}.jpg", _jpeg(thumbnail))
        Tile.objects.filter(image=image).delete()  # a redelivered task starts over
        for start in range(0, len(kept), BULK_BATCH):
            batch = kept[start : start + BULK_BATCH]
            Tile.objects.bulk_create(
                [Tile(image=image, project=project, x=x0, y=y0, w=w, h=h) for x0, y0, _w0, _h0, w, h in batch]
            )
            report(0.4 + 0.55 * min(1.0, (start + len(batch)) / max(1, len(kept))), "tiles")
        image.width, image.height, image.microns_per_pixel, image.kind, image.levels = width, height, mpp, kind, levels
        image.tiles_grid, image.tiles_kept, image.thumbnail = len(rects), len(kept), thumb_name
        image.state, image.state_reason, image.ingest_progress = ImageState.READY, "", 1.0
        image.save(update_fields=["width", "height", "microns_per_pixel", "kind", "levels", "tiles_grid", "tiles_kept",
                                  "thumbnail", "state", "state_reason", "ingest_progress"])
    return image


def fail_image(*, image: Image, reason: str) -> Image:
    """Mark ``image`` failed with ``reason``: no tiles, no thumbnail, its file removed (if no other image uses it)."""
    from .pixels import forget_image

    forget_image(image)
    name = image.file.name
    with transaction.atomic():
        Tile.objects.filter(image=image).delete()
        image.state, image.state_reason, image.ingest_progress = ImageState.FAILED, reason[:500], 0.0
        image.tiles_grid = image.tiles_kept = 0
        image.save(update_fields=["state", "state_reason", "ingest_progress", "tiles_grid", "tiles_kept"])
    if name and not Image.objects.filter(file=name).exclude(pk=image.pk).exists():
        try:
            default_storage.delete(name)
        except Exception:
            log.exception("could not remove the file of failed image %s", image.pk)
    return image


def run_ingest(*, image_id: int) -> str:
    """The ``ingest_image`` task's work: build the image, or leave it failed with the reason."""
    image = Image.objects.select_related("project").filter(pk=image_id).first()
    if image is None:
        log.warning("image %s no longer exists; nothing to ingest", image_id)
        return "missing"
    if image.state == ImageState.READY:
        return "ready"  # a redelivered task after success
    if image.state == ImageState.FAILED:
        return "failed"

    def report(value: float, message: str) -> None:
        _progress(image, value, message)

    try:
        build_image(image=image, progress=report)
    except IngestError as exc:
        fail_image(image=image, reason=str(exc))
        publish_ingest(image)
        return "failed"
    except Exception as exc:
        log.exception("ingest of image %s failed", image_id)
        fail_image(image=image, reason=f"ingest failed: {type(exc).__name__}: {exc}")
        publish_ingest(image)
        return "failed"
    publish_ingest(image, f"ready: {image.tiles_kept} of {image.tiles_grid} tiles kept")
    return "ready"


def enqueue_ingest(image: Image) -> None:
    """Start ingest once the transaction that created ``image`` commits."""
    enqueue_on_commit("karyo.cpu.ingest_image", image.pk)
