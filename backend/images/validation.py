"""Decode and validate uploaded images, masks and zip archives before anything is stored.

Everything here works on bytes in memory and raises :class:`InvalidUpload` /
:class:`UnsupportedFormat` with a message a person can act on. Nothing is written until an
upload has passed every check, so a rejected upload leaves no rows or files behind.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tifffile
from django.conf import settings
from PIL import Image as PILImage

from backend.common.archives import payload_members, reject_unsafe_members
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


def align_pillow_limit() -> None:
    """Pillow's own decompression-bomb limit follows KARYO_MAX_IMAGE_PIXELS (its default, 89.5 M
    pixels, would refuse a 9500x9500 image that Karyo's 100 M limit accepts). Process-wide, and
    re-applied on each decode so a changed setting takes effect."""
    PILImage.MAX_IMAGE_PIXELS = settings.KARYO_MAX_IMAGE_PIXELS


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
            if int(getattr(page, "imagedepth", 1) or 1) > 1:
                raise InvalidUpload(f"{name}: a volumetric TIFF ({page.imagedepth} planes deep) is not a 2-D image; "
                                    "export one plane", code="unsupported_image")
            array = page.asarray()
    except InvalidUpload:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise InvalidUpload(f"{name}: truncated or corrupt TIFF ({exc})", code="corrupt_image") from None
    if array.ndim == 3 and array.shape[0] <= 4 and array.shape[2] > 4:
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    try:
        return to_rgb8(array)
    except ValueError:
        # A volumetric (z-stack) or otherwise multi-dimensional page: not a 2-D image.
        raise InvalidUpload(
            f"{name}: a TIFF page of shape {tuple(array.shape)} is not a 2-D image (volumetric TIFFs are not supported; "
            "export one plane)", code="unsupported_image",
        ) from None


def decode_image(name: str, data: bytes) -> DecodedImage:
    """Validate and decode one image upload (PNG, JPEG or TIFF)."""
    if not data:
        raise InvalidUpload(f"{name}: the upload is empty", code="empty_upload")
    sha256 = hashlib.sha256(data).hexdigest()
    if data.startswith(TIFF_MAGICS):
        return DecodedImage(name=name, data=data, sha256=sha256, format="tiff", pixels=_decode_tiff(name, data))
    align_pillow_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data))
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as bomb:
        # Pillow's limit is Karyo's (align_pillow_limit): the same refusal, with Pillow's pixel count.
        counted = re.search(r"\((\d+) pixels\)", str(bomb))
        pixels = f"{int(counted.group(1)):,} pixels" if counted else "its pixel count"
        raise InvalidUpload(
            f"{name}: {pixels} exceeds the limit of {settings.KARYO_MAX_IMAGE_PIXELS:,} "
            "(cut the slide region smaller, or raise KARYO_MAX_IMAGE_PIXELS)", code="image_too_large",
        ) from None
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


def _zip_members(name: str, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Every check that the central directory allows, before any member is read."""
    infos = archive.infolist()
    reject_unsafe_members(infos, label=name)
    members = payload_members(infos)
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
    paths = {i.filename.replace("\\", "/").rstrip("/") for i in members}
    folders = {"/".join(p.split("/")[:depth]) for p in paths for depth in range(1, p.count("/") + 1)}
    clashes = sorted(paths & folders)
    if clashes:
        raise InvalidUpload(f"{name}: a file and a folder share the path {', '.join(clashes[:10])}", code="corrupt_archive",
                            details=clashes)
    names = [posixpath.basename(i.filename) for i in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidUpload(f"{name}: duplicate file names in the archive: {', '.join(duplicates)}", code="duplicate_names")
    return members


def _read_member(name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as fh:
            # Bounded read: a member that lies about its size cannot exhaust memory.
            content = fh.read(info.file_size + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError) as exc:
        # A bad CRC, an unsupported compression method, a truncated member.
        raise InvalidUpload(f"{name}: {info.filename} is corrupt ({exc})", code="corrupt_archive") from None
    if len(content) > info.file_size:
        raise InvalidUpload(f"{name}: {info.filename} is larger than its header says", code="corrupt_archive")
    return content


def iter_zip(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """The image members of a zip upload, one at a time: only one member's bytes are held at once.

    The whole central directory is checked before this returns (eagerly, not on first use), so a
    bad archive is refused before anything is read or stored.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InvalidUpload(f"{name}: not a valid zip archive", code="corrupt_archive") from None
    members = _zip_members(name, archive)

    def members_one_by_one() -> Iterator[tuple[str, bytes]]:
        with archive:
            for info in members:
                yield posixpath.basename(info.filename), _read_member(name, archive, info)

    return members_one_by_one()


def read_zip(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """Every image member of a zip upload in memory at once (small archives, tests); see iter_zip."""
    return list(iter_zip(name, data))


def decode_upload(name: str, data: bytes) -> Iterator[DecodedImage]:
    """One uploaded file -> the images it holds (a zip holds many), decoded lazily one by one.

    The consumer (``services.ingest_images``) stores each image before the next member is read
    and decoded, inside one transaction: memory stays bounded by one image, and a bad member
    still rolls the whole upload back. Checks that need no decoding run before this returns.
    """
    if not data:
        raise InvalidUpload(f"{name}: the upload is empty", code="empty_upload")
    if len(data) > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{name}: the upload exceeds {settings.KARYO_MAX_UPLOAD_BYTES:,} bytes", code="upload_too_large")
    if data.startswith(ZIP_MAGIC):
        return (decode_image(member, content) for member, content in iter_zip(name, data))
    return iter([decode_image(name, data)])
