"""The common layout: ``images/NAME.png`` + ``masks/NAME.png`` (16-bit instance label maps, 0 =
background) and, when the project has more than one class, ``classes/NAME.png`` (8-bit, the
class id of every pixel). With a split: ``splits/<split>.txt`` lists the names of each split.

Reading: without ``masks/`` the images are unlabelled; with it every image needs its mask.
Class maps give each instance the most frequent class under its pixels; their ids are the
export's class table (``manifest.json``) when there is one, else the project's class ids.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from backend.common.errors import KaryoError
from backend.common.storage import encode_png
from backend.images.validation import decode_mask

from .base import BaseWriter, Dataset, ExportSample, Labels, SourceItem, class_map, encode_gray8, find_images, majority_classes, manifest_classes, problem

NAME = "png"


class Writer(BaseWriter):
    name = NAME

    def __init__(self, sink, **kwargs):
        super().__init__(sink, **kwargs)
        self.write_classes = len(self.classes) > 1
        self.splits: dict[str, list[str]] = {}

    def add(self, sample: ExportSample) -> None:
        self.sink.write(f"images/{sample.name}.png", sample.image_png)
        self.sink.write(f"masks/{sample.name}.png", encode_png(sample.instances))
        if self.write_classes:
            self.sink.write(f"classes/{sample.name}.png", encode_gray8(class_map(sample.instances, sample.classes)))
        if sample.split:
            self.splits.setdefault(sample.split, []).append(sample.name)

    def close(self) -> None:
        for split in sorted(self.splits):
            self.sink.write(f"splits/{split}.txt", "\n".join(self.splits[split]) + "\n")


def detect(root: Path) -> bool:
    return (Path(root) / "images").is_dir()


def decode_class_map(name: str, data: bytes, *, width: int, height: int) -> np.ndarray:
    try:
        img = PILImage.open(io.BytesIO(data))
        img.load()
    except Exception:
        raise problem(name, "a class map must be a PNG") from None
    if img.format != "PNG" or img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise problem(name, f"a class map must be a single-channel PNG (got {img.format} {img.mode})")
    if (img.width, img.height) != (width, height):
        raise problem(name, f"class map is {img.width}x{img.height} but the image is {width}x{height}")
    return np.asarray(img).astype(np.int32)


def read(root: Path, *, manifest: dict | None = None) -> Dataset:
    root = Path(root)
    image_dir, mask_dir, class_dir = root / "images", root / "masks", root / "classes"
    if not image_dir.is_dir():
        raise KaryoError(f"{root}: no images/ folder (expected images/NAME.png + masks/NAME.png)", code="invalid_layout")
    images = find_images(image_dir)
    if not images:
        raise KaryoError(f"{image_dir}: no PNG, JPEG or TIFF images", code="empty_upload")
    classes = manifest_classes(manifest)
    id_to_name = {c.id: c.name for c in classes} if classes else None
    masks = {p.stem: p for p in sorted(mask_dir.glob("*.png"))} if mask_dir.is_dir() else {}
    class_maps = {p.stem: p for p in sorted(class_dir.glob("*.png"))} if class_dir.is_dir() else {}
    problems = []
    items = []
    for stem, paths in images.items():
        if len(paths) > 1:
            problems.append(f"duplicate names: {', '.join('images/' + p.name for p in paths)}")
            continue
        path = paths[0]
        if mask_dir.is_dir() and stem not in masks:
            # With a masks/ folder every image must have its mask: a silent gap would look
            # like an image with no nuclei and poison training.
            problems.append(f"images/{path.name} has no mask (expected masks/{stem}.png)")
            continue
        if class_dir.is_dir() and stem in masks and stem not in class_maps:
            problems.append(f"images/{path.name} has no class map (expected classes/{stem}.png)")
            continue
        items.append(SourceItem(
            name=stem, image_file=path.name, origin=f"images/{path.name}",
            load_image=path.read_bytes,
            load_labels=_label_loader(masks.get(stem), class_maps.get(stem), id_to_name),
        ))
    problems += [f"masks/{stem}.png has no image" for stem in sorted(set(masks) - set(images))]
    problems += [f"classes/{stem}.png has no image" for stem in sorted(set(class_maps) - set(images))]
    return Dataset(format=NAME, items=items, classes=classes, problems=problems, manifest=manifest)


def _label_loader(mask_path: Path | None, class_path: Path | None, id_to_name: dict[int, str] | None):
    def load(height: int, width: int) -> Labels | None:
        if mask_path is None:
            return None
        instances = decode_mask(f"masks/{mask_path.name}", mask_path.read_bytes(), width=width, height=height)
        classes: dict[int, str | int] = {}
        if class_path is not None:
            cmap = decode_class_map(f"classes/{class_path.name}", class_path.read_bytes(), width=width, height=height)
            for instance, class_id in majority_classes(instances, cmap).items():
                if id_to_name is not None:
                    if class_id not in id_to_name:
                        raise problem(f"classes/{class_path.name}", f"class id {class_id} is not in the manifest's classes")
                    classes[instance] = id_to_name[class_id]
                else:
                    classes[instance] = class_id
        return Labels(instances=instances, classes=classes)

    return load
