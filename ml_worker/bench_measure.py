"""Benchmark measurements: FLOPs, timed throughput, the Otsu + watershed baseline, metric means."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch


# ============================================================================ measurements
def count_gflops(model: torch.nn.Module, size: int = 256) -> float:
    """GFLOPs of one forward pass on a (1, 3, size, size) tile (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def measure_throughput(
    model: torch.nn.Module,
    size: int,
    batch: int = 8,
    max_iters: int = 1,
    min_time_s: float = 0.0,
    warmup_batch: int = 1,
    warmup_iters: int = 1,
) -> float:
    """CPU tiles/s of ``model`` on (batch, 3, size, size) inputs under ``inference_mode``.

    ``warmup_iters`` untimed passes of ``warmup_batch`` tiles (allocator, oneDNN kernels),
    then timed passes of ``batch`` tiles until ``min_time_s`` has elapsed or ``max_iters``
    passes are done (at least one). Returns ``batch`` / the fastest pass (like ``timeit``:
    other processes on a shared CPU can only make a pass slower).
    """
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    best = math.inf
    with torch.inference_mode():
        for _ in range(warmup_iters):
            model(x[:warmup_batch])
        n, t_start = 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
            n += 1
            if n >= max_iters or time.perf_counter() - t_start >= min_time_s:
                break
    return batch / best


def otsu_watershed(image: np.ndarray, min_size: int = 16) -> np.ndarray:
    """Classical baseline, no training: Otsu on the hematoxylin channel (grey when the
    image has no stain contrast) + distance-transform watershed split.

    Returns:
        (H, W) int32 instances.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    from ml_worker.instances import fill_small_holes, remove_small_instances, split_touching

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    hema = rgb2hed(img)[..., 0]
    if float(hema.std()) < 1e-6:  # no stain signal: dark = nucleus on the grey image
        hema = 1.0 - img.astype(np.float32).mean(axis=2) / 255.0
    hema = gaussian(hema, sigma=1.0)
    if float(hema.max() - hema.min()) < 1e-9:
        return np.zeros(img.shape[:2], np.int32)
    mask = hema > threshold_otsu(hema)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool))
    mask = fill_small_holes(mask, 4 * min_size)
    inst = split_touching(mask)
    return np.asarray(remove_small_instances(inst, min_size), dtype=np.int32)


def mean_metrics(pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from ml_worker.metrics import all_metrics

    per = [{"name": n, **all_metrics(p, t)} for n, p, t in pairs]
    keys = [k for k in per[0] if k != "name"]
    return {k: float(np.mean([r[k] for r in per])) for k in keys}, per
