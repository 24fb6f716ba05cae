"""What every format module shares: the data classes, the class palette and the small codecs.

Re-exported by the package (``from backend.exports.formats import ClassDef``); the format modules
import it from here, so the package and its modules import each other in one direction only.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image as PILImage

from backend.common.errors import InvalidUpload

FORMAT_NAMES = ("png", "coco", "pannuke", "labelstudio", "geojson")

_LEVEL0 = ("image layout, an image whose resolution differs from the project's working one: its nuclei (drawn at the "
           "working resolution) are resampled nearest-neighbour to the image's level-0 size (exact blocks at an "
           "integer ratio); manifest images[].pixels gives both grids")

# What each format cannot express; repeated in the manifest and the dataset card.
LOSSES = {
    "png": ["none: images, instance label maps and class maps are stored pixel for pixel", _LEVEL0],
    "coco": [
        "none for the masks: polygons follow pixel edges and rasterise back exactly with pycocotools "
        "(checked for every instance at export); instances with holes are written as RLE",
        _LEVEL0,
    ],
    "pannuke": [
        "tiles smaller than the largest tile of a split are padded (bottom/right) to one array shape; "
        "sizes.npy records the true sizes and the importer crops the padding away",
        "instance ids are stored as uint16 (PanNuke's own files use float64)",
    ],
    "labelstudio": [
        "Label Studio polygons cannot have holes: a nucleus with a hole is exported with the hole filled "
        "(on import, a nucleus lying inside another's filled hole stays on top)",
        "polygon points are percentages of the image size (floats); Karyo rounds them back to pixel "
        "corners on import",
        "a nucleus in several pieces becomes several regions with ids k<instance>p<piece>; "
        "regions drawn in Label Studio are one nucleus each",
        _LEVEL0,
    ],
    "geojson": [
        "none for the masks: one Polygon (with holes) or MultiPolygon per nucleus, vertices on pixel corners",
        "coordinates are those of images/NAME.png: the whole image in the image layout (the default), in the "
        "source image's level-0 pixels (an image whose resolution differs from the working one is written at its "
        "level-0 size, its stitched label map resampled nearest-neighbour; see manifest images[].pixels), the "
        "tile in the tile layout",
    ],
}

PANNUKE_CLASSES = ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]
_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ClassDef:
    id: int
    name: str
    color: str  # "#rrggbb"

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "color": self.color}


@dataclass(frozen=True)
class PlanItem:
    """What writers know before the first sample (PanNuke sizes its arrays from it)."""

    name: str
    split: str | None
    width: int
    height: int


@dataclass
class ExportSample:
    name: str
    image_png: bytes
    instances: np.ndarray  # int32 (H, W), ids 1..N
    classes: dict[int, int]  # every instance id -> class id
    split: str | None = None
    meta: dict = field(default_factory=dict)

    def rgb(self) -> np.ndarray:
        return np.asarray(PILImage.open(io.BytesIO(self.image_png)).convert("RGB"))


@dataclass
class Labels:
    """An item's annotation as read from a file."""

    instances: np.ndarray  # int32 (H, W), 0 = background
    classes: dict[int, str | int]  # instance -> class name (or id, for PNG class maps without a manifest)
    colors: dict[str, str] = field(default_factory=dict)  # class name -> "#rrggbb" seen in the file


@dataclass
class SourceItem:
    name: str
    image_file: str  # name of the new Image row, e.g. "NAME.png"
    origin: str  # the file(s) to name in error messages
    load_image: Callable[[], bytes]
    load_labels: Callable[[int, int], Labels | None]  # (height, width) -> labels; None = unlabelled


@dataclass
class Dataset:
    format: str
    items: list[SourceItem]
    classes: list[ClassDef] | None = None  # classes the data set declares (manifest, COCO categories...)
    problems: list[str] = field(default_factory=list)  # found while indexing
    manifest: dict | None = None


class BaseWriter:
    name = ""

    def __init__(self, sink, *, classes: list[ClassDef], plan: list[PlanItem], options: dict | None = None):
        self.sink = sink
        self.classes = classes
        self.plan = plan
        self.options = options or {}
        self.class_by_id = {c.id: c for c in classes}

    def add(self, sample: ExportSample) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def problem(path: str, message: str) -> InvalidUpload:
    return InvalidUpload(f"{path}: {message}", code="invalid_dataset")


def hex_to_rgb(color: str) -> list[int]:
    color = color.lstrip("#")
    return [int(color[i : i + 2], 16) for i in (0, 2, 4)]


def rgb_to_hex(rgb) -> str:
    return "#" + "".join(f"{int(v) & 255:02x}" for v in list(rgb)[:3])


def palette_color(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(stem: str) -> str:
    cleaned = _UNSAFE.sub("_", stem).strip("._") or "image"
    return cleaned[:150]


def class_map(instances: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    """Per-pixel class ids (uint8) from an instance map and its instance -> class table."""
    top = int(instances.max(initial=0))
    lut = np.zeros(top + 1, np.uint8)
    for instance, class_id in classes.items():
        if 0 < instance <= top:
            lut[instance] = class_id
    return lut[instances]


def encode_gray8(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def encode_rgb_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image header, without decoding the pixels."""
    with PILImage.open(io.BytesIO(data)) as img:
        return img.width, img.height


def majority_classes(instances: np.ndarray, classes: np.ndarray) -> dict[int, int]:
    """Instance -> the most frequent non-zero class under its pixels (class maps -> class table)."""
    inside = (instances > 0) & (classes > 0)
    if not inside.any():
        return {}
    pairs = instances[inside].astype(np.int64) * 65536 + classes[inside].astype(np.int64)
    keys, counts = np.unique(pairs, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for key, count in zip(keys.tolist(), counts.tolist()):
        instance, class_id = divmod(key, 65536)
        if instance not in best or count > best[instance][0]:
            best[instance] = (count, class_id)
    return {instance: class_id for instance, (_, class_id) in best.items()}


def find_images(folder) -> dict[str, list]:
    """Stem -> image paths in ``folder`` (a stem with several files is a duplicate name)."""
    found: dict[str, list] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                found.setdefault(path.stem, []).append(path)
    return found


def manifest_classes(manifest: dict | None) -> list[ClassDef] | None:
    if not manifest or not isinstance(manifest.get("classes"), list):
        return None
    try:
        return [ClassDef(int(c["id"]), str(c["name"]), str(c.get("color") or palette_color(i)))
                for i, c in enumerate(manifest["classes"])]
    except (KeyError, TypeError, ValueError):
        return None
