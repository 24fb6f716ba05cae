"""Curated data set exports: filters, provenance, splits, round trips in every format, the
command line, the API and a real worker process."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from PIL import Image as PILImage

from backend.common.errors import KaryoError
from backend.common.storage import encode_png, read_label_map
from backend.exports.models import Export
from backend.exports.services import create_export, run_export, start_export
from backend.exports.streaming import open_stream
from backend.exports.importing import import_path, read_dataset
from backend.images.models import Annotation, AnnotationSource, Tile
from backend.images.services import create_annotation, ingest_images, review_annotation
from backend.images.validation import decode_image
from backend.ml.models import ModelVersion, Prediction
from backend.projects.models import Project
from ml_worker import synth
from tests.backend.test_exports_formats import tricky_instances

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]
ROOT = Path(__file__).resolve().parents[2]
FORMATS = ["png", "coco", "pannuke", "labelstudio", "geojson"]
CLASSES = [{"id": 1, "name": "epithelial", "color": "#e6194b"}, {"id": 3, "name": "lymphocyte", "color": "#3cb44b"}]


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """The team fixture makes six users; PBKDF2 would spend seconds of this shared CPU on them."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def classes_for(instances: np.ndarray) -> dict[str, int]:
    return {str(int(i)): (1 if i % 2 else 3) for i in np.unique(instances) if i}


def build_curated(team, *, imported_only: bool = False) -> dict:
    """Project "Cervix" (tile 64, two classes with ids 1 and 3):

    * slide.png 80x100 -> 4 overlapping tiles; three reviewed, one only submitted; one reviewed
      tile also has a newer submitted correction (v2);
    * small.png 48x40 -> one tile (the whole image): ring with a hole, a nucleus inside it, a
      nucleus in two diagonal pieces; pre-annotated by model version 1, corrected twice
      (annotator, then admin) and reviewed.

    With ``imported_only`` every annotation is a reviewed import (no review hooks fire).
    """
    project = team["project"]
    users = team["users"]
    project.nucleus_classes = CLASSES
    project.licence = "CC-BY-4.0"
    project.description = "Synthetic cervix tiles for tests."
    project.save()
    slide_rgb, slide_mask = synth.generate("he", (100, 80), 11)
    small_rgb = synth.generate("pap", (40, 48), 12)[0]
    results = ingest_images(project=project, images=[
        decode_image("slide.png", png_bytes(slide_rgb)), decode_image("small.png", png_bytes(small_rgb))
    ], uploaded_by=users["admin"])
    slide, small = results[0].image, results[1].image
    full = slide_mask.astype(np.int32)
    slide_tiles = list(Tile.objects.filter(image=slide).order_by("y", "x"))
    for n, tile in enumerate(slide_tiles):
        crop = np.ascontiguousarray(full[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w])
        if imported_only:
            create_annotation(tile=tile, instances=crop, author=users["annotator"], source=AnnotationSource.IMPORTED,
                              status="reviewed", classes=classes_for(crop))
            continue
        annotation, _ = create_annotation(tile=tile, instances=crop, author=users["annotator"], classes=classes_for(crop))
        if n != 3:
            review_annotation(annotation=annotation, reviewer=users["reviewer"], accept=True)
        if n == 1:  # a newer, unreviewed correction: drop the last nucleus
            fixed = np.where(crop == crop.max(), 0, crop)
            create_annotation(tile=tile, instances=fixed, author=users["annotator"], classes=classes_for(fixed))
    tile = Tile.objects.get(image=small)
    truth = tricky_instances()
    if imported_only:
        create_annotation(tile=tile, instances=truth, author=users["admin"], source=AnnotationSource.IMPORTED,
                          status="reviewed", classes=classes_for(truth))
    else:
        predicted = np.where(truth == 2, 0, truth)  # the model missed the small nucleus
        predicted[0:3, 40:44] = 9  # and found a speck that is not a nucleus
        model = ModelVersion.objects.create(project=project, version=1, architecture="unet")
        prediction = Prediction.objects.create(
            tile=tile, model_version=model, mask=default_storage.save(f"predictions/{tile.pk}.png", ContentFile(encode_png(predicted))),
        )
        first, _ = create_annotation(tile=tile, instances=np.where(predicted == 9, 0, predicted), author=users["annotator"],
                                     source=AnnotationSource.CORRECTED_PREDICTION, prediction=prediction)
        second, _ = create_annotation(tile=tile, instances=truth, author=users["admin"], parent=first, classes=classes_for(truth))
        review_annotation(annotation=second, reviewer=users["reviewer"], accept=True)
    return {"project": project, "slide": slide, "small": small, "slide_tiles": slide_tiles, "small_tile": tile}


