"""``manage.py import_images PATH... --project NAME``: slides and images from files or folders.

Each file is stored (streamed, hashed in blocks) and ingested by the ``cpu`` worker exactly as an
upload would be; the command waits for ingest and shows a progress bar. ``--inline`` runs the
ingest in this process instead (no worker needed). A file that is refused (unreadable, too large,
a zip, already in the project) is reported and skipped; the others go on.
"""
from __future__ import annotations

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from backend.common.errors import KaryoError
from backend.images.ingest import run_ingest
from backend.images.models import Image, ImageState
from backend.images.uploads import import_file
from backend.projects.models import Project

SUFFIXES = {".svs", ".ndpi", ".scn", ".bif", ".tif", ".tiff", ".vms", ".svslide", ".png", ".jpg", ".jpeg"}


def files_under(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                            and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise CommandError(f"{raw}: no such file or folder")
    return found


class Command(BaseCommand):
    help = "Import slides and images (files or folders) into a project; waits for ingest."

    def add_arguments(self, parser) -> None:
        parser.add_argument("paths", nargs="+")
        parser.add_argument("--project", required=True, help="project name")
        parser.add_argument("--inline", action="store_true", help="ingest in this process instead of the cpu worker")
        parser.add_argument("--no-wait", action="store_true", help="return once the files are stored")
        parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for ingest")

    def handle(self, *args, **options) -> None:
        project = Project.objects.filter(name=options["project"]).first()
        if project is None:
            raise CommandError(f"no project named {options['project']!r}")
        files = files_under(options["paths"])
        if not files:
            raise CommandError("no slide or image files found")
        images: list[Image] = []
        refused = 0
        for path in files:
            try:
                images.append(import_file(project=project, path=path))
            except KaryoError as exc:
                refused += 1
                self.stderr.write(f"skipped {path}: {exc.detail}")
        if options["inline"]:
            for image in images:
                run_ingest(image_id=image.pk)
        elif not options["no_wait"] and images:
            self._wait(images, timeout=options["timeout"])
        ready = Image.objects.filter(pk__in=[i.pk for i in images])
        for image in ready.order_by("pk"):
            if image.state == ImageState.READY:
                self.stdout.write(f"{image.name}: ready, {image.tiles_kept} of {image.tiles_grid} tiles kept "
                                  f"({image.width}x{image.height}, {image.levels} level(s))")
            else:
                self.stdout.write(f"{image.name}: {image.state}" + (f" - {image.state_reason}" if image.state_reason else ""))
        failed = ready.filter(state=ImageState.FAILED).count()
        self.stdout.write(f"{len(images) - failed} imported, {failed} failed, {refused} skipped")
        if failed or refused:
            raise CommandError(f"{failed + refused} file(s) were not imported")

    def _wait(self, images: list[Image], *, timeout: float) -> None:
        ids = [i.pk for i in images]
        deadline = time.monotonic() + timeout
        with tqdm(total=len(ids), unit="image", desc="ingest", file=self.stdout) as bar:
            while time.monotonic() < deadline:
                rows = list(Image.objects.filter(pk__in=ids).values_list("state", "ingest_progress"))
                done = sum(1.0 if state != ImageState.INGESTING else progress for state, progress in rows)
                bar.n = round(done, 2)
                bar.refresh()
                if all(state != ImageState.INGESTING for state, _ in rows):
                    return
                time.sleep(0.5)
        raise CommandError("timed out waiting for ingest: is a cpu worker running? (or use --inline)")
