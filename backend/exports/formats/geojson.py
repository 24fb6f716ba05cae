"""QuPath GeoJSON: ``geojson/NAME.geojson`` (one FeatureCollection per image) + ``images/NAME.png``.

One Feature per nucleus, as QuPath writes and reads them ("Export objects as GeoJSON" / drag
the file onto the image):

* ``geometry``: a ``Polygon`` (outer ring + hole rings) or, for a nucleus in several pieces, a
  ``MultiPolygon``; rings closed, vertices on pixel corners in the coordinates of
  ``images/NAME.png``; exterior rings counter-clockwise by the right-hand rule of RFC 7946;
* ``properties.objectType``: ``"annotation"`` (default) or ``"detection"`` (option ``object_type``);
* ``properties.classification``: ``{"name": class name, "color": [r, g, b]}``;
* ``id``: a UUID, derived from the item name and instance id (stable across exports).

Reading also takes QuPath cells (``objectType: "cell"``: the ``nucleusGeometry`` when present),
the older ``colorRGB`` classification colour, a bare list of Features, and ``*.geojson`` files
next to the images. Other object types (tiles, TMA cores) are skipped.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .base import BaseWriter, ClassDef, Dataset, ExportSample, Labels, SourceItem, find_images, hex_to_rgb, manifest_classes, problem, rgb_to_hex
from backend.common.geometry import instance_parts, paint, polygons_shape

NAME = "geojson"
OBJECT_TYPES = ("annotation", "detection")
_NAMESPACE = uuid.UUID("6f1d3c2a-5b7e-4d7f-9a51-6b0f4c1e2d3a")


def nucleus_geometry(feature: dict) -> dict | None:
    """The geometry of a QuPath Feature's nucleus: a detection's or annotation's own geometry, a
    cell's ``nucleusGeometry`` (else its outline); None for object types that are not nuclei."""
    properties = feature.get("properties") or {}
    kind = properties.get("objectType", "annotation")
    geometry = feature.get("geometry")
    if kind == "cell":
        return properties.get("nucleusGeometry") or geometry
    return geometry if kind in OBJECT_TYPES else None


def _close(ring: np.ndarray) -> list[list[int]]:
    # Our outer rings turn clockwise in (x, y) numbers; RFC 7946 wants exteriors counter-clockwise.
    points = ring[::-1].tolist()
    return points + [points[0]]


def instances_to_features(instances: np.ndarray, classes: dict[int, int], class_table: dict[int, ClassDef],
                          *, object_type: str = "annotation", name: str = "") -> list[dict]:
    features = []
    for index, slc in enumerate(ndi.find_objects(instances), start=1):
        if slc is None:
            continue
        parts = instance_parts(instances[slc] == index, offset=(slc[1].start, slc[0].start))
        polygons = [[_close(p.outer)] + [_close(h) for h in p.holes] for p in parts]
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        cls = class_table[classes[index]]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{name}/{index}")),
            "geometry": geometry,
            "properties": {
                "objectType": object_type,
                "classification": {"name": cls.name, "color": hex_to_rgb(cls.color)},
                "isLocked": False,
            },
        })
    return features


def _rings(coordinates, where: str) -> list[np.ndarray]:
    rings = []
    if not isinstance(coordinates, list) or not coordinates:
        raise problem(where, "a Polygon needs at least one ring")
    for ring in coordinates:
        try:
            points = np.asarray(ring, dtype=np.float64)
        except (TypeError, ValueError):
            raise problem(where, "ring coordinates must be numbers") from None
        if points.ndim != 2 or points.shape[1] < 2 or len(points) < 4:
            raise problem(where, "a ring needs at least 4 [x, y] positions")
        points = points[:, :2]
        if np.array_equal(points[0], points[-1]):
            points = points[:-1]
        rings.append(points)
    return rings


def _geometry_polygons(geometry, where: str) -> list[list[np.ndarray]]:
    if not isinstance(geometry, dict):
        raise problem(where, "a feature needs a geometry")
    kind = geometry.get("type")
    if kind == "Polygon":
        return [_rings(geometry.get("coordinates"), where)]
    if kind == "MultiPolygon":
        return [_rings(poly, where) for poly in geometry.get("coordinates") or []]
    raise problem(where, f"{kind} geometries are not nuclei (Polygon or MultiPolygon only)")


def _classification(properties: dict) -> tuple[str | None, str | None]:
    cls = properties.get("classification")
    if isinstance(cls, str):
        return cls, None
    if not isinstance(cls, dict) or not cls.get("name"):
        return None, None
    color = None
    if isinstance(cls.get("color"), list) and len(cls["color"]) >= 3:
        color = rgb_to_hex(cls["color"])
    elif isinstance(cls.get("colorRGB"), int):
        value = cls["colorRGB"] & 0xFFFFFF
        color = rgb_to_hex([(value >> 16) & 255, (value >> 8) & 255, value & 255])
    return str(cls["name"]), color