@pytest.fixture
def curated(team):
    return build_curated(team)


def export_zip(project, fmt: str, tmp_path, filters=None, user=None, layout="tile") -> tuple[Export, Path]:
    """These tests check the per-tile layout (names, per-tile provenance); the image layout (the
    default) has its own tests in test_image_truth.py."""
    filters = dict(filters or {})
    filters["options"] = {"layout": layout, **(filters.get("options") or {})}
    export = create_export(project=project, format=fmt, filters=filters, created_by=user)
    export = run_export(export_id=export.pk)
    assert export.status == "succeeded", export.error
    path = tmp_path / f"{project.name}-{fmt}-{export.pk}.zip"
    stream, _ = open_stream(export.file.name)
    with stream:
        path.write_bytes(stream.read())
    return export, path


def unzip(path: Path) -> Path:
    out = path.with_suffix("")
    zipfile.ZipFile(path).extractall(out)
    return out


def items_of(zip_path: Path) -> dict:
    """name -> (image sha256, instances, classes by name), read back with the format's reader."""
    dataset = read_dataset(unzip(zip_path))
    assert not dataset.problems, dataset.problems
    out = {}
    for item in dataset.items:
        image = decode_image(item.image_file, item.load_image())
        labels = item.load_labels(image.height, image.width)
        out[item.name] = (image.sha256, labels.instances, labels.classes)
    return out


def relabelled(mask: np.ndarray) -> np.ndarray:
    ids = np.unique(mask)
    lut = np.zeros(int(mask.max()) + 1, np.int32)
    lut[ids[ids > 0]] = np.arange(1, int((ids > 0).sum()) + 1)
    return lut[mask]


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_import_export_gives_identical_images_masks_and_classes(curated, tmp_path, fmt):
    project = curated["project"]
    first, zip1 = export_zip(project, fmt, tmp_path, {"status": "submitted"})
    summary = import_path(path=zip1, project_name=f"copy-{fmt}")  # format detected
    assert summary.format == fmt and summary.created_project
    assert summary.images == 5 and summary.nuclei == first.manifest["counts"]["nuclei"]
    copy = Project.objects.get(name=f"copy-{fmt}")
    assert copy.tile_size == 64 and copy.licence == "CC-BY-4.0"
    assert [(c["id"], c["name"], c["color"]) for c in copy.nucleus_classes] == [(c["id"], c["name"], c["color"]) for c in CLASSES]
    _, zip2 = export_zip(copy, fmt, tmp_path)
    a, b = items_of(zip1), items_of(zip2)
    assert sorted(a) == sorted(b) == ["slide_x0_y0", "slide_x0_y36", "slide_x16_y0", "slide_x16_y36", "small"]
    for name in a:
        assert a[name][0] == b[name][0], f"{name}: image bytes differ"
        assert np.array_equal(a[name][1], b[name][1]), f"{name}: masks differ"
        assert a[name][2] == b[name][2], f"{name}: classes differ"
    # Every format but Label Studio (holes filled) holds exactly what is stored.
    manifest = json.loads((unzip(zip1) / "manifest.json").read_text())
    for tile in manifest["tiles"]:
        stored = relabelled(read_label_map(Annotation.objects.get(pk=tile["annotation"]["id"]).mask.name))
        if fmt != "labelstudio" or tile["name"] != "small":
            assert np.array_equal(a[tile["name"]][1], stored), tile["name"]
        names = {c["id"]: c["name"] for c in CLASSES}
        listed = Annotation.objects.get(pk=tile["annotation"]["id"]).classes
        raw = read_label_map(Annotation.objects.get(pk=tile["annotation"]["id"]).mask.name)
        expected = {int(new): names[listed[str(int(old))]] for new, old in
                    enumerate([i for i in np.unique(raw) if i], start=1)}
        assert a[tile["name"]][2] == expected


