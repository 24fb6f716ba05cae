"""Label Studio JSON tasks with polygon annotations: ``tasks.json`` (``tasks_<split>.json`` per
split), ``images/NAME.png`` and ``label_config.xml`` (an Image + PolygonLabels labelling config
with the project's classes and colours).

Create a Label Studio project with ``label_config.xml``, put the images where Label Studio can
serve them and import the tasks file. ``data.image`` is ``<image_url_prefix>images/NAME.png``:
the default prefix ``/data/local-files/?d=`` fits Label Studio's local file storage when the
archive is unpacked in ``LOCAL_FILES_DOCUMENT_ROOT`` (pass ``image_url_prefix`` to change it).

Each task has one annotation whose ``result`` holds one ``polygonlabels`` region per nucleus
piece: points in percent of the image size, as Label Studio stores them, on pixel corners (the
outline along the pixel edges, every corner kept). Polygons cannot have holes (filled on
export). Region ids ``k<instance>p<piece>`` (and ``n<instance>[p<k>]`` from Karyo's Label Studio
projects) let the importer put the pieces of one nucleus back together; any other region is one
nucleus. Polygons are read with the pixel-centre rule Karyo's Label Studio sync uses, so a task
reads the same whether it arrives through the sync or through an import. The geometry is
:mod:`backend.common.geometry`.
"""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from backend.common import geometry
from .base import BaseWriter, ClassDef, Dataset, ExportSample, Labels, SourceItem, find_images, manifest_classes, palette_color, problem

NAME = "labelstudio"
DEFAULT_PREFIX = "/data/local-files/?d="
_REGION_TYPES = {"rectanglelabels", "ellipselabels", "keypointlabels", "brushlabels", "polygonlabels", "rectangle",
                 "ellipse", "keypoint", "brush", "polygon"}


def instances_to_results(instances: np.ndarray, classes: dict[int, int], class_names: dict[int, str]) -> list[dict]:
    """Instance map -> Label Studio ``polygonlabels`` results (holes filled), in instance order: the
    reader numbers nuclei in the order of their first region, so export -> import keeps the ids."""
    return geometry.polygon_results(instances, class_of=lambda label: class_names[classes[label]], simplify="none",
                                    order="instance")


def results_to_labels(results: list[dict], height: int, width: int, where: str) -> Labels:
    """Label Studio results of one annotation -> instance map (ids in order of first region).

    Where regions overlap the smaller *piece* wins, so a nucleus lying in another's filled hole
    survives even when its other pieces make it larger in total."""
    groups: dict[str, list] = {}
    names: dict[str, str | None] = {}
    for region in results:
        kind = str(region.get("type", ""))
        if kind not in _REGION_TYPES:
            continue  # choices, text areas, ratings: not nuclei
        if kind not in ("polygonlabels", "polygon"):
            raise problem(where, f"region {region.get('id')!r} is a {kind}; only polygons can be imported")
        value = region.get("value") or {}
        rw, rh = region.get("original_width"), region.get("original_height")
        if rw is not None and rh is not None and (int(rw), int(rh)) != (width, height):
            raise problem(where, f"regions were drawn on a {rw}x{rh} image but the image is {width}x{height}")
        if region.get("image_rotation") not in (None, 0, 0.0):
            raise problem(where, f"region {region.get('id')!r} was drawn on a rotated image")
        try:
            points = np.asarray(value["points"], dtype=np.float64).reshape(-1, 2)
        except (KeyError, TypeError, ValueError):
            raise problem(where, f"region {region.get('id')!r} has no valid points") from None
        if len(points) < 3:
            raise problem(where, f"region {region.get('id')!r} has fewer than 3 points")
        pixels = geometry.from_percent(points, width, height)
        instance = geometry.label_from_region_id(str(region.get("id", "")))
        key = f"k{instance}" if instance is not None else f"r{len(groups)}:{region.get('id')}"
        groups.setdefault(key, []).append([pixels])
        labels = value.get("polygonlabels") or value.get("labels") or []
        names.setdefault(key, str(labels[0]) if labels else None)
    shapes, classes, instance = [], {}, 0
    for key, polygons in groups.items():
        pieces = [geometry.polygons_shape([polygon], height, width, rule="centre") for polygon in polygons]
        pieces = [(origin, crop) for origin, crop in pieces if crop.any()]
        if not pieces:
            continue
        instance += 1
        shapes += [(instance, origin, crop) for origin, crop in pieces]
        if names[key] is not None:
            classes[instance] = names[key]
    return Labels(instances=geometry.paint(shapes, height, width), classes=classes)


