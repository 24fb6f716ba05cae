"""Imports in image coordinates: a QuPath GeoJSON or a COCO file whose nuclei are drawn on an image
that is already in the project becomes annotation versions on the tiles it covers.

Input: a folder or zip with ``geojson/NAME.geojson`` / ``NAME.geojson`` files (one per image, NAME
= the image's name without extension) and/or COCO JSON files (``annotations/*.json`` or
``*.json``: ``images[].file_name`` names the image). An image is matched by checksum when the
folder holds its pixels (``images/NAME.*``, same bytes as the project's image), else by name.

All or nothing: every nucleus of every file is read and checked before anything is written, and
the error lists every offending object: coordinates outside the image, a COCO image or a file that
matches no image of the project, an unknown class, two nuclei whose polygons overlap (by at least
one pixel), a self-intersecting ring (two edges that properly cross).

Written: per matched image, a new version (``imported``) on every tile the file covers (a tile
that holds part of a nucleus; with a Karyo image-layout ``manifest.json``, also the tiles inside
its annotated regions, which may be empty). Each version holds the pixels of every nucleus
inside the tile, with the image-level nucleus ids, so the stitcher (``backend.images.stitching``)
puts each nucleus back together exactly; the ownership rule (the tile holding the centroid) says
which tile's version owns it (class, provenance).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.db import transaction

from backend.common.errors import InvalidUpload
from backend.common.geometry import polygons_shape
from backend.images.models import AnnotationSource, AnnotationStatus, Image, Tile
from backend.images.pixels import level0_per_working_pixel
from backend.images.services import create_annotation
from backend.images.stitching import Nucleus, label_window
from backend.projects.models import Project

from .formats.base import IMAGE_SUFFIXES
from .formats.coco import _json_files, _load_coco
from .formats.geojson import _classification, _geojson_files, _geometry_polygons, nucleus_geometry
from .importing import _remove_files, dataset_folder

log = logging.getLogger(__name__)
MAX_IMAGE_PIXELS = 25_000_000  # overlap checks paint a full-size map
MAX_LISTED = 50


@dataclass
class _Shape:
    where: str
    polygons: list[list[np.ndarray]]  # each: outer ring, then holes (COCO: one ring per polygon)
    class_name: str | None
    rle: dict | None = None


@dataclass
class _Source:
    key: str  # the image stem, or a COCO file_name
    origin: str
    sha256: str | None
    shapes: list[_Shape] = field(default_factory=list)
    format: str = "geojson"


@dataclass
class ImageAnnotationsSummary:
    images: int
    tiles: int
    nuclei: int
    per_image: dict[str, int]
    format: str  # "geojson", "coco" or "coco+geojson"
    project: str

    def as_dict(self) -> dict:
        """In the shape of a data set import's answer (``ImportResultSerializer``): no image is
        created; ``tiles`` and ``annotations`` are the tile versions written."""
        return {"images": self.images, "duplicates": 0, "tiles": self.tiles, "annotations": self.tiles,
                "nuclei": self.nuclei, "format": self.format, "project": self.project, "created_project": False}


def _image_bytes_sha(root: Path, stem: str) -> str | None:
    for folder in (root / "images", root):
        for suffix in IMAGE_SUFFIXES:
            path = folder / f"{stem}{suffix}"
            if path.is_file():
                return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def _read_sources(root: Path, problems: list[str]) -> list[_Source]:
    sources: list[_Source] = []
    for stem, paths in sorted(_geojson_files(root).items()):
        if len(paths) > 1:
            problems.append(f"duplicate GeoJSON files for {stem}: {', '.join(p.name for p in paths)}")
            continue
        rel = paths[0].relative_to(root).as_posix()
        try:
            data = json.loads(paths[0].read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{rel}: not valid JSON ({exc})")
            continue
        features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else (
            [data] if isinstance(data, dict) and data.get("type") == "Feature" else data)
        if not isinstance(features, list):
            problems.append(f"{rel}: expected a FeatureCollection, a Feature or a list of Features")
            continue
        source = _Source(stem, rel, _image_bytes_sha(root, stem))
        for number, feature in enumerate(features):
            where = f"{rel} feature {number}" + (f" (id {feature.get('id')})" if isinstance(feature, dict) and feature.get("id") else "")
            if not isinstance(feature, dict) or feature.get("type") != "Feature":
                problems.append(f"{where}: not a GeoJSON Feature")
                continue
            geometry = nucleus_geometry(feature)
            if geometry is None:
                continue
            try:
                polygons = _geometry_polygons(geometry, where)
            except InvalidUpload as exc:
                problems.append(str(exc.detail))
                continue
            source.shapes.append(_Shape(where, polygons, _classification(feature.get("properties") or {})[0]))
        sources.append(source)
    for path in _json_files(root):
        data = _load_coco(path)
        if data is None:
            continue
        rel = path.relative_to(root).as_posix()
        if not all(isinstance(data[key], list) for key in ("images", "annotations", "categories")):
            problems.append(f"{rel}: images, annotations and categories must be lists")
            continue
        names = {c.get("id"): str(c.get("name")) for c in data["categories"] if isinstance(c, dict)}
        by_image: dict[object, _Source] = {}
        for entry in data["images"]:
            if not isinstance(entry, dict) or "file_name" not in entry:
                problems.append(f"{rel}: an image entry without file_name")
                continue
            stem = Path(str(entry["file_name"])).stem
            source = _Source(str(entry["file_name"]), f"{rel} image {entry['file_name']!r} (id {entry.get('id')})",
                             _image_bytes_sha(root, stem), format="coco")
            by_image[entry.get("id")] = source
            sources.append(source)
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or ann.get("iscrowd"):
                continue
            where = f"{rel} annotation {ann.get('id')}"
            source = by_image.get(ann.get("image_id"))
            if source is None:
                problems.append(f"{where}: image_id {ann.get('image_id')!r} is not in the file's images")
                continue
            if ann.get("category_id") not in names:
                problems.append(f"{where}: category_id {ann.get('category_id')!r} is not in the file's categories")
                continue
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                try:
                    rings = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in seg]
                except (TypeError, ValueError):
                    problems.append(f"{where}: polygon coordinates must be numbers")
                    continue
                if not rings or any(len(r) < 3 for r in rings):
                    problems.append(f"{where}: a polygon needs at least 3 (x, y) points")
                    continue
                source.shapes.append(_Shape(where, [[r] for r in rings], names[ann["category_id"]]))
            elif isinstance(seg, dict) and "counts" in seg:
                source.shapes.append(_Shape(where, [], names[ann["category_id"]], rle=seg))
            else:
                problems.append(f"{where}: segmentation must be polygons or RLE")
    return sources


MAX_RING_VERTICES = 20_000


def _crossing_rings(ring: np.ndarray) -> bool:
    """True when two non-adjacent edges of the ring properly cross (touching at a vertex, as a
    pixel-corner outline may, is not a crossing). Edges are compared in blocks (memory ~ block x n)."""
    a = np.asarray(ring, dtype=np.float64)
    n = len(a)
    if n < 4:
        return False
    p, q = a, np.roll(a, -1, axis=0)

    def orient(o, s, t):
        return np.sign((s[..., 0] - o[..., 0]) * (t[..., 1] - o[..., 1]) - (s[..., 1] - o[..., 1]) * (t[..., 0] - o[..., 0]))

    idx = np.arange(n)
    p2, q2 = p[None, :, :], q[None, :, :]
    for start in range(0, n, 256):
        rows = idx[start : start + 256]
        p1, q1 = p[rows][:, None, :], q[rows][:, None, :]
        crossing = (orient(p1, q1, p2) * orient(p1, q1, q2) < 0) & (orient(p2, q2, p1) * orient(p2, q2, q1) < 0)
        gap = np.abs(rows[:, None] - idx[None, :])
        if (crossing & (gap > 1) & (gap != n - 1)).any():
            return True
    return False


def _match_images(project: Project, sources: list[_Source], problems: list[str]) -> dict[int, tuple[Image, list[_Source]]]:
    images = list(Image.objects.filter(project=project))
    by_sha = {i.sha256: i for i in images}
    by_stem: dict[str, list[Image]] = {}
    for image in images:
        by_stem.setdefault(Path(image.name).stem, []).append(image)
    matched: dict[int, tuple[Image, list[_Source]]] = {}
    for source in sources:
        image = by_sha.get(source.sha256) if source.sha256 else None
        if image is None:
            candidates = by_stem.get(Path(source.key).stem, [])
            if len(candidates) > 1:
                problems.append(f"{source.origin}: {len(candidates)} images of the project are named "
                                f"{Path(source.key).stem!r}; add the image file (matched by checksum)")
                continue
            image = candidates[0] if candidates else None
        if image is None:
            problems.append(f"{source.origin}: no image of project {project.name!r} is named {source.key!r} "
                            "or has the same bytes")
            continue
        matched.setdefault(image.pk, (image, []))[1].append(source)
    return matched


def _nuclei_of(image: Image, sources: list[_Source], resolve, problems: list[str]) -> list[Nucleus]:
    width, height = image.width, image.height
    if width * height > MAX_IMAGE_PIXELS:
        problems.append(f"{image.name}: {width}x{height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit of "
                        "image-coordinate imports")
        return []
    owner = np.zeros((height, width), np.int32)
    nuclei: list[Nucleus] = []
    wheres: list[str] = []
    overlaps: list[str] = []
    for source in sources:
        for shape in source.shapes:
            class_id = resolve(shape.class_name) if shape.class_name is not None else None
            if shape.class_name is not None and class_id is None:
                problems.append(f"{shape.where}: unknown class {shape.class_name!r}")
                continue
            if shape.rle is not None:
                from .formats.coco import _segmentation_mask

                try:
                    (y0, x0), crop = _segmentation_mask(shape.rle, height, width, shape.where)
                except InvalidUpload as exc:
                    problems.append(str(exc.detail))
                    continue
            else:
                points = np.concatenate([r for rings in shape.polygons for r in rings])
                if not np.isfinite(points).all():
                    problems.append(f"{shape.where}: coordinates must be finite numbers")
                    continue
                if any(len(r) > MAX_RING_VERTICES for rings in shape.polygons for r in rings):
                    problems.append(f"{shape.where}: a ring has more than {MAX_RING_VERTICES:,} vertices")
                    continue
                outside = (points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] > width) | (points[:, 1] > height)
                if outside.any():
                    x, y = points[outside][0].tolist()
                    problems.append(f"{shape.where}: {int(outside.sum())} coordinate(s) outside the {width}x{height} "
                                    f"image {image.name!r}, e.g. ({x:g}, {y:g})")
                    continue
                if any(_crossing_rings(r) for rings in shape.polygons for r in rings):
                    problems.append(f"{shape.where}: self-intersecting polygon (two of its edges cross)")
                    continue
                (y0, x0), crop = polygons_shape(shape.polygons, height, width, rule="coco")
            if not crop.any():
                continue
            k = len(nuclei) + 1
            region = owner[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
            hit = np.unique(region[crop & (region > 0)])
            for other in hit.tolist():
                overlaps.append(f"{wheres[other - 1]} and {shape.where} overlap (two nuclei share pixels)")
            region[crop] = k
            wheres.append(shape.where)
            nuclei.append(Nucleus(x0=x0, y0=y0, crop=crop, class_id=class_id or 0, tile_id=0, annotation_id=None,
                                  version=None, source_label=k, tiles=()))
    problems.extend(overlaps)
    if len(nuclei) > 65535:
        problems.append(f"{image.name}: {len(nuclei)} nuclei; a label map holds at most 65535")
    return nuclei


def _covered_tiles(image: Image, tiles: list[Tile], nuclei: list[Nucleus], regions: list[dict] | None) -> list[Tile]:
    def hits(tile: Tile, x0: int, y0: int, x1: int, y1: int) -> bool:
        return tile.x < x1 and x0 < tile.x + tile.w and tile.y < y1 and y0 < tile.y + tile.h

    covered = []
    for tile in tiles:
        if any(hits(tile, *n.bbox) for n in nuclei) or any(
            hits(tile, r["x"], r["y"], r["x"] + r["w"], r["y"] + r["h"]) for r in regions or []
        ):
            covered.append(tile)
    return covered


def import_image_annotations(*, project: Project, path: Path, author=None, status: str = AnnotationStatus.REVIEWED,
                             label: str | None = None) -> ImageAnnotationsSummary:
    """Check everything in ``path`` (folder or zip), then write the versions in one transaction."""
    label = label or Path(path).name
    classes = project.nucleus_classes
    by_name = {str(c["name"]): int(c["id"]) for c in classes}
    default_class = int(classes[0]["id"]) if classes else 1

    def resolve(name):
        return by_name.get(str(name))

    problems: list[str] = []
    with dataset_folder(Path(path), label=label) as root:
        manifest = None
        if (root / "manifest.json").is_file():
            try:
                manifest = json.loads((root / "manifest.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                manifest = None
        sources = _read_sources(root, problems)
    if not sources and not problems:
        problems.append("no QuPath GeoJSON or COCO file found")
    regions_by_name = {str(i.get("name")): i.get("annotated_regions") for i in (manifest or {}).get("images") or []
                       if isinstance(i, dict)}
    matched = _match_images(project, sources, problems)
    plans = []
    for image, image_sources in matched.values():
        if level0_per_working_pixel(image, working_mpp=project.working_mpp) != 1.0:
            problems.append(f"{image.name}: its resolution differs from the project's working one; "
                            "image-coordinate imports need the two to coincide")
            continue
        nuclei = _nuclei_of(image, image_sources, resolve, problems)
        plans.append((image, image_sources, nuclei))
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise InvalidUpload(f"{len(problems)} problem(s) in {label}, nothing imported: " + "; ".join(shown),
                            code="invalid_annotations", details=problems)

    written: list[str] = []
    per_image: dict[str, int] = {}
    tiles_written = 0
    try:
        with transaction.atomic():
            for image, image_sources, nuclei in plans:
                tiles = list(Tile.objects.filter(image=image).order_by("y", "x", "id"))
                regions = next((regions_by_name.get(Path(s.key).stem) for s in image_sources
                                if regions_by_name.get(Path(s.key).stem)), None)
                ids = list(range(1, len(nuclei) + 1))
                for tile in _covered_tiles(image, tiles, nuclei, regions):
                    window = label_window(nuclei, x=tile.x, y=tile.y, w=tile.w, h=tile.h, ids=ids)
                    present = [int(v) for v in np.unique(window) if v]
                    tile_classes = {str(k): nuclei[k - 1].class_id or default_class for k in present}
                    annotation, _ = create_annotation(
                        tile=tile, instances=window, author=author, source=AnnotationSource.IMPORTED, status=status,
                        classes=tile_classes or None,
                    )
                    written.append(annotation.mask.name)
                    tiles_written += 1
                per_image[image.name] = len(nuclei)
    except BaseException:
        _remove_files(written, [])
        raise
    return ImageAnnotationsSummary(images=len(plans), tiles=tiles_written, nuclei=sum(per_image.values()),
                                   per_image=per_image, format="+".join(sorted({s.format for s in sources})),
                                   project=project.name)