def test_reviewed_versions_are_exported_by_default_and_newer_submitted_ones_on_request(curated, tmp_path):
    project = curated["project"]
    reviewed, zip_reviewed = export_zip(project, "png", tmp_path)
    tiles = json.loads((unzip(zip_reviewed) / "manifest.json").read_text())["tiles"]
    assert [t["name"] for t in tiles] == ["slide_x0_y0", "slide_x16_y0", "slide_x0_y36", "small"]  # one never reviewed
    by_name = {t["name"]: t for t in tiles}
    assert by_name["slide_x16_y0"]["annotation"]["version"] == 1 and by_name["slide_x16_y0"]["annotation"]["status"] == "reviewed"
    submitted, zip_submitted = export_zip(project, "png", tmp_path, {"status": "submitted"})
    by_name = {t["name"]: t for t in json.loads((unzip(zip_submitted) / "manifest.json").read_text())["tiles"]}
    assert len(by_name) == 5 and by_name["slide_x16_y0"]["annotation"]["version"] == 2
    assert reviewed.manifest["counts"]["tiles"] == 4 and submitted.manifest["counts"]["tiles"] == 5
    assert "tiles" not in reviewed.manifest and reviewed.manifest["archive"]["files"] > 0  # the row keeps a summary


def test_filters_select_annotators_dates_classes_and_images(curated, tmp_path):
    project = curated["project"]
    by_admin, _ = export_zip(project, "png", tmp_path, {"annotators": ["admin"]})
    assert by_admin.manifest["counts"]["tiles"] == 1 and by_admin.manifest["annotators"] == ["admin", "annotator"]
    lymph, zip_lymph = export_zip(project, "coco", tmp_path, {"status": "submitted", "classes": ["lymphocyte"]})
    assert lymph.manifest["counts"]["per_class"] == {"epithelial": 0, "lymphocyte": lymph.manifest["counts"]["nuclei"]}
    assert set(c for _, _, cls in items_of(zip_lymph).values() for c in cls.values()) == {"lymphocyte"}
    only_small, _ = export_zip(project, "png", tmp_path, {"images": ["small"]})
    assert only_small.manifest["counts"]["tiles"] == 1
    today = timezone.now().date()
    in_range, _ = export_zip(project, "png", tmp_path, {"date_from": str(today - timedelta(days=1)), "date_to": str(today)})
    assert in_range.manifest["counts"]["tiles"] == 4
    with pytest.raises(KaryoError, match="nothing to export"):
        create_export(project=project, format="png", filters={"date_to": str(today - timedelta(days=1))})
    for bad in ({"status": "draft"}, {"classes": ["macrophage"]}, {"annotators": ["nobody"]}, {"colour": 1},
                {"split": {"train": -1}}, {"date_from": "yesterday"}, {"options": {"object_type": "cell"}}):
        with pytest.raises(KaryoError) as error:
            create_export(project=project, format="png", filters=bad)
        assert error.value.code == "invalid_filters"


def test_the_manifest_records_provenance_and_the_sha256_of_every_file(curated, tmp_path):
    export, path = export_zip(curated["project"], "geojson", tmp_path, user=curated["project"].created_by)
    root = unzip(path)
    manifest = json.loads((root / "manifest.json").read_text())
    members = sorted(n for n in zipfile.ZipFile(path).namelist() if n != "manifest.json")
    assert sorted(manifest["files"]) == members and "README.md" in members
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["karyo_version"] == "0.1.0" and manifest["format"] == "geojson" and manifest["created_by"] == "staff"
    assert manifest["filters"]["status"] == "reviewed" and manifest["split"] is None
    small = {t["name"]: t for t in manifest["tiles"]}["small"]
    assert small["image"]["sha256"] == curated["small"].sha256
    assert small["tile"] == {"id": curated["small_tile"].pk, "x": 0, "y": 0, "w": 48, "h": 40}
    assert small["annotation"]["version"] == 2 and small["annotation"]["versions"] == 2
    assert small["annotation"]["authors"] == ["annotator", "admin"] and small["annotation"]["reviewer"] == "reviewer"
    assert small["annotation"]["reviewed_at"] and small["annotation"]["first_created_at"] <= small["annotation"]["created_at"]
    assert small["model_version"] == {"id": small["model_version"]["id"], "version": 1, "architecture": "unet"}
    changes = small["changes_vs_prediction"]
    assert changes["instances_added"] == 1 and changes["instances_removed"] == 1 and changes["instances_matched"] == 3
    assert changes["pixels_changed"] == int((tricky_instances() == 2).sum()) + 12
    slide = {t["name"]: t for t in manifest["tiles"]}["slide_x0_y0"]
    assert slide["model_version"] is None and slide["changes_vs_prediction"] is None
    card = (root / "README.md").read_text()
    assert "CC-BY-4.0" in card and "| epithelial |" in card and "annotator" in card and "reviewer" in card
    assert manifest["counts"]["nuclei"] == sum(t["nuclei"] for t in manifest["tiles"])


