"""Whole-slide and plain image reading behind one interface, plus a generated SVS-like writer.

``open_slide(path)`` picks the first library that can read the file:

1. OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel): Aperio SVS, Hamamatsu
   NDPI/VMS, MIRAX, Leica SCN, Ventana BIF, Philips TIFF, generic tiled TIFF, ...
2. tifffile: OME-TIFF and any other TIFF (stripped, planar, OME pyramids); regions are read
   by decoding only the tiles/strips that intersect them (tifffile's own segment decoder).
3. Pillow: PNG / JPEG / anything else Pillow opens. These formats have no random access,
   so they are decoded whole: only ``max_pixels`` (checked from the header first) bounds
   their memory, and callers that accept uploads must pass it.

Before anything is decoded the *decoded cost* is computed from the headers: the sum over
all pyramid levels of width * height * samples * planes. A file above ``max_pixels`` is
refused with a message naming both numbers. Files with more than 4 samples per pixel
(multispectral) or several planes of the same size (z-stacks, time series, volumetric
tiles) are refused: reading them as RGB would silently pick or transpose data.

Coordinates follow OpenSlide: ``read_region(x, y, w, h, level=L)`` takes the top-left corner
in level-0 pixels and the size in pixels of level L. Everything outside the slide is white.

``write_pyramidal_tiff`` streams a synthetic slide (tissue blobs textured with
``ml_worker.synth`` H&E/Pap tiles on white glass) into a tiled, JPEG-compressed pyramid
with an Aperio ImageDescription, which OpenSlide reads as SVS with ``openslide.mpp-x``.
Only one row of tiles per level is ever in memory.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "SlideError",
    "SlideReader",
    "open_slide",
    "write_pyramidal_tiff",
]

BACKGROUND = 255
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class SlideError(ValueError):
    """A file that cannot be used as a slide; the message is meant for the user."""


# --------------------------------------------------------------------------- readers


class SlideReader(ABC):
    """Common interface; subclasses implement ``_read_level`` and the metadata."""

    format: str = "unknown"
    path: str

    def __init__(self) -> None:
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self._mpp: float | None = None
        self._mpp_default: float | None = None
        self.objective_power: float | None = None

    # -- metadata
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at level 0: from the file, else the default given to open_slide."""
        return self._mpp if self._mpp is not None else self._mpp_default

    @property
    def mpp_from_metadata(self) -> bool:
        return self._mpp is not None

    def mpp_message(self) -> str:
        if self._mpp is not None:
            return f"{self._mpp:.4g} um/px from the file's metadata"
        what = (
            "The file has no resolution metadata (no openslide.mpp-x, TIFF XResolution with a "
            "unit, OME PhysicalSizeX or Aperio MPP)"
        )
        if self._mpp_default is not None:
            return f"{what}; using the project's working resolution {self._mpp_default:g} um/px instead."
        return f"{what}; the pixel size is unknown, so the image is used at its native resolution."

    # -- pixel access
    def close(self) -> None:  # noqa: B027 - optional for subclasses
        pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample is <= ``downsample`` (never coarser than asked)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 RGB; (x, y) in level-0 pixels, (w, h) in pixels of ``level``."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        out = self._read_level(int(x), int(y), int(w), int(h), level)
        assert out.shape == (h, w, 3) and out.dtype == np.uint8, out.shape
        return out

    @abstractmethod
    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray: ...

    def read_at_mpp(self, x: int, y: int, w: int, h: int, *, mpp: float) -> np.ndarray:
        """(h, w, 3) uint8 at ``mpp`` um/px, covering the slide from level-0 pixel (x, y).

        The region spans ``w * mpp / slide_mpp`` level-0 pixels across. It is read from the
        deepest level that is still at least as fine as ``mpp`` and resampled (area
        averaging when shrinking). A slide without known mpp is read at its native
        resolution (factor 1).
        """
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        slide_mpp = self.mpp
        factor = 1.0 if slide_mpp is None else mpp / slide_mpp  # level-0 px per output px
        level = self.best_level_for_downsample(factor)
        ds = self.level_downsamples[level]
        scale = factor / ds  # level px per output px (>= 1 unless upsampling)
        if abs(scale - 1.0) < 1e-6:
            return self.read_region(x, y, w, h, level=level)
        lw, lh = max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))
        region = self.read_region(x, y, lw, lh, level=level)
        from PIL import Image

        img = Image.fromarray(region).resize(
            (w, h), Image.Resampling.BOX if scale > 1 else Image.Resampling.BILINEAR, box=(0, 0, w * scale, h * scale)
        )
        return np.asarray(img, dtype=np.uint8)

    def thumbnail(self, max_size: int | tuple[int, int]) -> np.ndarray:
        """Whole slide shrunk to fit ``max_size`` (keeps the aspect ratio), uint8 RGB."""
        mw, mh = (max_size, max_size) if isinstance(max_size, int) else max_size
        W, H = self.dimensions
        f = max(W / mw, H / mh, 1.0)
        tw, th = max(1, round(W / f)), max(1, round(H / f))
        level = self.best_level_for_downsample(f)
        lw, lh = self.level_dimensions[level]
        region = self.read_region(0, 0, lw, lh, level=level)
        from PIL import Image

        return np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX), dtype=np.uint8)

    def _clip_read(self, x: int, y: int, w: int, h: int, level: int, reader: Any) -> np.ndarray:
        """Helper: white canvas, paste the in-bounds part read by ``reader(lx, ly, w, h)``
        (level coordinates)."""
        ds = self.level_downsamples[level]
        LW, LH = self.level_dimensions[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, LW), min(ly + h, LH)
        if x0 < x1 and y0 < y1:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = reader(x0, y0, x1 - x0, y1 - y0)
        return out


