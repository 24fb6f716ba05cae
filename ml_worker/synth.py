"""Synthetic Pap-smear-like and H&E-like tiles with exact nucleus instance masks.

Used for tests, benchmarks and smoke-training without real data. Images are rendered in
optical-density (Beer-Lambert) space: each dye contributes ``concentration * OD vector``
and the pixel is ``255 * exp(-sum)``, so overlapping nuclei / cells get darker the way
stained material does.

Mask contract:

* (H, W) uint16, 0 = background, 1..N = nuclei, consecutive ids;
* where nuclei overlap, the later-drawn nucleus owns the pixels;
* every instance is one 4-connected component (pieces cut off by later nuclei are given to
  the neighbour that cut them, slivers that are too small are merged likewise);
* the hematoxylin (nucleus) stain is rendered only where the final mask is non-zero, so
  mask and image agree exactly (before the final blur, which mimics optics).

``generate(kind, size, seed)`` is deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = ["generate", "generate_typed", "write_dataset", "KINDS", "CLASS_NAMES"]

KINDS = ("pap", "he")

#: nucleus types of the typed generator, class id = index + 1 (0 = background)
CLASS_NAMES = {
    "he": ("epithelial", "lymphocyte", "stromal"),
    "pap": ("superficial", "intermediate", "parabasal", "atypical", "inflammatory"),
}

_CROSS = ndi.generate_binary_structure(2, 1)

# Unit optical-density vectors (R, G, B absorption) of the dyes.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
_EOSIN = np.array([0.07, 0.99, 0.11])
_ORANGE = np.array([0.05, 0.55, 0.85])  # Orange G / eosin mix: pink-orange cytoplasm
_LIGHT_GREEN = np.array([0.78, 0.42, 0.34])  # Light green SF / EA: bluish cytoplasm
_DEFAULT_RADIUS = {"pap": (4.0, 10.0), "he": (5.0, 11.0)}
_MIN_INSTANCE_PX = 12


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _jitter_stain(rng: np.random.Generator, v: np.ndarray, amount: float) -> np.ndarray:
    return _unit(np.clip(_unit(v) + rng.normal(0, amount, 3), 0.01, None))


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth Gaussian noise of unit std with correlation length ~``scale`` pixels.

    Generated on a coarse grid and upsampled, so large scales cost nothing.
    """
    h, w = shape
    if scale <= 1.5:
        n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale * 0.6)
    else:
        f = scale / 2.0
        gh, gw = int(math.ceil(h / f)) + 3, int(math.ceil(w / f)) + 3
        coarse = ndi.gaussian_filter(rng.standard_normal((gh, gw)).astype(np.float32), 1.0)
        n = ndi.zoom(coarse, f, order=1, prefilter=False)[:h, :w]
        if n.shape != (h, w):  # zoom rounding
            n = np.pad(n, ((0, h - n.shape[0]), (0, w - n.shape[1])), mode="edge")
    s = float(n.std())
    return (n - float(n.mean())) / (s if s > 0 else 1.0)


