"""Curated data set exports (Celery, queue ``cpu``) and imports of uploaded archives.

An export takes, per tile, the annotation version chosen by the filters, writes the items into
a zip on disk through the format's writer, adds the dataset card (``README.md``) and
``manifest.json`` (provenance + sha256 of every file), then streams the zip into storage.
Layout ``image`` (the default): one item per image, its tiles' versions stitched into whole
nuclei (``backend.images.stitching``); one image is in memory at a time, and images over
``IMAGE_LAYOUT_MAX_PIXELS`` are left out (listed in the manifest). Layout ``tile``: one item per
tile, one tile in memory at a time.
"""
from __future__ import annotations

import logging
import math
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time as dtime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Callable

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from backend.common.errors import InvalidUpload, KaryoError
from backend.common.jobs import enqueue_on_commit
from backend.common.storage import encode_png, read_label_map
from backend.images.models import AnnotationSource, AnnotationStatus, Image
from backend.images.pixels import image_mpp, level0_per_working_pixel, read_image_region, tile_png
from backend.images.stitching import TileLabels, annotated_regions, label_window, stitch
from backend.projects.models import Project

from .archive import ZipSink, work_dir
from .formats import FORMAT_NAMES, LOSSES, ClassDef, ExportSample, PlanItem, get_format, palette_color, safe_name
from .importing import ImportSummary, import_path
from .models import Export, ExportStatus
from .provenance import dataset_card, lineage, prediction_changes
from .selectors import STATUS_FILTERS, annotation_history, export_annotations, predictions_by_id
from .splits import SPLIT_NAMES, seeded_split

log = logging.getLogger(__name__)
FILTER_KEYS = {"status", "annotators", "date_from", "date_to", "classes", "images", "split", "options"}
OPTION_KEYS = {"object_type", "image_url_prefix", "tissue", "layout"}
LAYOUTS = ("image", "tile")
# An image-layout item is one whole image with its full-size label map in memory; above this many
# pixels the image is left out (the manifest lists it and why); use layout "tile" for it.
IMAGE_LAYOUT_MAX_PIXELS = 25_000_000
PANNUKE_PATCH = 256


def _invalid(message: str) -> KaryoError:
    return KaryoError(message, code="invalid_filters")


