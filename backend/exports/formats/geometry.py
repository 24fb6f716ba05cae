"""Exact polygons for instance label maps, and back.

Polygons here follow the pixel *edges* ("crack" boundaries): a vertex is a pixel corner, so
pixel ``(row, col)`` is the unit square ``[col, col+1] x [row, row+1]`` — the convention of
COCO, QuPath and GeoJSON in image space. A region's crack boundary encloses exactly its
pixels, so ``rasterize(trace(mask)) == mask`` for every mask: no rasterisation loss for
polygons written by Karyo. Polygons from other tools (diagonal edges, fractional
coordinates) are rasterised with pycocotools, the reference COCO consumers use.

Rings are ``(k, 2)`` float arrays of ``(x, y)`` vertices, not closed (first != last), with
only the corners kept. Outer rings turn counter-clockwise on screen (y down) and have a
negative shoelace area; hole rings turn the other way. Foreground is 4-connected: pixels
touching only at a corner are separate parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

# Edge directions on screen (y down), clockwise order: right, down, left, up.
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)
_CROSS = ndi.generate_binary_structure(2, 1)


@dataclass
class Part:
    """One 4-connected piece of an instance: its outer ring and the rings of its holes."""

    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)


def shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def trace_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Every crack-boundary loop of a boolean mask (outer rings and holes), as int64 (k, 2)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    if not m.any():
        return []
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = m
    inner = p[1:-1, 1:-1]
    starts, dirs = [], []
    # Edge start vertices (x, y) for each kind of exposed pixel side.
    for d, exposed, (ox, oy) in (
        (2, inner & ~p[:-2, 1:-1], (1, 0)),  # top side, going left, starts at the top-right corner
        (0, inner & ~p[2:, 1:-1], (0, 1)),  # bottom side, going right, from the bottom-left corner
        (1, inner & ~p[1:-1, :-2], (0, 0)),  # left side, going down, from the top-left corner
        (3, inner & ~p[1:-1, 2:], (1, 1)),  # right side, going up, from the bottom-right corner
    ):
        rows, cols = np.nonzero(exposed)
        starts.append((rows + oy) * (w + 1) + (cols + ox))
        dirs.append(np.full(rows.size, d, np.int8))
    start = np.concatenate(starts)
    direction = np.concatenate(dirs)
    order = np.argsort(start, kind="stable")
    start, direction = start[order], direction[order]
    n = start.size
    # A vertex has one outgoing edge, or two where pixels touch only at that corner.
    first = {}
    second = {}
    for i, s in enumerate(start.tolist()):
        if s in first:
            second[s] = i
        else:
            first[s] = i
    dir_list = direction.tolist()
    start_list = start.tolist()
    visited = bytearray(n)
    rings = []
    stride = w + 1
    for e0 in range(n):
        if visited[e0]:
            continue
        vertices = []
        e = e0
        prev = -1
        while not visited[e]:
            visited[e] = 1
            d = dir_list[e]
            if d != prev:
                s = start_list[e]
                vertices.append((s % stride, s // stride))
                prev = d
            s = start_list[e]
            end = s + _DX[d] + _DY[d] * stride
            nxt = first[end]
            alt = second.get(end)
            if alt is not None:
                # Pinch: take the left turn, which keeps diagonal pixels apart (4-connectivity).
                left = (d + 3) % 4
                if dir_list[nxt] != left and dir_list[alt] == left:
                    nxt = alt
                if visited[nxt]:
                    nxt = alt if nxt != alt else nxt
            e = nxt
        # The loop closes on e0; drop a first vertex that continues the last edge's direction.
        if len(vertices) > 1 and dir_list[e0] == prev:
            vertices.pop(0)
        rings.append(np.asarray(vertices, dtype=np.int64))
    return rings


def instance_parts(mask: np.ndarray, *, offset: tuple[int, int] = (0, 0)) -> list[Part]:
    """The 4-connected parts of a boolean mask with their holes; vertices shifted by ``offset`` (x, y)."""
    labels, count = ndi.label(mask, structure=_CROSS)
    parts = []
    objects = ndi.find_objects(labels)
    for index, slc in enumerate(objects, start=1):
        if slc is None:
            continue
        sub = labels[slc] == index
        dy, dx = slc[0].start + offset[1], slc[1].start + offset[0]
        outer, holes = None, []
        for ring in trace_rings(sub):
            ring = ring + np.array([dx, dy])
            if shoelace(ring) < 0 and outer is None:
                outer = ring
            else:
                holes.append(ring)
        parts.append(Part(outer=outer, holes=holes))
    return parts


def label_parts(instances: np.ndarray) -> dict[int, list[Part]]:
    """Instance id -> its parts, for every instance of a label map, in ascending id order."""
    out: dict[int, list[Part]] = {}
    for index, slc in enumerate(ndi.find_objects(instances), start=1):
        if slc is None:
            continue
        out[index] = instance_parts(instances[slc] == index, offset=(slc[1].start, slc[0].start))
    return out


def _is_rectilinear(ring: np.ndarray) -> bool:
    if not np.all(ring == np.round(ring)):
        return False
    nxt = np.roll(ring, -1, axis=0)
    return bool(np.all((ring[:, 0] == nxt[:, 0]) | (ring[:, 1] == nxt[:, 1])))


def _fill_rectilinear(rings: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Even-odd fill of integer, axis-aligned rings: pixel centres with an odd crossing count."""
    diff = np.zeros((h + 1, w + 2), np.int32)
    for ring in rings:
        r = ring.astype(np.int64)
        nxt = np.roll(r, -1, axis=0)
        vertical = r[:, 0] == nxt[:, 0]
        x = np.clip(r[vertical, 0], 0, w + 1)
        y0 = np.clip(np.minimum(r[vertical, 1], nxt[vertical, 1]), 0, h)
        y1 = np.clip(np.maximum(r[vertical, 1], nxt[vertical, 1]), 0, h)
        np.add.at(diff, (y0, x), 1)
        np.add.at(diff, (y1, x), -1)
    crossings = np.cumsum(np.cumsum(diff, axis=0), axis=1)
    return (crossings[:h, :w] & 1).astype(bool)


