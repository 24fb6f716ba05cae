from __future__ import annotations

import resource
import sys
import time
import tracemalloc
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from backend.common.errors import KaryoError
from backend.exports.archive import copy_stream
from backend.exports.formats import FORMAT_NAMES
from backend.exports.models import ExportStatus
from backend.exports.services import create_export, run_export
from backend.exports.streaming import open_stream
from backend.projects.models import Project


def _list(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


class Command(BaseCommand):
    help = (
        "Export a project's curated annotations as a zip (png, coco, pannuke, labelstudio or geojson) with "
        "manifest.json (provenance, sha256 of every file) and a dataset card. Runs in this process; the "
        "export is also recorded in the project's export list."
    )

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="project name")
        parser.add_argument("--format", required=True, choices=FORMAT_NAMES)
        parser.add_argument("--out", required=True, type=Path, help="the zip to write")
        parser.add_argument("--status", default="reviewed", choices=["reviewed", "submitted", "any"],
                            help="reviewed (default): latest reviewed version per tile; submitted: latest submitted or "
                                 "reviewed; any: latest version whatever its status")
        parser.add_argument("--annotator", action="append", help="only tiles whose exported version is by this user (repeatable)")
        parser.add_argument("--from", dest="date_from", help="annotated on or after (YYYY-MM-DD or ISO date-time)")
        parser.add_argument("--to", dest="date_to", help="annotated on or before (YYYY-MM-DD, inclusive)")
        parser.add_argument("--class", dest="classes", action="append", help="keep only nuclei of these classes (repeatable)")
        parser.add_argument("--image", dest="images", action="append", help="only these images (name or id; repeatable)")
        parser.add_argument("--split", help="train,val,test fractions by image, e.g. 0.7,0.15,0.15; or 'frozen'")
        parser.add_argument("--seed", type=int, default=None, help="split seed (default: random, recorded in the manifest)")
        parser.add_argument("--stratify", action="store_true", help="stratify the split by each image's main class")
        parser.add_argument("--object-type", choices=["annotation", "detection"], default=None, help="geojson objects")
        parser.add_argument("--image-url-prefix", default=None, help="labelstudio: prefix of data.image")
        parser.add_argument("--tissue", default=None, help="pannuke: types.npy value (default: project name)")
        parser.add_argument("--user", default=None, help="record this user as the exporter")
        parser.add_argument("--stats", action="store_true",
                            help="also print peak memory (tracemalloc, which slows the export, and max RSS)")

    def handle(self, *args, **opts):
        project = Project.objects.filter(name=opts["project"]).first()
        if project is None:
            raise CommandError(f"no project named {opts['project']!r}")
        user = None
        if opts["user"]:
            user = get_user_model().objects.filter(username=opts["user"]).first()
            if user is None:
                raise CommandError(f"no user named {opts['user']!r}")
        filters: dict = {"status": opts["status"], "annotators": _list(opts["annotator"]),
                         "date_from": opts["date_from"], "date_to": opts["date_to"],
                         "classes": _list(opts["classes"]), "images": _list(opts["images"])}
        if opts["split"] == "frozen":
            filters["split"] = "frozen"
        elif opts["split"]:
            try:
                parts = [float(v) for v in opts["split"].split(",")]
            except ValueError:
                raise CommandError("--split takes fractions like 0.7,0.15,0.15 (or 'frozen')") from None
            filters["split"] = {**dict(zip(("train", "val", "test"), parts)), "seed": opts["seed"], "stratify": opts["stratify"]}
        options = {k: opts[o] for k, o in (("object_type", "object_type"), ("image_url_prefix", "image_url_prefix"),
                                           ("tissue", "tissue")) if opts[o] is not None}
        if options:
            filters["options"] = options

        out: Path = opts["out"]
        if out.parent and not out.parent.exists():
            raise CommandError(f"{out.parent} does not exist")
        if opts["stats"]:
            tracemalloc.start()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        try:
            export = create_export(project=project, format=opts["format"], filters=filters, created_by=user)
        except KaryoError as exc:
            raise CommandError(str(exc.detail)) from None

        def progress(done: int, total: int) -> None:
            width = 30
            filled = int(width * done / total)
            sys.stdout.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tiles")
            sys.stdout.flush()

        export = run_export(export_id=export.pk, progress=progress)
        self.stdout.write("")
        if export.status != ExportStatus.SUCCEEDED:
            raise CommandError(f"export {export.pk} failed: {export.error}")
        stream, _ = open_stream(export.file.name)
        part = out.with_name(out.name + ".part")
        with stream, open(part, "wb") as fh:
            size = copy_stream(stream, fh)
        part.replace(out)
        elapsed = time.perf_counter() - started
        counts = export.manifest["counts"]
        split = "" if not counts["per_split"] else " (" + ", ".join(
            f"{k}: {v['tiles']} tiles" for k, v in counts["per_split"].items()) + ")"
        self.stdout.write(self.style.SUCCESS(
            f"exported {counts['tiles']} tiles of {counts['images']} images with {counts['nuclei']} nuclei "
            f"as {export.format}{split} to {out} ({size:,} bytes; export {export.pk}) in {elapsed:.2f} s"
        ))
        if opts["stats"]:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.stdout.write(
                f"time {elapsed:.2f} s (slowed by tracemalloc); peak traced memory {peak / 2**20:.1f} MiB; "
                f"max RSS {rss / 1024:.1f} MiB (before the export {rss_before / 1024:.1f} MiB)"
            )
