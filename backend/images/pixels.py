"""Pixels of images and tiles, read on demand from the stored file through one bounded cache.

Slides are never copied into one PNG per tile: a tile is a rectangle of its image, read through a
``ml_worker.slides.SlideReader`` when someone needs it (the tile PNG endpoint, the editor, Label
Studio, exports, prediction, training all call :func:`read_tile_rgb`). Two caches keep that cheap
and bounded per process:

- an LRU of open readers (``KARYO_SLIDE_READERS`` files, default 16): opening a slide parses its
  header and index, so a reader is kept for the next tile of the same slide;
- an LRU of decoded tiles bounded in bytes (``KARYO_TILE_CACHE_MB``, default 256 MB).

Resolution: ``Tile.x``/``Tile.y`` are level-0 pixels; ``Tile.w``/``Tile.h`` are pixels at the
project's working resolution. An image's level-0 resolution is its ``microns_per_pixel`` (from
the file's metadata or the uploader), or the project's ``working_mpp`` when unknown, so every image
without MPP is read 1:1. A slide scanned finer than the working resolution (e.g. 0.25 um/px at
40x for a 0.5 um/px project) is read from the nearest pyramid level at least as fine and resampled.

On S3 storage the slide file is fetched once into ``VAR_DIR/slide-cache`` (readers need a local
file to seek in); on local storage it is read in place.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.files.storage import default_storage

from backend.common.storage import read_rgb

from .models import Image, Tile

_lock = threading.Lock()
_readers: OrderedDict[tuple, tuple[object, threading.Lock]] = OrderedDict()
_tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
_tile_bytes = 0
MPP_TOLERANCE = 0.02  # relative: 0.499 and 0.5 um/px are the same resolution


def max_readers() -> int:
    return int(getattr(settings, "KARYO_SLIDE_READERS", 16))


def max_tile_bytes() -> int:
    return int(getattr(settings, "KARYO_TILE_CACHE_MB", 256)) * 1024 * 1024


def _storage_key() -> str:
    # Tests swap the default storage per test; a reader opened on another storage must not be reused.
    storage = default_storage
    return f"{storage.__class__.__name__}:{getattr(storage, 'location', '')}:{getattr(storage, 'bucket_name', '')}"


def local_path(name: str) -> Path:
    """A local file with the stored file's bytes (the file itself on local storage)."""
    try:
        return Path(default_storage.path(name))
    except NotImplementedError:
        pass
    cache = Path(settings.VAR_DIR) / "slide-cache"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / name.replace("/", "_")
    if not target.exists():
        tmp = target.with_name(target.name + f".{threading.get_ident()}.part")
        with default_storage.open(name, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(8 * 1024 * 1024):
                dst.write(block)
        tmp.replace(target)
    return target


def open_image_reader(image: Image):
    """The cached ``SlideReader`` of ``image`` and the lock that serialises reads from it."""
    from ml_worker.slides import open_slide

    key = (_storage_key(), image.file.name)
    with _lock:
        entry = _readers.get(key)
        if entry is not None:
            _readers.move_to_end(key)
            return entry
    reader = open_slide(local_path(image.file.name), max_pixels=settings.KARYO_MAX_IMAGE_PIXELS,
                       max_tiled_pixels=settings.KARYO_MAX_SLIDE_PIXELS)
    entry = (reader, threading.Lock())
    with _lock:
        if key in _readers:  # another thread opened it meanwhile
            reader.close()
            return _readers[key]
        _readers[key] = entry
        while len(_readers) > max_readers():
            _, (old, old_lock) = _readers.popitem(last=False)
            with old_lock:
                old.close()
    return entry


def forget_image(image: Image) -> None:
    """Close the cached reader and drop cached tiles of ``image`` (deleted or failed images)."""
    global _tile_bytes
    with _lock:
        for key in [k for k in _readers if k[1] == image.file.name]:
            reader, reader_lock = _readers.pop(key)
            with reader_lock:
                reader.close()
        for key in [k for k in _tiles if k[1] == image.pk]:
            _tile_bytes -= _tiles.pop(key).nbytes


def clear_caches() -> None:
    global _tile_bytes
    with _lock:
        while _readers:
            _, (reader, reader_lock) = _readers.popitem()
            with reader_lock:
                reader.close()
        _tiles.clear()
        _tile_bytes = 0


def image_mpp(image: Image, *, working_mpp: float) -> float:
    return float(image.microns_per_pixel or working_mpp)


def level0_per_working_pixel(image: Image, *, working_mpp: float) -> float:
    """How many level-0 pixels one working-resolution pixel spans (1.0 when they coincide)."""
    scale = working_mpp / image_mpp(image, working_mpp=working_mpp)
    return 1.0 if abs(scale - 1.0) < MPP_TOLERANCE else scale


def read_scaled(reader, *, x: int, y: int, w: int, h: int, scale: float) -> np.ndarray:
    """``w`` x ``h`` pixels at ``scale`` level-0 pixels per output pixel, from level-0 origin (x, y):
    read from the nearest level at least as fine as ``scale`` and resampled (uint8 RGB)."""
    if scale == 1.0:
        return reader.read_region(x, y, w, h, level=0)
    from PIL import Image as PILImage

    level = reader.best_level_for_downsample(scale) if scale > 1 else 0
    downsample = float(reader.level_downsamples[level])
    lw, lh = max(1, math.ceil(w * scale / downsample)), max(1, math.ceil(h * scale / downsample))
    region = reader.read_region(x, y, lw, lh, level=level)
    if region.shape[:2] == (h, w):
        return region
    resample = PILImage.Resampling.LANCZOS if scale / downsample > 1 else PILImage.Resampling.BICUBIC
    return np.asarray(PILImage.fromarray(region).resize((w, h), resample))


def read_image_region(image: Image, *, x: int, y: int, w: int, h: int, working_mpp: float) -> np.ndarray:
    """A region at the working resolution: origin in level-0 pixels, size in working pixels."""
    reader, reader_lock = open_image_reader(image)
    scale = level0_per_working_pixel(image, working_mpp=working_mpp)
    with reader_lock:
        if scale != 1.0 and reader.mpp is not None and abs(reader.mpp - image_mpp(image, working_mpp=working_mpp)) < 1e-6:
            return reader.read_at_mpp(x, y, w, h, mpp=working_mpp)
        return read_scaled(reader, x=x, y=y, w=w, h=h, scale=scale)


def read_tile_rgb(tile: Tile) -> np.ndarray:
    """The tile's pixels, (h, w, 3) uint8 at the working resolution. Legacy tiles with a PNG file
    read that file; every other tile is read from its image's pyramid (cached, bounded)."""
    global _tile_bytes
    key = (_storage_key(), tile.image_id, tile.x, tile.y, tile.w, tile.h)
    with _lock:
        cached = _tiles.get(key)
        if cached is not None:
            _tiles.move_to_end(key)
            return cached.copy()
    if tile.file:
        rgb = read_rgb(tile.file.name)
    else:
        image = tile.image
        rgb = read_image_region(image, x=tile.x, y=tile.y, w=tile.w, h=tile.h, working_mpp=tile.project.working_mpp)
    rgb = np.ascontiguousarray(rgb)
    with _lock:
        if key not in _tiles and rgb.nbytes <= max_tile_bytes():
            _tiles[key] = rgb
            _tile_bytes += rgb.nbytes
            while _tile_bytes > max_tile_bytes():
                _, old = _tiles.popitem(last=False)
                _tile_bytes -= old.nbytes
    return rgb.copy()  # callers may draw on their copy; the cached one stays clean


def cache_stats() -> dict:
    with _lock:
        return {"readers": len(_readers), "tiles": len(_tiles), "tile_bytes": _tile_bytes}


def tile_png(tile: Tile) -> bytes:
    """The tile's pixels as an RGB PNG (a legacy tile's stored PNG as it is)."""
    from backend.common.storage import encode_png, read_bytes

    if tile.file:
        return read_bytes(tile.file.name)
    return encode_png(read_tile_rgb(tile))
