"""Hand-checked cases for ml_worker.losses: every loss ≈ 0 on a perfect prediction and
behaves as documented on simple wrong ones; target derivation on two touching discs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from ml_worker import losses as L

torch.set_num_threads(1)

BIG = 30.0  # logit magnitude that saturates softmax/sigmoid (≈ perfect prediction)


def two_touching_discs(size: int = 48) -> torch.Tensor:
    """(H, W) long: disc 1 at (24, 16), disc 2 at (24, 30), both radius 8 — they share a
    straight border (disc 1 keeps the overlap)."""
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int64)
    for label, (cy, cx) in enumerate([(24, 16), (24, 30)], start=1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 64) & (inst == 0)] = label
    return torch.from_numpy(inst)


def perfect_logits(target: torch.Tensor, k: int) -> torch.Tensor:
    """Class map (B, H, W) → saturated logits (B, K, H, W) predicting it exactly."""
    return (torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 2 - 1) * BIG


@pytest.fixture
def mask() -> torch.Tensor:
    inst = two_touching_discs()
    return torch.stack([inst > 0, torch.roll(inst > 0, 5, dims=1)]).long()  # (2, H, W)


# ============================================================================ region losses
def test_cross_entropy_is_zero_for_perfect_and_log_k_for_uniform(mask: torch.Tensor) -> None:
    assert L.cross_entropy_loss(perfect_logits(mask, 2), mask) < 1e-6
    uniform = torch.zeros(2, 3, *mask.shape[1:])
    assert L.cross_entropy_loss(uniform, mask) == pytest.approx(math.log(3), rel=1e-5)


def test_bce_on_multilabel_target_is_zero_for_perfect_and_log2_for_zero_logits(mask: torch.Tensor) -> None:
    target = torch.stack([mask, 1 - mask], dim=1).float()  # (B, 2, H, W)
    assert L.LOSSES["bce"]((target * 2 - 1) * BIG, target) < 1e-6
    assert L.LOSSES["bce"](torch.zeros_like(target), target) == pytest.approx(math.log(2), rel=1e-5)


def test_soft_dice_is_zero_for_perfect_and_one_for_disjoint(mask: torch.Tensor) -> None:
    assert L.soft_dice_loss(perfect_logits(mask, 2), mask) < 1e-4
    assert L.soft_dice_loss(perfect_logits(1 - mask, 2), mask) > 0.99


def test_multiclass_dice_averages_foreground_classes() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 1
    target[0, 4:, 4:] = 2
    assert L.soft_dice_loss(perfect_logits(target, 3), target) < 1e-4
    # Class 1 perfect, class 2 (16 px) predicted as background: Dice_2 = (0 + s)/(16 + s)
    # with smooth s = 1, so the loss is 1 - mean(1, 1/17).
    pred = target.clone()
    pred[pred == 2] = 0
    expected = 1 - (1 + 1 / 17) / 2
    assert L.soft_dice_loss(perfect_logits(pred, 3), target) == pytest.approx(expected, rel=1e-4)


def test_binary_dice_on_sigmoid_target(mask: torch.Tensor) -> None:
    target = mask[:, None].float()  # (B, 1, H, W)
    assert L.soft_dice_loss((target * 2 - 1) * BIG, target) < 1e-4
    assert L.soft_dice_loss((1 - target * 2) * BIG, target) > 0.99


def test_ce_dice_is_the_sum(mask: torch.Tensor) -> None:
    logits = torch.randn(2, 2, *mask.shape[1:])
    expected = L.cross_entropy_loss(logits, mask) + L.soft_dice_loss(logits, mask)
    torch.testing.assert_close(L.ce_dice_loss(logits, mask), expected)


def test_focal_tversky_is_zero_for_perfect_and_one_for_disjoint(mask: torch.Tensor) -> None:
    assert L.focal_tversky_loss(perfect_logits(mask, 2), mask) < 1e-3
    assert L.focal_tversky_loss(perfect_logits(1 - mask, 2), mask) == pytest.approx(1.0, abs=1e-3)


def test_focal_tversky_penalises_missed_nuclei_more_than_false_alarms() -> None:
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, 5:15, 5:15] = 1  # 100 px nucleus
    missed = target.clone()
    missed[0, 5:10, 5:15] = 0  # 50 false negatives
    extra = target.clone()
    extra[0, 15:20, 5:15] = 1  # 50 false positives
    fn_loss = L.focal_tversky_loss(perfect_logits(missed, 2), target, smooth=0.0)
    fp_loss = L.focal_tversky_loss(perfect_logits(extra, 2), target, smooth=0.0)
    assert fn_loss > fp_loss
    # TI = TP / (TP + αFP + βFN) with α = 1 - β = 0.3, loss = (1 - TI)^(3/4)
    assert float(fn_loss) == pytest.approx((1 - 50 / (50 + 0.7 * 50)) ** 0.75, rel=1e-3)
    assert float(fp_loss) == pytest.approx((1 - 100 / (100 + 0.3 * 50)) ** 0.75, rel=1e-3)


def test_focal_tversky_gradient_is_finite_at_perfect_prediction(mask: torch.Tensor) -> None:
    logits = perfect_logits(mask, 2).requires_grad_()
    L.focal_tversky_loss(logits, mask).backward()
    assert torch.isfinite(logits.grad).all()


# ============================================================================ SSIM / edges
def test_ssim_loss_is_zero_for_identical_images_and_large_for_unrelated() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 32, 32, generator=g)
    assert L.ssim_loss(img, img) < 1e-5
    assert L.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    assert L.ssim_loss(noise, img) > 0.8
    # Structure matters more than brightness: a shifted copy keeps most of the similarity.
    assert L.ssim_loss(img + 0.1, img) < L.ssim_loss(noise, img)


def test_ssim_is_differentiable_and_works_below_window_size() -> None:
    pred = torch.rand(1, 1, 8, 8, requires_grad=True)
    loss = L.ssim_loss(pred, torch.rand(1, 1, 8, 8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_edge_l1_is_zero_for_perfect_and_half_for_zero_logits() -> None:
    contours = L.instance_contours(two_touching_discs()[None])  # (1, H, W)
    logits = (contours[:, None] * 2 - 1) * BIG
    assert L.edge_l1_loss(logits, contours) < 1e-6
    assert L.edge_l1_loss(torch.zeros_like(logits), contours) == pytest.approx(0.5)


# ============================================================================ border-weighted CE
def test_unet_weight_map_is_high_in_the_gap_between_nuclei() -> None:
    inst = np.zeros((40, 60), np.int64)
    inst[10:30, 5:25] = 1
    inst[10:30, 27:47] = 2  # 2-px gap at columns 25-26
    w = L.unet_weight_map(inst, w0=10, sigma=5)
    fg_w, bg_w = w[inst > 0].min(), w[0, 55]
    assert w[20, 25] > bg_w + 8  # d1 = d2 = 1..2 px → border term ≈ w0
    assert np.allclose(w[inst > 0], fg_w)  # no border term on nuclei
    n, n_fg = inst.size, (inst > 0).sum()
    assert fg_w == pytest.approx(n / (2 * n_fg)) and bg_w == pytest.approx(n / (2 * (n - n_fg)), rel=1e-3)


def test_unet_weight_map_without_neighbours_is_class_balance_only() -> None:
    inst = np.zeros((30, 30), np.int64)
    inst[5:15, 5:15] = 7
    w = L.unet_weight_map(inst, class_balance=False)
    assert np.allclose(w, 1.0)


def test_unet_weight_map_crop_matches_full_distance_transform() -> None:
    """The bounded-window speed-up must give the same map as full-image transforms."""
    rng = np.random.default_rng(0)
    inst = np.zeros((96, 96), np.int64)
    for label in range(1, 9):
        y, x = rng.integers(5, 85, size=2)
        inst[y : y + 8, x : x + 8] = label
    d = np.stack([ndi.distance_transform_edt(inst != i) for i in np.unique(inst)[1:]])
    d.sort(axis=0)
    expected = 10 * np.exp(-((d[0] + d[1]) ** 2) / (2 * 25)) * (inst == 0)
    got = L.unet_weight_map(inst, class_balance=False) - 1.0
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_border_weighted_ce_is_zero_for_perfect_and_needs_instances(mask: torch.Tensor) -> None:
    inst = two_touching_discs()[None]
    target = (inst > 0).long()
    assert L.border_weighted_ce_loss(perfect_logits(target, 2), target, inst) < 1e-6
    wrong = L.border_weighted_ce_loss(torch.zeros(1, 2, 48, 48), target, inst)
    assert wrong == pytest.approx(math.log(2), rel=1e-5)  # uniform CE whatever the weights
    with pytest.raises(ValueError, match="instance"):
        L.border_weighted_ce_loss(torch.zeros(1, 2, 48, 48), target)


# ============================================================================ target derivation
def test_contours_of_two_touching_discs() -> None:
    inst = two_touching_discs()
    edge = L.instance_contours(inst)
    assert edge.shape == inst.shape and edge.dtype == torch.float32
    assert ((edge > 0) <= (inst > 0)).all(), "contours are inner (on nuclei)"
    assert edge[24, 16] == 0 and edge[24, 30] == 0, "centres are not contours"
    assert edge[24, 8] == 1 and edge[16, 16] == 1, "outer rim is a contour"
    # the shared border: both sides of the label change are contours
    col = int((inst[24] == 1).nonzero().max())
    assert edge[24, col] == 1 and edge[24, col + 1] == 1
    # each disc's contour is a closed ring: removing it leaves the interior in one piece
    for label in (1, 2):
        interior = ((inst == label) & (edge == 0)).numpy()
        assert ndi.label(interior)[1] == 1


def test_shrink_separates_touching_discs() -> None:
    inst = two_touching_discs()
    assert ndi.label((inst > 0).numpy())[1] == 1  # touching: one blob
    core = L.shrink_instances(inst, k=2)
    assert core.dtype == torch.long
    assert ((core > 0) <= (inst > 0)).all() and (core[core > 0] == inst[core > 0]).all()
    assert ndi.label((core > 0).numpy())[1] == 2, "borderless cores are separated"
    for label in (1, 2):
        assert 0 < (core == label).sum() < (inst == label).sum()
    # eroding by k removes a band at least k px wide on the outer rim, keeps the centre
    assert core[24, 8:10].sum() == 0 and core[24, 16] == 1


def test_touching_borders_only_where_two_discs_meet() -> None:
    inst = two_touching_discs()
    border = L.touching_borders(inst, k=2)
    assert border.sum() > 0
    cols = border.nonzero()[:, 1]
    col = int((inst[24] == 1).nonzero().max())  # last column of disc 1 on the centre row
    assert cols.min() >= col - 2 and cols.max() <= col + 3, "a thin band around the contact"
    assert border[24, col] == 1 and border[24, col + 1] == 1
    assert border[24, 16] == 0 and border[5, 5] == 0


def test_touching_borders_cover_the_gap_between_close_discs() -> None:
    inst = torch.zeros(20, 30, dtype=torch.long)
    inst[5:15, 2:12] = 1
    inst[5:15, 14:24] = 2  # 2-px background gap (columns 12, 13)
    border = L.touching_borders(inst, k=2)
    assert border[10, 12] == 1 and border[10, 13] == 1
    far = torch.zeros(20, 40, dtype=torch.long)
    far[5:15, 2:12] = 1
    far[5:15, 25:35] = 2
    assert L.touching_borders(far, k=2).sum() == 0


def test_targets_accept_batches_and_multihead_stack_is_consistent() -> None:
    inst = torch.stack([two_touching_discs(), torch.zeros(48, 48, dtype=torch.long)])
    t = L.multihead_targets(inst, k=2)
    assert t.shape == (2, 3, 48, 48) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0], (inst > 0).float())
    torch.testing.assert_close(t[:, 1], (L.shrink_instances(inst, 2) > 0).float())
    torch.testing.assert_close(t[:, 2], L.touching_borders(inst, 2))
    assert t[1].sum() == 0  # empty image → empty targets
    torch.testing.assert_close(L.instance_contours(inst)[0], L.instance_contours(inst[0]))


def test_targets_reject_float_labels() -> None:
    with pytest.raises(ValueError, match="integer"):
        L.instance_contours(torch.zeros(4, 4))


# ============================================================================ registry
@pytest.mark.parametrize("name", ["ce", "bce", "dice", "ce_dice", "bce_dice", "focal_tversky", "border_ce"])
def test_segmentation_losses_give_finite_gradients(name: str) -> None:
    inst = two_touching_discs()[None].repeat(2, 1, 1)
    logits = torch.randn(2, 2, 48, 48, requires_grad=True)
    loss = L.get_loss(name)(logits, (inst > 0).long(), inst)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_registry_has_every_documented_loss_and_rejects_unknown_names() -> None:
    assert {"ce", "bce", "dice", "ce_dice", "bce_dice", "focal_tversky", "border_ce", "ssim", "edge_l1"} <= set(
        L.LOSSES
    )
    with pytest.raises(KeyError, match="focal_tversky"):
        L.get_loss("nope")


def test_mismatched_target_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target"):
        L.soft_dice_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 4, 4, dtype=torch.long))
