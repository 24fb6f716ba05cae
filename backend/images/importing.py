"""Import a folder in the common layout (``images/NAME.png`` + ``masks/NAME.png``) into a project.

Without a ``masks/`` folder the images are imported unlabelled (they join the annotation queue).

Every file is decoded and checked before anything is written; the error lists every
offending file, so one run tells the admin everything to fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.db import transaction

from backend.common.errors import InvalidUpload, KaryoError
from backend.projects.models import Project

from .models import AnnotationSource, AnnotationStatus, Tile
from .services import create_annotation, ingest_images
from .validation import IMAGE_EXTENSIONS, decode_image, decode_mask


@dataclass(frozen=True)
class ImportSummary:
    images: int
    duplicates: int
    tiles: int
    annotations: int
    nuclei: int


def import_folder(
    *, project: Project, root: Path, author=None, status: str = AnnotationStatus.REVIEWED, progress=None
) -> ImportSummary:
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise KaryoError(f"{root}: no images/ folder (expected images/NAME.png + masks/NAME.png)", code="invalid_layout")
    image_files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not image_files:
        raise KaryoError(f"{image_dir}: no PNG, JPEG or TIFF images", code="empty_upload")
    masks_by_stem = {p.stem: p for p in mask_dir.glob("*.png")} if mask_dir.is_dir() else {}
    problems: list[str] = []
    decoded, masks = [], []
    for path in image_files:
        try:
            image = decode_image(path.name, path.read_bytes())
            mask_path = masks_by_stem.get(path.stem)
            mask = None
            if mask_path is None and mask_dir.is_dir():
                # With a masks/ folder every image must have its mask: a silent gap would look
                # like an image with no nuclei and poison training.
                problems.append(f"images/{path.name} has no mask (expected masks/{path.stem}.png)")
                continue
            if mask_path is not None:
                mask = decode_mask(mask_path.name, mask_path.read_bytes(), width=image.width, height=image.height)
            decoded.append(image)
            masks.append(mask)
        except KaryoError as exc:
            problems.append(str(exc.detail))
    orphans = sorted(set(masks_by_stem) - {p.stem for p in image_files})
    problems += [f"masks/{name}.png has no image" for name in orphans]
    if problems:
        raise InvalidUpload(f"{len(problems)} problem(s) in {root}: " + "; ".join(problems), code="invalid_dataset", details=problems)

    annotations = nuclei = 0
    with transaction.atomic():
        results = ingest_images(project=project, images=decoded, uploaded_by=author)
        for i, (result, mask) in enumerate(zip(results, masks)):
            if mask is not None and result.created:
                for tile in Tile.objects.filter(image=result.image):
                    crop = np.ascontiguousarray(mask[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])
                    annotation, _ = create_annotation(
                        tile=tile, instances=crop, author=author, source=AnnotationSource.IMPORTED, status=status
                    )
                    annotations += 1
                nuclei += int((np.unique(mask) != 0).sum())
            if progress is not None:
                progress(i + 1, len(results))
    created = [r for r in results if r.created]
    return ImportSummary(
        images=len(created),
        duplicates=len(results) - len(created),
        tiles=Tile.objects.filter(image__in=[r.image for r in created]).count(),
        annotations=annotations,
        nuclei=nuclei,
    )