@dataclass
class _Blob:
    """A star-shaped blob: perturbed, rotated ellipse."""

    cy: float
    cx: float
    a: float  # semi-major axis
    b: float  # semi-minor axis
    angle: float
    amps: np.ndarray  # (K,) Fourier amplitudes, harmonics 2..K+1
    phases: np.ndarray

    @property
    def extent(self) -> float:
        return self.a * (1.0 + float(np.abs(self.amps).sum())) + 1.0

    def rasterize(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """-> ((row slice, col slice), rho) with rho = radial position / boundary radius
        (inside where rho <= 1) over the blob's bounding box clipped to the image."""
        h, w = shape
        e = self.extent
        y0, y1 = max(0, int(self.cy - e)), min(h, int(math.ceil(self.cy + e)) + 1)
        x0, x1 = max(0, int(self.cx - e)), min(w, int(math.ceil(self.cx + e)) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - self.cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - self.cx
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = xx * c + yy * s  # along the major axis
        v = -xx * s + yy * c
        rho2 = u * u + v * v
        theta = np.arctan2(v, u)
        # Boundary radius of the ellipse in direction theta, times the perturbation.
        ct, st = np.cos(theta), np.sin(theta)
        r_e = (self.a * self.b) / np.sqrt((self.b * ct) ** 2 + (self.a * st) ** 2)
        pert = np.ones_like(theta)
        for k, (amp, ph) in enumerate(zip(self.amps, self.phases), start=2):
            pert += amp * np.cos(k * theta + ph)
        rho = np.sqrt(rho2) / (r_e * pert)
        return (slice(y0, y1), slice(x0, x1)), rho


def _random_blob(
    rng: np.random.Generator,
    cy: float,
    cx: float,
    r: float,
    max_aspect: float,
    irregularity: float,
    harmonics: int = 4,
) -> _Blob:
    aspect = rng.uniform(1.0, max_aspect)
    # Keep the area ~ pi r^2 whatever the aspect ratio.
    a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
    amps = irregularity * rng.uniform(0, 1, harmonics) / np.arange(2, harmonics + 2)
    return _Blob(cy, cx, a, b, rng.uniform(0, math.pi), amps, rng.uniform(0, 2 * math.pi, harmonics))


def _make_connected(labels: np.ndarray, min_px: int) -> np.ndarray:
    """Give every label a single 4-connected component of at least ``min_px`` pixels.

    Detached pieces (and whole instances below ``min_px``) go to the 4-neighbouring label
    they touch most, or to background if they touch none. Returns consecutive uint16 ids.
    """
    h, w = labels.shape
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        ys = slice(max(0, sl[0].start - 1), min(h, sl[0].stop + 1))
        xs = slice(max(0, sl[1].start - 1), min(w, sl[1].stop + 1))
        crop = labels[ys, xs]  # a view: edits go to ``labels``
        own = crop == i
        comp, n = ndi.label(own, structure=_CROSS)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        keep = int(np.argmax(sizes)) if sizes.max() >= min_px else -1
        for j in range(1, n + 1):
            if j == keep:
                continue
            frag = comp == j
            ring = ndi.binary_dilation(frag, structure=_CROSS) & ~frag
            neigh = crop[ring]
            neigh = neigh[(neigh != 0) & (neigh != i)]
            crop[frag] = np.bincount(neigh).argmax() if neigh.size else 0
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.uint16)
    return lut[labels]


def _place_nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    rmin: float,
    rmax: float,
    cluster_p: float,
) -> list[tuple[float, float, float]]:
    """Centres and radii; a fraction joins an earlier nucleus (touching / overlapping)."""
    h, w = shape
    out: list[tuple[float, float, float]] = []
    for _ in range(n):
        r = rng.uniform(rmin, rmax)
        if out and rng.random() < cluster_p:
            py, px, pr = out[rng.integers(len(out))]
            d = (pr + r) * rng.uniform(0.7, 1.05)
            t = rng.uniform(0, 2 * math.pi)
            cy, cx = py + d * math.sin(t), px + d * math.cos(t)
        else:
            cy, cx = rng.uniform(-rmax, h + rmax), rng.uniform(-rmax, w + rmax)
        out.append((cy, cx, r))
    return out


