"""Tissue detection on a low-resolution view of a slide.

Slides are mostly glass. A tile is worth a ``Tile`` row (and inference time) only when it
holds tissue, which is decided here on a thumbnail-sized image (one pixel per 8-32
level-0 pixels is plenty for 256-px tiles):

* saturation (HSV) and optical density (Beer-Lambert, mean over RGB) are thresholded with
  Otsu, each with a floor so that an all-glass slide does not split its own noise into
  "tissue": stained tissue is coloured (saturated) or absorbs light (dense);
* holes smaller than ``max_hole_px`` (lumina, fat cells) are filled, specks smaller than
  ``min_object_px`` (dust, debris) are removed.

``tile_tissue_fractions`` then gives, for rectangles in level-0 pixels, the fraction of
each that is tissue, with a summed-area table (O(1) per rectangle).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from ml_worker.slides import SlideReader

__all__ = ["tissue_mask", "tile_tissue_fractions", "tissue_from_reader"]

# Floors for the Otsu thresholds: glass is gray/white (saturation ~0, OD ~0.05); the
# faintest stained tissue is above these.
MIN_SATURATION = 0.06
MIN_OPTICAL_DENSITY = 0.25
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) == float(values.min()):
        return math.inf
    return float(threshold_otsu(values, nbins=256))


def tissue_mask(
    rgb_lowres: np.ndarray,
    *,
    min_object_px: int | None = None,
    max_hole_px: int | None = None,
) -> np.ndarray:
    """(H, W) bool tissue mask of a low-resolution (H, W, 3) uint8 RGB image.

    Args:
        rgb_lowres: thumbnail of the slide (any size; a few thousand px a side at most).
        min_object_px: connected tissue pieces smaller than this are dropped; default
            0.01% of the image (at least 4 px).
        max_hole_px: holes in tissue up to this area are filled; default 0.1% of the image
            (at least 16 px).
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    if rgb_lowres.ndim != 3 or rgb_lowres.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb_lowres.shape}")
    rgb = np.asarray(rgb_lowres[..., :3], dtype=np.uint8)
    # uint8 maths and a lookup table: a 2048^2 thumbnail costs ~50 MB here, not ~250 MB.
    mx = rgb.max(axis=2)
    sat = (mx - rgb.min(axis=2)).astype(np.float32)
    sat /= np.maximum(mx, 1).astype(np.float32)
    od = _OD_LUT[rgb[..., 0]]
    od += _OD_LUT[rgb[..., 1]]
    od += _OD_LUT[rgb[..., 2]]
    od /= 3.0
    t_sat = max(_otsu(sat), MIN_SATURATION)
    t_od = max(_otsu(od), MIN_OPTICAL_DENSITY)
    mask = (sat >= t_sat) | (od >= t_od)
    area = mask.size
    min_obj = max(4, int(area * 1e-4)) if min_object_px is None else int(min_object_px)
    max_hole = max(16, int(area * 1e-3)) if max_hole_px is None else int(max_hole_px)
    if max_hole > 0:
        mask = remove_small_holes(mask, max_size=max_hole)
    if min_obj > 1:
        mask = remove_small_objects(mask, max_size=min_obj - 1)
    return mask


def tile_tissue_fractions(
    mask: np.ndarray,
    *,
    downsample: float | tuple[float, float],
    grid: Sequence[tuple[int, int, int, int]],
) -> list[float]:
    """Tissue fraction (0..1) of each level-0 rectangle ``(x, y, w, h)``.

    ``downsample``: level-0 pixels per mask pixel (x, y or one number). Rectangles are
    snapped outwards to whole mask pixels; parts outside the mask count as glass.
    """
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample  # type: ignore[misc]
    H, W = mask.shape
    sat = np.zeros((H + 1, W + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    out = []
    for x, y, w, h in grid:
        fx0, fy0 = x / dx, y / dy
        fx1, fy1 = (x + w) / dx, (y + h) / dy
        x0, y0 = int(math.floor(fx0 + 1e-9)), int(math.floor(fy0 + 1e-9))
        x1, y1 = max(x0 + 1, int(math.ceil(fx1 - 1e-9))), max(y0 + 1, int(math.ceil(fy1 - 1e-9)))
        total = (x1 - x0) * (y1 - y0)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
        if cx0 >= cx1 or cy0 >= cy1:
            out.append(0.0)
            continue
        s = sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
        out.append(float(s) / total)
    return out


def tissue_from_reader(reader: SlideReader, *, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """Tissue mask of a whole slide from its thumbnail; returns (mask, (dx, dy)) with the
    level-0 pixels per mask pixel along x and y.

    The mask is at most ``max_side`` px a side and never finer than 1 px per 8 level-0 px
    (32 mask px across a 256-px tile is plenty), so small slides are not read at level 0."""
    W, H = reader.dimensions
    thumb = reader.thumbnail(max(1, min(max_side, math.ceil(max(W, H) / 8))))
    return tissue_mask(thumb), (W / thumb.shape[1], H / thumb.shape[0])
