"""Tests for ml_worker.metrics; expected values are worked out by hand in the comments."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ml_worker import metrics as M


def test_binary_metrics_on_a_hand_computed_case():
    pred = np.array([[1, 1, 1, 0, 0]])
    true = np.array([[0, 1, 1, 1, 1]])
    # tp = 2 (cols 1,2), fp = 1 (col 0), fn = 2 (cols 3,4), tn = 0
    assert M.dice(pred, true) == pytest.approx(4 / 7)  # 2*2 / (2*2 + 1 + 2)
    assert M.precision(pred, true) == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert M.recall(pred, true) == pytest.approx(0.5)  # 2 / (2 + 2)
    assert M.iou(pred, true) == pytest.approx(0.4)  # 2 / (2 + 1 + 2)
    assert M.pixel_accuracy(pred, true) == pytest.approx(0.4)  # cols 1,2 equal: 2/5
    # class 1 IoU = 2/5; class 0: pred0 = {3,4}, true0 = {0}, inter 0 -> IoU 0
    # mIoU = (2/5 + 0) / 2 = 0.2
    assert M.miou(pred, true) == pytest.approx(0.2)


def test_binary_metrics_treat_any_nonzero_label_as_nucleus():
    pred = np.array([[5, 9, 0, 0]])
    true = np.array([[1, 0, 3, 0]])
    # tp = 1, fp = 1, fn = 1 -> dice = 2/(2+1+1) = 0.5
    assert M.dice(pred, true) == pytest.approx(0.5)


def test_miou_with_three_classes():
    pred = np.array([0, 1, 2, 2])
    true = np.array([0, 1, 1, 2])
    # c0: inter 1, union 1 -> 1; c1: inter 1, union {1,2} = 2 -> 0.5
    # c2: inter 1 (idx 3), union {2,3} = 2 -> 0.5; mean = 2/3
    assert M.miou(pred, true) == pytest.approx(2 / 3)


def _three_vs_three():
    """Row of 15 pixels.

    true: A = cols 0-3 (4 px), B = cols 5-8 (4 px), C = cols 10-11 (2 px)
    pred: a = cols 0-2 (3 px), b = cols 5-9 (5 px), c = cols 13-14 (2 px)
    IoU(A, a) = 3/4 = 0.75, IoU(B, b) = 4/5 = 0.8; C and c overlap nothing.
    """
    true = np.zeros((1, 15), np.int32)
    pred = np.zeros((1, 15), np.int32)
    true[0, 0:4], true[0, 5:9], true[0, 10:12] = 1, 2, 3
    pred[0, 0:3], pred[0, 5:10], pred[0, 13:15] = 10, 20, 30  # ids need not be 1..N
    return pred, true


def test_dsb_map_on_a_hand_computed_case():
    pred, true = _three_vs_three()
    # t = 0.50..0.70 (5 thresholds): TP 2, FP 1, FN 1 -> 2/4 = 0.5
    # t = 0.75: 0.75 is not > 0.75 -> TP 1, FP 2, FN 2 -> 1/5 = 0.2
    # t = 0.80..0.95 (4 thresholds): TP 0 -> 0
    # mean = (5*0.5 + 0.2) / 10 = 0.27
    assert M.dsb_map(pred, true) == pytest.approx(0.27)


def test_object_f1_on_a_hand_computed_case():
    pred, true = _three_vs_three()
    # TP 2 at IoU > 0.5; 2*2 / (3 + 3) = 2/3
    assert M.object_f1(pred, true) == pytest.approx(2 / 3)


def test_aji_on_a_hand_computed_case():
    pred, true = _three_vs_three()
    # A-a: C += 3, U += 4; B-b: C += 4, U += 5; C unpaired: U += 2; c unused: U += 2
    # AJI = 7 / 13
    assert M.aji(pred, true) == pytest.approx(7 / 13)


def test_aji_lets_one_prediction_pair_with_several_true_nuclei():
    true = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[1, 1, 1, 1, 1]])
    # IoU(A,p) = IoU(B,p) = 2/5; both pair with p: C = 2 + 2, U = 5 + 5 -> 0.4
    assert M.aji(pred, true) == pytest.approx(0.4)


def test_panoptic_quality_on_a_hand_computed_case():
    pred, true = _three_vs_three()
    # TP 2, FP 1, FN 1: dq = 2 / (2 + 0.5 + 0.5) = 2/3; sq = (0.75 + 0.8)/2 = 0.775
    dq, sq, pq = M.panoptic_quality(pred, true)
    assert dq == pytest.approx(2 / 3)
    assert sq == pytest.approx(0.775)
    assert pq == pytest.approx(2 / 3 * 0.775)


def test_perfect_prediction_scores_one_everywhere():
    _, true = _three_vs_three()
    out = M.all_metrics(true, true)
    for k in ("dice", "precision", "recall", "iou", "miou", "pixel_accuracy",
              "dsb_map", "object_f1", "aji", "dq", "sq", "pq"):
        assert out[k] == pytest.approx(1.0), k
    assert out["n_true"] == out["n_pred"] == 3


def test_both_empty_is_defined_as_perfect_agreement():
    z = np.zeros((8, 8), np.int32)
    out = M.all_metrics(z, z)
    assert all(out[k] == 1.0 for k in out if not k.startswith("n_"))


def test_empty_prediction_against_nuclei_scores_zero():
    _, true = _three_vs_three()
    pred = np.zeros_like(true)
    out = M.all_metrics(pred, true)
    for k in ("dice", "precision", "recall", "iou", "dsb_map", "object_f1", "aji",
              "dq", "sq", "pq"):
        assert out[k] == 0.0, k
    # pixels: 10 of 15 are nucleus; accuracy = 5/15
    assert out["pixel_accuracy"] == pytest.approx(5 / 15)


def test_predictions_on_an_empty_truth_score_zero():
    pred, _ = _three_vs_three()
    true = np.zeros_like(pred)
    assert M.precision(pred, true) == 0.0
    assert M.recall(pred, true) == 0.0
    assert M.dsb_map(pred, true) == 0.0
    assert M.aji(pred, true) == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        M.dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_contingency_matches_a_brute_force_computation():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 6, (40, 40))
    pred = rng.integers(0, 5, (40, 40)) * 3
    tab = M.contingency(pred, true)
    tids = [i for i in np.unique(true) if i]
    pids = [i for i in np.unique(pred) if i]
    got = {(tids[t], pids[p]): v for t, p, v in zip(tab.true_idx, tab.pred_idx, tab.iou)}
    for t in tids:
        for p in pids:
            inter = np.sum((true == t) & (pred == p))
            union = np.sum((true == t) | (pred == p))
            assert got.get((t, p), 0.0) == pytest.approx(inter / union)


def _grid_of_nuclei(shape, n_side, r, shift=0):
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = yy**2 + xx**2 <= r * r
    step = shape[0] // n_side
    k = 0
    for i in range(n_side):
        for j in range(n_side):
            k += 1
            cy, cx = i * step + step // 2, j * step + step // 2 + shift
            inst[cy - r : cy + r + 1, cx - r : cx + r + 1][disc] = k
    return inst


def test_object_metrics_are_fast_with_hundreds_of_nuclei():
    true = _grid_of_nuclei((1000, 1000), 20, 18)  # 400 nuclei
    pred = _grid_of_nuclei((1000, 1000), 20, 18, shift=3)
    t0 = time.perf_counter()
    out = M.all_metrics(pred, true)
    assert time.perf_counter() - t0 < 1.0
    assert out["n_true"] == 400 and out["object_f1"] == 1.0


def test_the_many_objects_path_matches_the_dense_path():
    rng = np.random.default_rng(2)
    true = rng.integers(0, 7000, (300, 300))
    pred = rng.integers(0, 7000, (300, 300))
    # (7000 x 7000) > 2**25 entries -> np.unique path; compare with a small crop done both ways
    tab = M.contingency(pred, true)
    assert tab.n_true == len(np.unique(true[true > 0]))
    inter_total = int(tab.inter.sum())
    assert inter_total == int(np.count_nonzero((true > 0) & (pred > 0)))
