"""Segmentation metrics (numpy only).

Two families:

* **Pixel metrics** on binary or semantic masks of shape (H, W): :func:`dice` (= Zijdenbos
  similarity index, ZSI), :func:`precision`, :func:`recall`, :func:`iou`, :func:`miou`,
  :func:`pixel_accuracy`. For the binary ones, any non-zero pixel is "nucleus", so an
  instance map can be passed directly.
* **Object metrics** on instance maps of shape (H, W) (0 = background, any positive ids,
  gaps allowed): :func:`dsb_map`, :func:`object_f1`, :func:`aji`, :func:`panoptic_quality`.

Object metrics share one pairwise contingency table (:func:`contingency`), built with a
single ``np.bincount`` over combined labels, so an image with hundreds of nuclei costs
O(pixels) instead of O(pixels x nuclei).

Edge cases (documented contract, tested):

* A ratio whose denominator is 0 happens only when prediction and truth are both empty
  (for the relevant class); it is defined as **1.0** (perfect agreement): ``dice``,
  ``iou``, ``dsb_map``, ``object_f1``, ``aji``, ``panoptic_quality`` (dq = sq = pq = 1).
* ``precision`` with no predicted positives is 1.0 if the truth is empty too, else 0.0;
  ``recall`` with no true positives is 1.0 if the prediction is empty too, else 0.0.
* ``miou`` averages over classes present in the prediction or the truth; classes absent
  from both are skipped (an all-background pair gives 1.0).
* ``panoptic_quality``: sq = 0 when nothing matched (and the sets are not both empty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "typed_panoptic_quality",
    "dice",
    "precision",
    "recall",
    "iou",
    "miou",
    "pixel_accuracy",
    "Contingency",
    "contingency",
    "dsb_map",
    "object_f1",
    "aji",
    "panoptic_quality",
    "all_metrics",
    "DSB_THRESHOLDS",
]

#: IoU thresholds of the Data Science Bowl 2018 metric: 0.50, 0.55, ..., 0.95.
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _check_shapes(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs true {true.shape}")
    return pred, true


def _binary_counts(pred: np.ndarray, true: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of two masks where non-zero = positive."""
    pred, true = _check_shapes(pred, true)
    p = pred != 0
    t = true != 0
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = p.size - tp - fp - fn
    return tp, fp, fn, tn


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice / ZSI ``2|P∩T| / (|P|+|T|)`` of binary masks (H, W), non-zero = nucleus."""
    tp, fp, fn, _ = _binary_counts(pred, true)
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2.0 * tp / den


def precision(pred: np.ndarray, true: np.ndarray) -> float:
    """Pixel precision ``|P∩T| / |P|`` of binary masks (H, W)."""
    tp, fp, fn, _ = _binary_counts(pred, true)
    if tp + fp == 0:
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def recall(pred: np.ndarray, true: np.ndarray) -> float:
    """Pixel recall (sensitivity) ``|P∩T| / |T|`` of binary masks (H, W)."""
    tp, fp, fn, _ = _binary_counts(pred, true)
    if tp + fn == 0:
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Foreground IoU (Jaccard) ``|P∩T| / |P∪T|`` of binary masks (H, W)."""
    tp, fp, fn, _ = _binary_counts(pred, true)
    den = tp + fp + fn
    return 1.0 if den == 0 else tp / den


def miou(pred: np.ndarray, true: np.ndarray, num_classes: int | None = None) -> float:
    """Mean IoU over classes, background included.

    Args:
        pred, true: (H, W) non-negative integer class maps (pass ``inst > 0`` for the
            binary nucleus/background case).
        num_classes: number of classes K (labels 0..K-1); default ``max label + 1``.

    Returns:
        Mean of per-class IoU over the classes present in ``pred`` or ``true``.
    """
    pred, true = _check_shapes(pred, true)
    pred = pred.astype(np.int64, copy=False).ravel()
    true = true.astype(np.int64, copy=False).ravel()
    if pred.size == 0:
        return 1.0
    if pred.min() < 0 or true.min() < 0:
        raise ValueError("class labels must be non-negative")
    k = num_classes or int(max(pred.max(), true.max())) + 1
    conf = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    if not present.any():
        return 1.0
    return float(np.mean(inter[present] / union[present]))


def pixel_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of pixels whose labels are equal; (H, W) label maps of any kind."""
    pred, true = _check_shapes(pred, true)
    if pred.size == 0:
        return 1.0
    return float(np.count_nonzero(pred == true)) / pred.size


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Contingency:
    """Sparse pairwise overlap table of two instance maps.

    Instances are indexed 0..n-1 in increasing order of their original ids.

    Attributes:
        true_area: (n_true,) pixel count of each true instance.
        pred_area: (n_pred,) pixel count of each predicted instance.
        true_idx, pred_idx: (K,) indices of the K overlapping (true, pred) pairs.
        inter: (K,) intersection area of each pair.
        iou: (K,) IoU of each pair.
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    true_idx: np.ndarray
    pred_idx: np.ndarray
    inter: np.ndarray
    iou: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.true_area.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_area.size)

    def matches(self, threshold: float = 0.5) -> np.ndarray:
        """Boolean (K,) mask of pairs with IoU > ``threshold``.

        For ``threshold >= 0.5`` the matching is one-to-one: two different predictions
        cannot both cover more than half of the union with the same true nucleus.
        """
        if threshold < 0.5:
            raise ValueError("unique matching needs threshold >= 0.5")
        return self.iou > threshold


