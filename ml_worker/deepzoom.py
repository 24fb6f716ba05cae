"""Deep Zoom (DZI) tiles of a slide, for OpenSeadragon.

Layout (Microsoft Deep Zoom, as ``openslide.deepzoom`` produces it): level L has the slide
scaled by 2^-(N-1-L), level 0 is 1x1 px and level N-1 is the full resolution; tiles are
``tile_size`` px plus ``overlap`` px on every side that has a neighbour. OpenSlide-backed
readers use ``openslide.deepzoom.DeepZoomGenerator``; any other reader gets the same layout
from :class:`_GenericDeepZoom`, which reads each tile from the finest pyramid level that is
at least as detailed and box-filters it down.

Encoded tiles are kept in a small LRU (``cache_tiles``), so panning back over a viewport
costs a dictionary lookup.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ml_worker.slides import SlideReader

__all__ = ["DeepZoom"]

_FORMATS = {"jpeg": "JPEG", "png": "PNG"}


class DeepZoom:
    """DZI descriptor and tiles for one :class:`~ml_worker.slides.SlideReader`."""

    def __init__(
        self,
        reader: SlideReader,
        tile_size: int = 254,
        overlap: int = 1,
        format: str = "jpeg",
        *,
        quality: int = 75,
        cache_tiles: int = 512,
    ) -> None:
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
        if tile_size <= 0 or overlap < 0:
            raise ValueError("tile_size must be positive and overlap >= 0")
        self.reader = reader
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.format = format
        self.quality = int(quality)
        osr = getattr(reader, "osr", None)
        self._gen: Any
        if osr is not None:
            from openslide.deepzoom import DeepZoomGenerator

            self._gen = DeepZoomGenerator(osr, tile_size=self.tile_size, overlap=self.overlap, limit_bounds=False)
        else:
            self._gen = _GenericDeepZoom(reader, self.tile_size, self.overlap)
        self._cache: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._cache_max = int(cache_tiles)
        self._lock = threading.Lock()

    @property
    def level_count(self) -> int:
        return int(self._gen.level_count)

    @property
    def level_tiles(self) -> list[tuple[int, int]]:
        return [tuple(t) for t in self._gen.level_tiles]  # type: ignore[misc]

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [tuple(d) for d in self._gen.level_dimensions]  # type: ignore[misc]

    def dzi_xml(self) -> str:
        w, h = self.level_dimensions[-1]
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{self.format}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Height="{h}" Width="{w}"/></Image>'
        )

    def _check(self, level: int, col: int, row: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"Deep Zoom level {level} out of range 0..{self.level_count - 1}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"tile ({col}, {row}) out of range for level {level} ({cols}x{rows} tiles)")

    def tile_image(self, level: int, col: int, row: int) -> np.ndarray:
        """The tile as (h, w, 3) uint8 RGB (unencoded)."""
        self._check(level, col, row)
        img = self._gen.get_tile(level, (col, row))
        return np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The encoded tile (JPEG unless ``format="png"``); ValueError when out of range."""
        key = (level, col, row)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        self._check(level, col, row)
        from PIL import Image

        img = self._gen.get_tile(level, (col, row))
        if not isinstance(img, Image.Image):
            img = Image.fromarray(img)
        buf = io.BytesIO()
        if self.format == "jpeg":
            img.convert("RGB").save(buf, "JPEG", quality=self.quality)
        else:
            img.save(buf, "PNG")
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return data


class _GenericDeepZoom:
    """The DeepZoomGenerator layout over any SlideReader (no ``limit_bounds``)."""

    def __init__(self, reader: SlideReader, tile_size: int, overlap: int) -> None:
        self.reader = reader
        self.tile_size = tile_size
        self.overlap = overlap
        w, h = reader.dimensions
        dims = [(w, h)]
        while dims[-1][0] > 1 or dims[-1][1] > 1:
            pw, ph = dims[-1]
            dims.append((max(1, math.ceil(pw / 2)), max(1, math.ceil(ph / 2))))
        self.level_dimensions = list(reversed(dims))
        self.level_count = len(self.level_dimensions)
        self.level_tiles = [(math.ceil(w / tile_size), math.ceil(h / tile_size)) for w, h in self.level_dimensions]

    def get_tile(self, level: int, address: tuple[int, int]) -> Any:
        from PIL import Image

        col, row = address
        zw, zh = self.level_dimensions[level]
        ts, ov = self.tile_size, self.overlap
        x0 = col * ts - (ov if col > 0 else 0)
        y0 = row * ts - (ov if row > 0 else 0)
        x1 = min(zw, (col + 1) * ts + ov)
        y1 = min(zh, (row + 1) * ts + ov)
        ds = 2.0 ** (self.level_count - 1 - level)  # level-0 px per Deep Zoom px
        lvl = self.reader.best_level_for_downsample(ds)
        lds = self.reader.level_downsamples[lvl]
        W0, H0 = self.reader.dimensions
        # Level-0 extent of the tile, clipped to the slide (the last DZ pixel may be partial).
        X0, Y0 = x0 * ds, y0 * ds
        X1, Y1 = min(x1 * ds, W0), min(y1 * ds, H0)
        rw = max(1, math.ceil((X1 - X0) / lds))
        rh = max(1, math.ceil((Y1 - Y0) / lds))
        region = self.reader.read_region(int(X0), int(Y0), rw, rh, level=lvl)
        img = Image.fromarray(region)
        if img.size != (x1 - x0, y1 - y0):
            img = img.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
        return img
