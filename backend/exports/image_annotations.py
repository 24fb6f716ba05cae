"""Imports in image coordinates: a QuPath GeoJSON or a COCO file whose nuclei are drawn on an image
that is already in the project becomes annotation versions on the tiles it covers.

Input: a folder or zip with ``geojson/NAME.geojson`` / ``NAME.geojson`` files (one per image, NAME
= the image's name without extension) and/or COCO JSON files (``annotations/*.json`` or
``*.json``: ``images[].file_name`` names the image). An image is matched by checksum when the
folder holds its pixels (``images/NAME.*``, same bytes as the project's image), else by name.

Coordinates are the image's level-0 pixels (what QuPath writes, and what Karyo's image-layout
exports write). On an image whose resolution differs from the project's working one they are
scaled to working pixels (polygons: vertices divided by the level-0-per-working ratio, put back on
integers within 1e-6 px; RLE: resampled nearest-neighbour, the inverse of the export's
``upsample_labels``), so export -> import -> export gives the same nuclei. A Karyo
``manifest.json`` whose ``images[].pixels.level0_per_pixel`` says a file is in other pixels (older
exports wrote working pixels) is followed, for the nuclei and the annotated regions alike.

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
import math
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


def _snap(points: np.ndarray) -> np.ndarray:
    """Vertices within 1e-6 px of an integer put on it (pixel corners scaled there and back)."""
    near = np.round(points)
    return np.where(np.abs(points - near) < 1e-6, near, points)


def _resample_crop(y0: int, x0: int, crop: np.ndarray, factor: float, height: int, width: int):
    """A boolean crop at (y0, x0) of a file's pixel grid -> the same shape in working pixels
    (``factor`` working pixels per file pixel), nearest neighbour: working pixel (r, c) takes file
    pixel (floor((r + 0.5) / factor), floor((c + 0.5) / factor)), the inverse of the exporter's
    ``upsample_labels``."""
    r0, r1 = max(0, math.floor(y0 * factor)), min(height, math.ceil((y0 + crop.shape[0]) * factor))
    c0, c1 = max(0, math.floor(x0 * factor)), min(width, math.ceil((x0 + crop.shape[1]) * factor))
    if r1 <= r0 or c1 <= c0:
        return (r0, c0), np.zeros((0, 0), bool)
    rows = np.floor((np.arange(r0, r1) + 0.5) / factor).astype(np.int64) - y0
    cols = np.floor((np.arange(c0, c1) + 0.5) / factor).astype(np.int64) - x0
    inside_r = (rows >= 0) & (rows < crop.shape[0])
    inside_c = (cols >= 0) & (cols < crop.shape[1])
    out = crop[np.clip(rows, 0, crop.shape[0] - 1)[:, None], np.clip(cols, 0, crop.shape[1] - 1)[None, :]]
    return (r0, c0), out & inside_r[:, None] & inside_c[None, :]


def _nuclei_of(image: Image, sources: list[_Source], resolve, problems: list[str], *, scale: float = 1.0,
               file_scale: float = 1.0) -> list[Nucleus]:
    """The nuclei of ``sources`` in working pixels of ``image``. The files' coordinates are pixels
    of ``file_scale`` level-0 pixels each (1.0: level 0, what QuPath writes; a Karyo manifest says
    otherwise), checked against the image's size in those pixels; ``scale``: level-0 pixels per
    working pixel."""
    file_width, file_height = round(image.width / file_scale), round(image.height / file_scale)
    width, height = max(1, int(image.width / scale)), max(1, int(image.height / scale))
    factor = file_scale / scale  # working pixels per file pixel
    if abs(factor - 1.0) < 1e-9:
        factor = 1.0
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
                    (y0, x0), crop = _segmentation_mask(shape.rle, file_height, file_width, shape.where)
                except InvalidUpload as exc:
                    problems.append(str(exc.detail))
                    continue
                if factor != 1.0 and crop.any():
                    (y0, x0), crop = _resample_crop(y0, x0, crop, factor, height, width)
            else:
                points = np.concatenate([r for rings in shape.polygons for r in rings])
                if not np.isfinite(points).all():
                    problems.append(f"{shape.where}: coordinates must be finite numbers")
                    continue
                if any(len(r) > MAX_RING_VERTICES for rings in shape.polygons for r in rings):
                    problems.append(f"{shape.where}: a ring has more than {MAX_RING_VERTICES:,} vertices")
                    continue
                outside = ((points[:, 0] < 0) | (points[:, 1] < 0) | (points[:, 0] > file_width)
                           | (points[:, 1] > file_height))
                if outside.any():
                    x, y = points[outside][0].tolist()
                    problems.append(f"{shape.where}: {int(outside.sum())} coordinate(s) outside the {file_width}x"
                                    f"{file_height} image {image.name!r}, e.g. ({x:g}, {y:g})")
                    continue
                if any(_crossing_rings(r) for rings in shape.polygons for r in rings):
                    problems.append(f"{shape.where}: self-intersecting polygon (two of its edges cross)")
                    continue
                polygons = shape.polygons if factor == 1.0 else [[_snap(r * factor) for r in rings]
                                                                 for rings in shape.polygons]
                (y0, x0), crop = polygons_shape(polygons, height, width, rule="coco")
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


def _tile_rect(tile: Tile, scale: float) -> tuple[int, int, int, int]:
    """(x, y, w, h) of ``tile`` in working pixels of its image (the stitcher's grid)."""
    return round(tile.x / scale), round(tile.y / scale), int(tile.w), int(tile.h)


def _file_scale(entry: dict) -> float:
    """Level-0 pixels per pixel of an image's files, from its manifest entry (1.0 without one)."""
    try:
        value = float((entry.get("pixels") or {}).get("level0_per_pixel", 1.0))
    except (TypeError, ValueError, AttributeError):
        return 1.0
    return value if math.isfinite(value) and value > 0 else 1.0


def _covered_tiles(image: Image, tiles: list[Tile], nuclei: list[Nucleus], regions: list[dict] | None, *,
                   scale: float = 1.0, region_scale: float = 1.0) -> list[Tile]:
    """The tiles a nucleus (working pixels) or an annotated region (pixels of ``region_scale``
    level-0 pixels each, as the manifest wrote them) reaches."""
    f = region_scale / scale
    boxes = [n.bbox for n in nuclei] + [
        (r["x"] * f, r["y"] * f, (r["x"] + r["w"]) * f, (r["y"] + r["h"]) * f) for r in regions or []]

    def hits(rect, x0, y0, x1, y1) -> bool:
        tx, ty, tw, th = rect
        return tx < x1 and x0 < tx + tw and ty < y1 and y0 < ty + th

    return [tile for tile in tiles if any(hits(_tile_rect(tile, scale), *box) for box in boxes)]


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
    manifest_images = {str(i.get("name")): i for i in (manifest or {}).get("images") or [] if isinstance(i, dict)}
    matched = _match_images(project, sources, problems)
    plans = []
    for image, image_sources in matched.values():
        # Coordinates are level-0 pixels of the image (QuPath's); a Karyo manifest may say its files
        # are in other pixels (``images[].pixels.level0_per_pixel``: older exports wrote working ones).
        scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
        entry = next((manifest_images[Path(s.key).stem] for s in image_sources if Path(s.key).stem in manifest_images), {})
        file_scale = _file_scale(entry)
        nuclei = _nuclei_of(image, image_sources, resolve, problems, scale=scale, file_scale=file_scale)
        plans.append((image, image_sources, nuclei, scale, file_scale, entry.get("annotated_regions")))
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise InvalidUpload(f"{len(problems)} problem(s) in {label}, nothing imported: " + "; ".join(shown),
                            code="invalid_annotations", details=problems)

    written: list[str] = []
    per_image: dict[str, int] = {}
    tiles_written = 0
    try:
        with transaction.atomic():
            for image, _sources, nuclei, scale, file_scale, regions in plans:
                tiles = list(Tile.objects.filter(image=image).order_by("y", "x", "id"))
                ids = list(range(1, len(nuclei) + 1))
                for tile in _covered_tiles(image, tiles, nuclei, regions if isinstance(regions, list) else None,
                                           scale=scale, region_scale=file_scale):
                    x, y, w, h = _tile_rect(tile, scale)
                    window = label_window(nuclei, x=x, y=y, w=w, h=h, ids=ids)
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
