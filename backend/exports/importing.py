"""Import a data set into a project: a folder or a zip, in any format Karyo exports.

It lives in exports, above images, because it reads every export format back (``.formats``,
detected when not given): the common layout
(``images/NAME.png`` + ``masks/NAME.png`` 16-bit instance labels, optional ``classes/``), COCO,
PanNuke arrays, Label Studio tasks and QuPath GeoJSON. Without ``masks/`` (or annotations) the
images are imported unlabelled (they join the annotation queue).

All or nothing, in two passes: every file is read and checked first (the error lists every
offending file, so one run tells the admin everything to fix); only then, in one transaction,
are images, tiles and annotation versions written. A failure while writing rolls the rows back
and removes the files written so far. Memory holds one item at a time.
"""
from __future__ import annotations

import json
import logging
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from django.core.files.storage import default_storage
from django.db import transaction

from backend.common.errors import InvalidUpload, KaryoError
from backend.images.models import AnnotationSource, AnnotationStatus, Image, Tile
from backend.images.services import create_annotation, ingest_images
from backend.images.validation import decode_image
from backend.projects.models import Project, default_nucleus_classes
from backend.projects.services import create_project

from .archive import extract_archive, work_dir
from .formats import ClassDef, Dataset, detect_format, get_format, palette_color

log = logging.getLogger(__name__)
MAX_LISTED = 50


@dataclass(frozen=True)
class ImportSummary:
    images: int
    duplicates: int
    tiles: int
    annotations: int
    nuclei: int
    format: str = "png"
    project: str = ""
    created_project: bool = False

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_manifest(root: Path) -> dict | None:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidUpload(f"{path.name}: not valid JSON", code="invalid_dataset") from None
    return data if isinstance(data, dict) else None


def read_dataset(root: Path, *, format: str | None = None) -> Dataset:
    """Index a data set folder (nothing is decoded yet)."""
    root = Path(root)
    manifest = read_manifest(root) if root.is_dir() else None
    name = format or detect_format(root, manifest)
    return get_format(name).read(root, manifest=manifest)


