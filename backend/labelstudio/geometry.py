"""Instance label map <-> polygons, exactly; brush RLE <-> mask through the SDK's converter.

Pure numpy/scipy/skimage: no Django. Coordinates are in pixels of the tile with the *corner*
convention: pixel (row r, column c) covers [c, c+1) x [r, r+1), so its centre is (c+0.5, r+0.5).

One rule rasterises every polygon, ours and the pathologist's: a pixel belongs to a polygon
when its centre lies inside it (even-odd rule; a centre exactly on a boundary counts when the
boundary is on its left or above, i.e. half-open spans). Polygons are traced so that this rule
gives the traced mask back pixel for pixel: a mask that goes out to Label Studio and comes
back untouched is identical.

Tracing: marching squares at level 0.5 on each 4-connected component of each instance (the
contour passes through pixel-edge midpoints, at least 0.35 px from every pixel centre), then
Douglas-Peucker simplification with the largest tolerance whose rasterisation still equals the
component. Holes inside a nucleus are filled (Label Studio polygons have no holes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

SIMPLIFY_TOLERANCES = (0.45, 0.3, 0.15, 0.0)
PERCENT_DECIMALS = 4  # 1e-4 % of a 4096 px tile is 0.004 px: far below the 0.35 px margin


@dataclass(frozen=True)
class Region:
    """One polygon of an instance: ``points`` (N, 2) (x, y) in pixels, ``percent`` the same in
    Label Studio's percent of width/height (what is sent; ``points`` is ``from_percent(percent)``)."""

    label: int
    part: int
    points: np.ndarray
    percent: list


# --- rasterising -------------------------------------------------------------------------------