def _fill_pycocotools(ring: np.ndarray, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([ring.astype(np.float64).ravel().tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def fill_polygon(rings: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """One polygon (outer ring + hole rings, in any orientation) -> (h, w) boolean mask."""
    rings = [np.asarray(r, dtype=np.float64) for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros((h, w), bool)
    if all(_is_rectilinear(r) for r in rings):
        return _fill_rectilinear(rings, h, w)
    out = np.zeros((h, w), bool)
    for ring in rings:
        out ^= _fill_rectilinear([ring], h, w) if _is_rectilinear(ring) else _fill_pycocotools(ring, h, w)
    return out


def rasterize_parts(polygons: list[list[np.ndarray]], h: int, w: int) -> np.ndarray:
    """Union of polygons (each a list of rings: outer first, then holes)."""
    out = np.zeros((h, w), bool)
    for rings in polygons:
        out |= fill_polygon(rings, h, w)
    return out


def paint(shapes: list[tuple[int, tuple[int, int], np.ndarray]], h: int, w: int) -> np.ndarray:
    """(instance id, (y0, x0), boolean crop) shapes -> (h, w) int32 label map.

    Where shapes overlap the smaller one wins (it is painted last), so a nucleus lying inside
    another's filled hole survives. Crops reaching past the border are clipped.
    """
    out = np.zeros((h, w), np.int32)
    order = sorted(range(len(shapes)), key=lambda i: (-int(shapes[i][2].sum()), i))
    for i in order:
        instance_id, (y0, x0), crop = shapes[i]
        ch, cw = min(crop.shape[0], h - y0), min(crop.shape[1], w - x0)
        if ch <= 0 or cw <= 0:
            continue
        region = out[y0 : y0 + ch, x0 : x0 + cw]
        region[crop[:ch, :cw]] = instance_id
    return out


def polygons_shape(polygons: list[list[np.ndarray]], h: int, w: int) -> tuple[tuple[int, int], np.ndarray]:
    """Union of polygons (each a list of rings: outer, then holes), rasterised in their bounding
    box only: -> ((y0, x0), boolean crop). Cheap for small shapes on large images."""
    rings = [np.asarray(r, dtype=np.float64) for rings_ in polygons for r in rings_ if len(r)]
    if not rings:
        return (0, 0), np.zeros((0, 0), bool)
    pts = np.concatenate(rings)
    x0 = int(np.clip(np.floor(pts[:, 0].min()), 0, w))
    y0 = int(np.clip(np.floor(pts[:, 1].min()), 0, h))
    x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 1, 0, w))
    y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 1, 0, h))
    if x1 <= x0 or y1 <= y0:
        return (0, 0), np.zeros((0, 0), bool)
    shift = np.array([x0, y0], dtype=np.float64)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for rings_ in polygons:
        crop |= fill_polygon([np.asarray(r, dtype=np.float64) - shift for r in rings_], y1 - y0, x1 - x0)
    return (y0, x0), crop