def _parse_when(value) -> str | None:
    """A plain date (the whole day) or an ISO date-time (UTC when naive) -> ISO string."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        if len(text) == 10:
            day = parse_date(text)
            if day is not None:
                return day.isoformat()
        else:
            parsed = parse_datetime(text)
            if parsed is not None:
                if timezone.is_naive(parsed):
                    parsed = timezone.make_aware(parsed, dt_timezone.utc)
                return parsed.isoformat()
    except ValueError:
        pass
    raise _invalid(f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time")


def _bound(value: str | None, *, end: bool) -> datetime | None:
    """Filter bound: a date means the whole day (date_to inclusive)."""
    if value is None:
        return None
    if "T" in value:
        return datetime.fromisoformat(value)
    day = date.fromisoformat(value) + (timedelta(days=1) if end else timedelta())
    return datetime.combine(day, dtime.min, tzinfo=dt_timezone.utc)


def _frozen_split_available(project: Project) -> bool:
    image_fields = {f.name for f in Image._meta.get_fields()}
    return "split" in image_fields and getattr(project, "validation_frozen_at", None) is not None


def normalize_filters(*, project: Project, raw: dict | None) -> dict:
    """Check export filters and options and return them in a canonical form (what is stored)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - FILTER_KEYS)
    if unknown:
        raise _invalid(f"unknown filter(s) {', '.join(unknown)}; use {', '.join(sorted(FILTER_KEYS))}")
    status = raw.get("status") or "reviewed"
    if status not in STATUS_FILTERS:
        raise _invalid(f"status must be one of {', '.join(STATUS_FILTERS)}")
    annotators = [str(a) for a in raw.get("annotators") or []]
    missing = sorted(set(annotators) - set(get_user_model().objects.filter(username__in=annotators).values_list("username", flat=True)))
    if missing:
        raise _invalid(f"no user named {', '.join(missing)}")
    date_from, date_to = _parse_when(raw.get("date_from")), _parse_when(raw.get("date_to"))

    by_name = {c["name"]: c["id"] for c in project.nucleus_classes}
    class_ids = []
    for value in raw.get("classes") or []:
        if isinstance(value, int) and value in by_name.values():
            class_ids.append(value)
        elif str(value) in by_name:
            class_ids.append(by_name[str(value)])
        else:
            raise _invalid(f"unknown nucleus class {value!r}; the project has {', '.join(by_name)}")

    image_ids = []
    for value in raw.get("images") or []:
        query = Image.objects.filter(project=project)
        if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            found = list(query.filter(pk=int(value)).values_list("pk", flat=True))
        else:
            found = list(query.filter(name=str(value)).values_list("pk", flat=True)) or list(
                query.filter(name__startswith=f"{value}.").values_list("pk", flat=True)
            )
        if not found:
            raise _invalid(f"no image {value!r} in project {project.name!r}")
        image_ids.extend(found)

    split = raw.get("split")
    if split in (None, "", False):
        split = None
    elif split == "frozen":
        if not _frozen_split_available(project):
            raise _invalid("this project has no frozen split yet (it is frozen by the first training run); "
                           "use a seeded split instead")
        split = {"mode": "frozen"}
    elif isinstance(split, dict):
        fractions = split.get("fractions") or {k: split[k] for k in SPLIT_NAMES if k in split}
        if not isinstance(fractions, dict):
            raise _invalid('split fractions are an object like {"train": 0.7, "val": 0.3}')
        try:
            fractions = {str(k): float(v) for k, v in fractions.items() if float(v) > 0}
        except (TypeError, ValueError):
            raise _invalid("split fractions must be numbers") from None
        if any(not math.isfinite(v) or v > 1 for v in fractions.values()):
            raise _invalid("split fractions are numbers between 0 and 1 (e.g. 0.7)")
        if not fractions or any(k not in SPLIT_NAMES for k in fractions):
            raise _invalid("split needs positive fractions for train, val and/or test")
        seed = split.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)  # recorded, so the split can be reproduced
        if isinstance(seed, bool) or not isinstance(seed, int | str):
            raise _invalid("split seed must be an integer")
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise _invalid("split seed must be an integer") from None
        if not 0 <= seed < 2**32:
            raise _invalid("split seed must lie between 0 and 4294967295")
        total = sum(fractions.values())
        split = {
            "mode": "seeded",
            "fractions": {k: round(fractions[k] / total, 6) for k in SPLIT_NAMES if k in fractions},
            "seed": seed,
            "stratify": bool(split.get("stratify", False)),
        }
    else:
        raise _invalid('split is null, "frozen" or {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 1, "stratify": false}')

    if not isinstance(raw.get("options") or {}, dict):
        raise _invalid('options is an object, e.g. {"object_type": "annotation"}')
    options = dict(raw.get("options") or {})
    bad = sorted(set(options) - OPTION_KEYS)
    if bad:
        raise _invalid(f"unknown option(s) {', '.join(bad)}; use {', '.join(sorted(OPTION_KEYS))}")
    if options.get("object_type", "annotation") not in ("annotation", "detection"):
        raise _invalid('object_type is "annotation" or "detection"')
    if options.get("layout", "image") not in LAYOUTS:
        raise _invalid('layout is "image" (one item per image, nuclei stitched across tiles) or "tile" (one item per tile)')
    return {
        "status": status,
        "annotators": sorted(set(annotators)),
        "date_from": date_from,
        "date_to": date_to,
        "classes": sorted(set(class_ids)),
        "images": sorted(set(image_ids)),
        "split": split,
        "options": {k: str(v) for k, v in options.items()},
    }


def selected_annotations(*, project: Project, filters: dict):
    return export_annotations(
        project=project,
        status=filters["status"],
        annotators=filters["annotators"],
        created_from=_bound(filters["date_from"], end=False),
        created_before=_bound(filters["date_to"], end=True),
        image_ids=filters["images"],
    )


def create_export(*, project: Project, format: str, filters: dict | None, created_by=None) -> Export:
    """Validate and record an export (status queued); :func:`start_export` also enqueues it."""
    if format not in FORMAT_NAMES:
        raise KaryoError(f"unknown format {format!r}; use one of {', '.join(FORMAT_NAMES)}", code="invalid_format")
    normalized = normalize_filters(project=project, raw=filters)
    if not selected_annotations(project=project, filters=normalized).exists():
        raise KaryoError(f"nothing to export: no annotations match the filters (status {normalized['status']})",
                         code="empty_export")
    return Export.objects.create(project=project, format=format, filters=normalized, created_by=created_by)


