"""COCO instance segmentation: ``images/NAME.png`` + ``annotations/instances.json`` (or
``annotations/instances_<split>.json``, one per split).

Each nucleus is one annotation (``iscrowd`` 0) with ``area`` (pixels), ``bbox`` and a
``segmentation``: polygons along pixel edges (one per 4-connected piece), or compressed RLE
for a nucleus with a hole (COCO polygons cannot express holes). Every polygon is checked
against pycocotools' rasteriser at export and falls back to RLE if it would not reproduce the
pixels exactly, so ``COCO.annToMask`` gives back the exported masks.

Reading: polygons, uncompressed and compressed RLE; crowd annotations (``iscrowd`` 1) are
groups, not nuclei, and are skipped. Where imported annotations overlap, the smaller one wins.
"""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi

from .base import BaseWriter, ClassDef, Dataset, ExportSample, Labels, SourceItem, find_images, manifest_classes, palette_color, problem
from backend.common.geometry import instance_parts, paint, polygons_shape

NAME = "coco"


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _poly_matches(polygons: list[list[float]], crop: np.ndarray) -> bool:
    h, w = crop.shape
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w)))
    return bool(np.array_equal(decoded.astype(bool), crop))


def encode_instances(instances: np.ndarray, classes: dict[int, int]) -> list[dict]:
    """Instance map -> COCO annotation dicts (without ``id`` / ``image_id``), in instance order."""
    height, width = instances.shape
    out = []
    for index, slc in enumerate(ndi.find_objects(instances), start=1):
        if slc is None:
            continue
        crop = instances[slc] == index
        y0, x0 = slc[0].start, slc[1].start
        parts = instance_parts(crop)
        segmentation = None
        if not any(p.holes for p in parts):
            local = [p.outer.astype(np.float64).ravel().tolist() for p in parts]
            if _poly_matches(local, crop):
                segmentation = [(p.outer + np.array([x0, y0])).ravel().tolist() for p in parts]
        if segmentation is None:
            full = np.zeros((height, width), bool)
            full[slc] = crop
            segmentation = _rle(full)
        out.append({
            "category_id": int(classes[index]),
            "segmentation": segmentation,
            "area": int(crop.sum()),
            "bbox": [int(x0), int(y0), int(slc[1].stop - x0), int(slc[0].stop - y0)],
            "iscrowd": 0,
        })
    return out


