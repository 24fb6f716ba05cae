"""Small in-memory files for upload tests."""
from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image


def rgb_png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def label_png(instances: np.ndarray) -> bytes:
    return encode(instances.astype(np.uint16), "PNG")


def disc_labels(height: int = 64, width: int = 64, centres=((20, 20), (40, 44)), radius: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    labels = np.zeros((height, width), np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def finish_ingest() -> list[str]:
    """Run the ingest a cpu worker would run, in this process, for every image still ingesting.

    API uploads answer at once with the image ``ingesting`` and enqueue ``karyo.cpu.ingest_image``
    on commit; tests without a worker call the task's own code here (``run_ingest``, idempotent:
    a worker that later receives the message finds the image ready and does nothing).
    """
    from backend.images.ingest import run_ingest
    from backend.images.models import Image, ImageState

    ids = list(Image.objects.filter(state=ImageState.INGESTING).order_by("pk").values_list("pk", flat=True))
    return [run_ingest(image_id=pk) for pk in ids]