def rasterize_polygon(points: np.ndarray, height: int, width: int, *, x0: int = 0, y0: int = 0) -> np.ndarray:
    """Boolean (height, width) mask of the pixels whose centre lies inside the closed polygon.

    ``x0, y0``: the mask is the window of the tile starting at that pixel (the arithmetic is
    the same as for the whole tile, so a window agrees with the full mask bit for bit)."""
    mask = np.zeros((height, width), dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return mask
    ax, ay = pts[:, 0], pts[:, 1]
    bx, by = np.roll(ax, -1), np.roll(ay, -1)
    keep = ay != by
    ax, ay, bx, by = ax[keep], ay[keep], bx[keep], by[keep]
    if not len(ax):
        return mask
    lo, hi = np.minimum(ay, by), np.maximum(ay, by)
    r_min = max(y0, int(np.floor(lo.min() - 0.5)))
    r_max = min(y0 + height - 1, int(np.ceil(hi.max() - 0.5)))
    if r_max < r_min:
        return mask
    rows = np.arange(r_min, r_max + 1)
    yc = rows[:, None] + 0.5
    crosses = (lo[None, :] <= yc) & (yc < hi[None, :])  # half-open: each vertex counted once
    row_idx, edge_idx = np.nonzero(crosses)
    if not len(row_idx):
        return mask
    ycs = rows[row_idx] + 0.5
    ex0, ey0, ex1, ey1 = ax[edge_idx], ay[edge_idx], bx[edge_idx], by[edge_idx]
    xs = ex0 + (ycs - ey0) * (ex1 - ex0) / (ey1 - ey0)
    order = np.lexsort((xs, row_idx))
    row_idx, xs = row_idx[order], xs[order]
    # Even-odd: crossings pair up within each row (their count per row is even).
    starts, ends, pair_rows = xs[0::2], xs[1::2], row_idx[0::2]
    c_start = np.clip(np.ceil(starts - 0.5).astype(np.int64) - x0, 0, width)
    c_end = np.clip(np.ceil(ends - 0.5).astype(np.int64) - x0, 0, width)
    diff = np.zeros((len(rows), width + 1), dtype=np.int32)
    np.add.at(diff, (pair_rows, c_start), 1)
    np.add.at(diff, (pair_rows, c_end), -1)
    mask[r_min - y0 : r_max - y0 + 1] = np.cumsum(diff[:, :width], axis=1) > 0
    return mask


def rasterize(regions: list[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Instance label map from ``(label, points)`` polygons, painted in order (later wins)."""
    out = np.zeros((height, width), dtype=np.int32)
    for label, points in regions:
        out[rasterize_polygon(points, height, width)] = label
    return out


# --- tracing -----------------------------------------------------------------------------------

def _trace_component(component: np.ndarray, x0: int, y0: int, tile_w: int, tile_h: int) -> tuple[np.ndarray, list]:
    """Closed outline of one 4-connected component (a boolean window of the tile at x0, y0):
    ``(pixel points, percent points)``. The check rasterises exactly what the other side will:
    the percent points converted back to pixels."""
    padded = np.pad(component, 1).astype(np.float32)
    contours = find_contours(padded, 0.5, fully_connected="low")
    # The outer boundary is the longest; inner ones are holes (filled: polygons have none).
    outer = max(contours, key=len)
    # find_contours gives (row, col) of the padded array with pixel centres at integers.
    xy = np.stack([outer[:, 1] - 1 + 0.5 + x0, outer[:, 0] - 1 + 0.5 + y0], axis=1)
    if np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    # Background is 8-connected here, as marching squares with fully_connected="low" sees it.
    filled = ndimage.binary_fill_holes(component, structure=np.ones((3, 3), bool))
    h, w = component.shape
    for tolerance in SIMPLIFY_TOLERANCES:
        candidate = _simplify(xy, tolerance) if tolerance else xy
        if len(candidate) < 3:
            continue
        pct = to_percent(candidate, tile_w, tile_h)
        back = from_percent(pct, tile_w, tile_h)
        if np.array_equal(rasterize_polygon(back, h, w, x0=x0, y0=y0), filled):
            return back, pct
    exact = (xy / np.array([tile_w, tile_h]) * 100.0).tolist()
    return from_percent(exact, tile_w, tile_h), exact


def _simplify(xy: np.ndarray, tolerance: float) -> np.ndarray:
    import cv2

    return cv2.approxPolyDP(xy.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2).astype(np.float64)


def mask_to_regions(instances: np.ndarray) -> list[Region]:
    """One polygon per 4-connected part of every instance; larger outlines first, so that a
    nucleus lying in another's hole is painted after it."""
    instances = np.asarray(instances)
    tile_h, tile_w = instances.shape
    regions: list[Region] = []
    for index, box in enumerate(ndimage.find_objects(instances.astype(np.int64))):
        if box is None:
            continue
        label = index + 1
        rows, cols = box
        parts, count = ndimage.label(instances[box] == label)
        for part in range(1, count + 1):
            points, percent = _trace_component(parts == part, cols.start, rows.start, tile_w, tile_h)
            regions.append(Region(label, part - 1, points, percent))
    regions.sort(key=lambda r: -_area(r.points))
    return regions


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --- Label Studio coordinates ------------------------------------------------------------------

def to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel (x, y) -> Label Studio's [x%, y%] of the image width/height."""
    pct = np.asarray(points, dtype=np.float64) / np.array([width, height]) * 100.0
    return np.round(pct, PERCENT_DECIMALS).tolist()


def from_percent(points: list, width: int, height: int) -> np.ndarray:
    """Label Studio's percent points -> pixel (x, y); both directions of the sync use this."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) * np.array([width, height]) / 100.0


REGION_ID = re.compile(r"^n(\d+)(?:p(\d+))?$")


def region_id(region: Region) -> str:
    """Label Studio region ids of traced nuclei: ``n<label>`` (``p<part>`` for extra parts), so
    an untouched nucleus keeps its instance id when it comes back."""
    return f"n{region.label}" if region.part == 0 else f"n{region.label}p{region.part}"


def label_from_region_id(value: str) -> int | None:
    match = REGION_ID.match(value or "")
    return int(match.group(1)) if match else None


# --- brush layers (the SDK's own RLE codec) ----------------------------------------------------

def brush_rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE -> boolean (height, width) mask."""
    from label_studio_sdk.converter.brush import decode_rle

    return np.reshape(decode_rle(rle), (height, width, 4))[..., 3] > 0


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle((np.asarray(mask) > 0).astype(np.uint8) * 255)
