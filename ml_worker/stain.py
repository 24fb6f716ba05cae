"""Stain normalisation (Macenko, Reinhard) and per-image z-scoring.

A normaliser is fitted once on a reference tile (``fit(ref_rgb)``) and then maps any tile
to the reference's colour appearance (``transform(rgb) -> uint8``). Fitted parameters are
plain floats (``to_dict()`` / :func:`normalizer_from_dict`), so they travel inside a
checkpoint's JSON metadata and inference reproduces the training colours exactly.

Robustness rule: tiles with too little tissue (mostly glass / background, common in Pap
smears) cannot give a reliable stain estimate, so ``transform`` returns them unchanged
instead of amplifying noise; a ``fit`` on such a reference leaves the normaliser unfitted
(with a warning) and an unfitted normaliser is the identity. Nothing here raises on
"difficult" images.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "StainNormalizer",
    "IdentityNormalizer",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "make_normalizer",
    "normalizer_from_dict",
    "tissue_mask",
    "zscore",
    "NORMALIZERS",
]

log = logging.getLogger(__name__)


def _as_rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return rgb


def _optical_density(rgb: np.ndarray, io: float) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*W, 3) float32 optical density ``-ln((I + 1) / io)``, >= 0."""
    od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1.0) / io)
    return np.maximum(od, 0.0)


def tissue_mask(rgb: np.ndarray, beta: float = 0.15, io: float = 255.0) -> np.ndarray:
    """(H, W) bool: pixels whose optical density exceeds ``beta`` in every channel.

    Glass / background is bright in all channels (OD close to 0); stained tissue absorbs.
    """
    rgb = _as_rgb_uint8(rgb)
    od = _optical_density(rgb, io)
    return np.all(od > beta, axis=1).reshape(rgb.shape[:2])


class StainNormalizer(ABC):
    """Common interface: ``fit`` on a reference RGB tile, ``transform`` other tiles."""

    name: ClassVar[str] = ""

    @property
    @abstractmethod
    def fitted(self) -> bool:
        """Whether reference parameters are set (an unfitted normaliser is the identity)."""

    @abstractmethod
    def fit(self, ref_rgb: np.ndarray) -> "StainNormalizer":
        """Estimate reference parameters from an (H, W, 3) uint8 tile; returns self."""

    @abstractmethod
    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Map an (H, W, 3) uint8 tile to the reference appearance; (H, W, 3) uint8."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters, including ``"name"``."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> "StainNormalizer":
        """Inverse of :meth:`to_dict`."""

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.transform(rgb)


