"""The tile in its context frame (issue 12): the tile with ``Project.context_margin`` pixels of
its image around it (clipped at the image's border), and the ownership rule that decides which
nuclei of that frame a version of the tile keeps.

**Ownership rule**: a nucleus belongs to the tile that holds its centroid (the mean of its pixel
centres); where tiles overlap, to the one whose centre is nearest (``stitching.owner_of``). A
version made in the frame keeps the nuclei its tile owns, whole, including their parts in the
margin (``Annotation.context_mask``), and its tile-box ``mask`` is the same nuclei cut to the
tile. Nuclei owned by other tiles are dropped from it: they belong to the neighbours' versions.

Coordinates are pixels of the tiles' grid (the project's working resolution); a frame is a
rectangle of the image in that grid. Label maps of older versions (and of imports) cover the tile
box only; :func:`version_in_frame` places either kind in a frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.common.storage import read_label_map

from .models import Tile
from .pixels import level0_per_working_pixel
from .stitching import owner_of_rect


@dataclass(frozen=True)
class Frame:
    """A rectangle of the image (x, y, w, h; working px) around a tile at (tile_x, tile_y) in it."""

    x: int
    y: int
    w: int
    h: int
    tile_x: int  # the tile's left edge inside the frame
    tile_y: int
    tile_w: int
    tile_h: int

    @property
    def margin(self) -> tuple[int, int, int, int]:
        """Pixels of context left, top, right, bottom of the tile (0 at the image's border)."""
        return (self.tile_x, self.tile_y, self.w - self.tile_x - self.tile_w, self.h - self.tile_y - self.tile_h)

    def as_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h,
                "tile": {"x": self.tile_x, "y": self.tile_y, "w": self.tile_w, "h": self.tile_h}}


def tile_origin(tile: Tile, *, scale: float) -> tuple[int, int]:
    """The tile's origin in the working grid (``Tile.x``/``y`` are level-0 pixels)."""
    return round(tile.x / scale), round(tile.y / scale)


def context_frame(*, tile: Tile, margin: int | None = None) -> Frame:
    """``tile`` with ``margin`` (default the project's ``context_margin``) pixels around it,
    clipped at the image's border."""
    image, project = tile.image, tile.project
    margin = int(project.context_margin if margin is None else margin)
    scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
    width, height = max(1, int(image.width / scale)), max(1, int(image.height / scale))
    tx, ty = tile_origin(tile, scale=scale)
    x0, y0 = max(0, min(tx, tx - margin)), max(0, min(ty, ty - margin))
    x1, y1 = max(tx + tile.w, min(width, tx + tile.w + margin)), max(ty + tile.h, min(height, ty + tile.h + margin))
    return Frame(x=x0, y=y0, w=x1 - x0, h=y1 - y0, tile_x=tx - x0, tile_y=ty - y0, tile_w=tile.w, tile_h=tile.h)


def image_tile_rects(*, image, working_mpp: float) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """The ids and rectangles (x0, y0, x1, y1; working px) of every tile of ``image``."""
    scale = level0_per_working_pixel(image, working_mpp=working_mpp)
    ids, rects = [], []
    for tile_id, x, y, w, h in Tile.objects.filter(image_id=image.pk).order_by("y", "x", "id").values_list(
            "id", "x", "y", "w", "h"):
        x0, y0 = round(x / scale), round(y / scale)
        ids.append(tile_id)
        rects.append((x0, y0, x0 + w, y0 + h))
    return ids, rects


def tile_rects(*, tile: Tile) -> tuple[list[tuple[int, int, int, int]], int]:
    """The rectangles of every tile of ``tile``'s image (:func:`image_tile_rects`), and the index
    of ``tile`` among them."""
    ids, rects = image_tile_rects(image=tile.image, working_mpp=tile.project.working_mpp)
    return rects, ids.index(tile.pk)


def centroids(instances: np.ndarray) -> dict[int, tuple[float, float]]:
    """Label -> (x, y) of its pixel centres' mean, in the map's pixels (pixel (0, 0) spans 0..1)."""
    labels = np.asarray(instances).astype(np.int64, copy=False)
    if not labels.any():
        return {}
    rows, cols = np.nonzero(labels)
    values = labels[rows, cols]
    count = np.bincount(values)
    sx = np.bincount(values, weights=cols + 0.5)
    sy = np.bincount(values, weights=rows + 0.5)
    return {int(k): (float(sx[k] / count[k]), float(sy[k] / count[k])) for k in np.nonzero(count)[0].tolist()}


def owned_labels(instances: np.ndarray, *, frame: Frame, rects: list[tuple[int, int, int, int]], owner: int) -> set[int]:
    """The labels of a frame's label map whose centroid is owned by tile ``owner`` (an index
    into ``rects``; the ownership rule)."""
    return {label for label, (cx, cy) in centroids(instances).items()
            if owner_of_rect(rects, frame.x + cx, frame.y + cy) == owner}


def keep_owned(instances: np.ndarray, *, frame: Frame, rects: list[tuple[int, int, int, int]], owner: int) -> np.ndarray:
    """``instances`` (the frame's label map) with only the nuclei tile ``owner`` owns."""
    instances = np.asarray(instances)
    kept = owned_labels(instances, frame=frame, rects=rects, owner=owner)
    lut = np.zeros(int(instances.max(initial=0)) + 1, instances.dtype)
    for label in kept:
        lut[label] = label
    return lut[instances]


def crop_to_tile(instances: np.ndarray, *, frame: Frame) -> np.ndarray:
    """The tile's box of a frame's label map."""
    return np.ascontiguousarray(instances[frame.tile_y : frame.tile_y + frame.tile_h,
                                          frame.tile_x : frame.tile_x + frame.tile_w])


def paste(instances: np.ndarray, *, dx: int, dy: int, frame: Frame) -> np.ndarray:
    """A (frame.h, frame.w) int32 map with ``instances`` placed with its origin at (dx, dy) from the
    tile's origin (clipped to the frame)."""
    out = np.zeros((frame.h, frame.w), np.int32)
    h, w = instances.shape
    left, top = frame.tile_x + dx, frame.tile_y + dy
    x0, y0, x1, y1 = max(0, left), max(0, top), min(frame.w, left + w), min(frame.h, top + h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = instances[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def stored_maps(version) -> tuple[np.ndarray, int, int]:
    """An annotation version's or prediction's label map of the nuclei it holds and its origin
    from the tile's origin: the whole owned nuclei when it has them, else its tile box."""
    if getattr(version, "context_mask", None):
        return read_label_map(version.context_mask.name), int(version.context_x), int(version.context_y)
    return read_label_map(version.mask.name), 0, 0


def version_in_frame(version, *, frame: Frame) -> np.ndarray:
    """An annotation version or a prediction as a label map of ``frame``."""
    instances, dx, dy = stored_maps(version)
    return paste(instances, dx=dx, dy=dy, frame=frame)
