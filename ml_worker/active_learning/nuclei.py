"""Uncertainty measured on the nuclei a pathologist edits, not on background pixels (numpy only).

A tile's value to the annotator is the number of nuclei she will have to fix on it; its cost is
the time to check every nucleus shown plus the time of the fixes. This module estimates both
from one prediction (and, when they exist, from extra TTA / MC-dropout samples):

* **per predicted nucleus** ``i`` (region ``R_i``, neighbourhood ``N_i`` = ``R_i`` dilated by
  ``band`` px): the *soft IoU* between the drawn outline and the probability map,
  ``sIoU_i = sum_{R_i} p / (|R_i| + sum_{N_i \\ R_i} p)`` — the expected overlap if every pixel
  were nucleus with probability ``p``. ``p_fix_i = 1 - sIoU_i`` is the expected share of the
  outline the annotator redraws (0 for a crisp, confident nucleus; high for a faint false
  positive, which she deletes, or a blurred outline, which she redraws);
* **nuclei the prediction missed**: connected blobs of foreground probability in
  ``[low, 0.5)`` outside every predicted nucleus, at least a quarter of the median predicted
  nucleus area; each adds its mean probability (a blob the model half-sees is a coin flip);
* **instance-level disagreement** (:func:`instance_disagreement`, needs instance maps of
  several samples): a predicted nucleus that has no partner with IoU >= 0.7 in a sample (the
  redraw threshold of ``effort.correction_effort``) vanished, split, merged or changed shape
  there; a sample nucleus that overlaps no predicted nucleus at all appeared.
  ``instance_flips`` = sum over predicted nuclei of the share of samples where they flip +
  mean number appearing per sample.

Per tile: ``expected_fixes = sum_i p_fix_i + missed`` (in nuclei). Ranking by it alone prefers
crowded tiles, ranking by uncertainty per nucleus steered to empty background (issue 16); the
effort model :func:`fix_rate` divides the expected fixes by the expected *seconds* of work
(``tile_s + check_s * n_nuclei + fix_s * expected_fixes``), so an empty tile with a faint blob
costs the tile overhead for almost no fix, and a dense tile pays for itself only when its
nuclei are uncertain.

:func:`fit_temperature` / :func:`apply_temperature`: one temperature for a model version fitted
on held-out labelled pixels, so ``p`` (and every score above) means the same across versions.
:func:`expected_fixes_heatmap`: where on the tile, per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from ml_worker.active_learning.scores import binary_entropy, foreground_probability

__all__ = [
    "EFFORT_SECONDS",
    "nucleus_fix_probabilities",
    "missed_nuclei",
    "nucleus_scores",
    "instance_disagreement",
    "fix_rate",
    "expected_fixes_heatmap",
    "fit_temperature",
    "apply_temperature",
]

#: assumed annotator times (seconds): open and scan a tile, check one shown nucleus, fix one
#: (redraw / add / delete). Only their ratios matter to the ranking.
EFFORT_SECONDS = {"tile_s": 10.0, "check_s": 1.5, "fix_s": 8.0}

_EPS = 1e-7


def _instances(instances: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    inst = np.asarray(instances)
    if inst.shape != shape:
        raise ValueError(f"instances {inst.shape} do not match probabilities {shape}")
    return inst


def nucleus_fix_probabilities(fg: np.ndarray, instances: np.ndarray, *, band: int = 2) -> dict[int, float]:
    """``{label: p_fix}`` for every predicted nucleus: ``1 - soft IoU`` of its region against
    the foreground probability ``fg`` within ``band`` px around it (module docstring)."""
    fg = np.clip(np.asarray(fg, dtype=np.float64), 0.0, 1.0)
    inst = _instances(instances, fg.shape)
    out: dict[int, float] = {}
    labels = np.unique(inst)
    labels = labels[labels != 0]
    if labels.size == 0:
        return out
    objs = ndi.find_objects(inst.astype(np.int64))
    H, W = fg.shape
    struct = ndi.generate_binary_structure(2, 1)
    for lab in labels:
        sl = objs[int(lab) - 1] if int(lab) - 1 < len(objs) else None
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - band, 0), min(sl[0].stop + band, H)
        x0, x1 = max(sl[1].start - band, 0), min(sl[1].stop + band, W)
        region = inst[y0:y1, x0:x1] == lab
        ring = ndi.binary_dilation(region, struct, iterations=max(int(band), 1)) & ~region
        p = fg[y0:y1, x0:x1]
        inside = float(p[region].sum())
        siou = inside / (float(region.sum()) + float(p[ring].sum()) + _EPS)
        out[int(lab)] = float(np.clip(1.0 - siou, 0.0, 1.0))
    return out


def missed_nuclei(fg: np.ndarray, instances: np.ndarray, *, low: float = 0.3, band: int = 2,
                  min_area: float | None = None) -> tuple[float, np.ndarray]:
    """(expected number of nuclei the prediction missed, (H, W) bool mask of those blobs).

    Blobs of ``low <= fg < 0.5`` (and any foreground left out of the instances) farther than
    ``band`` px from every predicted nucleus, of at least ``min_area`` px (default: a quarter
    of the median predicted nucleus area, 8 px without nuclei); each counts its mean
    probability."""
    fg = np.clip(np.asarray(fg, dtype=np.float64), 0.0, 1.0)
    inst = _instances(instances, fg.shape)
    taken = inst != 0
    if taken.any() and band > 0:
        taken = ndi.binary_dilation(taken, ndi.generate_binary_structure(2, 1), iterations=int(band))
    cand = (fg >= low) & ~taken
    if not cand.any():
        return 0.0, cand
    if min_area is None:
        areas = np.bincount(inst.ravel().astype(np.int64))[1:]
        areas = areas[areas > 0]
        min_area = 0.25 * float(np.median(areas)) if areas.size else 8.0
    lab, n = ndi.label(cand)
    if n == 0:
        return 0.0, cand
    idx = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones_like(fg), lab, idx)
    mean_p = ndi.mean(fg, lab, idx)
    keep = area >= float(min_area)
    mask = np.isin(lab, idx[keep])
    return float(np.clip(mean_p[keep], 0.0, 1.0).sum()), mask


def _match(a: np.ndarray, b: np.ndarray, iou: float = 0.7) -> tuple[set[int], set[int]]:
    """Labels of ``a`` that have a partner in ``b`` with IoU >= ``iou`` (unique for iou > 0.5),
    and the labels of ``b`` that overlap some nucleus of ``a`` at all."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return set(), set()
    pairs, inter = np.unique(np.stack([a[both], b[both]]), axis=1, return_counts=True)
    area_a = np.bincount(a.ravel())
    area_b = np.bincount(b.ravel())
    union = area_a[pairs[0]] + area_b[pairs[1]] - inter
    ok = inter / union >= iou
    return {int(x) for x in pairs[0][ok]}, {int(x) for x in pairs[1]}


