"""One storage layer for every file Karyo keeps: local disk by default, S3/MinIO when configured.

All writes go through :class:`StagedWrites` so that a failure part-way through a multi-file
operation removes what it had written: no orphan files, no rows pointing at missing files.
"""
from __future__ import annotations

import io
import logging

import numpy as np
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from PIL import Image as PILImage

log = logging.getLogger(__name__)


def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> RGB PNG; (H, W) integer -> 16-bit grayscale PNG (label maps)."""
    buffer = io.BytesIO()
    if array.ndim == 3:
        PILImage.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="RGB").save(buffer, format="PNG")
    else:
        if array.max(initial=0) > 65535 or array.min(initial=0) < 0:
            raise ValueError("label maps hold 0..65535")
        PILImage.fromarray(np.ascontiguousarray(array.astype(np.uint16))).save(buffer, format="PNG")
    return buffer.getvalue()


def read_bytes(name: str) -> bytes:
    with default_storage.open(name, "rb") as fh:
        return fh.read()


def read_label_map(name: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(read_bytes(name)))).astype(np.int32)


def read_rgb(name: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(read_bytes(name))).convert("RGB"))


class StagedWrites:
    """Context manager: files saved inside are deleted again if the block raises."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def save(self, name: str, data: bytes, *, reuse_existing: bool = False) -> str:
        """Store ``data`` under ``name``. With ``reuse_existing`` (content-addressed names) an
        existing file is kept and not rolled back, since others may reference it."""
        if reuse_existing and default_storage.exists(name):
            return name
        stored = default_storage.save(name, ContentFile(data))
        self.written.append(stored)
        return stored

    def __enter__(self) -> "StagedWrites":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.remove_all()
        return False

    def remove_all(self) -> None:
        """Delete what was written so far (the block raised, or its files turned out not to be needed)."""
        for name in reversed(self.written):
            try:
                default_storage.delete(name)
            except Exception:  # keep rolling back the others
                log.exception("could not remove %s while rolling back", name)
        self.written.clear()
