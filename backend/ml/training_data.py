"""What a training run learns from: the image-level truth of its annotated regions (issue 12).

A nucleus belongs to the image, not to a tile. A run does not sample tiles: per image, the
rectangles its tiles with an accepted version cover (the *annotated regions*, in working pixels)
are cut into disjoint rectangles, and each rectangle becomes one ``ml_worker.data.Sample``:

- ``instances``: the image's stitched nuclei (``backend.images.truth.stitched_nuclei``, built from
  the latest accepted version of each tile) painted over the rectangle, so a nucleus cut by a
  tile border is one whole nucleus in the sample;
- ``classes`` (typed projects): each nucleus' model class id over its pixels;
- ``image``: the rectangle's pixels, pasted from its tiles as the annotators saw them (each read
  through ``backend.images.pixels.read_tile_rgb``: a slide is read tile by tile, never whole).

Pixels outside every annotated tile are never part of a sample, so they are never taken for
background: the training patches (``ml_worker.data.PatchDataset``) are cut inside a sample, and a
patch that hangs over a sample's edge is filled by mirroring the sample (image and labels alike),
not with the unannotated neighbourhood. A nucleus that reaches out of the annotated area is cut at
its edge. Rectangles longer than ``KARYO_TRAIN_REGION_MAX_SIDE`` working pixels (default 2048) are
split into equal parts, so one sample never holds more than that squared (memory stays bounded per
sample; a run holds its annotated area in memory, as it did tile by tile).

The split is the image's (``Image.split``, frozen by ``freeze_validation_split``): every sample of a
validation image validates, the rest train. Stays free of ml_worker's torch: Sample is plain data.
"""
from __future__ import annotations

import math

import numpy as np
from django.conf import settings

from backend.images.models import Annotation, Image, Split, Tile
from backend.images.pixels import level0_per_working_pixel, read_tile_rgb
from backend.images.selectors import training_annotations
from backend.images.stitching import Nucleus, label_window
from backend.images.truth import stitched_nuclei
from backend.projects.models import Project

Rect = tuple[int, int, int, int]  # x, y, w, h in working pixels of the image


def max_region_side() -> int:
    return max(64, int(getattr(settings, "KARYO_TRAIN_REGION_MAX_SIDE", 2048)))


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of True in a boolean row."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def disjoint_rectangles(rects: list[Rect]) -> list[Rect]:
    """Disjoint rectangles whose union is the union of ``rects``: the plane is cut at every
    rectangle edge, each horizontal band into its runs of covered cells, and a run that repeats
    in the next band grows downwards. A full grid of tiles (overlapping or not) is one rectangle."""
    rects = [r for r in rects if r[2] > 0 and r[3] > 0]
    if not rects:
        return []
    xs = sorted({v for x, _, w, _ in rects for v in (x, x + w)})
    ys = sorted({v for _, y, _, h in rects for v in (y, y + h)})
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    cover = np.zeros((len(ys) - 1, len(xs) - 1), bool)
    for x, y, w, h in rects:
        cover[yi[y] : yi[y + h], xi[x] : xi[x + w]] = True
    out: list[Rect] = []
    growing: dict[tuple[int, int], int] = {}  # run (i0, i1) -> first band
    for j in range(cover.shape[0] + 1):
        runs = set(_runs(cover[j])) if j < cover.shape[0] else set()
        for run in [r for r in growing if r not in runs]:
            j0 = growing.pop(run)
            out.append((xs[run[0]], ys[j0], xs[run[1]] - xs[run[0]], ys[j] - ys[j0]))
        for run in runs:
            growing.setdefault(run, j)
    return sorted(out, key=lambda r: (r[1], r[0]))


def split_rectangle(rect: Rect, max_side: int) -> list[Rect]:
    """``rect`` cut into equal parts no side of which is longer than ``max_side``."""
    x, y, w, h = rect
    nx, ny = math.ceil(w / max_side), math.ceil(h / max_side)
    xb = [x + round(i * w / nx) for i in range(nx + 1)]
    yb = [y + round(j * h / ny) for j in range(ny + 1)]
    return [(xb[i], yb[j], xb[i + 1] - xb[i], yb[j + 1] - yb[j]) for j in range(ny) for i in range(nx)]