class Writer(BaseWriter):
    name = NAME

    def __init__(self, sink, **kwargs):
        super().__init__(sink, **kwargs)
        self.prefix = str(self.options.get("image_url_prefix", DEFAULT_PREFIX))
        self.class_names = {c.id: c.name for c in self.classes}
        self.files: dict[str | None, dict] = {}

    def add(self, sample: ExportSample) -> None:
        self.sink.write(f"images/{sample.name}.png", sample.image_png)
        if sample.split not in self.files:
            path = self.sink.temp_path(".json")
            self.files[sample.split] = {"path": path, "fh": open(path, "w"), "count": 0}
            self.files[sample.split]["fh"].write("[\n")
        out = self.files[sample.split]
        meta = sample.meta or {}
        annotation = {
            "result": instances_to_results(sample.instances, sample.classes, self.class_names),
            "was_cancelled": False,
            "ground_truth": False,
        }
        if meta.get("annotation", {}).get("created_at"):
            annotation["created_at"] = meta["annotation"]["created_at"]
        task = {
            "data": {"image": f"{self.prefix}images/{sample.name}.png", "name": sample.name},
            "annotations": [annotation],
            "meta": {"karyo": {k: meta[k] for k in ("image", "tile", "annotation", "split") if k in meta}},
        }
        out["fh"].write(("," if out["count"] else "") + json.dumps(task, separators=(",", ":")) + "\n")
        out["count"] += 1

    def close(self) -> None:
        self.sink.write("label_config.xml", geometry.labeling_config([(c.name, c.color) for c in self.classes]))
        if not self.files:
            self.sink.write("tasks.json", "[]\n")
        for split, out in self.files.items():
            out["fh"].write("]\n")
            out["fh"].close()
            self.sink.add_file(f"tasks_{split}.json" if split else "tasks.json", out["path"])


def _task_files(root: Path) -> list[tuple[Path, list]]:
    found = []
    for path in sorted(root.glob("*.json")):
        if path.name == "manifest.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "data" in data:
            data = [data]
        if isinstance(data, list) and data and all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in data):
            found.append((path, data))
    return found


def detect(root: Path) -> bool:
    return bool(_task_files(Path(root)))


def _image_ref(task: dict) -> str | None:
    data = task["data"]
    candidates = [data.get("image")] + [v for k, v in data.items() if k != "image"]
    for value in candidates:
        if isinstance(value, str) and value and not value.startswith("data:"):
            parsed = urlparse(value)
            if "d" in parse_qs(parsed.query):
                return Path(unquote(parse_qs(parsed.query)["d"][0])).name
            name = Path(unquote(parsed.path)).name
            if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
                return name
    return None


def _classes_from_config(root: Path) -> list[ClassDef] | None:
    path = root / "label_config.xml"
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return None
    labels = [el for el in tree.iter("Label") if el.get("value")]
    return [ClassDef(i + 1, el.get("value"), el.get("background") or palette_color(i)) for i, el in enumerate(labels)] or None


def read(root: Path, *, manifest: dict | None = None) -> Dataset:
    root = Path(root)
    files = _task_files(root)
    if not files:
        raise problem(str(root), "no Label Studio tasks file (a JSON list of tasks with 'data')")
    images_on_disk = {**find_images(root), **find_images(root / "images")}
    problems, items, seen = [], [], {}
    for path, tasks in files:
        for number, task in enumerate(tasks):
            where = f"{path.name} task {task.get('id', number)}"
            ref = _image_ref(task)
            if ref is None:
                problems.append(f"{where}: no image in data")
                continue
            stem = Path(ref).stem
            if stem in seen:
                problems.append(f"duplicate names: {ref} in {where} and {seen[stem]}")
                continue
            seen[stem] = where
            candidates = images_on_disk.get(stem, [])
            if len(candidates) != 1:
                problems.append(f"{where}: image {ref} not found (expected images/{ref})" if not candidates
                                else f"duplicate names: {', '.join(p.name for p in candidates)}")
                continue
            annotations = [a for a in (task.get("annotations") or task.get("completions") or [])
                           if isinstance(a, dict) and not a.get("was_cancelled")]
            results = annotations[-1].get("result", []) if annotations else None
            items.append(SourceItem(
                name=stem, image_file=candidates[0].name, origin=f"{where} ({ref})",
                load_image=candidates[0].read_bytes,
                load_labels=_loader(results, f"{where} ({ref})"),
            ))
    classes = manifest_classes(manifest) or _classes_from_config(root)
    return Dataset(format=NAME, items=items, classes=classes, problems=problems, manifest=manifest)


def _loader(results, where: str):
    def load(height: int, width: int) -> Labels | None:
        if results is None:
            return None
        return results_to_labels(results, height, width, where)

    return load
