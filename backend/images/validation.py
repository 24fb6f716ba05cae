"""Decode and validate uploaded images, masks and zip archives before anything is stored.

Everything here works on bytes in memory and raises :class:`InvalidUpload` /
:class:`UnsupportedFormat` with a message a person can act on. Nothing is written until an
upload has passed every check, so a rejected upload leaves no rows or files behind.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import stat
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import tifffile
from django.conf import settings
from PIL import Image as PILImage

from backend.common.errors import InvalidUpload, UnsupportedFormat

SUPPORTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
ZIP_MAGIC = b"PK\x03\x04"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class DecodedImage:
    name: str
    data: bytes
    sha256: str
    format: str  # "png" | "jpeg" | "tiff"
    pixels: np.ndarray  # (H, W, 3) uint8 RGB

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _check_pixels(name: str, width: int, height: int) -> None:
    limit = settings.KARYO_MAX_IMAGE_PIXELS
    if width <= 0 or height <= 0:
        raise InvalidUpload(f"{name}: image has no pixels ({width}x{height})", code="empty_image")
    if width * height > limit:
        raise InvalidUpload(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {limit:,} "
            "(cut the slide region smaller, or raise KARYO_MAX_IMAGE_PIXELS)",
            code="image_too_large",
        )


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image array -> (H, W, 3) uint8; 16-bit and float data are rescaled."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"unsupported image shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] >= 4:
        array = array[:, :, :3]
    elif array.shape[2] == 2:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.integer):
        top = float(np.iinfo(array.dtype).max) if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float64) * 255.0 / top, 0, 255).astype(np.uint8)
    array = array.astype(np.float64)
    high = array.max(initial=0.0)
    scale = 255.0 if high <= 1.0 else 255.0 / high
    return np.clip(array * scale, 0, 255).astype(np.uint8)


def _decode_tiff(name: str, data: bytes) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            # Checked from the header, before any pixel data is decompressed.
            _check_pixels(name, int(page.imagewidth), int(page.imagelength))
            array = page.asarray()
    except InvalidUpload:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise InvalidUpload(f"{name}: truncated or corrupt TIFF ({exc})", code="corrupt_image") from None
    if array.ndim == 3 and array.shape[0] <= 4 and array.shape[2] > 4:
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    return to_rgb8(array)


def decode_image(name: str, data: bytes) -> DecodedImage:
    """Validate and decode one image upload (PNG, JPEG or TIFF)."""
    if not data:
        raise InvalidUpload(f"{name}: the upload is empty", code="empty_upload")
    sha256 = hashlib.sha256(data).hexdigest()
    if data.startswith(TIFF_MAGICS):
        return DecodedImage(name=name, data=data, sha256=sha256, format="tiff", pixels=_decode_tiff(name, data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data))
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise InvalidUpload(f"{name}: image dimensions exceed the pixel limit", code="image_too_large") from None
    except Exception:
        raise UnsupportedFormat(f"{name}: not a PNG, JPEG or TIFF image") from None
    if img.format not in SUPPORTED_FORMATS:
        raise UnsupportedFormat(f"{name}: {img.format} images are not supported; upload PNG, JPEG or TIFF")
    _check_pixels(name, img.width, img.height)
    try:
        img.load()
    except Exception as exc:
        raise InvalidUpload(f"{name}: truncated or corrupt {img.format} ({exc})", code="corrupt_image") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = to_rgb8(np.asarray(img))
    else:
        pixels = np.asarray(img.convert("RGB"))
    return DecodedImage(name=name, data=data, sha256=sha256, format=SUPPORTED_FORMATS[img.format], pixels=pixels)


def decode_mask(name: str, data: bytes, *, width: int, height: int) -> np.ndarray:
    """Validate an instance label map PNG (8- or 16-bit, one channel) of exactly ``width``x``height``.

    Returns an int32 (H, W) array, 0 = background.
    """
    if not data:
        raise InvalidUpload(f"{name}: the mask upload is empty", code="empty_upload")
    try:
        img = PILImage.open(io.BytesIO(data))
    except Exception:
        raise UnsupportedFormat(f"{name}: a mask must be a PNG label map") from None
    if img.format != "PNG":
        raise UnsupportedFormat(f"{name}: a mask must be a PNG label map, not {img.format}")
    if (img.width, img.height) != (width, height):
        raise InvalidUpload(
            f"{name}: mask is {img.width}x{img.height} but the tile is {width}x{height}", code="mask_size_mismatch"
        )
    if img.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "P", "1"):
        raise InvalidUpload(
            f"{name}: mask must be a single-channel 8- or 16-bit label map (got mode {img.mode})", code="invalid_mask"
        )
    try:
        img.load()
    except Exception as exc:
        raise InvalidUpload(f"{name}: truncated or corrupt PNG ({exc})", code="corrupt_image") from None
    array = np.asarray(img).astype(np.int64)
    if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
        raise InvalidUpload(f"{name}: label values must lie in 0..65535", code="invalid_mask")
    return array.astype(np.int32)


def _is_unsafe_member(info: zipfile.ZipInfo) -> bool:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return True
    if any(part == ".." for part in name.split("/")):
        return True
    mode = info.external_attr >> 16
    return stat.S_ISLNK(mode)


def read_zip(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """Safely list the image members of a zip upload; rejects the whole archive on any problem."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidUpload(f"{name}: not a valid zip archive", code="corrupt_archive") from None
    infos = archive.infolist()
    unsafe = [i.filename for i in infos if _is_unsafe_member(i)]
    if unsafe:
        raise InvalidUpload(
            f"{name}: archive paths escape the upload folder: {', '.join(unsafe[:10])}", code="unsafe_archive", details=unsafe
        )
    members = [
        i for i in infos
        if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not posixpath.basename(i.filename).startswith(".")
    ]
    if not members:
        raise InvalidUpload(f"{name}: the archive holds no files", code="empty_upload")
    if len(members) > settings.KARYO_MAX_ZIP_MEMBERS:
        raise InvalidUpload(f"{name}: more than {settings.KARYO_MAX_ZIP_MEMBERS} files in one archive", code="archive_too_large")
    unsupported = [i.filename for i in members if posixpath.splitext(i.filename.lower())[1] not in IMAGE_EXTENSIONS]
    if unsupported:
        raise UnsupportedFormat(
            f"{name}: unsupported files in the archive (PNG, JPEG, TIFF only): {', '.join(unsupported[:10])}",
            details=unsupported,
        )
    total = sum(i.file_size for i in members)
    if total > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{name}: the archive unpacks to {total:,} bytes, over the upload limit", code="archive_too_large")
    names = [posixpath.basename(i.filename) for i in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidUpload(f"{name}: duplicate file names in the archive: {', '.join(duplicates)}", code="duplicate_names")
    out = []
    for info in members:
        with archive.open(info) as fh:
            # Bounded read: a member that lies about its size cannot exhaust memory.
            content = fh.read(info.file_size + 1)
        if len(content) > info.file_size:
            raise InvalidUpload(f"{name}: {info.filename} is larger than its header says", code="corrupt_archive")
        out.append((posixpath.basename(info.filename), content))
    return out


def decode_upload(name: str, data: bytes) -> list[DecodedImage]:
    """One uploaded file -> the images it holds (a zip holds many). All-or-nothing."""
    if not data:
        raise InvalidUpload(f"{name}: the upload is empty", code="empty_upload")
    if len(data) > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{name}: the upload exceeds {settings.KARYO_MAX_UPLOAD_BYTES:,} bytes", code="upload_too_large")
    if data.startswith(ZIP_MAGIC):
        return [decode_image(member, content) for member, content in read_zip(name, data)]
    return [decode_image(name, data)]
