"""Mask-consistent data augmentation for (image, instance map) pairs.

Geometry is applied identically to the image (bilinear) and the instance map (nearest
neighbour, so labels stay exact integers and are never blended); photometric changes
touch the image only.

Pipeline of one call (each step with its own probability, see :class:`AugmentConfig`):

1. affine (rotation, scale, shear) and elastic deformation, fused into a single
   ``map_coordinates`` resampling; with ``out_shape`` smaller than the input, the extra
   input around the output region is used as real context instead of reflected padding;
2. flips and 90-degree rotations (exact, no interpolation);
3. HED colour jitter (Tellez et al. 2018: scale and shift the hematoxylin / eosin / DAB
   concentrations using skimage's stain matrices), Gaussian blur, Gaussian noise.

Determinism: ``Augmenter(config, seed)`` owns a ``np.random.Generator``; callers that need
order-independent randomness (DataLoader workers) pass their own ``rng``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = ["AugmentConfig", "Augmenter", "hed_jitter"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities and ranges (all JSON-friendly)."""

    flip: bool = True  # horizontal and vertical flips, each with p = 0.5
    rot90: bool = True  # k * 90 degrees, k uniform in 0..3 (0 / 180 only if non-square)
    affine_p: float = 0.5
    rotate_deg: float = 180.0  # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (0.85, 1.15)  # zoom factor
    shear_deg: float = 5.0
    elastic_p: float = 0.25
    elastic_magnitude: float = 2.0  # std of the displacement field, pixels
    elastic_sigma: float = 8.0  # smoothness of the field, pixels
    hed_p: float = 0.5
    hed_sigma: float = 0.08  # multiplicative jitter, concentration * U(1 - s, 1 + s)
    hed_bias: float = 0.03  # additive jitter in optical-density units, U(-b, b)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (1.0, 6.0)  # grey levels

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """``"none"``: identity; ``"light"``: flips and rot90 only; ``"default"``."""
        name = name.lower()
        if name == "default":
            return cls()
        if name == "light":
            return cls(affine_p=0.0, elastic_p=0.0, hed_p=0.0, blur_p=0.0, noise_p=0.0)
        if name == "none":
            return cls(flip=False, rot90=False, affine_p=0.0, elastic_p=0.0, hed_p=0.0,
                       blur_p=0.0, noise_p=0.0)
        raise ValueError(f"unknown augmentation preset {name!r} (none, light, default)")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AugmentConfig":
        """Build from a (possibly partial) dict; unknown keys raise ``ValueError``."""
        if not d:
            return cls()
        d = dict(d)
        base = cls.preset(d.pop("preset")) if "preset" in d else cls()
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown augmentation options: {sorted(unknown)}")
        for k in ("scale", "blur_sigma", "noise_std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return replace(base, **d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def warps(self) -> bool:
        return self.affine_p > 0 or self.elastic_p > 0


def hed_jitter(
    image: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """Scale / shift stain concentrations in skimage's HED space.

    Uses skimage's ``hed_from_rgb`` / ``rgb_from_hed`` matrices directly on natural-log
    optical density. Unlike ``rgb2hed`` + ``hed2rgb`` (which clip negative concentrations,
    a lossy round trip of up to ~30 grey levels) this is exactly the identity for
    ``alpha = 1, beta = 0``.

    Args:
        image: (H, W, 3) uint8 RGB.
        alpha: (3,) multiplicative factors for H, E, D.
        beta: (3,) additive shifts (optical density units).

    Returns:
        (H, W, 3) float32 RGB in [0, 255] (not rounded).
    """
    x = np.maximum(image.astype(np.float32), 1.0) / 255.0
    od = -np.log(x)
    conc = od @ hed_from_rgb.astype(np.float32)
    conc = conc * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    od2 = conc @ rgb_from_hed.astype(np.float32)
    return np.clip(255.0 * np.exp(-od2), 0.0, 255.0)


class Augmenter:
    """Random, mask-consistent augmentation.

    Args:
        config: an :class:`AugmentConfig`, a dict for :meth:`AugmentConfig.from_dict`, a
            preset name (``"none"``, ``"light"``, ``"default"``) or None (default).
        seed: seed of the internal generator (used when no ``rng`` is passed).
    """

    def __init__(
        self, config: AugmentConfig | dict[str, Any] | str | None = None, seed: int | None = 0
    ) -> None:
        if isinstance(config, AugmentConfig):
            self.config = config
        elif isinstance(config, str):
            self.config = AugmentConfig.preset(config)
        else:
            self.config = AugmentConfig.from_dict(config)
        self.rng = np.random.default_rng(seed)

    def context(self, size: int) -> int:
        """Extra input pixels per side needed to warp a ``size``-pixel output without
        sampling outside the input (45-degree rotation, most zoomed-out scale, elastic)."""
        c = self.config
        if not c.warps:
            return 0
        half = size / 2.0
        smin = min(c.scale) if c.affine_p > 0 else 1.0
        reach = half * (math.sqrt(2.0) if c.affine_p > 0 else 1.0) / max(smin, 1e-3)
        if c.affine_p > 0:
            reach *= 1.0 + math.tan(math.radians(c.shear_deg))
        if c.elastic_p > 0:
            reach += 3.0 * c.elastic_magnitude
        return int(math.ceil(reach - half)) + 1

    def __call__(
        self,
        image: np.ndarray,
        instances: np.ndarray,
        rng: np.random.Generator | None = None,
        out_shape: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one pair.

        Args:
            image: (H, W, 3) uint8 RGB.
            instances: (H, W) integer instance (or semantic) labels.
            rng: generator to draw from (default: the augmenter's own).
            out_shape: (h, w) <= (H, W): output the augmented centre region of this size;
                the surrounding input is used as context by the warps. Default (H, W).

        Returns:
            image (h, w, 3) uint8, instances (h, w) with the input's dtype; both
            C-contiguous.
        """
        rng = self.rng if rng is None else rng
        c = self.config
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != instances.shape:
            raise ValueError(
                f"expected image (H, W, 3) and instances (H, W), got {image.shape} and "
                f"{instances.shape}"
            )
        H, W = instances.shape
        oh, ow = (H, W) if out_shape is None else (int(out_shape[0]), int(out_shape[1]))
        if oh > H or ow > W:
            raise ValueError(f"out_shape {(oh, ow)} larger than input {(H, W)}")

        do_affine = c.affine_p > 0 and rng.random() < c.affine_p
        do_elastic = c.elastic_p > 0 and rng.random() < c.elastic_p
        if do_affine or do_elastic:
            img, inst = self._warp(image, instances, (oh, ow), rng, do_affine, do_elastic)
        else:
            y0, x0 = (H - oh) // 2, (W - ow) // 2
            img = image[y0 : y0 + oh, x0 : x0 + ow]
            inst = instances[y0 : y0 + oh, x0 : x0 + ow]

        if c.flip:
            if rng.random() < 0.5:
                img, inst = img[:, ::-1], inst[:, ::-1]
            if rng.random() < 0.5:
                img, inst = img[::-1], inst[::-1]
        if c.rot90:
            k = int(rng.integers(4))
            if oh != ow:
                k = 2 * (k % 2)  # odd quarter turns would change the shape
            if k:
                img, inst = np.rot90(img, k), np.rot90(inst, k)

        img = self._photometric(np.ascontiguousarray(img), rng)
        return img, np.ascontiguousarray(inst)

    # ------------------------------------------------------------------ internals

    def _warp(
        self,
        image: np.ndarray,
        instances: np.ndarray,
        out_shape: tuple[int, int],
        rng: np.random.Generator,
        do_affine: bool,
        do_elastic: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        H, W = instances.shape
        oh, ow = out_shape
        # Output pixel grid, centred; sampled at input coordinates around the input centre.
        yy, xx = np.mgrid[:oh, :ow].astype(np.float32)
        yy -= (oh - 1) / 2.0
        xx -= (ow - 1) / 2.0
        if do_affine:
            th = math.radians(rng.uniform(-c.rotate_deg, c.rotate_deg))
            s = rng.uniform(*c.scale)
            sh = math.tan(math.radians(rng.uniform(-c.shear_deg, c.shear_deg)))
            # Forward map input->output is R @ Shear @ (s I); sample with its inverse.
            fwd = np.array(
                [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]
            ) @ np.array([[1.0, sh], [0.0, 1.0]]) * s
            inv = np.linalg.inv(fwd).astype(np.float32)
            sy = inv[0, 0] * yy + inv[0, 1] * xx
            sx = inv[1, 0] * yy + inv[1, 1] * xx
        else:
            sy, sx = yy, xx
        if do_elastic:
            sig = c.elastic_sigma
            for arr in (sy, sx):
                field = ndi.gaussian_filter(
                    rng.standard_normal((oh, ow)).astype(np.float32), sig, mode="reflect"
                )
                std = float(field.std())
                if std > 0:
                    arr += field * (c.elastic_magnitude / std)
        sy = sy + (H - 1) / 2.0
        sx = sx + (W - 1) / 2.0
        coords = np.stack([sy, sx])
        out = np.empty((oh, ow, 3), np.float32)
        for ch in range(3):
            ndi.map_coordinates(
                image[..., ch].astype(np.float32), coords, output=out[..., ch], order=1,
                mode="reflect", prefilter=False,
            )
        img = np.clip(out, 0, 255).round().astype(np.uint8)
        inst = ndi.map_coordinates(instances, coords, order=0, mode="reflect", prefilter=False)
        return img, inst.astype(instances.dtype, copy=False)

    def _photometric(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        out: np.ndarray | None = None
        if c.hed_p > 0 and rng.random() < c.hed_p:
            alpha = rng.uniform(1 - c.hed_sigma, 1 + c.hed_sigma, 3)
            beta = rng.uniform(-c.hed_bias, c.hed_bias, 3)
            out = hed_jitter(img, alpha, beta)
        if c.blur_p > 0 and rng.random() < c.blur_p:
            s = rng.uniform(*c.blur_sigma)
            src = img.astype(np.float32) if out is None else out
            out = ndi.gaussian_filter(src, (s, s, 0))
        if c.noise_p > 0 and rng.random() < c.noise_p:
            std = rng.uniform(*c.noise_std)
            src = img.astype(np.float32) if out is None else out
            out = src + rng.normal(0.0, std, src.shape).astype(np.float32)
        if out is None:
            return img
        return np.clip(out, 0, 255).round().astype(np.uint8)