class IdentityNormalizer(StainNormalizer):
    """``"none"``: leaves images unchanged; lets callers treat "no normalisation" uniformly."""

    name = "none"

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, ref_rgb: np.ndarray) -> "IdentityNormalizer":
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        return _as_rgb_uint8(rgb)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IdentityNormalizer":
        return cls()


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al., ISBI 2009: SVD-based estimation of the two stain vectors.

    Pixels are converted to optical density; the tissue pixels' OD lies close to the plane
    spanned by the two stain vectors (hematoxylin, eosin). The extreme angles (``alpha``
    and ``100 - alpha`` percentiles) of the OD projected on that plane give the vectors.
    A tile is re-expressed as stain concentrations, each concentration rescaled so that
    its 99th percentile matches the reference, and recomposed with the reference vectors.

    Args:
        io: transmitted light intensity (background brightness), 255 keeps OD >= 0 for
            every uint8 value so white backgrounds survive the round trip.
        alpha: angular percentile (robust extremes).
        beta: OD threshold below which a pixel counts as background.
        min_tissue_pixels: fewer tissue pixels than this -> no estimate (identity).
        max_samples: tissue pixels used for the estimate (random subset; keeps large
            images fast, deterministic).
    """

    name = "macenko"

    #: Reference commonly used when no reference tile is given (Macenko's H&E values).
    DEFAULT_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    DEFAULT_MAX_CONC = np.array([1.9705, 1.0308])

    def __init__(
        self,
        io: float = 255.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_pixels: int = 200,
        max_samples: int = 100_000,
    ) -> None:
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_tissue_pixels = int(min_tissue_pixels)
        self.max_samples = int(max_samples)
        self.stain_matrix: np.ndarray | None = None  # (3, 2) columns H, E (unit norm)
        self.max_conc: np.ndarray | None = None  # (2,)

    @property
    def fitted(self) -> bool:
        return self.stain_matrix is not None and self.max_conc is not None

    @classmethod
    def default_he(cls, **kw: Any) -> "MacenkoNormalizer":
        """A normaliser fitted to the standard H&E reference of the Macenko paper."""
        n = cls(**kw)
        n.stain_matrix = cls.DEFAULT_STAINS / np.linalg.norm(cls.DEFAULT_STAINS, axis=0)
        n.max_conc = cls.DEFAULT_MAX_CONC.copy()
        return n

    def _estimate(self, od: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(N, 3) OD -> ((3, 2) stain matrix, (2,) 99th-percentile concentrations) or None."""
        tissue = od[np.all(od > self.beta, axis=1)]
        if tissue.shape[0] < self.min_tissue_pixels:
            return None
        if tissue.shape[0] > self.max_samples:
            rng = np.random.default_rng(0)
            tissue = tissue[rng.choice(tissue.shape[0], self.max_samples, replace=False)]
        tissue = tissue.astype(np.float64)
        cov = np.cov(tissue, rowvar=False)
        if not np.all(np.isfinite(cov)):
            return None
        _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
        plane = vecs[:, 1:3][:, ::-1].copy()  # principal direction first
        if plane[:, 0].sum() < 0:  # eigenvector signs are arbitrary; OD is positive
            plane[:, 0] *= -1
        proj = tissue @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100.0 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        # Hematoxylin absorbs red light more than eosin does: put it first.
        stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
        stains /= np.linalg.norm(stains, axis=0, keepdims=True)
        if abs(float(stains[:, 0] @ stains[:, 1])) > 0.995:
            return None  # one stain only: the decomposition would be ill-conditioned
        conc = np.linalg.pinv(stains) @ tissue.T
        max_conc = np.percentile(conc, 99, axis=1)
        if not np.all(np.isfinite(max_conc)) or np.any(max_conc <= 1e-6):
            return None
        return stains, max_conc

    def fit(self, ref_rgb: np.ndarray) -> "MacenkoNormalizer":
        est = self._estimate(_optical_density(_as_rgb_uint8(ref_rgb), self.io))
        if est is None:
            log.warning("Macenko: reference has too little tissue; normaliser left unfitted")
            self.stain_matrix = self.max_conc = None
        else:
            self.stain_matrix, self.max_conc = est
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _as_rgb_uint8(rgb)
        if not self.fitted:
            return rgb
        od = _optical_density(rgb, self.io)
        est = self._estimate(od)
        if est is None:
            return rgb
        src_stains, src_max = est
        conc = np.linalg.pinv(src_stains).astype(np.float32) @ od.T  # (2, N)
        conc *= (self.max_conc / src_max).astype(np.float32)[:, None]
        out = self.io * np.exp(-(self.stain_matrix.astype(np.float32) @ conc))
        return np.clip(out.T, 0, 255).round().astype(np.uint8).reshape(rgb.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "min_tissue_pixels": self.min_tissue_pixels,
            "max_samples": self.max_samples,
            "stain_matrix": None if self.stain_matrix is None else self.stain_matrix.tolist(),
            "max_conc": None if self.max_conc is None else self.max_conc.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MacenkoNormalizer":
        n = cls(
            io=d.get("io", 255.0),
            alpha=d.get("alpha", 1.0),
            beta=d.get("beta", 0.15),
            min_tissue_pixels=d.get("min_tissue_pixels", 200),
            max_samples=d.get("max_samples", 100_000),
        )
        if d.get("stain_matrix") is not None and d.get("max_conc") is not None:
            n.stain_matrix = np.asarray(d["stain_matrix"], np.float64).reshape(3, 2)
            n.max_conc = np.asarray(d["max_conc"], np.float64).reshape(2)
        return n


# Ruderman et al. lαβ space, as used by Reinhard et al. 2001 (cheaper than CIELAB and the
# space of the original method).
_RGB2LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_LMS_EPS = 1.0 / 255.0  # log floor: black pixels must not give -inf


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (N, 3) float32 lαβ."""
    x = rgb.reshape(-1, 3).astype(np.float32) / 255.0
    lms = x @ _RGB2LMS.T.astype(np.float32)
    return np.log10(np.maximum(lms, _LMS_EPS)) @ _LMS2LAB.T.astype(np.float32)


def _lab_to_rgb(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    lms = 10.0 ** (lab @ _LAB2LMS.T.astype(np.float32))
    rgb = lms @ _LMS2RGB.T.astype(np.float32)
    return np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8).reshape(shape)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. 2001 colour transfer: match per-channel mean / std in lαβ space.

    Args:
        min_tissue_fraction: tiles (and references) whose tissue fraction (see
            :func:`tissue_mask`) is below this are left unchanged / not fitted: their
            statistics describe the glass, not the stain.
        max_scale: the std ratio is clipped to ``[1/max_scale, max_scale]`` so a very flat
            tile is not blown up into noise.
    """

    name = "reinhard"

    def __init__(self, min_tissue_fraction: float = 0.01, max_scale: float = 4.0) -> None:
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.max_scale = float(max_scale)
        self.mean: np.ndarray | None = None  # (3,)
        self.std: np.ndarray | None = None  # (3,)

    @property
    def fitted(self) -> bool:
        return self.mean is not None and self.std is not None

    def _enough_tissue(self, rgb: np.ndarray) -> bool:
        return float(tissue_mask(rgb).mean()) >= self.min_tissue_fraction

    def fit(self, ref_rgb: np.ndarray) -> "ReinhardNormalizer":
        rgb = _as_rgb_uint8(ref_rgb)
        if rgb.size == 0 or not self._enough_tissue(rgb):
            log.warning("Reinhard: reference has too little tissue; normaliser left unfitted")
            self.mean = self.std = None
            return self
        lab = _rgb_to_lab(rgb)
        self.mean = lab.mean(0).astype(np.float64)
        self.std = lab.std(0).astype(np.float64)
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        rgb = _as_rgb_uint8(rgb)
        if not self.fitted or rgb.size == 0 or not self._enough_tissue(rgb):
            return rgb
        lab = _rgb_to_lab(rgb)
        mu = lab.mean(0)
        sd = lab.std(0)
        scale = np.where(sd > 1e-6, self.std / np.maximum(sd, 1e-6), 1.0)
        scale = np.clip(scale, 1.0 / self.max_scale, self.max_scale).astype(np.float32)
        out = (lab - mu) * scale + self.mean.astype(np.float32)
        return _lab_to_rgb(out, rgb.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "min_tissue_fraction": self.min_tissue_fraction,
            "max_scale": self.max_scale,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReinhardNormalizer":
        n = cls(
            min_tissue_fraction=d.get("min_tissue_fraction", 0.01),
            max_scale=d.get("max_scale", 4.0),
        )
        if d.get("mean") is not None and d.get("std") is not None:
            n.mean = np.asarray(d["mean"], np.float64).reshape(3)
            n.std = np.asarray(d["std"], np.float64).reshape(3)
        return n


NORMALIZERS: dict[str, type[StainNormalizer]] = {
    "none": IdentityNormalizer,
    "macenko": MacenkoNormalizer,
    "reinhard": ReinhardNormalizer,
}


def make_normalizer(name: str | None, **kwargs: Any) -> StainNormalizer:
    """Create an (unfitted) normaliser: ``"none"`` (or None), ``"macenko"``, ``"reinhard"``."""
    key = (name or "none").lower()
    if key not in NORMALIZERS:
        raise ValueError(f"unknown stain normaliser {name!r}; choose from {sorted(NORMALIZERS)}")
    return NORMALIZERS[key](**kwargs)


def normalizer_from_dict(d: dict[str, Any] | None) -> StainNormalizer:
    """Rebuild a normaliser from :meth:`StainNormalizer.to_dict` output (None -> identity)."""
    if not d:
        return IdentityNormalizer()
    key = str(d.get("name", "none")).lower()
    if key not in NORMALIZERS:
        raise ValueError(f"unknown stain normaliser {key!r} in saved parameters")
    return NORMALIZERS[key].from_dict(d)


def zscore(img: np.ndarray, min_std: float = 0.03) -> np.ndarray:
    """Per-image, per-channel standardisation.

    Args:
        img: (H, W, C) (or (H, W)) uint8, scaled to [0, 1] first, or a float image
            already in [0, 1].
        min_std: floor on the channel std (in [0, 1] intensity units). A tile of almost
            pure background has a tiny std; dividing by it would turn camera noise into
            unit-variance texture, so the floor keeps such tiles flat.

    Returns:
        (H, W, C) float32 with each channel of zero mean and (at most) unit std.
    """
    x = np.asarray(img)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.size == 0:
        return x
    # float64 statistics: float32 accumulation over ~10^6 pixels drifts by ~1e-3.
    mean = x.mean(axis=(0, 1), keepdims=True, dtype=np.float64)
    std = x.std(axis=(0, 1), keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, min_std)).astype(np.float32)