def features_to_labels(features: list, height: int, width: int, where: str) -> Labels:
    shapes, classes, colors = [], {}, {}
    for number, feature in enumerate(features):
        label = f"{where} feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise problem(label, "not a GeoJSON Feature")
        geometry = nucleus_geometry(feature)
        if geometry is None:
            continue
        origin, crop = polygons_shape(_geometry_polygons(geometry, label), height, width, rule="coco")
        if not crop.any():
            continue
        instance = len(shapes) + 1
        shapes.append((instance, origin, crop))
        name, color = _classification(feature.get("properties") or {})
        if name is not None:
            classes[instance] = name
            if color:
                colors.setdefault(name, color)
    return Labels(instances=paint(shapes, height, width), classes=classes, colors=colors)


def nuclei_to_features(nuclei, class_table: dict[int, ClassDef], *, object_type: str = "annotation", name: str = "",
                       scale: float = 1.0) -> list[dict]:
    """Features from stitched nuclei (``(instance id, x0, y0, boolean crop, class id)``), traced
    crop by crop: no full-size label map. ``scale`` multiplies every vertex (working pixels ->
    level-0 pixels of a slide whose resolution differs from the working one)."""
    features = []
    for index, x0, y0, crop, class_id in nuclei:
        parts = instance_parts(crop, offset=(x0, y0))
        polygons = [[_close(p.outer * scale if scale != 1.0 else p.outer)]
                    + [_close(h * scale if scale != 1.0 else h) for h in p.holes] for p in parts]
        cls = class_table[class_id]
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{name}/{index}")),
            "geometry": ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                         else {"type": "MultiPolygon", "coordinates": polygons}),
            "properties": {
                "objectType": object_type,
                "classification": {"name": cls.name, "color": hex_to_rgb(cls.color)},
                "isLocked": False,
            },
        })
    return features


class Writer(BaseWriter):
    name = NAME

    def add_nuclei(self, name: str, nuclei, *, scale: float = 1.0) -> None:
        """A large image: its GeoJSON only (written from the nuclei's crops; no image file)."""
        features = nuclei_to_features(nuclei, self.class_by_id, object_type=self.object_type, name=name, scale=scale)
        self.sink.write(
            f"geojson/{name}.geojson",
            json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")) + "\n",
        )

    def __init__(self, sink, **kwargs):
        super().__init__(sink, **kwargs)
        self.object_type = self.options.get("object_type", "annotation")

    def add(self, sample: ExportSample) -> None:
        self.sink.write(f"images/{sample.name}.png", sample.image_png)
        features = instances_to_features(
            sample.instances, sample.classes, self.class_by_id, object_type=self.object_type, name=sample.name
        )
        self.sink.write(
            f"geojson/{sample.name}.geojson",
            json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")) + "\n",
        )


def _geojson_files(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for folder in (root / "geojson", root / "images", root):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() == ".geojson" or (folder.name == "geojson" and path.suffix.lower() == ".json"):
                found.setdefault(path.stem, []).append(path)
    return found


def detect(root: Path) -> bool:
    return bool(_geojson_files(Path(root)))


def read(root: Path, *, manifest: dict | None = None) -> Dataset:
    root = Path(root)
    files = _geojson_files(root)
    images = {**find_images(root), **find_images(root / "images")}
    problems, items = [], []
    for stem, paths in sorted(images.items()):
        if len(paths) > 1:
            problems.append(f"duplicate names: {', '.join(p.name for p in paths)}")
            continue
        geo = files.get(stem, [])
        if len(geo) > 1:
            problems.append(f"duplicate names: {', '.join(p.relative_to(root).as_posix() for p in geo)}")
            continue
        if not geo:
            problems.append(f"images/{paths[0].name} has no GeoJSON (expected geojson/{stem}.geojson)")
            continue
        rel = geo[0].relative_to(root).as_posix()
        items.append(SourceItem(
            name=stem, image_file=paths[0].name, origin=rel,
            load_image=paths[0].read_bytes, load_labels=_loader(geo[0], rel),
        ))
    problems += [f"{paths[0].relative_to(root).as_posix()} has no image" for stem, paths in sorted(files.items()) if stem not in images]
    return Dataset(format=NAME, items=items, classes=manifest_classes(manifest), problems=problems, manifest=manifest)


def _loader(path: Path, where: str):
    def load(height: int, width: int) -> Labels:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise problem(where, f"not valid JSON ({exc})") from None
        if isinstance(data, dict) and data.get("type") == "FeatureCollection":
            features = data.get("features") or []
        elif isinstance(data, dict) and data.get("type") == "Feature":
            features = [data]
        elif isinstance(data, list):
            features = data
        else:
            raise problem(where, "expected a FeatureCollection, a Feature or a list of Features")
        return features_to_labels(features, height, width, where)

    return load