def _draw_nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    specs: list[tuple[float, float, float, float, float, float]],
    types: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Paint nuclei in order; returns (uint16 labels, float32 hematoxylin concentration,
    uint8 class map or None).

    specs: (cy, cx, r, conc, max_aspect, irregularity) per nucleus, drawing order.
    types: class id per spec (typed generator), or None.
    """
    labels = np.zeros(shape, np.int32)
    hema = np.zeros(shape, np.float32)
    painted = np.zeros(shape, np.uint8) if types is not None else None
    k = 0
    for i, (cy, cx, r, conc, max_aspect, irr) in enumerate(specs):
        blob = _random_blob(rng, cy, cx, r, max_aspect, irr)
        ras = blob.rasterize(shape)
        if ras is None:
            continue
        sl, rho = ras
        inside = rho <= 1.0
        if not inside.any():
            continue
        k += 1
        labels[sl][inside] = k
        if painted is not None:
            painted[sl][inside] = types[i]  # type: ignore[index]
        # Darker rim (nuclear membrane / chromatin margination), optional nucleolus.
        prof = conc * (0.8 + 0.4 * np.clip(rho, 0, 1) ** 4)
        hema[sl] += np.where(inside, prof, 0.0).astype(np.float32)
        if r > 6 and rng.random() < 0.4:
            ny, nx = rng.uniform(-0.3, 0.3, 2) * r
            yy = np.arange(sl[0].start, sl[0].stop)[:, None] - (cy + ny)
            xx = np.arange(sl[1].start, sl[1].stop)[None, :] - (cx + nx)
            spot = np.exp(-(yy * yy + xx * xx) / (2 * (0.12 * r) ** 2))
            hema[sl] += np.where(inside, 0.8 * conc * spot, 0.0).astype(np.float32)
    labels = _make_connected(labels, _MIN_INSTANCE_PX)
    classes = None
    if painted is not None:
        # Slivers re-assigned by _make_connected take their new owner's class: one class per
        # nucleus, its pixels' majority.
        n = int(labels.max())
        votes = np.zeros((n + 1, 256), np.int64)
        np.add.at(votes, (labels.ravel(), painted.ravel()), 1)
        votes[:, 0] = 0
        lut = votes.argmax(axis=1).astype(np.uint8)
        lut[0] = 0
        classes = lut[labels]
    return labels, hema, classes


def _finish(
    rng: np.random.Generator,
    od: np.ndarray,
    blur: tuple[float, float],
    noise: tuple[float, float],
) -> np.ndarray:
    """OD (H, W, 3) -> uint8 RGB with optical blur and sensor noise."""
    img = 255.0 * np.exp(-od)
    s = rng.uniform(*blur)
    if s > 0.05:
        img = ndi.gaussian_filter(img, (s, s, 0))
    img += rng.normal(0.0, rng.uniform(*noise), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _generate_he(
    rng: np.random.Generator, shape: tuple[int, int], n: int | None, radius: tuple[float, float],
    typed: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    h, w = shape
    rmin, rmax = radius
    hvec = _jitter_stain(rng, _HEMATOXYLIN, 0.06)
    evec = _jitter_stain(rng, _EOSIN, 0.06)
    # Stroma: wavy eosinophilic fibres, modulated density, some empty (white) spaces.
    theta = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    warp = 12.0 * _noise(rng, shape, 20)
    period = rng.uniform(6, 11)
    fibres = 0.5 + 0.5 * np.sin(
        2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta) + warp) / period
    )
    density = rng.uniform(0.25, 0.5) * (1 + 0.35 * _noise(rng, shape, 32))
    eosin = density * (0.7 + 0.3 * fibres) * (1 + 0.2 * _noise(rng, shape, 2))
    lumen = _noise(rng, shape, 40) > rng.uniform(1.0, 1.8)
    eosin = np.where(lumen, 0.03, eosin)
    eosin = ndi.gaussian_filter(np.clip(eosin, 0.0, None), 0.7)
    if n is None:
        mean_area = math.pi * ((rmin + rmax) / 2) ** 2
        n = int(rng.uniform(0.18, 0.32) * h * w / mean_area)
    specs = []
    types: list[int] = []
    for cy, cx, r in _place_nuclei(rng, shape, n, rmin, rmax, cluster_p=0.35):
        u = rng.random()
        if u < 0.2:  # lymphocyte: small, round, dark
            r = max(rmin, 0.7 * r)
            specs.append((cy, cx, r, rng.uniform(1.4, 1.9), 1.15, 0.08))
            types.append(2)
        elif typed and u < 0.45:  # stromal (fibroblast): thin, spindle-shaped, dark
            specs.append((cy, cx, max(rmin, 0.9 * r), rng.uniform(1.3, 1.7), 3.2, 0.06))
            types.append(3)
        else:  # epithelial: larger, oval, paler with chromatin texture
            specs.append((cy, cx, r, rng.uniform(0.8, 1.4), 1.9, 0.25))
            types.append(1)
    labels, hema, classes = _draw_nuclei(rng, shape, specs, types if typed else None)
    hema *= labels > 0
    hema *= np.clip(1.0 + 0.3 * _noise(rng, shape, 1.2), 0.3, None)
    eosin = eosin * np.where(labels > 0, 0.5, 1.0)
    od = hema[..., None] * hvec + eosin[..., None] * evec + 0.03
    return _finish(rng, od.astype(np.float32), (0.4, 1.0), (1.0, 3.5)), labels, classes


def _generate_pap(
    rng: np.random.Generator, shape: tuple[int, int], n: int | None, radius: tuple[float, float],
    typed: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    h, w = shape
    rmin, rmax = radius
    hvec = _jitter_stain(rng, _HEMATOXYLIN * np.array([0.9, 1.0, 1.3]), 0.05)  # bluer
    pink = _jitter_stain(rng, _ORANGE, 0.06)
    green = _jitter_stain(rng, _LIGHT_GREEN, 0.06)
    # Glass: near white with a faint warm tint and smooth unevenness.
    bg = 0.04 + 0.015 * _noise(rng, shape, 48)
    pink_c = np.zeros(shape, np.float32)
    green_c = np.zeros(shape, np.float32)
    cell_scale = rng.uniform(3.5, 5.5) * (rmin + rmax) / 2
    if n is None:
        n = max(2, int(rng.uniform(0.45, 0.8) * h * w / (math.pi * cell_scale**2)))
    n_cells = n
    specs = []
    types: list[int] = []
    for _ in range(n_cells):
        # Centres inside the tile (the cytoplasm may still spill over the border), so
        # every epithelial cell contributes a visible nucleus.
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rc = cell_scale * rng.uniform(0.7, 1.3)
        cell = _random_blob(rng, cy, cx, rc, 1.8, 0.45, harmonics=5)
        ras = cell.rasterize(shape)
        if ras is not None:
            sl, rho = ras
            inside = rho <= 1.0
            # Translucent cytoplasm with folded (darker) edges; overlaps add up.
            conc = rng.uniform(0.12, 0.3) * (0.85 + 0.5 * np.clip(rho, 0, 1) ** 8)
            target = pink_c if rng.random() < 0.45 else green_c
            target[sl] += np.where(inside, conc, 0.0).astype(np.float32)
        # Nucleus somewhere in the central part of the cell.
        t = rng.uniform(0, 2 * math.pi)
        d = rng.uniform(0, 0.35) * rc
        r = rng.uniform(rmin, rmax)
        conc = np.interp(r, [rmin, rmax], [1.9, 1.1]) * rng.uniform(0.85, 1.15)
        aspect, irr, kind = 1.5, 0.15, 2
        if typed:
            # Maturation: superficial cells have small pyknotic nuclei, intermediate ones
            # vesicular mid-sized nuclei, parabasal cells large round nuclei; atypical nuclei
            # are enlarged, irregular and hyperchromatic.
            kind = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
            if kind == 1:
                r, conc, aspect, irr = max(2.5, 0.45 * rmin + 0.1 * rmax), rng.uniform(2.0, 2.4), 1.1, 0.05
            elif kind == 2:
                r, conc = rmin + 0.35 * (rmax - rmin) * rng.uniform(0.8, 1.2), rng.uniform(1.1, 1.4)
            elif kind == 3:
                r, conc, aspect = rmax * rng.uniform(0.85, 1.0), rng.uniform(1.0, 1.3), 1.2
            else:
                r, conc, aspect, irr = rmax * rng.uniform(1.1, 1.35), rng.uniform(1.9, 2.4), 1.7, 0.45
        specs.append((cy + d * math.sin(t), cx + d * math.cos(t), r, conc, aspect, irr))
        types.append(kind)
    # Inflammatory cells: small dark nuclei with scant cytoplasm, often in small groups.
    n_infl = int(rng.integers(0, max(2, n_cells // 2) + 1))
    for _ in range(n_infl):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = max(2.5, 0.55 * rmin + 0.2 * rmax) * rng.uniform(0.8, 1.1)
        specs.append((cy, cx, r, rng.uniform(1.6, 2.2), 1.3, 0.35))
        types.append(5)
    order = rng.permutation(len(specs)) if rng.random() < 0.3 else np.arange(len(specs))
    labels, hema, classes = _draw_nuclei(rng, shape, [specs[i] for i in order],
                                         [types[i] for i in order] if typed else None)
    hema *= labels > 0
    hema *= np.clip(1.0 + 0.25 * _noise(rng, shape, 1.2), 0.3, None)
    cyto_tex = 1 + 0.2 * _noise(rng, shape, 3)
    od = (
        bg[..., None] * np.array([0.35, 0.45, 0.8])
        + (pink_c * cyto_tex)[..., None] * pink
        + (green_c * cyto_tex)[..., None] * green
        + hema[..., None] * hvec
    )
    return _finish(rng, od.astype(np.float32), (0.5, 1.1), (1.0, 3.0)), labels, classes


def generate(
    kind: str = "he",
    size: int | tuple[int, int] = 256,
    seed: int | None = 0,
    n_nuclei: int | None = None,
    nucleus_radius: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic tile.

    Args:
        kind: ``"pap"`` (Pap smear: light background, large cells with pale pink / blue-green
            cytoplasm, dark blue-purple nuclei, overlapping cells, inflammatory cells) or
            ``"he"`` (H&E: pink stroma, dense purple nuclei of varied size and shape,
            touching / overlapping).
        size: H = W, or (H, W).
        seed: random seed; the same seed gives the same tile.
        n_nuclei: H&E: number of nuclei drawn; Pap: number of epithelial cells (each with a
            nucleus; inflammatory cells come on top). Default: from a typical density.
            Nuclei falling outside the tile or fully hidden are not in the mask.
        nucleus_radius: (min, max) nucleus radius in pixels.

    Returns:
        image (H, W, 3) uint8 RGB, instances (H, W) uint16 (0 = background, 1..N).
    """
    image, labels, _ = _render(kind, size, seed, n_nuclei, nucleus_radius, typed=False)
    return image, labels


