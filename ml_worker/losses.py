"""Losses and torch target derivation for Karyo's segmentation models.

Segmentation losses share one signature so that models and the training loop can pick them
by name from :data:`LOSSES`::

    loss = LOSSES[name](logits, target, instances=None)  # -> scalar tensor

* ``logits``: (B, K, H, W) raw network outputs.
* ``target``: either a **class map** (B, H, W) long — the logits are read as K mutually
  exclusive classes (softmax, class 0 = background) — or a **multi-label map**
  (B, K, H, W) float in [0, 1] — the logits are K independent sigmoid channels (the
  multi-head model). The dtype of ``target`` selects the interpretation.
* ``instances``: (B, H, W) long instance labels, only needed by ``border_ce``.

The auxiliary losses use the same call shape: ``ssim`` takes (reconstruction, image) and
``edge_l1`` takes (edge logits, contour map).

Targets that need morphology (contours, shrunk "borderless" nuclei, borders between touching
nuclei) are derived from instance label maps in torch with max-pool tricks, so they run on
the same device as the model and the data pipeline stays identical for every architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

__all__ = [
    "LOSSES",
    "get_loss",
    "cross_entropy_loss",
    "soft_dice_loss",
    "ce_dice_loss",
    "focal_tversky_loss",
    "ssim",
    "ssim_loss",
    "edge_l1_loss",
    "unet_weight_map",
    "border_weighted_ce_loss",
    "instance_contours",
    "shrink_instances",
    "touching_borders",
    "multihead_targets",
]

LossFn = Callable[..., torch.Tensor]

# Labels are max-pooled as float32, exact for integers below 2**24.
_MAX_LABEL = 2**24


# ============================================================================ helpers
def _is_class_map(target: torch.Tensor) -> bool:
    """True for a (B, H, W) integer class map, False for a (B, K, H, W) float multi-label map."""
    return not torch.is_floating_point(target)


def _check_target(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, H, W), got {tuple(logits.shape)}")
    if _is_class_map(target):
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"class-map target must be (B, H, W) = {(logits.shape[0], *logits.shape[2:])}, "
                f"got {tuple(target.shape)}"
            )
    elif target.shape != logits.shape:
        raise ValueError(f"multi-label target must match logits {tuple(logits.shape)}, got {tuple(target.shape)}")


def _probs_and_onehot(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, one-hot/multi-label target), both (B, K, H, W) float."""
    _check_target(logits, target)
    if _is_class_map(target):
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        return probs, onehot
    return torch.sigmoid(logits), target.to(logits.dtype)


def _channels(k: int, target: torch.Tensor, include_background: bool) -> slice:
    """Channels a region loss averages over: for a class map, the foreground classes
    1..K-1 unless ``include_background`` (the background class would dominate a 2-class
    Dice and hide errors on nuclei); for multi-label targets every channel."""
    if _is_class_map(target) and not include_background and k > 1:
        return slice(1, None)
    return slice(None)


