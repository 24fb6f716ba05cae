from __future__ import annotations

import sys
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from backend.common.errors import KaryoError
from backend.images.importing import import_folder
from backend.images.models import AnnotationStatus
from backend.projects.models import Project
from backend.projects.services import create_project


class Command(BaseCommand):
    help = "Import images/*.png + masks/*.png (16-bit instance labels) into a project (created if missing)."

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path)
        parser.add_argument("--project", required=True, help="project name (created when it does not exist)")
        parser.add_argument("--status", default="reviewed", choices=[AnnotationStatus.SUBMITTED, AnnotationStatus.REVIEWED])
        parser.add_argument("--tile-size", type=int, default=256, help="tile size for a new project")
        parser.add_argument("--user", default=None, help="author of the imported annotations (username)")

    def handle(self, *args, path: Path, project: str, status: str, tile_size: int, user: str | None, **options):
        author = None
        if user:
            author = get_user_model().objects.filter(username=user).first()
            if author is None:
                raise CommandError(f"no user named {user!r}")
        target = Project.objects.filter(name=project).first()
        try:
            if target is None:
                target = create_project(name=project, created_by=author, tile_size=tile_size)
                self.stdout.write(f"created project {project!r} (tile size {tile_size})")

            def progress(done: int, total: int) -> None:
                width = 30
                filled = int(width * done / total)
                sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} images")
                sys.stdout.flush()

            summary = import_folder(project=target, root=path, author=author, status=status, progress=progress)
        except KaryoError as exc:
            raise CommandError(str(exc.detail)) from None
        self.stdout.write("")
        self.stdout.write(self.style.SUCCESS(
            f"imported {summary.images} images ({summary.duplicates} already present), {summary.tiles} tiles, "
            f"{summary.annotations} annotations with {summary.nuclei} nuclei into {project!r}"
        ))
