"""Dataset formats: one module per format, each a writer/reader pair.

No ORM here: writers receive :class:`ExportSample` objects one at a time (numpy arrays plus
metadata) and write them through an :class:`~backend.exports.archive.ZipSink`; readers index a
folder and return a :class:`Dataset` whose items load lazily, one at a time, so that neither
side ever holds a whole data set in memory.

Conventions shared by every format:

* items are named ``NAME`` (a file stem, unique in the data set); the image is ``images/NAME.png``;
* instance ids are 1..N, consecutive, in the order of the stored ids (writers renumber nothing:
  the exporter has already done it, so export -> import -> export is stable);
* every instance has a class id from the export's class table (``manifest.json`` ``classes``);
* polygons follow pixel edges (see :mod:`backend.common.geometry`) and are therefore exact.
"""
from __future__ import annotations

from backend.common.errors import InvalidUpload

from .base import (
    FORMAT_NAMES,
    IMAGE_SUFFIXES,
    LOSSES,
    PANNUKE_CLASSES,
    BaseWriter,
    ClassDef,
    Dataset,
    ExportSample,
    Labels,
    PlanItem,
    SourceItem,
    class_map,
    encode_gray8,
    encode_rgb_png,
    find_images,
    hex_to_rgb,
    image_size,
    majority_classes,
    manifest_classes,
    palette_color,
    problem,
    rgb_to_hex,
    safe_name,
)

__all__ = [
    "BaseWriter",
    "ClassDef",
    "Dataset",
    "ExportSample",
    "FORMAT_NAMES",
    "IMAGE_SUFFIXES",
    "LOSSES",
    "Labels",
    "PANNUKE_CLASSES",
    "PlanItem",
    "SourceItem",
    "class_map",
    "detect_format",
    "encode_gray8",
    "encode_rgb_png",
    "find_images",
    "get_format",
    "hex_to_rgb",
    "image_size",
    "majority_classes",
    "manifest_classes",
    "palette_color",
    "problem",
    "rgb_to_hex",
    "safe_name",
]


def get_format(name: str):
    from . import coco, geojson, labelstudio, pannuke, png

    modules = {"png": png, "coco": coco, "pannuke": pannuke, "labelstudio": labelstudio, "geojson": geojson}
    if name not in modules:
        raise InvalidUpload(f"unknown format {name!r}; use one of {', '.join(FORMAT_NAMES)}", code="invalid_format")
    return modules[name]


def detect_format(root, manifest: dict | None = None) -> str:
    """The format of a data set folder: the manifest says so, or the files do."""
    if manifest and manifest.get("format") in FORMAT_NAMES:
        return manifest["format"]
    for name in ("pannuke", "coco", "labelstudio", "geojson", "png"):
        if get_format(name).detect(root):
            return name
    raise InvalidUpload(
        f"{root}: no images/ folder (expected images/NAME.png + masks/NAME.png) and no COCO JSON, "
        "PanNuke .npy, Label Studio tasks or QuPath GeoJSON either",
        code="invalid_layout",
    )
