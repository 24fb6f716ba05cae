"""Post-processing: turn per-pixel probabilities into nucleus instance maps.

Every architecture ends in one of two functions here:

* :func:`semantic_to_instances` -- semantic (foreground / background) models: threshold,
  connected components, then a distance-transform marker watershed that splits touching
  nuclei (the classic "blob + h-maxima" split used for DSB-2018 style masks).
* :func:`multihead_to_instances` -- multi-head models that predict the whole nucleus, a
  shrunk "borderless" core and the borders between touching nuclei: the cores (minus the
  borders) are the markers, the nucleus mask is the flooding area; with
  ``method="random_walker"`` the markers grow by scikit-image's random walker instead of a
  watershed flood.

Conventions (see docs/ml_worker.md): instance maps are (H, W) int32 in memory, 0 is
background and 1..N are nuclei, numbered consecutively.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import random_walker, watershed

__all__ = [
    "relabel",
    "remove_small_instances",
    "fill_small_holes",
    "split_touching",
    "semantic_to_instances",
    "multihead_to_instances",
    "MULTIHEAD_METHODS",
    "instance_classes",
    "class_map",
]

# 4-connectivity for components: a diagonal touch is not enough to merge two nuclei, which
# is the conservative choice for densely packed tissue.
_CROSS = ndi.generate_binary_structure(2, 1)


def relabel(inst: np.ndarray) -> np.ndarray:
    """Renumber the labels of an instance map to consecutive ids 1..N, order preserved.

    Args:
        inst: (H, W) non-negative integer labels (any ids, gaps allowed), 0 = background.

    Returns:
        (H, W) int32 with the same partition, labels 1..N in increasing order of the old
        ids (like ``skimage.segmentation.relabel_sequential``), 0 kept as background.
    """
    inst = np.asarray(inst)
    if inst.size == 0:
        return inst.astype(np.int32)
    if inst.min() < 0:
        raise ValueError("instance labels must be non-negative")
    max_id = int(inst.max())
    if max_id == 0:
        return np.zeros(inst.shape, np.int32)
    if max_id < 4 * inst.size + 1024:
        # A lookup table is O(pixels) and much faster than np.unique's sort; only used
        # when the ids are not absurdly sparse (a huge max id would make the table huge).
        present = np.bincount(inst.ravel(), minlength=max_id + 1) > 0
        present[0] = False
        lut = np.zeros(max_id + 1, np.int32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
        return lut[inst]
    ids, inverse = np.unique(inst, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(inst.shape) + offset).astype(np.int32)


def remove_small_instances(inst: np.ndarray, min_size: int) -> np.ndarray:
    """Drop instances with fewer than ``min_size`` pixels and relabel 1..N.

    Args:
        inst: (H, W) non-negative integer labels.
        min_size: minimum area in pixels; 0 or 1 keeps everything.

    Returns:
        (H, W) int32 relabelled instance map.
    """
    inst = relabel(inst)
    if min_size > 1 and inst.max() > 0:
        sizes = np.bincount(inst.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            inst = np.where(small[inst], 0, inst)
            inst = relabel(inst)
    return inst


def fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    """Fill background holes of at most ``max_hole`` pixels that do not touch the border.

    Unlike ``ndi.binary_fill_holes`` this leaves large enclosed regions alone: background
    surrounded by a ring of touching nuclei must stay background.

    Args:
        mask: (H, W) bool foreground.
        max_hole: largest hole area (pixels) to fill.

    Returns:
        (H, W) bool.
    """
    mask = np.asarray(mask, bool)
    if max_hole <= 0 or not mask.any():
        return mask
    holes, n = ndi.label(~mask, structure=_CROSS)
    if n == 0:
        return mask
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    fill = sizes <= max_hole
    fill[0] = False
    # Regions touching the image border are open background, not holes.
    border = np.unique(
        np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])
    )
    fill[border] = False
    return mask | fill[holes]


def split_touching(
    mask: np.ndarray,
    h: float = 1.5,
    min_distance: int = 3,
    smooth: float = 1.0,
) -> np.ndarray:
    """Split a binary foreground into instances with a distance-transform watershed.

    Each nucleus is assumed to be roughly convex, so its Euclidean distance transform has
    one dominant maximum; touching nuclei produce a saddle at the neck. Markers are the
    h-maxima of the (lightly smoothed) distance map: a peak only counts if it rises at
    least ``h`` pixels above the saddle joining it to a higher peak, which suppresses the
    spurious maxima of jagged boundaries. Peaks closer than ``min_distance`` are merged.

    Args:
        mask: (H, W) bool foreground.
        h: minimum peak dynamic, in pixels of distance. Larger = fewer splits.
        min_distance: markers closer than this (pixels) are merged into one.
        smooth: sigma (pixels) of the Gaussian applied to the distance map; 0 disables.

    Returns:
        (H, W) int32 labels 1..N; every foreground component gets at least one label.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    if smooth > 0:
        dist = ndi.gaussian_filter(dist, smooth)
        dist[~mask] = 0.0
    comps, n_comp = ndi.label(mask, structure=_CROSS)
    peaks = _h_maxima_per_component(dist, comps, h)
    if min_distance > 1:
        # Merging nearby plateaus: a dilation by min_distance/2 joins peaks that are
        # closer than min_distance into one connected marker.
        r = max(1, min_distance // 2)
        peaks = ndi.binary_dilation(peaks, structure=_disk(r)) & mask
    markers, n = ndi.label(peaks, structure=np.ones((3, 3), bool))
    # Components with no marker (tiny or flat blobs) would be left unlabelled by the
    # masked watershed; give each of them its own marker so no foreground is lost.
    has_marker = np.zeros(n_comp + 1, bool)
    has_marker[comps[markers > 0]] = True
    missing = ~has_marker
    missing[0] = False
    if missing.any():
        extra = relabel(np.where(missing[comps], comps, 0))
        markers = np.where(extra > 0, extra + n, markers)
    labels = watershed(-dist, markers, mask=mask)
    return relabel(labels)


def semantic_to_instances(
    foreground_prob: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 16,
    split: bool = True,
    h: float = 1.5,
    min_distance: int = 3,
    max_hole: int | None = None,
) -> np.ndarray:
    """Instances from a semantic foreground probability map.

    Args:
        foreground_prob: (H, W) float probability of "nucleus". A (C, H, W) softmax output
            is also accepted: the foreground is ``1 - probs[0]`` (all non-background classes).
        threshold: foreground if ``prob > threshold``.
        min_size: instances smaller than this (pixels) are dropped as noise.
        split: split touching nuclei with :func:`split_touching`; if False, plain connected
            components.
        h, min_distance: see :func:`split_touching`.
        max_hole: fill holes up to this many pixels inside nuclei (default ``4*min_size``),
            so a pale nucleolus in a thresholded nucleus does not create a ring.

    Returns:
        (H, W) int32 instance map, labels 1..N.
    """
    prob = np.asarray(foreground_prob, dtype=np.float32)
    if prob.ndim == 3:
        prob = 1.0 - prob[0]
    if prob.ndim != 2:
        raise ValueError(f"expected (H, W) or (C, H, W) probabilities, got {prob.shape}")
    mask = prob > threshold
    mask = fill_small_holes(mask, 4 * min_size if max_hole is None else max_hole)
    if split:
        labels = split_touching(mask, h=h, min_distance=min_distance)
    else:
        labels, _ = ndi.label(mask, structure=_CROSS)
    return remove_small_instances(labels, min_size)


def multihead_to_instances(
    nucleus: np.ndarray,
    borderless: np.ndarray,
    borders: np.ndarray,
    threshold: float = 0.5,
    marker_threshold: float | None = None,
    min_size: int = 16,
    min_marker_size: int = 4,
    method: str = "watershed",
) -> np.ndarray:
    """Marker-controlled watershed (or random walker) for multi-head (nucleus / core / border)
    outputs.

    Markers are connected components of ``borderless > t`` with the touching-border
    pixels (``borders > t``) removed, so two cores joined by a thin bridge over a border
    stay separate. They are flooded over the nucleus mask (``nucleus > threshold``) on the
    landscape ``1 - nucleus + borders``: low inside confident nuclei, high on predicted
    borders, so the flood fronts meet on the borders. Mask components without a marker
    (a missed core) become their own instance instead of being lost.

    Args:
        nucleus: (H, W) probability of nucleus (whole body).
        borderless: (H, W) probability of the shrunk nucleus core.
        borders: (H, W) probability of a border between touching nuclei.
        threshold: nucleus threshold (mask = ``nucleus > threshold``).
        marker_threshold: threshold for cores and borders (default: ``threshold``).
        min_size: instances smaller than this are dropped.
        min_marker_size: marker components smaller than this are ignored (noise).
        method: ``watershed`` (flood the landscape above) or ``random_walker`` (the
            alternative of the DSB-2018 multi-head model: each unlabelled mask pixel goes to
            the marker a random walk on the image ``nucleus - borders`` most likely reaches
            first, with everything outside the mask labelled background; slower, smoother
            cuts where the border channel is faint).

    Returns:
        (H, W) int32 instance map, labels 1..N.
    """
    if method not in MULTIHEAD_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(MULTIHEAD_METHODS)}")
    nucleus = np.asarray(nucleus, np.float32)
    borderless = np.asarray(borderless, np.float32)
    borders = np.asarray(borders, np.float32)
    if not (nucleus.shape == borderless.shape == borders.shape) or nucleus.ndim != 2:
        raise ValueError(
            f"nucleus/borderless/borders must be equal (H, W) arrays, got "
            f"{nucleus.shape}, {borderless.shape}, {borders.shape}"
        )
    mt = threshold if marker_threshold is None else marker_threshold
    mask = nucleus > threshold
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    seeds = (borderless > mt) & ~(borders > mt) & mask
    markers, _ = ndi.label(seeds, structure=_CROSS)
    markers = remove_small_instances(markers, min_marker_size)
    n = int(markers.max())
    comps, n_comp = ndi.label(mask, structure=_CROSS)
    has_marker = np.zeros(n_comp + 1, bool)
    has_marker[comps[markers > 0]] = True
    missing = ~has_marker
    missing[0] = False
    if missing.any():
        extra = relabel(np.where(missing[comps], comps, 0))
        markers = np.where(extra > 0, extra + n, markers)
    if method == "random_walker":
        return remove_small_instances(_random_walk(nucleus - borders, markers, mask), min_size)
    landscape = 1.0 - nucleus + borders
    labels = watershed(landscape, markers, mask=mask)
    return remove_small_instances(labels, min_size)