def test_a_seeded_split_is_by_image_reproducible_and_written_into_the_archive(team, tmp_path):
    project = team["project"]
    names = synth.write_dataset(tmp_path / "ds", 6, kind="he", size=(80, 64), seed=2)
    import_path(path=tmp_path / "ds", project=project)
    split = {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 4, "stratify": True}
    first, path = export_zip(project, "png", tmp_path, {"split": split})
    second, _ = export_zip(project, "png", tmp_path, {"split": split})
    tiles = json.loads((unzip(path) / "manifest.json").read_text())["tiles"]
    per_image = {}
    for t in tiles:
        per_image.setdefault(t["image"]["name"], set()).add(t["split"])
    assert all(len(s) == 1 for s in per_image.values()) and len(per_image) == len(names)
    counts = first.manifest["counts"]["per_split"]
    assert {k: v["images"] for k, v in counts.items()} == {"train": 3, "val": 2, "test": 1} or \
        {k: v["images"] for k, v in counts.items()} == {"train": 3, "val": 1, "test": 2}
    assert first.manifest["split_seed"] == 4 and first.manifest["counts"]["per_split"] == second.manifest["counts"]["per_split"]
    listed = {s: (unzip(path) / "splits" / f"{s}.txt").read_text().split() for s in counts}
    assert sorted(sum(listed.values(), [])) == sorted(t["name"] for t in tiles)
    random_seed, coco_zip = export_zip(project, "coco", tmp_path, {"split": {"train": 0.8, "test": 0.2}})
    assert isinstance(random_seed.filters["split"]["seed"], int)  # recorded for reproduction
    assert sorted(n for n in zipfile.ZipFile(coco_zip).namelist() if n.startswith("annotations/")) == [
        "annotations/instances_test.json", "annotations/instances_train.json"]


def test_the_frozen_split_is_refused_until_the_project_has_one(curated):
    project = curated["project"]
    with pytest.raises(KaryoError, match="no frozen split"):
        create_export(project=project, format="png", filters={"split": "frozen"})
    if not hasattr(project, "validation_frozen_at") or not hasattr(curated["slide"], "split"):
        pytest.skip("this checkout has no frozen by-image split yet")
    project.validation_frozen_at = timezone.now()
    project.save(update_fields=["validation_frozen_at"])
    type(curated["slide"]).objects.filter(pk=curated["slide"].pk).update(split="val")
    export = run_export(export_id=create_export(project=project, format="png", filters={"split": "frozen"}).pk)
    assert export.manifest["counts"]["per_split"]["val"]["tiles"] == 3
    assert export.manifest["counts"]["per_split"]["unassigned"]["tiles"] == 1


def test_the_command_line_exports_a_zip_with_the_chosen_status(curated, tmp_path, capsys):
    out = tmp_path / "cervix.zip"
    call_command("export_dataset", "--project", "Cervix", "--format", "coco", "--out", str(out), "--status", "submitted",
                 "--split", "0.5,0.5", "--seed", "1", "--stats")
    printed = capsys.readouterr().out
    assert "exported 5 tiles of 2 images" in printed and "peak traced memory" in printed
    names = zipfile.ZipFile(out).namelist()
    assert "manifest.json" in names and "README.md" in names and any(n.startswith("annotations/instances_") for n in names)
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="nothing to export"):
        call_command("export_dataset", "--project", "Cervix", "--format", "png", "--out", str(out), "--annotator", "viewer")