def _sequential(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Map ids to 0 (background) and 1..n (sorted by id); returns (int64 labels, n)."""
    inst = np.asarray(inst)
    if inst.size == 0:
        return inst.astype(np.int64).ravel(), 0
    if inst.min() < 0:
        raise ValueError("instance labels must be non-negative")
    max_id = int(inst.max())
    flat = inst.ravel()
    if max_id == 0:
        return np.zeros(flat.size, np.int64), 0
    if max_id < 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=max_id + 1) > 0
        present[0] = False
        n = int(present.sum())
        lut = np.zeros(max_id + 1, np.int64)
        lut[present] = np.arange(1, n + 1)
        return lut[flat], n
    ids, inv = np.unique(flat, return_inverse=True)
    if ids[0] != 0:
        inv = inv + 1
    return inv.astype(np.int64), int((ids > 0).sum())


def contingency(pred_inst: np.ndarray, true_inst: np.ndarray) -> Contingency:
    """Build the overlap table of two (H, W) instance maps (0 = background)."""
    pred_inst, true_inst = _check_shapes(pred_inst, true_inst)
    p, n_pred = _sequential(pred_inst)
    t, n_true = _sequential(true_inst)
    width = n_pred + 1
    combined = t * width + p
    size = (n_true + 1) * width
    if size <= 1 << 25:
        counts = np.bincount(combined, minlength=size)
        keys = np.flatnonzero(counts)
        vals = counts[keys]
    else:
        # Thousands x thousands of objects: a dense table would be hundreds of MB, the
        # sort-based unique stays O(pixels log pixels) in memory proportional to pixels.
        keys, vals = np.unique(combined, return_counts=True)
    ti = keys // width
    pi = keys % width
    true_area = np.zeros(n_true + 1, np.int64)
    pred_area = np.zeros(n_pred + 1, np.int64)
    np.add.at(true_area, ti, vals)
    np.add.at(pred_area, pi, vals)
    both = (ti > 0) & (pi > 0)
    ti, pi, inter = ti[both] - 1, pi[both] - 1, vals[both]
    true_area, pred_area = true_area[1:], pred_area[1:]
    union = true_area[ti] + pred_area[pi] - inter
    return Contingency(
        true_area=true_area,
        pred_area=pred_area,
        true_idx=ti,
        pred_idx=pi,
        inter=inter,
        iou=inter / np.maximum(union, 1),
    )


def _as_table(pred_inst: np.ndarray | Contingency, true_inst: np.ndarray | None) -> Contingency:
    if isinstance(pred_inst, Contingency):
        return pred_inst
    if true_inst is None:
        raise TypeError("true_inst is required")
    return contingency(pred_inst, true_inst)


def dsb_map(
    pred_inst: np.ndarray | Contingency,
    true_inst: np.ndarray | None = None,
    thresholds: tuple[float, ...] = DSB_THRESHOLDS,
) -> float:
    """Data Science Bowl 2018 score: mean over IoU thresholds of TP / (TP + FP + FN).

    A prediction matches a true nucleus when their IoU is strictly greater than the
    threshold t (0.5, 0.55, ..., 0.95).

    Args:
        pred_inst, true_inst: (H, W) instance maps, or a precomputed :class:`Contingency`.
    """
    tab = _as_table(pred_inst, true_inst)
    if tab.n_true == 0 and tab.n_pred == 0:
        return 1.0
    scores = []
    for t in thresholds:
        tp = int(np.count_nonzero(tab.matches(t)))
        fp = tab.n_pred - tp
        fn = tab.n_true - tp
        scores.append(tp / (tp + fp + fn))
    return float(np.mean(scores))


def object_f1(
    pred_inst: np.ndarray | Contingency,
    true_inst: np.ndarray | None = None,
    threshold: float = 0.5,
) -> float:
    """Object-level F1 ``2TP / (2TP + FP + FN)`` with unique matching at IoU > 0.5."""
    tab = _as_table(pred_inst, true_inst)
    if tab.n_true == 0 and tab.n_pred == 0:
        return 1.0
    tp = int(np.count_nonzero(tab.matches(threshold)))
    return 2.0 * tp / (tab.n_pred + tab.n_true)


def aji(pred_inst: np.ndarray | Contingency, true_inst: np.ndarray | None = None) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    Each true nucleus G_i is paired with the prediction S_j of highest IoU with it
    (a prediction may be paired with several true nuclei, as in the original algorithm);
    C += |G_i ∩ S_j|, U += |G_i ∪ S_j|. A true nucleus that overlaps no prediction adds
    |G_i| to U. Every prediction never paired adds its area to U. AJI = C / U.
    """
    tab = _as_table(pred_inst, true_inst)
    if tab.n_true == 0 and tab.n_pred == 0:
        return 1.0
    inter_sum = 0
    union_sum = int(tab.true_area.sum())
    used = np.zeros(tab.n_pred, bool)
    if tab.iou.size:
        # Best pair per true nucleus: sort pairs by (true idx, -iou), take the first of each
        # true idx. Ties on IoU go to the lower prediction index (stable sort).
        order = np.lexsort((-tab.iou, tab.true_idx))
        ti = tab.true_idx[order]
        first = np.ones(ti.size, bool)
        first[1:] = ti[1:] != ti[:-1]
        best = order[first]
        bp, bint = tab.pred_idx[best], tab.inter[best]
        inter_sum = int(bint.sum())
        # |G ∪ S| = |G| + |S| - |G ∩ S|; |G| of every true nucleus is already in union_sum.
        union_sum += int((tab.pred_area[bp] - bint).sum())
        used[bp] = True
    union_sum += int(tab.pred_area[~used].sum())
    return inter_sum / union_sum if union_sum else 1.0


def panoptic_quality(
    pred_inst: np.ndarray | Contingency, true_inst: np.ndarray | None = None
) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al. 2019) for one class of nuclei.

    Unique matches at IoU > 0.5. dq = TP / (TP + FP/2 + FN/2) (detection quality, an F1),
    sq = mean IoU of the matched pairs (segmentation quality), pq = dq * sq.

    Returns:
        (dq, sq, pq).
    """
    tab = _as_table(pred_inst, true_inst)
    if tab.n_true == 0 and tab.n_pred == 0:
        return 1.0, 1.0, 1.0
    m = tab.matches(0.5)
    tp = int(np.count_nonzero(m))
    fp = tab.n_pred - tp
    fn = tab.n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(tab.iou[m].mean()) if tp else 0.0
    return float(dq), sq, float(dq * sq)


def all_metrics(pred_inst: np.ndarray, true_inst: np.ndarray) -> dict[str, float]:
    """Every metric of this module for one image.

    Args:
        pred_inst, true_inst: (H, W) instance maps (0 = background).

    Returns:
        dict with pixel metrics computed on ``inst > 0`` (``dice``, ``precision``,
        ``recall``, ``iou``, ``miou`` (2 classes), ``pixel_accuracy``), object metrics
        (``dsb_map``, ``object_f1``, ``aji``, ``dq``, ``sq``, ``pq``) and the counts
        ``n_pred`` / ``n_true`` (as floats, so the dict averages cleanly).
    """
    pred_inst, true_inst = _check_shapes(pred_inst, true_inst)
    pb = pred_inst > 0
    tb = true_inst > 0
    tab = contingency(pred_inst, true_inst)
    dq, sq, pq = panoptic_quality(tab)
    return {
        "dice": dice(pb, tb),
        "precision": precision(pb, tb),
        "recall": recall(pb, tb),
        "iou": iou(pb, tb),
        "miou": miou(pb.astype(np.uint8), tb.astype(np.uint8), num_classes=2),
        "pixel_accuracy": pixel_accuracy(pb, tb),
        "dsb_map": dsb_map(tab),
        "object_f1": object_f1(tab),
        "aji": aji(tab),
        "dq": dq,
        "sq": sq,
        "pq": pq,
        "n_pred": float(tab.n_pred),
        "n_true": float(tab.n_true),
    }


def typed_panoptic_quality(
    pred_inst: np.ndarray, pred_classes: np.ndarray, true_inst: np.ndarray, true_classes: np.ndarray,
    num_classes: int,
) -> dict[str, Any]:
    """PanNuke's typed panoptic quality for one image (Gamper et al. 2020).

    For each nucleus class c = 1..``num_classes`` the predicted and true nuclei of class c are
    matched on their own (IoU > 0.5) and PQ_c computed; a class absent from both prediction
    and truth in this image is ``nan`` (left out of the averages, as in PanNuke's code).

    Args:
        pred_inst, true_inst: (H, W) instance maps.
        pred_classes, true_classes: (H, W) per-pixel class ids (one class per nucleus).
        num_classes: K, the number of nucleus classes.

    Returns:
        ``{"bpq": binary PQ (classes ignored), "per_class": {c: PQ_c or nan},
        "mpq": mean of the non-nan PQ_c (nan when every class is absent)}``.
    """
    pred_inst, true_inst = _check_shapes(pred_inst, true_inst)
    per_class: dict[int, float] = {}
    for c in range(1, int(num_classes) + 1):
        p = np.where(np.asarray(pred_classes) == c, pred_inst, 0)
        t = np.where(np.asarray(true_classes) == c, true_inst, 0)
        if not p.any() and not t.any():
            per_class[c] = float("nan")
            continue
        per_class[c] = panoptic_quality(contingency(p, t))[2]
    present = [v for v in per_class.values() if not math.isnan(v)]
    return {
        "bpq": panoptic_quality(contingency(pred_inst, true_inst))[2],
        "per_class": per_class,
        "mpq": float(np.mean(present)) if present else float("nan"),
    }