@transaction.atomic
def start_export(*, project: Project, format: str, filters: dict | None, created_by=None) -> Export:
    """Record an export and run it on the ``cpu`` queue once the row is committed."""
    export = create_export(project=project, format=format, filters=filters, created_by=created_by)
    enqueue_on_commit("karyo.cpu.export_dataset", export.pk)  # exports.tasks.export_dataset
    return export


def _class_table(project: Project, annotations) -> list[ClassDef]:
    table = [ClassDef(int(c["id"]), str(c["name"]), str(c["color"])) for c in project.nucleus_classes]
    known = {c.id for c in table}
    extra = sorted({int(v) for a in annotations for v in (a.classes or {}).values()} - known)
    table += [ClassDef(cid, f"class_{cid}", palette_color(len(table) + i)) for i, cid in enumerate(extra)]
    return sorted(table, key=lambda c: c.id)


def _names(annotations) -> list[str]:
    """Item names: the image stem, plus _x<x>_y<y> when the tile is not the whole image."""
    stems: dict[str, set[int]] = {}
    for a in annotations:
        stems.setdefault(safe_name(Path(a.tile.image.name).stem), set()).add(a.tile.image_id)
    names = []
    for a in annotations:
        tile, image = a.tile, a.tile.image
        stem = safe_name(Path(image.name).stem)
        if len(stems[stem]) > 1:
            stem = f"{stem}-{image.pk}"
        whole = (tile.x, tile.y, tile.w, tile.h) == (0, 0, image.width, image.height)
        names.append(stem if whole else f"{stem}_x{tile.x}_y{tile.y}")
    return names


