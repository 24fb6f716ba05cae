"""Correction effort: how much an annotator had to change a pre-annotation (numpy only).

Given the model's prediction shown to the annotator (``pred_inst``) and the final,
corrected annotation (``true_inst``), every nucleus falls in one bin:

* **kept**     — a true nucleus matched one-to-one by a prediction with IoU >=
  ``iou_threshold`` (0.7): accepted as is (or with a negligible touch);
* **redrawn**  — a true nucleus matched (IoU >= ``match_iou``, 0.5) but below
  ``iou_threshold``: the annotator had to redraw / edit the outline;
* **added**    — a true nucleus with no matching prediction: drawn from scratch (missed,
  or only covered by a merged / badly placed prediction);
* **deleted**  — a prediction matching no true nucleus: false positive, or a merged blob
  the annotator removes before drawing the nuclei it covered.

Matching is one-to-one, greedy by decreasing IoU among pairs with IoU >= ``match_iou``
(for ``match_iou`` > 0.5 it is the unique matching of the DSB / PQ metrics).

The same figures are meant to be recorded by the platform for real corrections, so the
simulation (``ml_worker.al_sim``) and production measure effort identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from ml_worker.metrics import contingency

__all__ = ["correction_effort", "aggregate_effort", "EFFORT_COUNTS"]

#: count fields of :func:`correction_effort` that :func:`aggregate_effort` sums
EFFORT_COUNTS = ("n_true", "n_pred", "n_kept", "n_redrawn", "n_added", "n_deleted")


def _shares(c: Mapping[str, float]) -> dict[str, float]:
    n_true, n_pred = c["n_true"], c["n_pred"]
    changed = c["n_added"] + c["n_redrawn"]
    return {
        "added_or_redrawn_share": changed / n_true if n_true else 0.0,
        "added_share": c["n_added"] / n_true if n_true else 0.0,
        "redrawn_share": c["n_redrawn"] / n_true if n_true else 0.0,
        "deleted_share": c["n_deleted"] / n_pred if n_pred else 0.0,
        # polygon operations per true nucleus (adds + redraws + deletions)
        "edits_per_nucleus": (changed + c["n_deleted"]) / n_true if n_true else float(c["n_deleted"]),
    }


def correction_effort(
    pred_inst: np.ndarray,
    true_inst: np.ndarray,
    iou_threshold: float = 0.7,
    match_iou: float = 0.5,
) -> dict[str, float]:
    """Annotation effort to turn ``pred_inst`` into ``true_inst`` (see module docstring).

    Args:
        pred_inst: (H, W) predicted instance map shown to the annotator (0 = background).
        true_inst: (H, W) corrected / ground-truth instance map.
        iou_threshold: a matched nucleus with IoU below this had to be redrawn.
        match_iou: minimum IoU for a prediction to count as the same nucleus at all.

    Returns:
        dict with ``added_or_redrawn_share`` (share of true nuclei added or redrawn; 0 when
        there are none), ``deleted_share`` (share of predicted nuclei deleted; 0 when none
        were predicted), ``added_share``, ``redrawn_share``, ``edits_per_nucleus``, the counts
        ``n_true``, ``n_pred``, ``n_kept``, ``n_redrawn``, ``n_added``, ``n_deleted`` and
        ``mean_matched_iou`` (over matched pairs; 1.0 when both maps are empty, 0.0 when
        nothing matched).
    """
    if not 0.0 < match_iou <= iou_threshold <= 1.0:
        raise ValueError(f"need 0 < match_iou <= iou_threshold <= 1, got {match_iou}, {iou_threshold}")
    tab = contingency(pred_inst, true_inst)
    n_true, n_pred = tab.n_true, tab.n_pred
    ok = tab.iou >= match_iou
    ti, pi, iou = tab.true_idx[ok], tab.pred_idx[ok], tab.iou[ok]
    order = np.argsort(-iou, kind="stable")
    t_used = np.zeros(n_true, bool)
    p_used = np.zeros(n_pred, bool)
    matched: list[float] = []
    for j in order:
        t, p = ti[j], pi[j]
        if t_used[t] or p_used[p]:
            continue
        t_used[t] = p_used[p] = True
        matched.append(float(iou[j]))
    m = np.asarray(matched)
    n_kept = int(np.count_nonzero(m >= iou_threshold))
    counts = {
        "n_true": n_true,
        "n_pred": n_pred,
        "n_kept": n_kept,
        "n_redrawn": int(m.size - n_kept),
        "n_added": int(n_true - m.size),
        "n_deleted": int(n_pred - m.size),
    }
    out: dict[str, float] = {**_shares(counts), **{k: float(v) for k, v in counts.items()}}
    out["mean_matched_iou"] = float(m.mean()) if m.size else (1.0 if n_true == n_pred == 0 else 0.0)
    return out


def aggregate_effort(efforts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Pool several tiles' :func:`correction_effort` results: counts are summed and the
    shares recomputed from the sums (a tile with many nuclei weighs more, as it does for
    the annotator). An empty iterable gives zero counts and shares."""
    tot = {k: 0.0 for k in EFFORT_COUNTS}
    n = 0
    for e in efforts:
        n += 1
        for k in EFFORT_COUNTS:
            tot[k] += float(e[k])
    return {**_shares(tot), **tot, "n_tiles": float(n)}