def _to_rgb8(a: np.ndarray) -> np.ndarray:
    """(h, w[, s]) any dtype -> (h, w, 3) uint8; alpha is composited over white."""
    if a.dtype != np.uint8:
        if a.dtype.kind == "f":
            a = np.clip(a * (255.0 if float(np.nanmax(a, initial=0)) <= 1.0 else 1.0), 0, 255)
        elif a.dtype.kind in "ui" and a.dtype.itemsize > 1:
            a = a.astype(np.float64) / (np.iinfo(a.dtype).max / 255.0)
        elif a.dtype == bool:
            a = a * 255.0
        a = a.round().astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    s = a.shape[2]
    if s in (2, 4):
        alpha = a[..., -1]
        if alpha.min() == 255:  # the usual case inside a slide: no compositing, no float copy
            a = a[..., :-1]
        else:
            al = alpha[..., None].astype(np.uint16)
            a = ((a[..., :-1] * al + BACKGROUND * (255 - al) + 127) // 255).astype(np.uint8)
        s -= 1
    if s == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


class _OpenSlideReader(SlideReader):
    def __init__(self, path: str, fmt: str) -> None:
        super().__init__()
        import openslide

        self.path = path
        self.format = f"openslide:{fmt}"
        self.osr = openslide.OpenSlide(path)
        self.level_dimensions = [tuple(map(int, d)) for d in self.osr.level_dimensions]  # type: ignore[misc]
        self.level_downsamples = [float(d) for d in self.osr.level_downsamples]
        props = self.osr.properties
        self._mpp = _positive(props.get("openslide.mpp-x"))
        if self._mpp is None:
            self._mpp = _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
        self.objective_power = _positive(props.get("openslide.objective-power"))

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(self.osr.read_region((x, y), level, (w, h)))
        except openslide.OpenSlideError as e:
            raise SlideError(f"the slide's pixel data cannot be decoded ({e}); the file may be truncated") from e
        return _to_rgb8(rgba)  # OpenSlide gives transparent (alpha 0) outside the slide

    def close(self) -> None:
        self.osr.close()


class _TiffReader(SlideReader):
    """Region reads through tifffile's per-segment decoder: only touched tiles are decoded."""

    def __init__(self, path: str, tf: Any) -> None:
        super().__init__()
        self.path = path
        self.tf = tf
        series = tf.series[0]
        self.format = f"tifffile:{series.kind or 'tiff'}"
        self.pages = [lvl.keyframe for lvl in series.levels]
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self.pages]
        W0 = self.level_dimensions[0][0]
        self.level_downsamples = [W0 / w for w, _ in self.level_dimensions]
        self._lock = threading.RLock()
        self._mpp, self.objective_power = _tiff_mpp(tf, self.pages[0])

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._clip_read(x, y, w, h, level, lambda lx, ly, ww, hh: self._decode(level, lx, ly, ww, hh))

    def _decode(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self.pages[level]
        decode = page.decode
        tiled = page.is_tiled
        th, tw = (page.tilelength, page.tilewidth) if tiled else (page.rowsperstrip, page.imagewidth)
        th = min(th, page.imagelength) if not tiled else th
        nty, ntx = math.ceil(page.imagelength / th), math.ceil(page.imagewidth / tw)
        separate = page.planarconfig == 2 and page.samplesperpixel > 1
        planes = page.samplesperpixel if separate else 1
        out_s = page.samplesperpixel
        out = np.zeros((h, w, out_s), page.dtype)
        fh = self.tf.filehandle
        for r in range(y // th, (y + h - 1) // th + 1):
            for c in range(x // tw, (x + w - 1) // tw + 1):
                for s in range(planes):
                    idx = s * nty * ntx + r * ntx + c
                    off, cnt = page.dataoffsets[idx], page.databytecounts[idx]
                    with self._lock:
                        fh.seek(off)
                        data = fh.read(cnt)
                    if len(data) < cnt:
                        raise SlideError(
                            f"{Path(self.path).name} is truncated: tile data ends past the end of the file"
                        )
                    seg, _, _ = decode(
                        data, idx, jpegtables=page.jpegtables, jpegheader=page.jpegheader, _fullsize=tiled
                    )
                    if seg is None:
                        continue
                    seg = seg.reshape(seg.shape[-3:])  # (length, width, contig samples)
                    sy0, sx0 = r * th, c * tw
                    ys, ye = max(y, sy0), min(y + h, sy0 + seg.shape[0])
                    xs, xe = max(x, sx0), min(x + w, sx0 + seg.shape[1])
                    if ys >= ye or xs >= xe:
                        continue
                    part = seg[ys - sy0 : ye - sy0, xs - sx0 : xe - sx0]
                    if separate:
                        out[ys - y : ye - y, xs - x : xe - x, s] = part[..., 0]
                    else:
                        out[ys - y : ye - y, xs - x : xe - x] = part
        return _to_rgb8(out)

    def close(self) -> None:
        self.tf.close()


class _PillowReader(SlideReader):
    """PNG/JPEG/...: decoded whole (the pixel limit was checked from the header first)."""

    def __init__(self, path: str, img: Any) -> None:
        super().__init__()
        self.path = path
        self.format = f"pillow:{(img.format or 'image').lower()}"
        try:
            img.load()
        except Exception as e:  # Pillow raises OSError/SyntaxError/... for broken data
            raise SlideError(f"{Path(path).name} cannot be decoded ({e}); the file may be truncated") from e
        dpi = img.info.get("dpi")
        self._mpp = _positive(25400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 1 else None
        if img.mode not in ("RGB", "L", "RGBA", "LA", "I;16", "I", "F"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        self.array = _to_rgb8(np.asarray(img))
        img.close()
        h, w = self.array.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]

    def _read_level(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._clip_read(x, y, w, h, level, lambda lx, ly, ww, hh: self.array[ly : ly + hh, lx : lx + ww])


# --------------------------------------------------------------------------- metadata helpers


def _positive(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _mpp_from_resolution(xres: Any, unit: Any) -> float | None:
    """TIFF XResolution (pixels per unit) -> um/px; None without a physical unit."""
    if isinstance(xres, tuple):
        xres = xres[0] / xres[1] if xres[1] else None
    r = _positive(xres)
    if r is None:
        return None
    u = str(unit).lower()
    if u in ("3", "centimeter", "resunit.centimeter"):
        return 1e4 / r
    if u in ("2", "inch", "resunit.inch"):
        # 72/96 dpi are what image editors write by default, not a scan resolution.
        return None if r in (72.0, 96.0) else 25400.0 / r
    return None


def _tiff_mpp(tf: Any, page: Any) -> tuple[float | None, float | None]:
    obj = None
    desc = page.description or ""
    if desc.startswith("Aperio"):
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (p.partition("=") for p in desc.split("|")[1:]) if k.strip()
        )
        obj = _positive(fields.get("AppMag"))
        mpp = _positive(fields.get("MPP"))
        if mpp is not None:
            return mpp, obj
    if tf.is_ome and tf.ome_metadata:
        import re

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        if m:
            v = _positive(m.group(1))
            unit = u.group(1) if u else "µm"
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
            if v is not None and scale is not None:
                return v * scale, obj
    tags = page.tags
    xres = tags.get("XResolution")
    unit = tags.get("ResolutionUnit")
    if xres is not None:
        return _mpp_from_resolution(xres.value, int(unit.value) if unit is not None else 2), obj
    return None, obj


# --------------------------------------------------------------------------- opening


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def _check_cost(name: str, cost: int, max_pixels: int | None, what: str, setting: str = "KARYO_MAX_IMAGE_PIXELS") -> None:
    if max_pixels is not None and cost > max_pixels:
        raise SlideError(
            f"{name} is too large: {what} decode to {cost:,} samples ({_human(cost)}), above the limit "
            f"of {max_pixels:,} ({_human(max_pixels)}, {setting}); the limit counts every "
            "pyramid level, samples per pixel and planes"
        )


class _Limits:
    """``max_pixels`` bounds files decoded whole (PNG, JPEG, stripped TIFF); ``max_tiled`` bounds
    tiled files, which are only ever decoded one tile at a time (None: ``max_pixels`` too)."""

    def __init__(self, max_pixels: int | None, max_tiled: int | None) -> None:
        self.whole = max_pixels
        self.tiled = max_tiled if max_tiled is not None else max_pixels
        self.tiled_setting = "KARYO_MAX_SLIDE_PIXELS" if max_tiled is not None else "KARYO_MAX_IMAGE_PIXELS"


def _inspect_tiff(path: str, name: str, limits: _Limits | int | None) -> Any:
    """Open with tifffile and refuse what cannot be read as one 2-D RGB(A)/gray pyramid.
    ``limits``: a :class:`_Limits`, or one number (or None) for both kinds of file.

    Returns the open TiffFile (caller closes it)."""
    import tifffile

    if not isinstance(limits, _Limits):
        limits = _Limits(limits, None)

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:
        raise SlideError(f"{name} cannot be read as a TIFF ({e}); the file is corrupt or truncated") from e
    try:
        if not tf.series:
            raise SlideError(f"{name} contains no image")
        series = tf.series[0]
        page = series.keyframe
        if page is None:
            raise SlideError(f"{name} contains no readable image")
        spp = int(page.samplesperpixel)
        if spp > 4:
            raise SlideError(
                f"{name} has {spp} samples per pixel (a multispectral or multichannel image); Karyo reads "
                "gray, RGB or RGBA images (at most 4 samples) and will not guess which channels are colour"
            )
        shape = dict(zip(series.axes, series.shape))
        planes = int(np.prod([v for k, v in shape.items() if k not in "YXS"], dtype=np.int64))
        if page.imagedepth > 1 or planes > 1:
            dims = " x ".join(f"{v} {k}" for k, v in shape.items())
            raise SlideError(
                f"{name} is a volumetric/multi-plane TIFF ({dims}; axes {series.axes}): several planes of "
                f"the same size, not a resolution pyramid. Karyo reads one 2-D plane per slide; export the "
                "plane you want (or a projection) as its own file"
            )
        levels = series.levels
        cost = sum(int(np.prod(lv.shape, dtype=np.int64)) for lv in levels)
        tiled = all(lv.keyframe.is_tiled for lv in levels)
        _check_cost(
            name,
            cost,
            limits.tiled if tiled else limits.whole,
            f"its {len(levels)} level(s) ({page.imagewidth}x{page.imagelength} at level 0, {spp} samples)",
            limits.tiled_setting if tiled else "KARYO_MAX_IMAGE_PIXELS",
        )
        size = os.path.getsize(path)
        for lv in levels:
            kp = lv.keyframe
            ends = [o + c for o, c in zip(kp.dataoffsets, kp.databytecounts) if c]
            if ends and max(ends) > size:
                raise SlideError(
                    f"{name} is truncated: its image data extends to byte {max(ends):,} but the file has "
                    f"{size:,} bytes (an interrupted upload or copy?)"
                )
            if not kp.dataoffsets or (kp.compression == 1 and not any(kp.databytecounts)):
                raise SlideError(f"{name} has a level without image data")
        return tf
    except BaseException:
        tf.close()
        raise


def open_slide(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = None,
    max_tiled_pixels: int | None = None,
    default_mpp: float | None = None,
) -> SlideReader:
    """Open ``path`` with OpenSlide, tifffile or Pillow (in that order of preference).

    Args:
        path: a slide or image file.
        max_pixels: refuse files whose decoded cost (all levels, samples, planes) exceeds it.
        max_tiled_pixels: the same limit for tiled files (slide pyramids), which are never
            decoded whole; None = ``max_pixels``.
        default_mpp: reported as ``.mpp`` when the file has no resolution metadata (the
            project's working resolution); ``.mpp_from_metadata`` tells which one it is.

    Raises:
        SlideError: unreadable, truncated, too large, multispectral or volumetric files.
        FileNotFoundError: no such file.
    """
    p = str(path)
    name = Path(p).name
    if not os.path.isfile(p):
        raise FileNotFoundError(p)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise SlideError(f"{name} is empty")

    reader: SlideReader | None = None
    limits = _Limits(max_pixels, max_tiled_pixels)
    if head[:4] in _TIFF_MAGIC:
        tf = _inspect_tiff(p, name, limits)
        # OME-TIFF keeps its pyramid in SubIFDs and its pixel size in OME-XML, neither of
        # which OpenSlide's generic TIFF driver reads: tifffile handles those.
        reader = None if tf.is_ome else _try_openslide(p, name, limits)
        if reader is None:
            reader = _TiffReader(p, tf)
        else:
            tf.close()
    else:
        reader = _try_openslide(p, name, limits)
        if reader is None:
            reader = _open_pillow(p, name, max_pixels)
    reader._mpp_default = default_mpp
    return reader


def _try_openslide(p: str, name: str, limits: _Limits | int | None) -> SlideReader | None:
    import openslide

    if not isinstance(limits, _Limits):
        limits = _Limits(limits, None)

    fmt = openslide.OpenSlide.detect_format(p)
    if fmt is None:
        return None
    try:
        r = _OpenSlideReader(p, fmt)
    except openslide.OpenSlideError as e:
        if fmt == "generic-tiff":
            return None  # tifffile may still read it
        raise SlideError(f"{name} looks like a {fmt} slide but OpenSlide cannot open it: {e}") from e
    cost = sum(w * h * 3 for w, h in r.level_dimensions)
    try:
        # OpenSlide reads tile by tile whatever the format.
        _check_cost(
            name,
            cost,
            limits.tiled,
            f"its {r.level_count} level(s) ({r.dimensions[0]}x{r.dimensions[1]} at level 0, RGB)",
            limits.tiled_setting,
        )
    except SlideError:
        r.close()
        raise
    return r


def _open_pillow(p: str, name: str, max_pixels: int | None) -> SlideReader:
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_limit(max_pixels):
            img = Image.open(p)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise SlideError(
            f"{name} is not a supported slide or image (OpenSlide, tifffile and Pillow cannot read it)"
        ) from e
    except Image.DecompressionBombError as e:
        raise SlideError(f"{name} is too large: {e}") from e
    w, h = img.size
    bands = len(img.getbands())
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        img.close()
        raise SlideError(f"{name} has {frames} frames (an animation or stack); Karyo reads one 2-D image")
    try:
        _check_cost(name, w * h * bands, max_pixels, f"{w}x{h} pixels with {bands} band(s)")
        return _PillowReader(p, img)
    except BaseException:
        img.close()
        raise


class _pillow_limit:
    """Our own limit replaces Pillow's global bomb check while opening (restored after)."""

    def __init__(self, max_pixels: int | None) -> None:
        self.max_pixels = max_pixels

    def __enter__(self) -> None:
        from PIL import Image

        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: Any) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self.saved


# --------------------------------------------------------------------------- writer


def _level_dims(width: int, height: int, factor: int, min_side: int = 1024) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while max(dims[-1]) >= min_side:
        w, h = dims[-1]
        dims.append((max(1, math.ceil(w / factor)), max(1, math.ceil(h / factor))))
    return dims


def _tissue_field(width: int, height: int, cell: int, fraction: float, seed: int) -> np.ndarray:
    """Coarse (ceil(H/cell), ceil(W/cell)) float32 field; > 0 is tissue, ~fraction of cells."""
    from ml_worker.synth import _noise

    gh, gw = math.ceil(height / cell), math.ceil(width / cell)
    rng = np.random.default_rng(seed + 7919)
    # Blobs of a few mm: correlation length ~ 1/6 of the slide side in coarse cells.
    n = _noise(rng, (gh, gw), max(2.0, min(gh, gw) / 6.0))
    # Fade out at the slide border so the glass edge stays clear.
    yy = np.minimum(np.arange(gh), np.arange(gh)[::-1])[:, None] / max(gh, 1)
    xx = np.minimum(np.arange(gw), np.arange(gw)[::-1])[None, :] / max(gw, 1)
    n = n - 3.0 * np.clip(0.08 - np.minimum(yy, xx), 0, None) / 0.08
    if fraction <= 0:
        return np.full((gh, gw), -1.0, np.float32)
    if fraction >= 1:
        return np.ones((gh, gw), np.float32)
    thr = float(np.quantile(n, 1.0 - fraction))
    # Soft edge one coarse cell wide.
    return ((n - thr) / max(float(n.std()), 1e-6) * 4.0).astype(np.float32)


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    # Same parameters tifffile uses for JPEG RGB with (2, 2) subsampling -> YCbCr photometric.
    return imagecodecs.jpeg_encode(
        np.ascontiguousarray(tile), level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    *,
    width: int,
    height: int,
    mpp: float = 0.5,
    tile: int = 256,
    kind: str = "he",
    seed: int = 0,
    compression: str = "jpeg",
    tissue_fraction: float = 0.5,
    quality: int = 85,
    level_factor: int = 2,
    background: int = 242,
    n_textures: int = 8,
) -> None:
    """Write a synthetic SVS-like slide: tiled JPEG pyramid with Aperio metadata (MPP, AppMag).

    Level 0 is produced one row of tiles at a time; each row is JPEG-encoded straight into
    the TIFF and box-downsampled into the next level's row buffer. Lower levels are encoded
    into temporary files as their rows fill and copied into the TIFF afterwards (tifffile
    writes pre-compressed tiles as they are). Memory: a few tile rows per level.

    Tissue: a smooth random field thresholded so that ~``tissue_fraction`` of the slide is
    tissue, textured with tiles from ``ml_worker.synth.generate(kind)`` (a bank of
    ``n_textures`` 512-px renders, cropped/rotated per tile, so nuclei are cut at 256-px tile
    seams); the rest is plain glass (``background`` gray). No ground-truth map is written.
    """
    import tifffile

    from ml_worker.synth import generate

    if compression != "jpeg":
        raise ValueError("only compression='jpeg' is supported (what SVS uses)")
    if width <= 0 or height <= 0 or tile % 16 or tile <= 0:
        raise ValueError("width/height must be positive and tile a positive multiple of 16")
    if level_factor not in (2, 4):
        raise ValueError("level_factor must be 2 or 4")
    dims = _level_dims(width, height, level_factor)
    cell = 64
    field = _tissue_field(width, height, cell, tissue_fraction, seed)
    rng = np.random.default_rng(seed)
    bank = [generate(kind, 512, seed * 1000 + i)[0] for i in range(max(1, n_textures))]
    bg_tile = np.full((tile, tile, 3), background, np.uint8)
    bg_bytes = _jpeg(bg_tile, quality)

    def level0_row(r: int) -> np.ndarray:
        W = dims[0][0]
        ntx = math.ceil(W / tile)
        row = np.full((tile, ntx * tile, 3), background, np.uint8)
        y0 = r * tile
        for c in range(ntx):
            x0 = c * tile
            cy0, cy1 = y0 // cell, min(field.shape[0], (y0 + tile) // cell + 2)
            cx0, cx1 = x0 // cell, min(field.shape[1], (x0 + tile) // cell + 2)
            patch = field[max(cy0 - 1, 0) : cy1, max(cx0 - 1, 0) : cx1]
            if patch.max() <= -1.0:
                continue
            tex = bank[int(rng.integers(len(bank)))]
            oy, ox = rng.integers(0, tex.shape[0] - tile + 1, 2)
            t = np.rot90(tex[oy : oy + tile, ox : ox + tile], int(rng.integers(4)))
            if patch.min() >= 0.0:  # well inside tissue: alpha is 1 everywhere
                row[:, x0 : x0 + tile] = t
                continue
            from scipy import ndimage as ndi

            yy = (np.arange(y0, y0 + tile) + 0.5) / cell - 0.5 - max(cy0 - 1, 0)
            xx = (np.arange(x0, x0 + tile) + 0.5) / cell - 0.5 - max(cx0 - 1, 0)
            gy, gx = np.meshgrid(yy, xx, indexing="ij")
            alpha = np.clip(ndi.map_coordinates(patch, [gy, gx], order=1, mode="nearest") + 1.0, 0, 1)
            if alpha.max() <= 0:
                continue
            a = alpha[..., None]
            row[:, x0 : x0 + tile] = (a * t + (1 - a) * background).round().astype(np.uint8)
        return row

    n_levels = len(dims)
    tmpdir = tempfile.mkdtemp(prefix="karyo-slide-", dir=os.path.dirname(os.path.abspath(path)))
    tmp_paths = [os.path.join(tmpdir, f"level{i}.bin") for i in range(n_levels)]
    tmp_files = [open(tp, "wb") if i else None for i, tp in enumerate(tmp_paths)]
    counts: list[list[int]] = [[] for _ in range(n_levels)]
    # Pending rows per level (>= 1): arrays of (rows, padded width, 3) waiting to fill a tile row.
    pending: list[list[np.ndarray]] = [[] for _ in range(n_levels)]

    def padded_width(level: int) -> int:
        return math.ceil(dims[level][0] / tile) * tile

    def encode_row(row: np.ndarray) -> Iterator[bytes]:
        for c in range(row.shape[1] // tile):
            t = row[:, c * tile : (c + 1) * tile]
            if t.min() == background and t.max() == background:
                yield bg_bytes
            else:
                yield _jpeg(t, quality)

    def downsample(rows: np.ndarray, level: int) -> np.ndarray:
        """Box-filter rows of ``level - 1`` (a multiple of the factor) into rows of ``level``."""
        f = level_factor
        wpad = padded_width(level) * f
        if rows.shape[1] < wpad:
            rows = np.concatenate(
                [rows, np.full((rows.shape[0], wpad - rows.shape[1], 3), background, np.uint8)], axis=1
            )
        from PIL import Image

        # Pillow's reduce() is a C box filter, ~20x faster than a strided numpy mean.
        return np.asarray(Image.fromarray(np.ascontiguousarray(rows[:, :wpad])).reduce(f))

    # Rows of each level not yet downsampled into the next (fewer than the factor).
    remainder: list[np.ndarray | None] = [None] * n_levels

    def push_down(level: int, rows: np.ndarray, final: bool) -> None:
        """Downsample rows of ``level`` into ``level + 1`` (keeping a remainder < factor)."""
        if level + 1 >= n_levels:
            return
        f = level_factor
        if remainder[level] is not None:
            rows = np.concatenate([remainder[level], rows])  # type: ignore[list-item]
            remainder[level] = None
        keep = rows.shape[0] % f
        if keep and final:
            pad = np.full((f - keep, *rows.shape[1:]), background, np.uint8)
            rows, keep = np.concatenate([rows, pad]), 0
        if keep:
            remainder[level] = rows[rows.shape[0] - keep :]
            rows = rows[: rows.shape[0] - keep]
        feed(level + 1, downsample(rows, level + 1) if rows.shape[0] else rows[:, : padded_width(level + 1)], final)

    def feed(level: int, rows: np.ndarray, final: bool) -> None:
        """Add rows to a level >= 1; encode every complete tile row; pass the rows down."""
        if rows.shape[0]:
            pending[level].append(rows)
        buf = np.concatenate(pending[level]) if pending[level] else rows[:0]
        ntx = math.ceil(dims[level][0] / tile)
        remaining = dims[level][1] - len(counts[level]) // ntx * tile
        while remaining > 0 and (buf.shape[0] >= tile or (final and buf.shape[0] > 0)):
            row = buf[:tile]
            if row.shape[0] < tile:
                row = np.concatenate([row, np.full((tile - row.shape[0], *row.shape[1:]), background, np.uint8)])
            for b in encode_row(row):
                tmp_files[level].write(b)  # type: ignore[union-attr]
                counts[level].append(len(b))
            remaining -= tile
            buf = buf[tile:]
        pending[level] = [buf] if buf.shape[0] and remaining > 0 else []
        push_down(level, rows, final)

    def level0_tiles() -> Iterator[bytes]:
        nty = math.ceil(height / tile)
        for r in range(nty):
            row = level0_row(r)
            for b in encode_row(row):
                counts[0].append(len(b))
                yield b
            push_down(0, row[: min(tile, height - r * tile)], r == nty - 1)

    desc0 = (
        f"Aperio Image Library v12.0.0 (Karyo synthetic)\r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {20.0 * 0.5 / mpp:g}|MPP = {mpp:g}"
        f"|Karyo.kind = {kind}|Karyo.seed = {seed}|Karyo.tissue_fraction = {tissue_fraction:g}"
    )
    res = (1e4 / mpp, 1e4 / mpp)
    common = dict(
        dtype=np.uint8,
        photometric="rgb",
        compression="jpeg",
        subsampling=(2, 2),
        tile=(tile, tile),
        metadata=None,
        resolutionunit="CENTIMETER",
    )
    out = str(path)
    try:
        with tifffile.TiffWriter(out, bigtiff=width * height * 3 > 2**31) as tw:
            gen = level0_tiles()
            # Wrapped: tifffile closes the iterator it was given after the last tile, and
            # closing must not reach ``gen``, whose tail pushes the last row down the levels.
            tw.write((b for b in gen), shape=(height, width, 3), description=desc0, resolution=res, **common)
            for _ in gen:
                raise RuntimeError("level-0 tile generator yielded more tiles than the grid has")
            for f in tmp_files[1:]:
                f.close()  # type: ignore[union-attr]
            # Aperio layout: page 1 is a small stripped thumbnail (tifffile's SVS series
            # expects it there; OpenSlide exposes it as the associated image "thumbnail").
            thumb = _thumbnail_from_tiles(tmp_paths[-1] if n_levels > 1 else None, counts[-1], dims[-1], tile)
            if thumb is not None:
                tw.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    metadata=None,
                    rowsperstrip=16,
                    description=f"Aperio Image Library v12.0.0 (Karyo synthetic)\r\n{width}x{height} -> "
                    f"{thumb.shape[1]}x{thumb.shape[0]} - ",
                    subfiletype=1,
                )
            for lv in range(1, n_levels):
                w, h = dims[lv]
                ds = width / w
                desc = f"Aperio Image Library v12.0.0 (Karyo synthetic)\r\n{width}x{height} -> {w}x{h} - |MPP = {mpp * ds:g}"
                tw.write(
                    _read_chunks(tmp_paths[lv], counts[lv]),
                    shape=(h, w, 3),
                    description=desc,
                    resolution=(res[0] / ds, res[1] / ds),
                    subfiletype=0,
                    **common,
                )
    finally:
        for f in tmp_files[1:]:
            if f is not None and not f.closed:
                f.close()
        for tp in tmp_paths:
            if os.path.exists(tp):
                os.remove(tp)
        os.rmdir(tmpdir)


def _thumbnail_from_tiles(
    path: str | None, counts: list[int], dims: tuple[int, int], tile: int, max_side: int = 768
) -> np.ndarray | None:
    """Decode the smallest level's JPEG tiles (< 1024 px a side) into a thumbnail."""
    import imagecodecs
    from PIL import Image

    if path is None:
        return None
    w, h = dims
    ntx = math.ceil(w / tile)
    canvas = np.zeros((math.ceil(h / tile) * tile, ntx * tile, 3), np.uint8)
    for i, b in enumerate(_read_chunks(path, counts)):
        r, c = divmod(i, ntx)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = imagecodecs.jpeg_decode(b)
    img = Image.fromarray(canvas[:h, :w])
    img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return np.asarray(img)


def _read_chunks(path: str, counts: list[int]) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for c in counts:
            yield fh.read(c)
