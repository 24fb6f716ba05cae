"""Per-tile uncertainty scores from predicted probabilities (numpy only).

Every score is a float where **higher = more uncertain = more worth annotating**, and the
pixel-level quantities are normalised so that scores of different tiles (and models with
different class counts) compare:

* ``entropy``  — mean over pixels of the class entropy H(p) / log K (in [0, 1]).
* ``margin``   — mean over pixels of 1 - (p_top1 - p_top2) (in [0, 1]).
* ``boundary`` — mean normalised entropy inside a band of ``band`` px around the contours of
  the predicted instances: that is where annotators correct (split, merge, redraw). A tile
  without predicted nuclei falls back to its ``entropy``.
* ``expected_fixes`` — the expected number of nuclei the annotator will fix on the tile
  (redraw, delete, or add where the model half-sees one): ``nuclei.nucleus_scores``. Not in
  [0, 1]: a count, which is what makes tiles with many doubtful nuclei stand out.

Two output kinds (``kind``):

* ``"softmax"`` — (K, H, W) mutually exclusive classes, class 0 = background (semantic
  models); foreground probability = 1 - p[0].
* ``"sigmoid"`` — independent sigmoid channels, channel 0 = nucleus (multi-head models,
  1-channel binary models). Only the nucleus channel is scored, as the binary
  distribution (1 - p, p).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "KINDS",
    "CHEAP_SCORES",
    "class_distribution",
    "foreground_probability",
    "pixel_entropy",
    "pixel_margin",
    "boundary_band",
    "uncertainty_scores",
    "binary_entropy",
]

KINDS = ("softmax", "sigmoid")
#: scores every :func:`uncertainty_scores` call (and so every ``analyze_tile``) computes
CHEAP_SCORES = ("entropy", "margin", "boundary", "expected_fixes")

_EPS = 1e-7


def _check(probs: np.ndarray, kind: str) -> np.ndarray:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 3 or p.shape[0] < 1:
        raise ValueError(f"expected probabilities of shape (C, H, W), got {p.shape}")
    if kind == "softmax" and p.shape[0] < 2:
        raise ValueError("softmax probabilities need at least 2 channels (background first)")
    return p


def class_distribution(probs: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """(K, H, W) class distribution the uncertainty is measured on.

    ``softmax``: the probabilities themselves. ``sigmoid``: the nucleus channel as the
    binary distribution (background = 1 - p, nucleus = p), shape (2, H, W).
    """
    p = _check(probs, kind)
    if kind == "softmax":
        return p
    fg = np.clip(p[0], 0.0, 1.0)
    return np.stack([1.0 - fg, fg])


def foreground_probability(probs: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """(H, W) nucleus probability: 1 - p[background] (softmax) or the nucleus channel
    (sigmoid)."""
    p = _check(probs, kind)
    fg = 1.0 - p[0] if kind == "softmax" else p[0]
    return np.clip(fg, 0.0, 1.0).astype(np.float32)


def binary_entropy(fg: np.ndarray) -> np.ndarray:
    """Entropy of Bernoulli(p), normalised by log 2 (in [0, 1]); any shape."""
    p = np.clip(np.asarray(fg, dtype=np.float64), _EPS, 1.0 - _EPS)
    return (-(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2.0)).astype(np.float32)


def pixel_entropy(probs: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """(H, W) class entropy per pixel normalised by log K (0 = certain, 1 = uniform)."""
    d = class_distribution(probs, kind).astype(np.float64)
    k = d.shape[0]
    d = np.clip(d, _EPS, 1.0)
    h = -(d * np.log(d)).sum(axis=0) / np.log(k)
    return np.clip(h, 0.0, 1.0).astype(np.float32)


def pixel_margin(probs: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """(H, W) 1 - (p_top1 - p_top2) per pixel (0 = certain, 1 = tie)."""
    d = class_distribution(probs, kind)
    top2 = np.partition(d, d.shape[0] - 2, axis=0)[-2:]  # (2, H, W): second, first
    return np.clip(1.0 - (top2[1] - top2[0]), 0.0, 1.0).astype(np.float32)


def boundary_band(instances: np.ndarray, band: int = 2) -> np.ndarray:
    """(H, W) bool band of half-width ``band`` px around every instance contour (both
    sides of the contour, and the lines between touching instances)."""
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be (H, W), got {inst.shape}")
    edge = np.zeros(inst.shape, bool)
    # A pixel is on a contour when a 4-neighbour has another label (background included).
    dy = inst[1:, :] != inst[:-1, :]
    dx = inst[:, 1:] != inst[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    if band > 1 and edge.any():
        edge = ndi.binary_dilation(edge, ndi.generate_binary_structure(2, 1), iterations=band - 1)
    return edge


def uncertainty_scores(
    probs: np.ndarray,
    instances: np.ndarray | None = None,
    *,
    kind: str = "softmax",
    band: int = 2,
) -> dict[str, float]:
    """The cheap scores of one tile (:data:`CHEAP_SCORES`) from one prediction.

    Args:
        probs: (C, H, W) probabilities (see module docstring for ``kind``).
        instances: (H, W) predicted instance map; needed for ``boundary`` (without it, or
            without any predicted nucleus, ``boundary`` = ``entropy``).
        kind: ``"softmax"`` or ``"sigmoid"``.
        band: half-width in px of the contour band of ``boundary``.

    Returns:
        ``{"entropy": ..., "margin": ..., "boundary": ...}`` floats in [0, 1] and
        ``expected_fixes`` (a count of nuclei, >= 0; without ``instances`` only the blobs the
        model half-sees count).
    """
    from ml_worker.active_learning.nuclei import nucleus_scores

    ent = pixel_entropy(probs, kind)
    entropy = float(ent.mean()) if ent.size else 0.0
    margin = float(pixel_margin(probs, kind).mean()) if ent.size else 0.0
    boundary = entropy
    if instances is not None:
        inst = np.asarray(instances)
        if inst.shape != ent.shape:
            raise ValueError(f"instances {inst.shape} do not match probabilities {ent.shape}")
        if inst.any():
            m = boundary_band(inst, band)
            if m.any():
                boundary = float(ent[m].mean())
    inst_map = np.zeros(ent.shape, np.int32) if instances is None else np.asarray(instances)
    fixes = nucleus_scores(probs, inst_map, kind=kind, band=band)["expected_fixes"] if ent.size else 0.0
    return {"entropy": entropy, "margin": margin, "boundary": boundary, "expected_fixes": fixes}
