"""Tests for ml_worker.instances (post-processing into instance maps)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_worker.instances import (
    fill_small_holes,
    multihead_to_instances,
    relabel,
    remove_small_instances,
    semantic_to_instances,
    split_touching,
)
from ml_worker.metrics import contingency


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _best_iou_per_true(pred, true):
    tab = contingency(pred, true)
    best = np.zeros(tab.n_true)
    np.maximum.at(best, tab.true_idx, tab.iou)
    return best


def _two_touching_discs(shape=(100, 120), r=20, gap=32):
    """Two overlapping discs; truth splits the overlap along the bisector."""
    c1, c2 = (50, 40), (50, 40 + gap)
    d1 = _disc(shape, *c1, r)
    d2 = _disc(shape, *c2, r)
    xx = np.mgrid[: shape[0], : shape[1]][1]
    truth = np.zeros(shape, np.int32)
    truth[d1 & (xx < 40 + gap / 2)] = 1
    truth[d2 & (xx >= 40 + gap / 2)] = 2
    return d1 | d2, truth


def test_it_separates_two_touching_discs():
    union, truth = _two_touching_discs()
    prob = union.astype(np.float32) * 0.9
    inst = semantic_to_instances(prob)
    assert inst.dtype == np.int32
    assert inst.max() == 2
    assert np.all(_best_iou_per_true(inst, truth) > 0.8)


def test_it_does_not_split_an_elongated_nucleus_with_a_jagged_boundary():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:80, :120]
    ell = ((yy - 40) / 12.0) ** 2 + ((xx - 60) / 36.0) ** 2 <= 1.0
    # Jagged boundary: flip random boundary pixels.
    edge = ell ^ np.roll(ell, 1, 0)
    noisy = ell ^ (edge & (rng.random(ell.shape) < 0.5))
    inst = semantic_to_instances(noisy.astype(np.float32))
    assert inst.max() == 1


def test_it_accepts_a_softmax_stack_and_drops_tiny_objects():
    union, _ = _two_touching_discs()
    fg = union.astype(np.float32)
    fg[2:4, 2:4] = 1.0  # 4-pixel speck, below min_size
    probs = np.stack([1 - fg, fg])
    inst = semantic_to_instances(probs, min_size=16)
    assert inst.max() == 2
    assert inst[2, 2] == 0


def test_it_returns_an_empty_map_when_nothing_is_above_threshold():
    inst = semantic_to_instances(np.full((32, 32), 0.2, np.float32))
    assert inst.shape == (32, 32) and inst.dtype == np.int32 and inst.max() == 0


def test_plain_components_are_used_when_splitting_is_off():
    union, _ = _two_touching_discs()
    assert semantic_to_instances(union.astype(np.float32), split=False).max() == 1


def test_split_touching_labels_every_component_even_without_a_peak():
    mask = np.zeros((20, 20), bool)
    mask[5, 5:8] = True  # 1-pixel-wide line: flat distance map
    assert split_touching(mask).max() == 1


def test_fill_small_holes_fills_a_nucleolus_but_not_a_large_enclosed_region():
    mask = _disc((60, 60), 30, 30, 20)
    mask[29:31, 29:31] = False  # tiny hole
    ring = _disc((60, 60), 30, 30, 28) & ~_disc((60, 60), 30, 30, 24)
    filled = fill_small_holes(mask, 10)
    assert filled[30, 30]
    ring_filled = fill_small_holes(ring, 10)
    assert not ring_filled[30, 30]


def test_relabel_makes_ids_consecutive_and_keeps_their_order():
    inst = np.array([[0, 7, 7], [300, 0, 12]])
    out = relabel(inst)
    np.testing.assert_array_equal(out, [[0, 1, 1], [3, 0, 2]])
    assert out.dtype == np.int32
    # Very sparse ids take the np.unique path; same result.
    big = np.array([[0, 10**9], [5, 5]], np.int64)
    np.testing.assert_array_equal(relabel(big), [[0, 2], [1, 1]])


def test_remove_small_instances_drops_and_relabels():
    inst = np.zeros((10, 10), np.int32)
    inst[0, 0] = 4
    inst[5:9, 5:9] = 9
    out = remove_small_instances(inst, 5)
    assert out.max() == 1 and out[0, 0] == 0 and out[6, 6] == 1


def test_multihead_uses_cores_as_markers_and_borders_as_separators():
    union, truth = _two_touching_discs()
    from scipy import ndimage as ndi

    borderless = np.zeros(union.shape, np.float32)
    for k in (1, 2):
        borderless[ndi.binary_erosion(truth == k, iterations=4)] = 1.0
    xx = np.mgrid[: union.shape[0], : union.shape[1]][1]
    borders = ((np.abs(xx - 56) <= 1) & union).astype(np.float32)
    inst = multihead_to_instances(union.astype(np.float32), borderless, borders)
    assert inst.max() == 2
    assert np.all(_best_iou_per_true(inst, truth) > 0.8)


def test_multihead_keeps_a_nucleus_whose_core_was_missed():
    nucleus = _disc((64, 64), 20, 20, 8) | _disc((64, 64), 45, 45, 8)
    borderless = _disc((64, 64), 20, 20, 4).astype(np.float32)  # second core missed
    inst = multihead_to_instances(
        nucleus.astype(np.float32), borderless, np.zeros((64, 64), np.float32)
    )
    assert inst.max() == 2
    assert inst[45, 45] > 0


def test_multihead_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        multihead_to_instances(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)))
