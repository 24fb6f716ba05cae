"""Importing data sets in every format: detection, the API, bad archives rejected with nothing
imported, and CPM-15 through COCO and back."""
from __future__ import annotations

import csv
import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from pycocotools.coco import COCO

from backend.common.errors import KaryoError
from backend.common.storage import read_label_map
from backend.images.models import Annotation, Image, Tile
from backend.projects.models import Membership, Project
from tests.backend.conftest import client_for
from tests.backend.factories import disc_labels, label_png, rgb_png
from tests.backend.test_exports import CLASSES, build_curated, export_zip, fast_password_hashing, unzip  # noqa: F401

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]
CPM15 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cpm15"


def stored_files() -> set[str]:
    found = set()

    def walk(path: str) -> None:
        dirs, files = default_storage.listdir(path)
        found.update(f"{path}/{f}".lstrip("/") for f in files)
        for d in dirs:
            walk(f"{path}/{d}".lstrip("/"))

    try:
        walk("")
    except FileNotFoundError:
        pass
    return found


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, data in members:
            info = zipfile.ZipInfo(name)
            archive.writestr(info, data)
    return buffer.getvalue()


def coco_json(categories: list[str], file_name: str = "a.png") -> bytes:
    return json.dumps({
        "images": [{"id": 1, "file_name": file_name, "width": 64, "height": 64}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": len(categories), "iscrowd": 0, "area": 16,
                         "bbox": [4, 4, 4, 4], "segmentation": [[4, 4, 8, 4, 8, 8, 4, 8]]}],
    }).encode()