def generate_typed(
    kind: str = "he",
    size: int | tuple[int, int] = 256,
    seed: int | None = 0,
    n_nuclei: int | None = None,
    nucleus_radius: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`generate`, with nucleus types (:data:`CLASS_NAMES`) that differ in size,
    shape, chromatin density and stain, so that class learning is testable.

    Returns:
        image (H, W, 3) uint8, instances (H, W) uint16, classes (H, W) uint8 (per-pixel class
        id, one class per nucleus, 0 = background).
    """
    image, labels, classes = _render(kind, size, seed, n_nuclei, nucleus_radius, typed=True)
    assert classes is not None
    return image, labels, classes


def _render(
    kind: str, size: int | tuple[int, int], seed: int | None, n_nuclei: int | None,
    nucleus_radius: tuple[float, float] | None, typed: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    shape = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"size must be positive, got {size}")
    radius = tuple(map(float, nucleus_radius or _DEFAULT_RADIUS[kind]))
    if not 0 < radius[0] <= radius[1]:
        raise ValueError(f"nucleus_radius must be 0 < min <= max, got {nucleus_radius}")
    rng = np.random.default_rng(seed)
    fn = _generate_he if kind == "he" else _generate_pap
    return fn(rng, shape, n_nuclei, radius, typed)  # type: ignore[arg-type]


def write_dataset(
    out_dir: str | Path,
    n_images: int,
    kind: str = "he",
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    prefix: str | None = None,
    typed: bool = False,
) -> list[str]:
    """Write ``n_images`` tiles in the common layout and return their names.

    Layout: ``out_dir/images/NAME.png`` (RGB) and ``out_dir/masks/NAME.png`` (16-bit
    instance labels); with ``typed``, also ``out_dir/classes/NAME.png`` (8-bit class ids,
    :data:`CLASS_NAMES`) and ``out_dir/classes.json`` (the names). Image i uses seed
    ``seed + i``, so datasets are reproducible and a larger dataset extends a smaller one.
    """
    from PIL import Image

    from ml_worker.data import write_mask

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    prefix = prefix if prefix is not None else f"{kind}_"
    names = []
    if typed:
        import json

        (out / "classes").mkdir(parents=True, exist_ok=True)
        (out / "classes.json").write_text(json.dumps(list(CLASS_NAMES[kind])))
    for i in range(n_images):
        name = f"{prefix}{i:04d}"
        if typed:
            img, inst, cls = generate_typed(kind, size, seed + i)
            Image.fromarray(cls).save(out / "classes" / f"{name}.png")
        else:
            img, inst = generate(kind, size, seed + i)
        Image.fromarray(img).save(out / "images" / f"{name}.png")
        write_mask(out / "masks" / f"{name}.png", inst)
        names.append(name)
    return names
