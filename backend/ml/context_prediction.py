"""Predictions hold whole nuclei (issue 12): the nuclei a tile owns (centroid inside it, the
ownership rule of ``backend.images.margins``), each whole, including its parts outside the tile.

The instance map they are cut from is predicted on more than the tile:

* the region of the image that the context frames (``margins.context_frame``: the tile with the
  project's ``context_margin``) of the run's tiles of that image cover — the whole image when
  every tile is predicted, a strip of a slide for a chunk of its tiles — at once (blended tiled
  inference, ``ml_worker.inference.predict_instances``), when it is at most
  ``WHOLE_IMAGE_PIXELS`` and the frames fill at least a third of it: computed once and kept
  while the image's tiles are stored, so a nucleus crossing a tile border is the same nucleus
  seen from both tiles;
* otherwise (scattered tiles of a slide) each tile's context frame on its own; a nucleus larger
  than the margin is cut at the frame's edge.

The tile's own analysis (``analyze_tiles``: uncertainty scores, embedding, heat map) is unchanged;
this adds the map a ``Prediction`` stores as ``context_mask`` (and its tile-box crop as ``mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from backend.images import margins
from backend.images.models import Tile
from backend.images.pixels import level0_per_working_pixel, read_image_region
from backend.images.stitching import owner_of_rect

WHOLE_IMAGE_PIXELS = 4096 * 4096


@dataclass
class OwnedPrediction:
    """The owned nuclei (ids 1..n) in a map whose origin is (dx, dy) <= 0 from the tile's origin."""

    instances: np.ndarray
    dx: int
    dy: int
    classes: dict[str, list]  # instance id -> [project class id, confidence]; empty for a binary model

    @property
    def nucleus_count(self) -> int:
        return int(self.instances.max(initial=0))

    def tile_box(self, *, w: int, h: int) -> np.ndarray:
        return np.ascontiguousarray(self.instances[-self.dy : -self.dy + h, -self.dx : -self.dx + w])


@dataclass
class _Map:
    """A predicted instance map of the image region at (x, y) (working px), with what ownership needs."""

    x: int
    y: int
    instances: np.ndarray
    boxes: list
    centroids: np.ndarray  # (n + 1, 2): x, y in the map's pixels
    labels: np.ndarray | None  # model class per instance id (typed models)
    confidence: np.ndarray | None


class ContextPredictor:
    """``predictor(tile)`` -> :class:`OwnedPrediction` for the tiles of one model version."""

    def __init__(self, *, model, normalizer, tile_size: int, classes: list[dict], tiles: list[Tile]):
        self.model, self.normalizer, self.tile_size, self.classes = model, normalizer, int(tile_size), classes
        self._image_map: tuple[int, _Map] | None = None
        self._rects: tuple[int, list[int], list] | None = None
        # Per image: the region the run's tiles' frames cover, when it is worth predicting at once.
        frames: dict[int, list[margins.Frame]] = {}
        for tile in tiles:
            frames.setdefault(tile.image_id, []).append(margins.context_frame(tile=tile))
        self._regions: dict[int, tuple[int, int, int, int]] = {}
        for image_id, group in frames.items():
            x0, y0 = min(f.x for f in group), min(f.y for f in group)
            x1, y1 = max(f.x + f.w for f in group), max(f.y + f.h for f in group)
            area = (x1 - x0) * (y1 - y0)
            if area <= WHOLE_IMAGE_PIXELS and 3 * sum(f.w * f.h for f in group) >= area:
                self._regions[image_id] = (x0, y0, x1 - x0, y1 - y0)

    def _infer(self, rgb: np.ndarray, *, x: int, y: int) -> _Map:
        from ml_worker.inference import predict_instances

        instances, probs = predict_instances(self.model, rgb, tile_size=self.tile_size, normalizer=self.normalizer)
        instances = np.asarray(instances, np.int32)
        n = int(instances.max(initial=0))
        rows, cols = np.nonzero(instances)
        values = instances[rows, cols]
        count = np.maximum(np.bincount(values, minlength=n + 1), 1)
        centroids = np.stack([np.bincount(values, weights=cols + 0.5, minlength=n + 1) / count,
                              np.bincount(values, weights=rows + 0.5, minlength=n + 1) / count], axis=1)
        labels = confidence = None
        if self.classes and probs is not None and n:
            from ml_worker.instances import instance_classes

            fn = getattr(self.model, "class_probabilities", None)
            labels, confidence = instance_classes(instances, fn(probs) if callable(fn) else probs)
        return _Map(x, y, instances, ndi.find_objects(instances), centroids, labels, confidence)

    def _map_for(self, tile: Tile, frame: margins.Frame) -> _Map:
        image, project = tile.image, tile.project
        scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
        region = self._regions.get(image.pk)
        if region is not None:
            if self._image_map is None or self._image_map[0] != image.pk:
                self._image_map = None  # let the previous image's map go first
                x, y, w, h = region
                rgb = read_image_region(image, x=round(x * scale), y=round(y * scale), w=w, h=h,
                                        working_mpp=project.working_mpp)
                self._image_map = (image.pk, self._infer(np.ascontiguousarray(rgb), x=x, y=y))
            return self._image_map[1]
        rgb = read_image_region(image, x=round(frame.x * scale), y=round(frame.y * scale), w=frame.w, h=frame.h,
                                working_mpp=project.working_mpp)
        return self._infer(np.ascontiguousarray(rgb), x=frame.x, y=frame.y)

    def _tile_rects(self, tile: Tile) -> tuple[list, int]:
        if self._rects is None or self._rects[0] != tile.image_id:
            ids, rects = margins.image_tile_rects(image=tile.image, working_mpp=tile.project.working_mpp)
            self._rects = (tile.image_id, ids, rects)
        _, ids, rects = self._rects
        return rects, ids.index(tile.pk)

    def __call__(self, tile: Tile) -> OwnedPrediction:
        frame = margins.context_frame(tile=tile)
        m = self._map_for(tile, frame)
        rects, owner = self._tile_rects(tile)
        tx, ty = frame.x + frame.tile_x - m.x, frame.y + frame.tile_y - m.y  # the tile's origin in the map
        window = m.instances[ty : ty + tile.h, tx : tx + tile.w]
        owned = [int(v) for v in np.unique(window) if v
                 and owner_of_rect(rects, m.x + m.centroids[v, 0], m.y + m.centroids[v, 1]) == owner]
        x0, y0, x1, y1 = tx, ty, tx + tile.w, ty + tile.h
        for v in owned:
            rows, cols = m.boxes[v - 1]
            x0, y0, x1, y1 = min(x0, cols.start), min(y0, rows.start), max(x1, cols.stop), max(y1, rows.stop)
        lut = np.zeros(int(m.instances.max(initial=0)) + 1, np.int32)
        lut[owned] = np.arange(1, len(owned) + 1, dtype=np.int32)
        crop = lut[m.instances[y0:y1, x0:x1]]
        classes = {}
        if m.labels is not None:
            for new, v in enumerate(owned, start=1):
                if 0 < int(m.labels[v]) <= len(self.classes):
                    classes[str(new)] = [int(self.classes[int(m.labels[v]) - 1]["id"]), round(float(m.confidence[v]), 4)]
        return OwnedPrediction(instances=crop, dx=x0 - tx, dy=y0 - ty, classes=classes)
