"""Tiled inference for images of any size with Gaussian-weighted blending.

Large images do not fit a network in one pass, and tile borders see less context than
tile centres, so predictions near a tile edge are less reliable. Following the HSP-Net
post-processing (and nnU-Net), overlapping tiles are blended with a Gaussian importance
map (sigma = tile / 8): each pixel's probability is the weight-averaged prediction of the
tiles covering it, dominated by the tiles where it is most central. A thin margin along
every tile edge that lies inside the image gets zero weight: those pixels were computed
from the network's zero/replicate padding rather than from image context.

Memory is bounded by one batch of tiles plus two full-size accumulators
(``out_channels x H x W`` weighted sums and ``H x W`` weights); tile outputs are folded
into the accumulators as soon as their batch finishes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ml_worker.data import preprocess, tile_grid
from ml_worker.stain import StainNormalizer

__all__ = ["gaussian_importance_map", "predict_probs", "predict_instances", "pick_device"]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def gaussian_importance_map(shape: tuple[int, int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """(h, w) float32 Gaussian centred on the tile, sigma = side * ``sigma_scale``, max 1.

    Weights are floored at 1e-3 so image corners covered by a single tile edge still get a
    well-conditioned average (the value there is just that tile's prediction).
    """
    h, w = shape
    ys = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    xs = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    gy = np.exp(-(ys**2) / (2 * (max(h * sigma_scale, 1e-6)) ** 2))
    gx = np.exp(-(xs**2) / (2 * (max(w * sigma_scale, 1e-6)) ** 2))
    g = np.outer(gy, gx)
    g /= g.max()
    return np.maximum(g, 1e-3).astype(np.float32)


def _round_up(v: int, d: int) -> int:
    return int(math.ceil(v / d) * d)


def _activation(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    act = getattr(model, "activation", None)
    if callable(act):
        return act(logits)
    # Plain modules: one channel = binary (sigmoid), several = mutually exclusive classes.
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    tile_size: int = 256,
    overlap: int | float = 32,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    normalizer: StainNormalizer | None = None,
    amp: bool | None = None,
    compile: bool = False,
    edge_margin: int | None = None,
) -> np.ndarray:
    """Per-pixel probabilities for a whole image.

    Args:
        model: a ``KaryoModel`` (or any module mapping (B, 3, h, w) to (B, C, h, w) logits;
            uses ``model.activation`` and ``model.size_divisor`` when present).
        image: (H, W, 3) uint8 RGB, any size.
        tile_size: tile side; rounded up to a multiple of ``model.size_divisor``. Sides of
            the image shorter than a tile use a smaller (divisor-aligned) tile instead.
        overlap: pixels shared by neighbouring tiles (int), or a fraction of the tile
            (float < 1).
        batch_size: tiles per forward pass.
        device: default CUDA if available else CPU. The model is moved there.
        normalizer: stain normaliser, as in training (see ``data.preprocess``).
        amp: bf16 autocast; None = on when the device is CUDA with bf16 support. Ignored on
            CPU.
        compile: ``torch.compile`` the model first (CUDA only; ignored on CPU).
        edge_margin: pixels along each tile edge that lies inside the image given zero
            weight (default ``overlap // 4``, capped at ``overlap // 2`` so every pixel
            stays covered). Those pixels were computed from the network's padding, not
            from image context; dropping them means a network whose receptive-field
            radius is <= the margin gives exactly the whole-image result.

    Returns:
        (C, H, W) float32 probabilities (C = model output channels).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    H, W = image.shape[:2]
    dev = pick_device(device)
    div = int(getattr(model, "size_divisor", 1) or 1)
    tile = _round_up(int(tile_size), div)
    th, tw = min(tile, _round_up(H, div)), min(tile, _round_up(W, div))
    if isinstance(overlap, float) and overlap < 1.0:
        ov_h, ov_w = int(round(th * overlap)), int(round(tw * overlap))
    else:
        ov_h = ov_w = int(overlap)
    ov_h, ov_w = min(ov_h, th - 1), min(ov_w, tw - 1)  # keep a positive stride on small tiles

    x = preprocess(image, normalizer)  # (3, H, W) float32
    ph, pw = max(H, th), max(W, tw)
    if (ph, pw) != (H, W):
        # Mirror padding: what PatchDataset does beyond image borders during training.
        x = np.pad(x, ((0, 0), (0, ph - H), (0, pw - W)), mode="symmetric")

    is_cuda = dev.type == "cuda"
    use_amp = is_cuda and (torch.cuda.is_bf16_supported() if amp is None else bool(amp))
    was_training = model.training
    model.eval()
    model.to(dev)
    if is_cuda:
        model.to(memory_format=torch.channels_last)
    net: Any = torch.compile(model) if (compile and is_cuda) else model

    base = gaussian_importance_map((th, tw))
    m = min(ov_h, ov_w) // 4 if edge_margin is None else int(edge_margin)
    m_h, m_w = max(0, min(m, ov_h // 2)), max(0, min(m, ov_w // 2))
    coords = tile_grid(ph, pw, (th, tw), (ov_h, ov_w))

    def tile_weight(y: int, x0: int) -> np.ndarray:
        # Margins only on edges shared with another tile; the padded image's own border
        # has no neighbour to take over.
        w = base.copy()
        if m_h:
            if y > 0:
                w[:m_h] = 0.0
            if y + th < ph:
                w[-m_h:] = 0.0
        if m_w:
            if x0 > 0:
                w[:, :m_w] = 0.0
            if x0 + tw < pw:
                w[:, -m_w:] = 0.0
        return w

    acc: np.ndarray | None = None  # (C, ph, pw) weighted probability sums
    wsum = np.zeros((ph, pw), np.float32)
    try:
        with torch.inference_mode():
            for b0 in range(0, len(coords), batch_size):
                chunk = coords[b0 : b0 + batch_size]
                batch = np.stack([x[:, y : y + th, xx : xx + tw] for y, xx in chunk])
                inp = torch.from_numpy(batch).to(dev, non_blocking=True)
                inp = inp.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = net(inp)
                if logits.shape[-2:] != (th, tw):
                    raise RuntimeError(
                        f"model returned spatial size {tuple(logits.shape[-2:])} for a "
                        f"{th}x{tw} tile; forward must preserve the input size"
                    )
                weights = np.stack([tile_weight(y, xx) for y, xx in chunk])[:, None]
                # Weight on the device, then one transfer of the batch to the host.
                w_t = torch.from_numpy(weights).to(dev, non_blocking=True)
                probs = (_activation(model, logits.float()) * w_t).cpu().numpy()
                del logits, inp, w_t
                if acc is None:
                    acc = np.zeros((probs.shape[1], ph, pw), np.float32)
                for (y, xx), p, w in zip(chunk, probs, weights):
                    acc[:, y : y + th, xx : xx + tw] += p
                    wsum[y : y + th, xx : xx + tw] += w[0]
                del probs
    finally:
        model.train(was_training)
    assert acc is not None
    acc /= np.maximum(wsum, 1e-12)[None]
    return np.ascontiguousarray(acc[:, :H, :W])


def predict_instances(
    model: torch.nn.Module, image: np.ndarray, **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Tiled probabilities, then the model's own post-processing.

    Args:
        model: a ``KaryoModel`` (must implement ``to_instances``).
        image: (H, W, 3) uint8.
        **kwargs: forwarded to :func:`predict_probs`.

    Returns:
        instances (H, W) int32, probabilities (C, H, W) float32.
    """
    probs = predict_probs(model, image, **kwargs)
    inst = np.asarray(model.to_instances(probs), dtype=np.int32)  # type: ignore[operator]
    return inst, probs