@contextmanager
def dataset_folder(path: Path, *, label: str | None = None) -> Iterator[Path]:
    """A folder as it is, or a zip checked and unpacked into scratch space for the duration."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(dir=work_dir(), prefix="import-") as tmp:
            yield extract_archive(path, Path(tmp), label=label or path.name)
    elif path.is_file():
        raise InvalidUpload(f"{label or path.name}: not a zip archive or a folder", code="corrupt_archive")
    else:
        yield path


def _class_table(dataset: Dataset, used: dict, colors: dict[str, str]) -> list[dict]:
    """Nucleus classes for a project created from this data set."""
    table: list[ClassDef] = list(dataset.classes or [])
    names = {c.name for c in table}
    ids = {c.id for c in table}
    for value in used:
        if isinstance(value, str) and value not in names:
            table.append(ClassDef(max(ids | {0}) + 1, value, colors.get(value) or palette_color(len(table))))
            names.add(value)
            ids.add(table[-1].id)
        elif isinstance(value, int) and value not in ids:
            table.append(ClassDef(value, f"class_{value}", palette_color(len(table))))
            ids.add(value)
    if not table:
        return default_nucleus_classes()
    if any(not 1 <= c.id <= 255 for c in table) or len({c.id for c in table}) != len(table):
        table = [ClassDef(i + 1, c.name, c.color) for i, c in enumerate(table)]
    return [{"id": c.id, "name": c.name, "color": colors.get(c.name, c.color)} for c in table]


def _resolver(project_classes: list[dict]) -> Callable[[str | int], int | None]:
    by_name = {c["name"]: c["id"] for c in project_classes}
    ids = {c["id"] for c in project_classes}

    def resolve(value: str | int) -> int | None:
        if isinstance(value, str):
            return by_name.get(value)
        return value if value in ids else None

    return resolve


def _fail(problems: list[str], label: str) -> InvalidUpload:
    shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
    return InvalidUpload(
        f"{len(problems)} problem(s) in {label}: " + "; ".join(shown), code="invalid_dataset", details=problems
    )


def import_dataset(
    *,
    dataset: Dataset,
    project: Project | None = None,
    new_project: dict | None = None,
    author=None,
    status: str = AnnotationStatus.REVIEWED,
    progress: Callable[[int, int], None] | None = None,
    label: str = "the data set",
) -> ImportSummary:
    """Check every item of ``dataset``, then write them all into ``project`` (or into a project
    created from ``new_project`` = {"name", "tile_size", ...}) in one transaction."""
    if (project is None) == (new_project is None):
        raise ValueError("give either project or new_project")
    problems = list(dataset.problems)
    used: dict[str | int, list[str]] = {}
    colors: dict[str, str] = {}
    for item in dataset.items:
        try:
            decoded = decode_image(item.image_file, item.load_image())
            labels = item.load_labels(decoded.height, decoded.width)
        except KaryoError as exc:
            problems.append(str(exc.detail))
            continue
        if labels is None:
            continue
        if int(labels.instances.max(initial=0)) > 65535:
            problems.append(f"{item.origin}: more than 65535 nuclei in one image")
        for value in set(labels.classes.values()):
            used.setdefault(value, []).append(item.origin)
        for name, color in labels.colors.items():
            colors.setdefault(name, color)
    if not dataset.items and not problems:
        problems.append("no images to import")

    if project is not None:
        classes = project.nucleus_classes
    else:
        classes = _class_table(dataset, used, colors)
    resolve = _resolver(classes)
    known = ", ".join(repr(c["name"]) for c in classes)
    for value, origins in used.items():
        if resolve(value) is None:
            what = f"class {value!r}" if isinstance(value, str) else f"class id {value}"
            more = f" and {len(origins) - 5} more" if len(origins) > 5 else ""
            problems.append(f"unknown {what} in {', '.join(origins[:5])}{more} (the project's classes: {known})")
    if problems:
        raise _fail(problems, label)

    written: list[str] = []
    image_files: list[str] = []
    try:
        with transaction.atomic():
            created_project = project is None
            if project is None:
                spec = dict(new_project)
                project = create_project(
                    name=spec.pop("name"), created_by=author, nucleus_classes=classes, **spec
                )
            summary = _write(project=project, dataset=dataset, author=author, status=status,
                             resolve=resolve, progress=progress, written=written, image_files=image_files)
    except BaseException:
        _remove_files(written, image_files)
        raise
    return ImportSummary(**summary, format=dataset.format, project=project.name, created_project=created_project)


def _write(*, project, dataset, author, status, resolve, progress, written, image_files) -> dict:
    created_images = duplicates = annotations = nuclei = tiles = 0
    total = len(dataset.items)
    for done, item in enumerate(dataset.items, start=1):
        decoded = decode_image(item.image_file, item.load_image())
        labels = item.load_labels(decoded.height, decoded.width)
        result = ingest_images(project=project, images=[decoded], uploaded_by=author)[0]
        if not result.created:
            duplicates += 1
        else:
            created_images += 1
            image_files.append(result.image.file.name)
            image_tiles = list(Tile.objects.filter(image=result.image).order_by("y", "x"))
            written.extend(t.file.name for t in image_tiles if t.file)  # legacy tiles only: new ones have no file
            if result.image.thumbnail:
                written.append(result.image.thumbnail.name)
            tiles += len(image_tiles)
            if labels is not None:
                for tile in image_tiles:
                    crop = np.ascontiguousarray(labels.instances[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])
                    present = np.unique(crop)
                    tile_classes = {
                        str(int(i)): resolve(labels.classes[int(i)]) for i in present if i and int(i) in labels.classes
                    }
                    annotation, _ = create_annotation(
                        tile=tile, instances=crop, author=author, source=AnnotationSource.IMPORTED, status=status,
                        classes=tile_classes or None,
                    )
                    written.append(annotation.mask.name)
                    annotations += 1
                nuclei += int((np.unique(labels.instances) != 0).sum())
        if progress is not None:
            progress(done, total)
    return {"images": created_images, "duplicates": duplicates, "tiles": tiles, "annotations": annotations, "nuclei": nuclei}


def _remove_files(written: list[str], image_files: list[str]) -> None:
    """After a rolled-back import: remove tile and mask files, and image files no row uses."""
    for name in written:
        try:
            default_storage.delete(name)
        except Exception:
            log.exception("could not remove %s after a failed import", name)
    for name in image_files:
        try:
            if not Image.objects.filter(file=name).exists():
                default_storage.delete(name)
        except Exception:
            log.exception("could not remove %s after a failed import", name)


def import_path(
    *,
    path: Path,
    project: Project | None = None,
    project_name: str | None = None,
    format: str | None = None,
    author=None,
    status: str = AnnotationStatus.REVIEWED,
    tile_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    label: str | None = None,
) -> ImportSummary:
    """Import a folder or a zip into ``project``, or into a new project named ``project_name``.

    A new project takes its classes from the data set, and its tile size from ``tile_size``, else
    from the manifest of a Karyo export (so each exported tile stays one tile), else 256.
    """
    label = label or str(path)
    with dataset_folder(Path(path), label=label) as root:
        dataset = read_dataset(root, format=format)
        new_project = None
        if project is None:
            source = (dataset.manifest or {}).get("project") or {}
            new_project = {"name": project_name, "tile_size": int(tile_size or source.get("tile_size") or 256)}
            if source.get("licence"):
                new_project["licence"] = str(source["licence"])[:200]
        return import_dataset(dataset=dataset, project=project, new_project=new_project, author=author,
                              status=status, progress=progress, label=label)


def import_folder(
    *, project: Project, root: Path, author=None, status: str = AnnotationStatus.REVIEWED, progress=None,
    format: str | None = None,
) -> ImportSummary:
    """Import a folder (or zip) into an existing project; the format is detected when not given."""
    return import_path(path=Path(root), project=project, format=format, author=author, status=status, progress=progress)