def _segmentation_mask(segmentation, height: int, width: int, where: str):
    """-> ((y0, x0), boolean crop) of one annotation's segmentation."""
    if isinstance(segmentation, list):
        rings = []
        for poly in segmentation:
            coords = np.asarray(poly, dtype=np.float64)
            if coords.ndim != 1 or coords.size < 6 or coords.size % 2:
                raise problem(where, "a polygon needs at least 3 (x, y) points")
            rings.append(coords.reshape(-1, 2))
        if not rings:
            raise problem(where, "empty segmentation")
        # The polygons of one COCO object are a union (no holes): each is its own polygon.
        return polygons_shape([[ring] for ring in rings], height, width, rule="coco")
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise problem(where, f"RLE size {segmentation['size']} is not the image size [{height}, {width}]")
        try:
            if isinstance(segmentation["counts"], list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}
            full = mask_utils.decode(rle).astype(bool)
        except Exception as exc:
            raise problem(where, f"unreadable RLE ({exc})") from None
        rows, cols = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
        if not rows.size:
            return (0, 0), np.zeros((0, 0), bool)
        return (int(rows[0]), int(cols[0])), full[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    raise problem(where, "segmentation must be polygons or RLE")


def decode_annotations(annotations: list[dict], height: int, width: int, category_names: dict[int, str], where: str) -> Labels:
    """COCO annotations of one image -> instance map (ids 1..N in annotation order) and classes."""
    shapes = []
    classes: dict[int, str] = {}
    for ann in annotations:
        if ann.get("iscrowd"):
            continue
        label = f"{where} (annotation {ann.get('id')})"
        origin, crop = _segmentation_mask(ann.get("segmentation"), height, width, label)
        if not crop.any():
            continue
        instance = len(shapes) + 1
        shapes.append((instance, origin, crop))
        classes[instance] = category_names[ann["category_id"]]
    return Labels(instances=paint(shapes, height, width), classes=classes)


class Writer(BaseWriter):
    name = NAME

    def __init__(self, sink, **kwargs):
        super().__init__(sink, **kwargs)
        self.parts: dict[str | None, dict] = {}
        project = self.options.get("project") or {}
        self.header = {
            "info": {
                "description": project.get("name", "Karyo export"),
                "version": self.options.get("karyo_version", ""),
                "year": date.today().year,
                "contributor": "Karyo",
                "date_created": date.today().isoformat(),
            },
            "licenses": [{"id": 1, "name": project.get("licence", ""), "url": ""}],
            "categories": [{"id": c.id, "name": c.name, "supercategory": "nucleus", "color": c.color} for c in self.classes],
        }

    def _part(self, split: str | None) -> dict:
        if split not in self.parts:
            images, anns = self.sink.temp_path(".images"), self.sink.temp_path(".anns")
            self.parts[split] = {
                "images_path": images, "anns_path": anns, "images": open(images, "w"), "anns": open(anns, "w"),
                "image_id": 0, "ann_id": 0,
            }
        return self.parts[split]

    def add(self, sample: ExportSample) -> None:
        self.sink.write(f"images/{sample.name}.png", sample.image_png)
        part = self._part(sample.split)
        part["image_id"] += 1
        height, width = sample.instances.shape
        entry = {"id": part["image_id"], "file_name": f"{sample.name}.png", "width": int(width), "height": int(height), "license": 1}
        if sample.split:
            entry["split"] = sample.split
        part["images"].write(("," if part["image_id"] > 1 else "") + json.dumps(entry))
        for ann in encode_instances(sample.instances, sample.classes):
            part["ann_id"] += 1
            ann = {"id": part["ann_id"], "image_id": part["image_id"], **ann}
            part["anns"].write(("," if part["ann_id"] > 1 else "") + json.dumps(ann, separators=(",", ":")))

    def close(self) -> None:
        if not self.parts:
            self._part(None)
        for split, part in self.parts.items():
            part["images"].close()
            part["anns"].close()
            out = self.sink.temp_path(".json")
            head = json.dumps(self.header)[:-1]
            with open(out, "w") as fh:
                fh.write(head + ',"images":[')
                with open(part["images_path"]) as src:
                    while chunk := src.read(1 << 20):
                        fh.write(chunk)
                fh.write('],"annotations":[')
                with open(part["anns_path"]) as src:
                    while chunk := src.read(1 << 20):
                        fh.write(chunk)
                fh.write("]}\n")
            Path(part["images_path"]).unlink()
            Path(part["anns_path"]).unlink()
            name = f"annotations/instances_{split}.json" if split else "annotations/instances.json"
            self.sink.add_file(name, out)


def _json_files(root: Path) -> list[Path]:
    files = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    return files + sorted(p for p in root.glob("*.json") if p.name != "manifest.json")


def _load_coco(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and {"images", "annotations", "categories"} <= data.keys():
        return data
    return None


def detect(root: Path) -> bool:
    root = Path(root)
    return any(_load_coco(path) is not None for path in _json_files(root))


def read(root: Path, *, manifest: dict | None = None) -> Dataset:
    root = Path(root)
    problems: list[str] = []
    images_on_disk = {**find_images(root), **find_images(root / "images")}
    declared: dict[int, ClassDef] = {}
    items: list[SourceItem] = []
    seen: dict[str, str] = {}
    found_any = False
    for path in _json_files(root):
        data = _load_coco(path)
        if data is None:
            continue
        found_any = True
        rel = path.relative_to(root).as_posix()
        names: dict[int, str] = {}
        for i, cat in enumerate(data["categories"]):
            try:
                cid, cname = int(cat["id"]), str(cat["name"])
            except (KeyError, TypeError, ValueError):
                problems.append(f"{rel}: a category needs an id and a name")
                continue
            names[cid] = cname
            declared.setdefault(cid, ClassDef(cid, cname, str(cat.get("color") or palette_color(len(declared)))))
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if ann.get("category_id") not in names:
                problems.append(f"{rel}: annotation {ann.get('id')} has unknown category id {ann.get('category_id')!r}")
                continue
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        image_ids = set()
        for entry in data["images"]:
            file_name = str(entry.get("file_name", ""))
            stem = Path(file_name).stem
            image_ids.add(entry.get("id"))
            if stem in seen:
                problems.append(f"duplicate names: {file_name} in {rel} and {seen[stem]}")
                continue
            seen[stem] = rel
            candidates = images_on_disk.get(stem, [])
            if not candidates:
                problems.append(f"{rel}: image {file_name} not found (expected images/{Path(file_name).name})")
                continue
            if len(candidates) > 1:
                problems.append(f"duplicate names: {', '.join(p.name for p in candidates)}")
                continue
            anns = sorted(by_image.get(entry.get("id"), []), key=lambda a: (a.get("id") is None, a.get("id") or 0))
            items.append(SourceItem(
                name=stem, image_file=candidates[0].name, origin=f"{rel} ({file_name})",
                load_image=candidates[0].read_bytes,
                load_labels=_loader(anns, names, entry, f"{rel} ({file_name})"),
            ))
        orphans = sorted(str(i) for i in set(by_image) - image_ids)
        if orphans:
            problems.append(f"{rel}: annotations refer to unknown image ids {', '.join(orphans[:10])}")
    if not found_any:
        raise problem(str(root), "no COCO annotation file (annotations/*.json with images, annotations and categories)")
    classes = manifest_classes(manifest) or [declared[k] for k in sorted(declared)]
    return Dataset(format=NAME, items=items, classes=classes, problems=problems, manifest=manifest)


def _loader(anns: list[dict], names: dict[int, str], entry: dict, where: str):
    def load(height: int, width: int) -> Labels:
        declared = (entry.get("height"), entry.get("width"))
        if None not in declared and (int(declared[0]), int(declared[1])) != (height, width):
            raise problem(where, f"declared {declared[1]}x{declared[0]} but the image is {width}x{height}")
        return decode_annotations(anns, height, width, names, where)

    return load
