"""Image-level truth, stored: per image, the stitched table of nuclei (``stitching.stitch``) built
from the latest accepted version of each tile, kept in storage as ``stitched/<image id>.npz``.

Derived, never edited: it is rebuilt on the ``cpu`` queue (task ``karyo.cpu.stitch_image``) when a
tile of the image gets a new accepted version (``images.receivers.on_annotation_saved``), and
rebuilt on read when the versions it was built from are no longer the accepted ones (bulk imports
announce nothing). Exports stitch the versions their filters chose with the same function.

The table holds, per nucleus: its box (x0, y0, w, h in the tiles' pixel grid), its pixels (a
packed boolean crop), its class id, and its owner (tile id, annotation id, version).
"""
from __future__ import annotations

import io
import logging

import numpy as np
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from backend.common.storage import read_bytes, read_label_map

from .models import Annotation, AnnotationSource, Image
from .pixels import level0_per_working_pixel
from .selectors import training_annotations
from .stitching import Nucleus, TileLabels, stitch

log = logging.getLogger(__name__)


def stitched_name(*, image_id: int) -> str:
    return f"stitched/{image_id}.npz"


def tile_labels(*, annotations: list[Annotation], scale: float = 1.0) -> list[TileLabels]:
    """The stitcher's input: each version's label map placed at its tile's origin (tile grid pixels).

    A version made in the context frame (``context_mask``) gives its owned nuclei whole
    (``TileLabels.whole``, origin offset by ``context_x``/``context_y``); an older one its tile box."""
    out = []
    for a in annotations:
        whole = bool(a.context_mask)
        out.append(TileLabels(
            tile_id=a.tile_id, x=round(a.tile.x / scale), y=round(a.tile.y / scale),
            instances=read_label_map(a.context_mask.name if whole else a.mask.name),
            classes={int(k): int(v) for k, v in (a.classes or {}).items()}, annotation_id=a.pk, version=a.version,
            # A data set import cuts one image-level label map into tiles and keeps its ids.
            shared_ids=a.source == AnnotationSource.IMPORTED,
            whole=whole, ox=int(a.context_x) if whole else 0, oy=int(a.context_y) if whole else 0,
            tile_w=a.tile.w, tile_h=a.tile.h,
        ))
    return out


def accepted_versions(*, image: Image) -> list[Annotation]:
    """Per tile of ``image``, the latest accepted version (what training uses), in tile order."""
    return list(training_annotations(project=image.project).filter(tile__image=image)
                .order_by("tile__y", "tile__x", "tile_id"))


def _encode(nuclei: list[Nucleus], sources: list[int]) -> bytes:
    boxes = np.array([[n.x0, n.y0, n.crop.shape[1], n.crop.shape[0]] for n in nuclei], np.int64).reshape(-1, 4)
    bits = [np.packbits(n.crop.ravel()) for n in nuclei]
    offsets = np.cumsum([0] + [len(b) for b in bits]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        boxes=boxes,
        bits=np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        offsets=offsets,
        classes=np.array([n.class_id for n in nuclei], np.int64),
        owners=np.array([[n.tile_id, n.annotation_id or 0, n.version or 0, n.source_label] for n in nuclei],
                        np.int64).reshape(-1, 4),
        sources=np.array(sorted(sources), np.int64),
    )
    return buffer.getvalue()


def _decode(data: bytes) -> tuple[list[Nucleus], list[int]]:
    with np.load(io.BytesIO(data)) as z:
        boxes, bits, offsets = z["boxes"], z["bits"], z["offsets"]
        classes, owners, sources = z["classes"], z["owners"], z["sources"]
    nuclei = []
    for k, (x0, y0, w, h) in enumerate(boxes.tolist()):
        crop = np.unpackbits(bits[offsets[k] : offsets[k + 1]], count=w * h).astype(bool).reshape(h, w)
        tile_id, annotation_id, version, label = owners[k].tolist()
        nuclei.append(Nucleus(x0=x0, y0=y0, crop=crop, class_id=int(classes[k]), tile_id=tile_id,
                              annotation_id=annotation_id or None, version=version or None, source_label=label,
                              tiles=(tile_id,)))
    return nuclei, sources.tolist()


def rebuild_stitched(*, image: Image) -> list[Nucleus]:
    """Stitch ``image`` from its accepted versions and store the table (replacing the old one)."""
    versions = accepted_versions(image=image)
    scale = level0_per_working_pixel(image, working_mpp=image.project.working_mpp)
    default_class = int(image.project.nucleus_classes[0]["id"]) if image.project.nucleus_classes else 1
    nuclei = stitch(tile_labels(annotations=versions, scale=scale), default_class=default_class)
    name = stitched_name(image_id=image.pk)
    if default_storage.exists(name):
        default_storage.delete(name)
    default_storage.save(name, ContentFile(_encode(nuclei, [a.pk for a in versions])))
    return nuclei


def stitched_nuclei(*, image: Image) -> list[Nucleus]:
    """The image's stitched nuclei: the stored table when it was built from the versions accepted
    now, else rebuilt (and stored) here."""
    name = stitched_name(image_id=image.pk)
    current = sorted(a.pk for a in accepted_versions(image=image))
    if default_storage.exists(name):
        try:
            nuclei, sources = _decode(read_bytes(name))
        except Exception:  # a damaged derived file is rebuilt, never trusted
            log.warning("stitched table %s unreadable; rebuilding", name)
        else:
            if sources == current:
                return nuclei
    return rebuild_stitched(image=image)


def run_stitch(*, image_id: int) -> str:
    """Body of the ``karyo.cpu.stitch_image`` task."""
    image = Image.objects.select_related("project").filter(pk=image_id).first()
    if image is None:
        return "gone"
    return f"{len(rebuild_stitched(image=image))} nuclei"