def instance_disagreement(instances: np.ndarray, samples: Sequence[np.ndarray]) -> tuple[dict[int, float], float]:
    """({label: share of samples where the predicted nucleus vanished / split / merged /
    changed shape}, mean number of nuclei per sample that overlap no predicted nucleus).

    A nucleus keeps its identity in a sample when some sample nucleus overlaps it with
    IoU >= 0.7 (that partner is unique); a split, a merge, a vanishing or an outline the
    annotator would redraw breaks that."""
    inst = np.asarray(instances)
    labels = [int(v) for v in np.unique(inst) if v != 0]
    if not samples:
        return {lab: 0.0 for lab in labels}, 0.0
    flips = dict.fromkeys(labels, 0.0)
    appear = 0.0
    for s in samples:
        s = _instances(s, inst.shape)
        kept, partners = _match(inst, s)
        for lab in labels:
            if lab not in kept:
                flips[lab] += 1.0
        appear += len([v for v in np.unique(s) if v != 0 and int(v) not in partners])
    n = float(len(samples))
    return {lab: f / n for lab, f in flips.items()}, appear / n


def nucleus_scores(probs: np.ndarray, instances: np.ndarray, *, kind: str = "softmax", band: int = 2,
                   samples: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """The nucleus-level scores of one tile: ``expected_fixes`` always; ``instance_flips`` when
    instance maps of extra ``samples`` (TTA / MC dropout, transformed back) are given."""
    fg = foreground_probability(probs, kind)
    inst = _instances(instances, fg.shape)
    p_fix = nucleus_fix_probabilities(fg, inst, band=band)
    missed, _ = missed_nuclei(fg, inst, band=band)
    out = {"expected_fixes": float(sum(p_fix.values()) + missed)}
    if samples is not None:
        flips, appear = instance_disagreement(inst, samples)
        out["instance_flips"] = float(sum(flips.values()) + appear)
    return out


def fix_rate(expected_fixes: np.ndarray, nuclei: np.ndarray | None, *, tile_s: float = EFFORT_SECONDS["tile_s"],
             check_s: float = EFFORT_SECONDS["check_s"], fix_s: float = EFFORT_SECONDS["fix_s"]) -> np.ndarray:
    """Expected fixes per minute of the annotator's time on each tile:
    ``60 · E / (tile_s + check_s · n + fix_s · E)`` (``n`` = predicted nuclei to check; None =
    unknown, only the fixes count). Value and cost both grow with the nuclei on the tile; the
    fixed ``tile_s`` keeps an almost empty tile from winning on a small denominator."""
    e = np.clip(np.asarray(expected_fixes, dtype=np.float64), 0.0, None)
    n = np.zeros_like(e) if nuclei is None else np.asarray(nuclei, dtype=np.float64).reshape(-1)
    if n.shape != e.shape:
        raise ValueError(f"nuclei has {n.size} values for {e.size} candidates")
    if (n < 0).any() or not np.all(np.isfinite(n)):
        raise ValueError("nucleus counts must be finite and non-negative")
    if tile_s <= 0 or check_s < 0 or fix_s < 0:
        raise ValueError("tile_s must be > 0 and check_s, fix_s >= 0")
    return 60.0 * e / (tile_s + check_s * n + fix_s * e)


def expected_fixes_heatmap(probs: np.ndarray, instances: np.ndarray, *, kind: str = "softmax",
                           band: int = 2) -> np.ndarray:
    """(H, W) float32 in [0, 1]: where the fixes are. Each predicted nucleus (and its contour
    band) shows its ``p_fix``, each missed blob its mean probability, the rest of the tile
    a quarter of its pixel entropy (visible, but below any nucleus that needs work)."""
    fg = foreground_probability(probs, kind)
    inst = _instances(instances, fg.shape).astype(np.int64)
    heat = 0.25 * binary_entropy(fg)
    p_fix = nucleus_fix_probabilities(fg, inst, band=band)
    if p_fix:
        lut = np.zeros(int(inst.max()) + 1, np.float32)
        for lab, p in p_fix.items():
            lut[lab] = p
        # each pixel of a nucleus' contour band takes the nearest nucleus' value
        _, (iy, ix) = ndi.distance_transform_edt(inst == 0, return_indices=True)
        near = inst[iy, ix]
        dist = ndi.distance_transform_edt(inst == 0)
        zone = dist <= band
        heat = np.where(zone, np.maximum(heat, lut[near]), heat)
    _, mask = missed_nuclei(fg, inst, band=band)
    if mask.any():
        lab, n = ndi.label(mask)
        means = ndi.mean(fg, lab, np.arange(1, n + 1))
        heat = np.where(mask, np.maximum(heat, np.concatenate([[0.0], means])[lab]), heat)
    return np.clip(heat, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- calibration


def apply_temperature(probs: np.ndarray, temperature: float, *, kind: str = "softmax") -> np.ndarray:
    """Probabilities re-tempered: ``softmax(log p / T)`` over the channels (``softmax``) or
    ``sigmoid(logit(p) / T)`` per channel (``sigmoid``). ``T > 1`` softens, ``T = 1`` is
    the identity (to float precision)."""
    t = float(temperature)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
    if kind == "sigmoid":
        z = np.log(p) - np.log1p(-p)
        return (1.0 / (1.0 + np.exp(-z / t))).astype(np.float32)
    if kind != "softmax":
        raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")
    z = np.log(p) / t
    z -= z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def fit_temperature(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], *, kind: str = "softmax",
                    max_pixels: int = 200_000, seed: int = 0, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising the pixel negative log-likelihood of held-out labels.

    Args:
        probs: (C, H, W) probabilities of the validation tiles (the model's plain pass).
        targets: (H, W) labels of the same tiles: class indices (``softmax``) or 0/1 nucleus
            masks (``sigmoid``; any instance map > 0 counts as nucleus).
        max_pixels: pixels sampled (uniformly, seeded) for the fit.

    Returns:
        T > 0 for :func:`apply_temperature` (1.0 when no pixel was given).
    """
    from scipy.optimize import minimize_scalar

    if len(probs) != len(targets):
        raise ValueError(f"{len(probs)} probability maps for {len(targets)} targets")
    zs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for p, y in zip(probs, targets):
        p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
        y = np.asarray(y)
        if p.ndim != 3 or y.shape != p.shape[1:]:
            raise ValueError(f"probabilities {p.shape} and target {y.shape} do not match")
        if kind == "sigmoid":
            zs.append((np.log(p[0]) - np.log1p(-p[0])).ravel())
            ys.append((y > 0).astype(np.int64).ravel())
        else:
            zs.append(np.log(p).reshape(p.shape[0], -1).T)
            ys.append(y.astype(np.int64).ravel())
    if not zs:
        return 1.0
    z = np.concatenate(zs)
    y = np.concatenate(ys)
    if y.size == 0:
        return 1.0
    if y.size > max_pixels:
        pick = np.random.default_rng(seed).choice(y.size, max_pixels, replace=False)
        z, y = z[pick], y[pick]
    if kind == "softmax" and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"class labels must be in [0, {z.shape[1] - 1}]")

    def nll(log_t: float) -> float:
        t = float(np.exp(log_t))
        if kind == "sigmoid":
            s = z / t
            return float(np.mean(np.logaddexp(0.0, -s) * y + np.logaddexp(0.0, s) * (1 - y)))
        s = z / t
        s = s - s.max(axis=1, keepdims=True)
        lse = np.log(np.exp(s).sum(axis=1))
        return float(np.mean(lse - s[np.arange(y.size), y]))

    res = minimize_scalar(nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))