def _splits(project: Project, annotations, filters: dict, default_class: int) -> dict[int, str] | None:
    split = filters["split"]
    if split is None:
        return None
    image_ids = sorted({a.tile.image_id for a in annotations})
    if split["mode"] == "frozen":
        frozen = dict(Image.objects.filter(pk__in=image_ids).values_list("pk", "split"))
        return {i: frozen.get(i) or "unassigned" for i in image_ids}
    strata = None
    if split["stratify"]:
        per_image: dict[int, Counter] = {}
        for a in annotations:
            counts = per_image.setdefault(a.tile.image_id, Counter())
            listed = {int(k): int(v) for k, v in (a.classes or {}).items()}
            counts.update(listed.values())
            counts[default_class] += max(a.nucleus_count - len(listed), 0)
        strata = {
            i: (str(per_image[i].most_common(1)[0][0]) if per_image.get(i) and sum(per_image[i].values()) else "none")
            for i in image_ids
        }
    return seeded_split(image_ids=image_ids, fractions=split["fractions"], seed=split["seed"], strata=strata)


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def _sample(annotation, name: str, split: str | None, *, default_class: int, keep_classes: set[int]):
    """Read one tile and its annotation from storage -> (ExportSample, raw label map)."""
    tile = annotation.tile
    png = tile_png(tile)
    raw = read_label_map(annotation.mask.name)
    listed = {int(k): int(v) for k, v in (annotation.classes or {}).items()}
    ids = np.unique(raw)
    ids = ids[ids > 0]
    class_of = {int(i): listed.get(int(i), default_class) for i in ids}
    keep = [i for i in ids.tolist() if not keep_classes or class_of[i] in keep_classes]
    lut = np.zeros(int(raw.max(initial=0)) + 1, np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    instances = lut[raw]
    classes = {new: class_of[old] for new, old in enumerate(keep, start=1)}
    return ExportSample(name=name, image_png=png, instances=instances, classes=classes, split=split), raw


@dataclass
class _ImageGroup:
    """One image of an image-layout export: its selected versions and the items cut from it."""

    image: Image
    name: str
    split: str | None
    scale: float  # level-0 pixels per working pixel (1.0 unless the image has another resolution)
    width: int  # working pixels
    height: int
    annotations: list
    items: list[tuple[PlanItem, int, int]]  # (plan item, x, y): the whole image, or PanNuke patches
    polygons_only: bool = False  # over the pixel limit, GeoJSON: features traced nucleus by nucleus, no image file
    level0: bool = False  # written at the image's level-0 size (its resolution differs from the working one)

    @property
    def out_scale(self) -> float:
        """Level-0 pixels per pixel of the written files (GeoJSON vertices, label maps, images)."""
        return 1.0 if self.level0 or self.polygons_only else self.scale


def _image_plan(project: Project, annotations, split_of: dict | None, *, pannuke: bool, polygons: bool = False):
    """Group the selected versions by image -> (groups, plan, images left out and why)."""
    by_image: dict[int, list] = {}
    for a in annotations:
        by_image.setdefault(a.tile.image_id, []).append(a)
    stems: dict[str, set[int]] = {}
    for anns in by_image.values():
        stems.setdefault(safe_name(Path(anns[0].tile.image.name).stem), set()).add(anns[0].tile.image_id)
    groups, plan, left_out = [], [], []
    for image_id, anns in by_image.items():
        image = anns[0].tile.image
        stem = safe_name(Path(image.name).stem)
        name = f"{stem}-{image.pk}" if len(stems[stem]) > 1 else stem
        scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
        width, height = max(1, int(image.width / scale)), max(1, int(image.height / scale))
        split = split_of.get(image_id) if split_of else None
        # An image whose resolution differs from the working one is written at its level-0 size
        # (coordinates QuPath and COCO tools read on the source image); PanNuke patches stay in
        # working pixels (the resolution a model is trained at). When its level-0 size is over the
        # limit, GeoJSON is traced nucleus by nucleus in level-0 pixels (no image file) and the other
        # formats are written in working pixels (manifest images[].pixels says so).
        level0 = scale != 1.0 and not pannuke and image.width * image.height <= IMAGE_LAYOUT_MAX_PIXELS
        over = width * height > IMAGE_LAYOUT_MAX_PIXELS
        if polygons and (over or (scale != 1.0 and not level0)):
            item = PlanItem(name, split, image.width if scale != 1.0 else width, image.height if scale != 1.0 else height)
            plan.append(item)
            groups.append(_ImageGroup(image, name, split, scale, width, height, anns, [(item, 0, 0)], polygons_only=True))
            continue
        if over:
            left_out.append({
                "image": {"id": image.pk, "name": image.name, "width": image.width, "height": image.height},
                "tiles": len(anns),
                "reason": f"{width}x{height} pixels is over the image-layout limit of {IMAGE_LAYOUT_MAX_PIXELS:,} "
                          "pixels (a full-size label map); export it with layout \"tile\"",
            })
            continue
        if pannuke and (width > PANNUKE_PATCH or height > PANNUKE_PATCH):
            rects = [(round(a.tile.x / scale), round(a.tile.y / scale), a.tile.w, a.tile.h) for a in anns]
            items = []
            for y in range(0, height, PANNUKE_PATCH):
                for x in range(0, width, PANNUKE_PATCH):
                    w, h = min(PANNUKE_PATCH, width - x), min(PANNUKE_PATCH, height - y)
                    if any(tx < x + w and x < tx + tw and ty < y + h and y < ty + th for tx, ty, tw, th in rects):
                        items.append((PlanItem(f"{name}_x{x}_y{y}", split, w, h), x, y))
        elif level0:
            items = [(PlanItem(name, split, image.width, image.height), 0, 0)]
        else:
            items = [(PlanItem(name, split, width, height), 0, 0)]
        plan.extend(item for item, _, _ in items)
        groups.append(_ImageGroup(image, name, split, scale, width, height, anns, items, level0=level0))
    if not groups:
        raise KaryoError("nothing to export in the image layout: every selected image is over the pixel limit "
                         f"({IMAGE_LAYOUT_MAX_PIXELS:,}); use layout \"tile\"", code="empty_export")
    return groups, plan, left_out


def _relabel(instances: np.ndarray, classes: dict[int, int]) -> tuple[np.ndarray, dict[int, int]]:
    ids = np.unique(instances)
    ids = ids[ids > 0]
    lut = np.zeros(int(instances.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[instances], {new: classes[int(old)] for new, old in enumerate(ids.tolist(), start=1)}


def _image_samples(group: _ImageGroup, *, project: Project, writer, default_class: int, keep_classes: set[int],
                   class_names, chains, predictions, prediction_ids):
    """Stitch one image's tiles (backend.images.stitching) -> (samples, per-tile metas, image meta)."""
    tiles, raws = [], {}
    for a in group.annotations:
        raw = read_label_map(a.mask.name)
        raws[a.pk] = raw
        listed = {int(k): int(v) for k, v in (a.classes or {}).items()}
        whole = bool(a.context_mask)  # the nuclei the tile owns, whole (issue 12): pasted as they are
        tiles.append(TileLabels(
            tile_id=a.tile_id, x=round(a.tile.x / group.scale), y=round(a.tile.y / group.scale),
            instances=read_label_map(a.context_mask.name) if whole else raw, classes=listed, annotation_id=a.pk,
            version=a.version, shared_ids=a.source == AnnotationSource.IMPORTED,
            whole=whole, ox=a.context_x if whole else 0, oy=a.context_y if whole else 0, tile_w=a.tile.w, tile_h=a.tile.h,
        ))
    nuclei = [n for n in stitch(tiles, default_class=default_class) if not keep_classes or n.class_id in keep_classes]
    classes = {k: n.class_id for k, n in enumerate(nuclei, start=1)}
    samples = []
    if group.polygons_only:
        # Level-0 vertices: drop the file onto the slide in QuPath.
        writer.add_nuclei(group.name, [(k, n.x0, n.y0, n.crop, n.class_id) for k, n in enumerate(nuclei, start=1)],
                          scale=group.scale)
    elif group.level0:
        # The stitched map (working pixels) resampled nearest-neighbour to the image's level-0 size,
        # with the image's level-0 pixels: every format then writes level-0 coordinates.
        instances = upsample_labels(label_window(nuclei, x=0, y=0, w=group.width, h=group.height),
                                    width=group.image.width, height=group.image.height, scale=group.scale)
        rgb = read_image_region(group.image, x=0, y=0, w=group.image.width, h=group.image.height,
                                working_mpp=image_mpp(group.image, working_mpp=project.working_mpp))
    else:
        instances = label_window(nuclei, x=0, y=0, w=group.width, h=group.height)
        rgb = read_image_region(group.image, x=0, y=0, w=group.width, h=group.height, working_mpp=project.working_mpp)
    for item, x, y in [] if group.polygons_only else group.items:
        if (item.width, item.height) == instances.shape[::-1]:
            samples.append(ExportSample(name=item.name, image_png=encode_png(np.ascontiguousarray(rgb)),
                                        instances=instances, classes=classes, split=item.split))
            continue
        crop, crop_classes = _relabel(instances[y : y + item.height, x : x + item.width], classes)
        samples.append(ExportSample(name=item.name, split=item.split, instances=crop, classes=crop_classes,
                                    image_png=encode_png(np.ascontiguousarray(rgb[y : y + item.height, x : x + item.width]))))
    owned: dict[int, dict[int, int]] = {}
    for k, n in enumerate(nuclei, start=1):
        owned.setdefault(n.tile_id, {})[k] = n.class_id
    metas = []
    for a in group.annotations:
        pseudo = ExportSample(name=group.name, image_png=b"", instances=raws[a.pk], classes=owned.get(a.tile_id, {}),
                              split=group.split)
        meta = _tile_meta(a, pseudo, chains[a.pk], predictions.get(prediction_ids[a.pk]), raws[a.pk], class_names)
        meta["nuclei_owned"] = meta.pop("nuclei")
        metas.append(meta)
    image_meta = {
        "name": group.name,
        "split": group.split,
        "image": {"id": group.image.pk, "name": group.image.name, "sha256": group.image.sha256,
                  "width": group.image.width, "height": group.image.height},
        "pixels": _pixels_meta(group),
        "annotated_regions": _regions_meta(group, tiles),
        "label_map": not group.polygons_only,
        "image_file": None if group.polygons_only else f"images/{group.name}.png",
        "nuclei": len(nuclei),
        "classes": dict(sorted(Counter(class_names[c] for c in classes.values()).items())),
        "items": [item.name for item, _, _ in group.items],
        "class_ids": classes,  # taken out by the caller (counts), not written
    }
    return samples, metas, image_meta


def upsample_labels(labels: np.ndarray, *, width: int, height: int, scale: float) -> np.ndarray:
    """A working-pixel label map at ``width`` x ``height`` level-0 pixels (``scale`` level-0 pixels
    per working pixel), nearest neighbour: level-0 pixel (r, c) takes working pixel
    (floor((r + 0.5) / scale), floor((c + 0.5) / scale)). At an integer scale each working pixel
    becomes a scale x scale block, so polygons traced on the result are the working ones times scale."""
    rows = np.minimum(((np.arange(height) + 0.5) / scale).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / scale).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _pixels_meta(group: _ImageGroup) -> dict:
    """The pixel grid of the files written for ``group`` and the working grid its nuclei live in."""
    if group.level0 or (group.polygons_only and group.scale != 1.0):
        width, height = group.image.width, group.image.height
    else:
        width, height = group.width, group.height
    return {"width": width, "height": height, "level0_per_pixel": group.out_scale,
            "working": {"width": group.width, "height": group.height, "level0_per_pixel": group.scale}}


def _regions_meta(group: _ImageGroup, tiles: list[TileLabels]) -> list[dict]:
    """The annotated regions in the pixels of the written files (``_pixels_meta``): working pixels,
    or each tile's level-0 rectangle when the files are at level 0."""
    if group.out_scale == group.scale:
        return annotated_regions(tiles)
    return [{"x": a.tile.x, "y": a.tile.y, "w": math.ceil(a.tile.w * group.scale), "h": math.ceil(a.tile.h * group.scale),
             "tile_id": a.tile_id} for a in group.annotations]


class _Progress:
    def __init__(self, export_id: int, total: int, callback: Callable[[int, int], None] | None):
        self.export_id, self.total, self.callback = export_id, max(total, 1), callback
        self.last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.callback is not None:
            self.callback(done, self.total)
        if now - self.last >= 0.5 or done == self.total:
            self.last = now
            # The writing phase is 95%; zipping into storage is the rest.
            Export.objects.filter(pk=self.export_id).update(progress=round(0.95 * done / self.total, 4))


def run_export(*, export_id: int, progress: Callable[[int, int], None] | None = None) -> Export:
    """Build an export (the body of the Celery task). Failures are recorded on the row."""
    export = Export.objects.select_related("project", "created_by").filter(pk=export_id).first()
    if export is None:
        log.warning("export %s no longer exists", export_id)
        return None
    if export.status == ExportStatus.SUCCEEDED:
        return export  # delivered twice (acks_late): the first run finished
    Export.objects.filter(pk=export_id).update(status=ExportStatus.RUNNING, progress=0.0, error="")
    try:
        name, summary = _build(export, progress)
    except Exception as exc:
        message = str(exc.detail) if isinstance(exc, KaryoError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, KaryoError):
            log.exception("export %s failed", export_id)
        Export.objects.filter(pk=export_id).update(status=ExportStatus.FAILED, error=message, finished_at=timezone.now())
    else:
        Export.objects.filter(pk=export_id).update(
            status=ExportStatus.SUCCEEDED, progress=1.0, file=name, manifest=summary, finished_at=timezone.now()
        )
    export.refresh_from_db()
    return export


def _build(export: Export, progress_callback) -> tuple[str, dict]:
    project = export.project
    filters = export.filters
    annotations = list(selected_annotations(project=project, filters=filters))
    if not annotations:
        raise KaryoError("nothing to export: no annotations match the filters", code="empty_export")
    classes = _class_table(project, annotations)
    class_names = {c.id: c.name for c in classes}
    default_class = int(project.nucleus_classes[0]["id"])
    split_of = _splits(project, annotations, filters, default_class)
    layout = filters.get("options", {}).get("layout", "image")
    keep_classes = set(filters["classes"])
    if layout == "tile":
        names = _names(annotations)
        splits = [split_of[a.tile.image_id] if split_of else None for a in annotations]
        plan = [PlanItem(n, s, a.tile.w, a.tile.h) for n, s, a in zip(names, splits, annotations)]
        groups = [[a] for a in annotations]
        left_out: list[dict] = []
    else:
        groups, plan, left_out = _image_plan(project, annotations, split_of, pannuke=export.format == "pannuke",
                                             polygons=export.format == "geojson")

    history = annotation_history(tile_ids=[a.tile_id for a in annotations])
    chains = {a.pk: lineage(a.pk, history) for a in annotations}
    prediction_ids = {}
    for a in annotations:
        linked = [row["prediction_id"] for row in reversed(chains[a.pk]) if row["prediction_id"]]
        prediction_ids[a.pk] = linked[0] if linked else None
    predictions = predictions_by_id(ids={p for p in prediction_ids.values() if p})

    project_info = {
        "id": project.pk, "name": project.name, "description": project.description, "licence": project.licence,
        "tile_size": project.tile_size, "tile_overlap": project.tile_overlap,
    }
    options = {**filters.get("options", {}), "project": project_info, "karyo_version": settings.KARYO_VERSION}
    tiles_meta = []
    images_meta = []
    per_class: Counter = Counter()
    per_split: dict[str, dict] = {}
    annotators, reviewers, model_versions = set(), set(), set()
    report = _Progress(export.pk, len(groups), progress_callback)

    with tempfile.TemporaryDirectory(dir=work_dir(), prefix=f"export-{export.pk}-") as tmp:
        zip_path = Path(tmp) / "export.zip"
        sink = ZipSink(zip_path, Path(tmp) / "scratch")
        try:
            writer = get_format(export.format).Writer(sink, classes=classes, plan=plan, options=options)
            items = iter(plan)
            for done, group in enumerate(groups, start=1):
                if layout == "tile":
                    annotation, item = group[0], next(items)
                    sample, raw = _sample(annotation, item.name, item.split, default_class=default_class,
                                          keep_classes=keep_classes)
                    meta = _tile_meta(annotation, sample, chains[annotation.pk],
                                      predictions.get(prediction_ids[annotation.pk]), raw, class_names)
                    sample.meta = meta
                    samples, metas, image_meta = [sample], [meta], None
                else:
                    samples, metas, image_meta = _image_samples(
                        group, project=project, writer=writer, default_class=default_class, keep_classes=keep_classes, class_names=class_names,
                        chains=chains, predictions=predictions, prediction_ids=prediction_ids,
                    )
                    images_meta.append(image_meta)
                for sample in samples:
                    writer.add(sample)
                # Nuclei are counted once per image (PanNuke patches repeat a nucleus cut by a patch edge).
                for split, classes_of in ([(samples[0].split, samples[0].classes)] if layout == "tile"
                                          else [(image_meta["split"], image_meta.pop("class_ids"))]):
                    counted = Counter(class_names[c] for c in classes_of.values())
                    per_class.update(counted)
                    if split:
                        bucket = per_split.setdefault(split, {"tiles": 0, "images": set(), "nuclei": 0,
                                                              "per_class": Counter()})
                        bucket["nuclei"] += len(classes_of)
                        bucket["per_class"].update(counted)
                for meta in metas:
                    tiles_meta.append(meta)
                    if meta["split"]:
                        bucket = per_split.setdefault(meta["split"], {"tiles": 0, "images": set(), "nuclei": 0,
                                                                      "per_class": Counter()})
                        bucket["tiles"] += 1
                        bucket["images"].add(meta["image"]["id"])
                    annotators.update(meta["annotation"]["authors"])
                    if meta["annotation"]["reviewer"]:
                        reviewers.add(meta["annotation"]["reviewer"])
                    if meta["model_version"]:
                        model_versions.add(meta["model_version"]["version"])
                report(done)
            writer.close()
            manifest = {
                "karyo_version": settings.KARYO_VERSION,
                "format": export.format,
                "export_id": export.pk,
                "created_at": timezone.now().isoformat(),
                "created_by": export.created_by.username if export.created_by else None,
                "project": project_info,
                "classes": [c.as_dict() for c in classes],
                "filters": filters,
                "split": filters["split"],
                "split_seed": (filters["split"] or {}).get("seed"),
                "layout": layout,
                "naming": (
                    "one item per tile: <image stem>, or <image stem>_x<x>_y<y> when the image has several tiles"
                    if layout == "tile" else
                    f"one item per image (<image stem>), nuclei stitched across tiles, in image pixels; PanNuke: "
                    f"{PANNUKE_PATCH}x{PANNUKE_PATCH} patches <image stem>_x<x>_y<y> cut from the stitched maps"
                ),
                "ownership": "a nucleus belongs to the tile that holds its centroid (docs/exports.md)",
                "losses": LOSSES[export.format],
                "counts": {
                    "tiles": len(annotations),
                    "images": len({a.tile.image_id for a in annotations}),
                    "nuclei": sum(per_class.values()),
                    "per_class": {name: per_class.get(name, 0) for name in class_names.values()},
                    "per_split": {
                        s: {"tiles": b["tiles"], "images": len(b["images"]), "nuclei": b["nuclei"],
                            "per_class": {name: b["per_class"].get(name, 0) for name in class_names.values()}}
                        for s, b in sorted(per_split.items())
                    },
                },
                "annotators": sorted(annotators),
                "reviewers": sorted(reviewers),
                "pre_annotation": {
                    "tiles": sum(1 for t in tiles_meta if t["model_version"]),
                    "model_versions": sorted(model_versions),
                },
                "tiles": tiles_meta,
            }
            if layout == "image":
                manifest["images"] = images_meta
                manifest["left_out"] = left_out
                manifest["counts"]["items"] = len(plan)
            sink.write("README.md", dataset_card(manifest))
            manifest["files"] = dict(sorted(sink.files.items()))
            sink.write_json("manifest.json", manifest)
        finally:
            sink.close()
        stored_name = f"exports/{project.pk}/{export.pk}-{safe_name(project.name)}-{export.format}.zip"
        with open(zip_path, "rb") as fh:
            stored = default_storage.save(stored_name, File(fh, name=stored_name))
        zip_bytes = zip_path.stat().st_size
    summary = {k: v for k, v in manifest.items() if k not in ("tiles", "files", "images")}
    summary["archive"] = {"files": len(manifest["files"]) + 1, "bytes": zip_bytes}
    return stored, summary


def _tile_meta(annotation, sample: ExportSample, chain: list[dict], prediction, raw: np.ndarray, class_names) -> dict:
    tile, image = annotation.tile, annotation.tile.image
    authors = []
    for row in chain:
        if row["author__username"] and row["author__username"] not in authors:
            authors.append(row["author__username"])
    changes = None
    if prediction is not None:
        try:
            changes = prediction_changes(read_label_map(prediction.mask.name), raw)
        except Exception as exc:  # a missing prediction file must not sink the export
            log.warning("could not compare annotation %s with prediction %s: %s", annotation.pk, prediction.pk, exc)
    counted = Counter(class_names[c] for c in sample.classes.values())
    return {
        "name": sample.name,
        "split": sample.split,
        "image": {"id": image.pk, "name": image.name, "sha256": image.sha256, "width": image.width, "height": image.height},
        "tile": {"id": tile.pk, "x": tile.x, "y": tile.y, "w": tile.w, "h": tile.h},
        "annotation": {
            "id": annotation.pk,
            "version": annotation.version,
            "status": annotation.status,
            "source": annotation.source,
            "author": annotation.author.username if annotation.author else None,
            "authors": authors,
            "reviewer": annotation.reviewed_by.username if annotation.reviewed_by else None,
            "created_at": _iso(annotation.created_at),
            "first_created_at": _iso(chain[0]["created_at"]) if chain else _iso(annotation.created_at),
            "reviewed_at": _iso(annotation.reviewed_at),
            "versions": len(chain),
        },
        "model_version": (
            {"id": prediction.model_version.pk, "version": prediction.model_version.version,
             "architecture": prediction.model_version.architecture}
            if prediction is not None else None
        ),
        "prediction_id": prediction.pk if prediction is not None else None,
        "changes_vs_prediction": changes,
        "nuclei": len(sample.classes),
        "classes": dict(sorted(counted.items())),
    }


def import_upload(*, project: Project, upload, format: str | None = None, status: str = AnnotationStatus.REVIEWED,
                  author=None) -> ImportSummary:
    """Import an uploaded zip (kept on disk, never read whole into memory) into ``project``."""
    if upload.size > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{upload.name}: the upload exceeds {settings.KARYO_MAX_UPLOAD_BYTES:,} bytes", code="upload_too_large")
    if hasattr(upload, "temporary_file_path"):
        return import_path(path=Path(upload.temporary_file_path()), project=project, format=format, status=status,
                           author=author, label=upload.name)
    with tempfile.NamedTemporaryFile(dir=work_dir(), suffix=".zip") as tmp:
        for chunk in upload.chunks():
            tmp.write(chunk)
        tmp.flush()
        return import_path(path=Path(tmp.name), project=project, format=format, status=status, author=author,
                           label=upload.name)


def import_image_upload(*, project: Project, upload, status: str = AnnotationStatus.REVIEWED, author=None) -> dict:
    """Import an uploaded zip of QuPath GeoJSON / COCO nuclei in image coordinates onto the
    project's images (``image_annotations``); the answer has the shape of :func:`import_upload`'s."""
    from .image_annotations import import_image_annotations

    if upload.size > settings.KARYO_MAX_UPLOAD_BYTES:
        raise InvalidUpload(f"{upload.name}: the upload exceeds {settings.KARYO_MAX_UPLOAD_BYTES:,} bytes", code="upload_too_large")
    if hasattr(upload, "temporary_file_path"):
        return import_image_annotations(project=project, path=Path(upload.temporary_file_path()), status=status,
                                        author=author, label=upload.name).as_dict()
    with tempfile.NamedTemporaryFile(dir=work_dir(), suffix=".zip") as tmp:
        for chunk in upload.chunks():
            tmp.write(chunk)
        tmp.flush()
        return import_image_annotations(project=project, path=Path(tmp.name), status=status, author=author,
                                        label=upload.name).as_dict()