# ============================================================================ region losses
def cross_entropy_loss(
    logits: torch.Tensor, target: torch.Tensor, instances: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-wise cross-entropy.

    Class map (B, H, W) long → softmax CE; multi-label (B, K, H, W) float → BCE-with-logits
    averaged over channels and pixels. Returns a scalar.
    """
    _check_target(logits, target)
    if _is_class_map(target):
        return F.cross_entropy(logits, target.long())
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None = None,
    smooth: float = 1.0,
    include_background: bool = False,
) -> torch.Tensor:
    """Soft Dice loss, 1 - mean_c (2·Σp·t + s) / (Σp + Σt + s).

    Sums run over the batch and pixels per channel (batch Dice: stable when an image has no
    nuclei). Multi-class (softmax, foreground classes) or binary/multi-label (sigmoid per
    channel) depending on ``target`` (see module doc). Returns a scalar in [0, 1].
    """
    probs, onehot = _probs_and_onehot(logits, target)
    ch = _channels(logits.shape[1], target, include_background)
    p, t = probs[:, ch], onehot[:, ch]
    dims = (0, 2, 3)
    inter = (p * t).sum(dims)  # (K',)
    denom = p.sum(dims) + t.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice.mean()


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
    """CE + soft Dice (BCE + soft Dice for multi-label targets). Scalar."""
    return cross_entropy_loss(logits, target) + soft_dice_loss(logits, target)


def focal_tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None = None,
    beta: float = 0.7,
    gamma: float = 4.0 / 3.0,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Focal Tversky loss (Abraham & Khan 2019), U-Net#'s default.

    Tversky index TI = (TP + s) / (TP + α·FP + β·FN + s) with α = 1 - β; β = 0.7 penalises
    false negatives more than false positives (nuclei are the minority class). The loss is
    mean_c (1 - TI_c)^(1/γ) with γ = 4/3, which focuses training on the harder (low TI)
    classes/batches. Channels as in :func:`soft_dice_loss`. Returns a scalar.
    """
    alpha = 1.0 - beta
    probs, onehot = _probs_and_onehot(logits, target)
    ch = _channels(logits.shape[1], target, include_background=False)
    p, t = probs[:, ch], onehot[:, ch]
    dims = (0, 2, 3)
    tp = (p * t).sum(dims)
    fp = (p * (1 - t)).sum(dims)
    fn = ((1 - p) * t).sum(dims)
    ti = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    # (1 - TI)^(1/γ) has an infinite slope at 0 for γ > 1: clamp so a perfect batch gives
    # a finite (tiny) gradient instead of NaN.
    return (1.0 - ti).clamp_min(1e-6).pow(1.0 / gamma).mean()


# ============================================================================ SSIM
def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian kernel as a depthwise conv weight (channels, 1, size, size)."""
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float | None = None,
) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) with an 11×11 σ=1.5 Gaussian window.

    Args:
        x, y: (B, C, H, W) images; computed per channel ("valid" windows, no padding).
        data_range: dynamic range L of the images (C1 = (0.01L)², C2 = (0.03L)²). ``None``
            uses the per-sample range of ``y`` — our inputs are z-score normalised, not [0, 1].

    Returns:
        Scalar mean SSIM (1 for identical images).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {x.shape}, {y.shape}")
    # Shrink the window for tiny images (still odd) so the "valid" map is never empty.
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= (size + 1) % 2
    c = x.shape[1]
    win = _gaussian_window(size, sigma, c, x)
    if data_range is None:
        rng = (y.amax(dim=(1, 2, 3), keepdim=True) - y.amin(dim=(1, 2, 3), keepdim=True)).detach()
        rng = rng.clamp_min(1e-6)  # (B, 1, 1, 1)
    else:
        rng = torch.as_tensor(float(data_range), dtype=x.dtype, device=x.device)
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
    """1 - SSIM(pred, target) for (B, C, H, W) images (DSSNet's super-resolution head)."""
    return 1.0 - ssim(pred, target)


# ============================================================================ edges
def edge_l1_loss(
    edge_logits: torch.Tensor, target: torch.Tensor, instances: torch.Tensor | None = None
) -> torch.Tensor:
    """L1 between sigmoid(edge logits) (B, 1, H, W) and a contour map (B, H, W) or
    (B, 1, H, W) in {0, 1} (see :func:`instance_contours`). Scalar."""
    if target.ndim == 3:
        target = target[:, None]
    if target.shape != edge_logits.shape:
        raise ValueError(f"edge target {tuple(target.shape)} does not match {tuple(edge_logits.shape)}")
    return (torch.sigmoid(edge_logits) - target.to(edge_logits.dtype)).abs().mean()


# ============================================================================ border-weighted CE
def unet_weight_map(inst: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True) -> np.ndarray:
    """Ronneberger et al. (2015) U-Net weight map for one instance map.

    w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / (2σ²)) on background pixels, where d1/d2
    are the distances to the nearest and second-nearest nucleus — large in the thin gaps
    between touching nuclei, which forces the network to separate them.

    Args:
        inst: (H, W) integer instance labels, 0 = background.
        w0, sigma: border term amplitude and width (paper: 10 and 5 px).
        class_balance: w_c = N / (2·N_class) for foreground/background (mean weight 1);
            otherwise w_c = 1.

    Returns:
        (H, W) float32 weights.
    """
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"instance map must be (H, W), got {inst.shape}")
    fg = inst > 0
    n, n_fg = inst.size, int(fg.sum())
    if class_balance and 0 < n_fg < n:
        weights = np.where(fg, n / (2.0 * n_fg), n / (2.0 * (n - n_fg))).astype(np.float32)
    else:
        weights = np.ones(inst.shape, np.float32)

    ids, dense = np.unique(inst, return_inverse=True)
    dense = dense.reshape(inst.shape)
    if ids[0] != 0:
        dense = dense + 1
    if dense.max() < 2:  # fewer than two nuclei: no gaps between nuclei
        return weights

    # Only distances up to 6σ matter (beyond, the border term is < exp(-18)), so each
    # nucleus's distance transform runs on its bounding box grown by that margin:
    # O(N · box) instead of O(N · H · W) on tiles with hundreds of nuclei.
    margin = int(math.ceil(6 * sigma))
    h, w = inst.shape
    d1 = np.full(inst.shape, np.inf, np.float32)
    d2 = np.full(inst.shape, np.inf, np.float32)
    for label, sl in enumerate(ndi.find_objects(dense), start=1):
        if sl is None:
            continue
        ys = slice(max(sl[0].start - margin, 0), min(sl[0].stop + margin, h))
        xs = slice(max(sl[1].start - margin, 0), min(sl[1].stop + margin, w))
        # Distance to this nucleus is exact inside the crop: all its pixels are in the crop.
        d = ndi.distance_transform_edt(dense[ys, xs] != label).astype(np.float32)
        c1, c2 = d1[ys, xs], d2[ys, xs]
        c2[...] = np.minimum(c2, np.maximum(c1, d))
        c1[...] = np.minimum(c1, d)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    return weights + np.where(fg, 0.0, border).astype(np.float32)


def border_weighted_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    instances: torch.Tensor | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> torch.Tensor:
    """U-Net border-weighted cross-entropy: Σ w·CE / Σ w with ``w`` from
    :func:`unet_weight_map` per sample (computed on the CPU in numpy/scipy).

    Args:
        logits: (B, K, H, W); target: (B, H, W) long; instances: (B, H, W) long (required).
    """
    if instances is None:
        raise ValueError("border_ce needs the instance maps (batch['instances'])")
    if not _is_class_map(target):
        raise ValueError("border_ce needs a (B, H, W) class-map target")
    _check_target(logits, target)
    inst = instances.detach().cpu().numpy()
    w = np.stack([unet_weight_map(i, w0=w0, sigma=sigma) for i in inst])
    weights = torch.from_numpy(w).to(device=logits.device, dtype=logits.dtype)  # (B, H, W)
    ce = F.cross_entropy(logits, target.long(), reduction="none")  # (B, H, W)
    return (ce * weights).sum() / weights.sum()


# ============================================================================ target derivation
def _as_batch(inst: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(H, W) or (B, H, W) integer labels → ((B, 1, H, W) float32, was_2d)."""
    if inst.ndim not in (2, 3):
        raise ValueError(f"instance maps must be (H, W) or (B, H, W), got {tuple(inst.shape)}")
    if torch.is_floating_point(inst):
        raise ValueError("instance maps must be integer tensors")
    if inst.numel() and int(inst.max()) >= _MAX_LABEL:
        raise ValueError(f"instance labels must be < {_MAX_LABEL}")
    was_2d = inst.ndim == 2
    x = inst[None] if was_2d else inst
    return x[:, None].to(torch.float32), was_2d


def _max_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    # Padding of max_pool2d is -inf, so image borders never inject fake labels.
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)


def _min_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    return -F.max_pool2d(-x, 2 * radius + 1, stride=1, padding=radius)


def _restore(x: torch.Tensor, was_2d: bool) -> torch.Tensor:
    x = x[:, 0]
    return x[0] if was_2d else x


def instance_contours(inst: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Inner contours of every nucleus: foreground pixels whose (2·width+1)² neighbourhood
    holds another label (background or a different nucleus), so borders between touching
    nuclei are contours too.

    Args:
        inst: (H, W) or (B, H, W) integer labels.
    Returns:
        Float {0, 1} map of the same shape.
    """
    x, was_2d = _as_batch(inst)  # (B, 1, H, W)
    edge = (x > 0) & (_max_pool(x, width) != _min_pool(x, width))
    return _restore(edge.to(torch.float32), was_2d)


def shrink_instances(inst: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Erode every nucleus by ``k`` pixels (square structuring element) independently:
    a pixel keeps its label when its whole (2k+1)² neighbourhood has that label. The result
    is the "borderless" nucleus core; touching nuclei become separated.

    Args:
        inst: (H, W) or (B, H, W) integer labels.
    Returns:
        Shrunk labels, long, same shape (0 where eroded).
    """
    x, was_2d = _as_batch(inst)
    keep = (x > 0) & (_max_pool(x, k) == x) & (_min_pool(x, k) == x)
    return _restore((x * keep).long(), was_2d)


def touching_borders(inst: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Pixels where the k-pixel dilations of two *different* nuclei meet, i.e. whose
    (2k+1)² neighbourhood contains at least two distinct non-zero labels. Covers the thin
    gap (or shared edge) between touching nuclei, background or foreground alike.

    Args:
        inst: (H, W) or (B, H, W) integer labels.
    Returns:
        Float {0, 1} map of the same shape.
    """
    x, was_2d = _as_batch(inst)
    big = float(_MAX_LABEL)
    max_nz = _max_pool(x, k)  # the largest label around (0 if none)
    min_nz = _min_pool(torch.where(x > 0, x, torch.full_like(x, big)), k)  # smallest non-zero
    border = (max_nz > 0) & (min_nz < big) & (max_nz != min_nz)
    return _restore(border.to(torch.float32), was_2d)


def multihead_targets(inst: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Targets of the multi-head U-Net from instance labels (B, H, W):
    (B, 3, H, W) float = [nucleus, borderless (shrunk by k) nucleus, touching borders]."""
    if inst.ndim != 3:
        raise ValueError(f"instances must be (B, H, W), got {tuple(inst.shape)}")
    nucleus = (inst > 0).to(torch.float32)
    borderless = (shrink_instances(inst, k) > 0).to(torch.float32)
    borders = touching_borders(inst, k)
    return torch.stack([nucleus, borderless, borders], dim=1)


# ============================================================================ registry
#: name → loss fn(pred, target, instances=None) -> scalar; see module docstring.
LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy_loss,
    "bce": cross_entropy_loss,  # same function: BCE for multi-label (float) targets
    "dice": soft_dice_loss,
    "ce_dice": ce_dice_loss,
    "bce_dice": ce_dice_loss,  # same function: BCE + Dice for multi-label targets
    "focal_tversky": focal_tversky_loss,
    "border_ce": border_weighted_ce_loss,
    "ssim": ssim_loss,
    "edge_l1": edge_l1_loss,
}


def get_loss(name: str) -> LossFn:
    """Loss function by name; KeyError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}") from None