def test_an_admin_starts_an_export_over_the_api_and_a_reviewer_downloads_it(curated, api):
    project = curated["project"]
    response = api("admin").post(f"/api/projects/{project.pk}/exports/",
                                 {"format": "pannuke", "filters": {"status": "submitted", "split": {"train": 1, "seed": 1}}},
                                 format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "queued" and body["download_url"] is None and body["filters"]["split"]["seed"] == 1
    early = api("reviewer").get(f"/api/exports/{body['id']}/download/")
    assert early.status_code == 409 and early.json()["error"]["code"] == "export_not_ready"
    run_export(export_id=body["id"])  # what the worker does (see the worker test below)
    detail = api("reviewer").get(f"/api/exports/{body['id']}/").json()
    assert detail["status"] == "succeeded" and detail["progress"] == 1.0
    assert detail["manifest"]["counts"]["per_split"]["train"]["tiles"] == 5
    download = api("reviewer").get(detail["download_url"])
    assert download.status_code == 200 and download["Content-Type"] == "application/zip"
    assert "attachment" in download["Content-Disposition"] and download.streaming
    data = b"".join(download.streaming_content)
    assert int(download["Content-Length"]) == len(data)
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert {"train/images.npy", "train/masks.npy", "train/types.npy", "manifest.json"} <= set(names)
    listing = api("reviewer").get(f"/api/projects/{project.pk}/exports/").json()
    assert [e["id"] for e in listing["results"]] == [body["id"]]
    bad = api("admin").post(f"/api/projects/{project.pk}/exports/", {"format": "png", "filters": {"status": "maybe"}},
                            format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_filters"
    assert api("annotator").get(f"/api/exports/{body['id']}/download/").status_code == 403


def test_a_failing_export_records_its_error(curated, monkeypatch):
    export = create_export(project=curated["project"], format="png", filters=None)
    monkeypatch.setattr("backend.exports.services.read_label_map", lambda name: (_ for _ in ()).throw(OSError("disk gone")))
    export = run_export(export_id=export.pk)
    assert export.status == "failed" and "disk gone" in export.error and export.finished_at is not None


# --- a real worker process -------------------------------------------------------------

def worker_env(settings) -> dict:
    """The worker must see this test's database and storage (the fixtures changed both)."""
    env = os.environ.copy()
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        auth = quote(db["USER"] or "") + (f":{quote(db['PASSWORD'])}" if db["PASSWORD"] else "")
        env["DATABASE_URL"] = f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    storage = settings.STORAGES["default"]
    if storage["BACKEND"].endswith("FileSystemStorage"):
        env["KARYO_MEDIA_ROOT"] = str(storage["OPTIONS"]["location"])
    else:
        options = storage["OPTIONS"]
        env.update(KARYO_S3_ENDPOINT=options["endpoint_url"], KARYO_S3_BUCKET=options["bucket_name"],
                   KARYO_S3_ACCESS_KEY=options["access_key"], KARYO_S3_SECRET_KEY=options["secret_key"],
                   KARYO_S3_REGION=options["region_name"])
    return env


@pytest.fixture
def export_worker(settings, tmp_path):
    log = open(tmp_path / "worker.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "backend.karyo", "worker", "-Q", "cpu", "--pool", "solo",
         "--hostname", f"exports-{os.getpid()}@%h", "-l", "INFO", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        log.seek(0)
        if "ready." in log.read():
            break
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"worker exited: {log.read()}")
        time.sleep(0.2)
    else:
        process.kill()
        log.seek(0)
        pytest.fail(f"worker never became ready: {log.read()}")
    yield log
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.mark.django_db(transaction=True)
def test_an_export_runs_as_a_celery_task_in_a_real_worker_process(team, export_worker):
    data = build_curated(team, imported_only=True)
    export = start_export(project=data["project"], format="coco", filters=None, created_by=team["users"]["admin"])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        export.refresh_from_db()
        if export.status in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    export_worker.seek(0)
    log = export_worker.read()
    assert export.status == "succeeded", f"{export.status} {export.error}\n{log[-3000:]}"
    assert "karyo.cpu.export_dataset" in log
    assert export.progress == 1.0 and export.manifest["counts"]["tiles"] == 5
    stream, size = open_stream(export.file.name)
    with stream:
        names = zipfile.ZipFile(io.BytesIO(stream.read())).namelist()
    assert "annotations/instances.json" in names and size > 0