def tile_rect(tile: Tile, scale: float) -> Rect:
    """The tile in working pixels of its image (the stitcher's grid: ``truth.tile_labels``)."""
    return round(tile.x / scale), round(tile.y / scale), int(tile.w), int(tile.h)


def annotated_regions(*, tiles: list[Tile], scale: float) -> list[Rect]:
    """The disjoint rectangles (working pixels) that ``tiles`` cover, none longer than
    :func:`max_region_side` on a side."""
    side = max_region_side()
    return [part for rect in disjoint_rectangles([tile_rect(t, scale) for t in tiles])
            for part in split_rectangle(rect, side)]


def _overlap(a: Rect, b: Rect) -> Rect | None:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def region_pixels(*, region: Rect, tiles: list[Tile], scale: float) -> np.ndarray:
    """(h, w, 3) uint8 of ``region``, pasted from the tiles that cover it (each read on its own)."""
    x, y, w, h = region
    out = np.zeros((h, w, 3), np.uint8)
    covered = np.zeros((h, w), bool)
    for tile in tiles:
        rect = tile_rect(tile, scale)
        common = _overlap(rect, region)
        if common is None:
            continue
        cx, cy, cw, ch = common
        rgb = read_tile_rgb(tile)
        out[cy - y : cy - y + ch, cx - x : cx - x + cw] = rgb[cy - rect[1] : cy - rect[1] + ch, cx - rect[0] : cx - rect[0] + cw]
        covered[cy - y : cy - y + ch, cx - x : cx - x + cw] = True
    if not covered.all():  # a region is a part of the tiles' union: this is a bug, not bad data
        raise ValueError(f"region {region} is not covered by the annotated tiles")
    return out


def region_labels(*, region: Rect, nuclei: list[Nucleus], boxes: np.ndarray,
                  model_ids: dict[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The stitched nuclei over ``region``: (instances int32 1..N, model class map uint8 or None).
    ``boxes``: the nuclei's (x0, y0, x1, y1), to pick those that reach the region."""
    x, y, w, h = region
    if len(nuclei):
        hit = np.flatnonzero((boxes[:, 0] < x + w) & (boxes[:, 2] > x) & (boxes[:, 1] < y + h) & (boxes[:, 3] > y))
    else:
        hit = np.zeros(0, np.int64)
    chosen = [nuclei[k] for k in hit.tolist()]
    instances = label_window(chosen, x=x, y=y, w=w, h=h)
    if model_ids is None:
        return instances, None
    default = min(model_ids.values())
    lut = np.zeros(len(chosen) + 1, np.uint8)
    for k, nucleus in enumerate(chosen, start=1):
        lut[k] = model_ids.get(int(nucleus.class_id), default)
    return instances, lut[instances]


def image_samples(*, project: Project, model_ids: dict[int, int] | None) -> tuple[list, list]:
    """(train, val) Samples of ``project``: per image, its annotated regions with its stitched
    nuclei (module docstring). ``model_ids``: project class id -> model class id (1..K) for a
    typed run (a nucleus of another class gets the first model class), None for a binary one."""
    from ml_worker.data import Sample

    by_image: dict[int, list[Annotation]] = {}
    for annotation in (training_annotations(project=project).select_related("tile__image", "tile__project")
                       .order_by("tile__image_id", "tile__y", "tile__x", "tile_id")):
        by_image.setdefault(annotation.tile.image_id, []).append(annotation)
    train, val = [], []
    for versions in by_image.values():
        image: Image = versions[0].tile.image
        tiles = [a.tile for a in versions]
        scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
        nuclei = stitched_nuclei(image=image)
        boxes = np.array([n.bbox for n in nuclei], np.int64).reshape(-1, 4)
        for region in annotated_regions(tiles=tiles, scale=scale):
            instances, classes = region_labels(region=region, nuclei=nuclei, boxes=boxes, model_ids=model_ids)
            x, y, w, h = region
            sample = Sample(name=f"image-{image.pk}-x{x}-y{y}-{w}x{h}",
                            image=region_pixels(region=region, tiles=tiles, scale=scale),
                            instances=instances, classes=classes)
            (val if image.split == Split.VAL else train).append(sample)
    return train, val