MULTIHEAD_METHODS = ("watershed", "random_walker")


def _random_walk(data: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grow ``markers`` (1..N) over ``mask`` by random walker on ``data``; outside the mask is
    a background seed. Returns an (H, W) int32 instance map."""
    unlabelled = mask & (markers == 0)
    if not unlabelled.any() or int(markers.max()) == 0:
        return markers.astype(np.int32)
    seeds = np.where(mask, markers + 1, 1).astype(np.int32)  # 1 = background seed
    seeds[unlabelled] = 0
    if int(seeds.max()) == 1:  # no marker at all: nothing to grow
        return np.zeros(mask.shape, np.int32)
    # Labelled pixels leave the linear system, so its size is the unlabelled mask pixels only.
    grown = random_walker(data.astype(np.float64), seeds, beta=130, mode="cg_j", tol=1e-3)
    return np.where(mask, np.asarray(grown, np.int32) - 1, 0).clip(min=0).astype(np.int32)


def _h_maxima_per_component(dist: np.ndarray, comps: np.ndarray, h: float) -> np.ndarray:
    """``h_maxima(dist, h)`` restricted to each labelled component, as a bool map.

    skimage's grey reconstruction sorts every pixel of its input; on a 1000 x 800 tile that
    is ~1 s, mostly spent on background. Components never interact (the distance map is 0
    between them), so running it on each component's bounding box gives the same maxima
    for a fraction of the cost.
    """
    peaks = np.zeros(dist.shape, bool)
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:
            continue
        own = comps[sl] == i
        d = np.where(own, dist[sl], 0.0).astype(np.float32)
        if own.sum() < 4:
            peaks[sl] |= own & (d == d.max())
            continue
        # Pad with 0 so maxima touching the bounding box are still regional maxima.
        hm = h_maxima(np.pad(d, 1), h)[1:-1, 1:-1].astype(bool)
        peaks[sl] |= hm & own
    return peaks


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r


def instance_classes(inst: np.ndarray, class_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class of each predicted nucleus from a softmax output.

    Args:
        inst: (H, W) instance map, labels 1..N.
        class_probs: (K + 1, H, W) class probabilities, channel 0 = background.

    Returns:
        ``(classes, confidence)``: arrays of length N + 1 indexed by instance id (entry 0 is
        the background: class 0, confidence 0). A nucleus' class is the foreground class with
        the largest summed probability over its pixels (the soft majority of its pixels);
        its confidence is that class' share of the nucleus' foreground probability, in
        [1/K, 1]. With one foreground class every nucleus is class 1, confidence 1.
    """
    inst = np.asarray(inst)
    p = np.asarray(class_probs, dtype=np.float64)
    if p.ndim != 3 or p.shape[1:] != inst.shape:
        raise ValueError(f"expected (K+1, H, W) probabilities for a {inst.shape} map, got {p.shape}")
    n = int(inst.max(initial=0))
    k = p.shape[0] - 1
    classes = np.zeros(n + 1, np.int64)
    confidence = np.zeros(n + 1, np.float64)
    if n == 0 or k < 1:
        return classes, confidence
    ids = inst.ravel().astype(np.int64)
    sums = np.stack([np.bincount(ids, weights=p[c + 1].ravel(), minlength=n + 1) for c in range(k)], axis=1)
    total = sums.sum(axis=1)
    classes[1:] = sums[1:].argmax(axis=1) + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence[1:] = np.where(total[1:] > 0, sums[1:].max(axis=1) / total[1:], 0.0)
    return classes, confidence


def class_map(inst: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(H, W) uint8 per-pixel class ids from an instance map and its per-instance classes."""
    lut = np.asarray(classes, dtype=np.uint8)
    return lut[np.asarray(inst).astype(np.int64)]
