from __future__ import annotations

import sys
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from backend.common.errors import KaryoError
from backend.exports.formats import FORMAT_NAMES
from backend.exports.importing import import_path
from backend.images.models import AnnotationStatus
from backend.projects.models import Project


class Command(BaseCommand):
    help = (
        "Import a data set (folder or zip) into a project, created when missing: the common layout "
        "(images/*.png + masks/*.png 16-bit instance labels), COCO, PanNuke arrays, Label Studio tasks or "
        "QuPath GeoJSON. The format is detected when --format is not given. All or nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path, help="a data set folder, or a zip of one (e.g. a Karyo export)")
        parser.add_argument("--project", required=True, help="project name (created when it does not exist)")
        parser.add_argument("--format", choices=FORMAT_NAMES, default=None, help="default: detected")
        parser.add_argument("--status", default="reviewed", choices=[AnnotationStatus.SUBMITTED, AnnotationStatus.REVIEWED])
        parser.add_argument("--tile-size", type=int, default=None,
                            help="tile size for a new project (default: from a Karyo manifest, else 256)")
        parser.add_argument("--user", default=None, help="author of the imported annotations (username)")
        parser.add_argument("--onto-images", action="store_true",
                            help="QuPath GeoJSON / COCO nuclei in image coordinates for images already in the project "
                                 "(matched by checksum or name): new versions on the tiles they cover")

    def handle(self, *args, path: Path, project: str, format: str | None, status: str, tile_size: int | None,
               user: str | None, onto_images: bool = False, **options):
        author = None
        if user:
            author = get_user_model().objects.filter(username=user).first()
            if author is None:
                raise CommandError(f"no user named {user!r}")
        target = Project.objects.filter(name=project).first()
        if onto_images:
            from backend.exports.image_annotations import import_image_annotations

            if target is None:
                raise CommandError(f"no project named {project!r} (--onto-images needs its images)")
            try:
                result = import_image_annotations(project=target, path=path, author=author, status=status)
            except KaryoError as exc:
                raise CommandError(str(exc.detail)) from None
            self.stdout.write(self.style.SUCCESS(
                f"imported {result.nuclei} nuclei ({result.format}) onto {result.images} images of {project!r} "
                f"({result.tiles} tile versions)"
            ))
            return

        def progress(done: int, total: int) -> None:
            width = 30
            filled = int(width * done / total)
            sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
            sys.stdout.flush()

        try:
            summary = import_path(path=path, project=target, project_name=project, format=format, author=author,
                                  status=status, tile_size=tile_size, progress=progress)
        except KaryoError as exc:
            raise CommandError(str(exc.detail)) from None
        self.stdout.write("")
        if summary.created_project:
            created = Project.objects.get(name=project)
            classes = ", ".join(c["name"] for c in created.nucleus_classes)
            self.stdout.write(f"created project {project!r} (tile size {created.tile_size}; classes: {classes})")
        self.stdout.write(self.style.SUCCESS(
            f"imported {summary.images} images ({summary.duplicates} already present) from {summary.format}, "
            f"{summary.tiles} tiles, {summary.annotations} annotations with {summary.nuclei} nuclei into {project!r}"
        ))