BAD_ARCHIVES = {
    "path escaping the root": ([("../evil/images/a.png", rgb_png()), ("images/b.png", rgb_png(seed=1))],
                               "unsafe_archive", ["../evil/images/a.png"]),
    "absolute path": ([("/tmp/images/a.png", rgb_png())], "unsafe_archive", ["/tmp/images/a.png"]),
    "duplicate members": ([("images/a.png", rgb_png()), ("images/a.png", rgb_png(seed=1))], "duplicate_names", ["images/a.png"]),
    "duplicate names": ([("images/a.png", rgb_png()), ("images/a.tif", rgb_png(seed=1)),
                         ("masks/a.png", label_png(disc_labels()))], "invalid_dataset", ["images/a.png", "a.tif"]),
    "mask size mismatch": ([("images/a.png", rgb_png()), ("masks/a.png", label_png(disc_labels(32, 64))),
                            ("images/b.png", rgb_png(seed=2)), ("masks/b.png", label_png(disc_labels()))],
                           "invalid_dataset", ["masks/a.png: mask is 64x32 but the tile is 64x64"]),
    "missing mask": ([("images/a.png", rgb_png()), ("masks/a.png", label_png(disc_labels())),
                      ("images/b.png", rgb_png(seed=2))], "invalid_dataset", ["images/b.png has no mask"]),
    "unknown class": ([("images/a.png", rgb_png()), ("annotations/instances.json", coco_json(["epithelial", "macrophage"]))],
                      "invalid_dataset", ["unknown class 'macrophage' in annotations/instances.json (a.png)"]),
    "missing image": ([("images/b.png", rgb_png()), ("annotations/instances.json", coco_json(["epithelial"]))],
                      "invalid_dataset", ["image a.png not found"]),
    "not a zip": ([], "corrupt_archive", ["not a zip archive"]),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_a_bad_archive_is_rejected_over_the_api_with_nothing_imported(curated, api, case):
    members, code, mentioned = BAD_ARCHIVES[case]
    project = curated["project"]
    before = (Image.objects.count(), Tile.objects.count(), Annotation.objects.count(), stored_files())
    data = zip_bytes(members) if members else b"this is not a zip"
    response = api("admin").post(f"/api/projects/{project.pk}/imports/",
                                 {"file": SimpleUploadedFile("upload.zip", data)}, format="multipart")
    assert response.status_code in (400, 415), response.content
    error = response.json()["error"]
    assert error["code"] == code
    for text in mentioned:
        assert text in error["message"], error["message"]
    assert (Image.objects.count(), Tile.objects.count(), Annotation.objects.count(), stored_files()) == before


@pytest.fixture
def curated(team):
    return build_curated(team)


def test_an_admin_imports_a_zip_over_the_api_into_an_existing_project(curated, api, tmp_path):
    project = curated["project"]
    _, path = export_zip(project, "geojson", tmp_path, {"status": "submitted"})
    other = Project.objects.create(name="Second", nucleus_classes=CLASSES, tile_size=64)
    admin = curated["project"].created_by
    Membership.objects.create(user=admin, project=other, role="admin")
    client = client_for(admin)
    response = client.post(f"/api/projects/{other.pk}/imports/",
                           {"file": SimpleUploadedFile("cervix.zip", path.read_bytes()), "status": "submitted"},
                           format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body == {"images": 5, "duplicates": 0, "tiles": 5, "annotations": 5, "nuclei": body["nuclei"],
                    "format": "geojson", "project": "Second", "created_project": False}
    assert set(Annotation.objects.filter(tile__project=other).values_list("status", flat=True)) == {"submitted"}
    again = client.post(f"/api/projects/{other.pk}/imports/",
                        {"file": SimpleUploadedFile("cervix.zip", path.read_bytes())}, format="multipart")
    assert again.status_code == 200 and again.json()["duplicates"] == 5
    assert api("reviewer").post(f"/api/projects/{project.pk}/imports/",
                                {"file": SimpleUploadedFile("x.zip", path.read_bytes())}, format="multipart").status_code == 403


def test_a_failure_while_writing_rolls_back_rows_and_files(curated, tmp_path, monkeypatch):
    _, path = export_zip(curated["project"], "png", tmp_path, {"status": "submitted"})
    before = stored_files()
    import backend.exports.importing as importing

    real = importing.create_annotation
    calls = []

    def flaky(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("storage hiccup")
        return real(**kwargs)

    monkeypatch.setattr(importing, "create_annotation", flaky)
    with pytest.raises(RuntimeError):
        importing.import_path(path=path, project_name="half")
    assert not Project.objects.filter(name="half").exists()
    assert stored_files() == before


def test_the_command_line_imports_an_export_with_or_without_the_format(curated, tmp_path, capsys):
    _, path = export_zip(curated["project"], "labelstudio", tmp_path, {"status": "submitted"})
    call_command("import_dataset", str(path), "--project", "from-ls")
    out = capsys.readouterr().out
    assert "created project 'from-ls' (tile size 64; classes: epithelial, lymphocyte)" in out
    assert "imported 5 images (0 already present) from labelstudio" in out
    call_command("import_dataset", str(unzip(path)), "--project", "from-ls-folder", "--format", "labelstudio")
    assert Image.objects.filter(project__name="from-ls-folder").count() == 5
    with pytest.raises(CommandError, match="no COCO annotation file"):
        call_command("import_dataset", str(path), "--project", "wrong", "--format", "coco")
    assert not Project.objects.filter(name="wrong").exists()


def test_a_foreign_coco_file_creates_its_categories_and_skips_crowds(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "a.png").write_bytes(rgb_png())
    data = json.loads(coco_json(["tumour", "stroma"]))
    data["categories"][0]["id"], data["categories"][1]["id"] = 300, 400  # beyond Karyo's 1..255: renumbered
    data["annotations"][0]["category_id"] = 400
    data["annotations"].append({"id": 2, "image_id": 1, "category_id": 300, "iscrowd": 1,
                                "segmentation": [[20, 20, 30, 20, 30, 30]], "area": 50, "bbox": [20, 20, 10, 10]})
    (tmp_path / "ds" / "coco.json").write_text(json.dumps(data))
    call_command("import_dataset", str(tmp_path / "ds"), "--project", "foreign")
    project = Project.objects.get(name="foreign")
    assert [(c["id"], c["name"]) for c in project.nucleus_classes] == [(1, "tumour"), (2, "stroma")]
    annotation = Annotation.objects.get(tile__project=project)
    assert annotation.nucleus_count == 1 and annotation.classes == {"1": 2}
    assert (read_label_map(annotation.mask.name) == 1).sum() == 16


@pytest.mark.skipif(not CPM15.exists(), reason="the shared CPM-15 data set is not on this machine")
def test_cpm15_in_the_common_layout_goes_to_coco_and_back_with_all_2905_nuclei(tmp_path, capsys):
    expected = sum(int(row["instances"]) for row in csv.DictReader(open(CPM15 / "manifest.csv")))
    assert expected == 2905
    # A tile large enough for the largest image (1032x808): one tile, one annotation per image.
    call_command("import_dataset", str(CPM15), "--project", "cpm15", "--tile-size", "1040")
    source = Project.objects.get(name="cpm15")
    export, path = export_zip(source, "coco", tmp_path)
    assert export.manifest["counts"] == {"tiles": 15, "images": 15, "nuclei": 2905, "per_class": {"nucleus": 2905},
                                         "per_split": {}}
    api = COCO(str(unzip(path) / "annotations" / "instances.json"))
    assert len(api.getAnnIds()) == 2905
    for ann in api.loadAnns(api.getAnnIds()[::97]):
        assert api.annToMask(ann).sum() == ann["area"]
    capsys.readouterr()
    call_command("import_dataset", str(path), "--project", "cpm15-back")
    out = capsys.readouterr().out
    assert "from coco" in out and "2905 nuclei" in out
    back = Project.objects.get(name="cpm15-back")
    assert back.tile_size == 1040
    assert sum(a.nucleus_count for a in Annotation.objects.filter(tile__project=back)) == 2905
    originals = {a.tile.image.name: a for a in Annotation.objects.filter(tile__project=source).select_related("tile__image")}
    for copy in Annotation.objects.filter(tile__project=back).select_related("tile__image"):
        assert np.array_equal(read_label_map(copy.mask.name), read_label_map(originals[copy.tile.image.name].mask.name))


def test_importing_needs_a_project_or_a_new_project_name():
    from backend.exports.importing import import_dataset
    from backend.exports.formats import Dataset

    with pytest.raises(ValueError):
        import_dataset(dataset=Dataset(format="png", items=[]))
    with pytest.raises(KaryoError, match="no images to import"):
        import_dataset(dataset=Dataset(format="png", items=[]), new_project={"name": "empty"})


def test_a_folder_of_images_only_is_imported_unlabelled(team, tmp_path):
    from ml_worker import synth

    synth.write_dataset(tmp_path / "ds", 2, kind="pap", size=64, seed=9)
    (tmp_path / "ds" / "masks").rename(tmp_path / "held-out")
    from backend.exports.importing import import_folder

    summary = import_folder(project=team["project"], root=tmp_path / "ds")
    assert (summary.format, summary.images, summary.tiles, summary.annotations) == ("png", 2, 2, 0)
