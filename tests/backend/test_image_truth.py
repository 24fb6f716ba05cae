"""Nuclei belong to images, not tiles (issue 12): the stitched nuclei of an image, exports in
image coordinates, and the checks a user would make on a data set imported at a tile size
smaller than its images (generated here; CPM-15 too when ../shared/data/cpm15 is present)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from backend.exports.importing import import_path
from backend.images.models import Annotation, Tile
from backend.images.stitching import TileLabels, label_window, stitch
from backend.projects.models import Project
from ml_worker import synth
from ml_worker.data import tile_grid
from tests.backend.test_exports import export_zip, items_of, unzip

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]
ROOT = Path(__file__).resolve().parents[2]
CPM15 = ROOT.parent / "shared" / "data" / "cpm15"
CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}]
FORMATS = ["png", "coco", "pannuke", "labelstudio", "geojson"]


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    """The same instances (pixel sets), whatever their ids."""
    if a.shape != b.shape or not np.array_equal(a > 0, b > 0):
        return False
    pairs = set(zip(a[a > 0].tolist(), b[b > 0].tolist()))
    return len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs})


def nuclei_in(mask: np.ndarray) -> int:
    return int((np.unique(mask) > 0).sum())


# --- the stitcher on its own ---------------------------------------------------------------------

@pytest.mark.parametrize("tile,overlap", [(64, 16), (50, 7), (64, 0)])
def test_stitching_the_crops_of_an_image_gives_back_its_nuclei_each_once_and_whole(tile, overlap):
    for seed in range(4):
        _, mask = synth.generate("he", size=160, seed=seed)
        mask = mask.astype(np.int32)
        tiles = [TileLabels(k, x, y, mask[y : y + tile, x : x + tile], {}, shared_ids=True)
                 for k, (y, x) in enumerate(tile_grid(160, 160, tile, overlap))]
        nuclei = stitch(tiles, default_class=1)
        assert len(nuclei) == nuclei_in(mask)
        assert same_up_to_relabelling(label_window(nuclei, x=0, y=0, w=160, h=160), mask)


def test_halves_drawn_in_two_abutting_tiles_are_one_nucleus_owned_by_the_tile_with_its_centroid():
    left = np.zeros((32, 32), np.int32)
    right = np.zeros((32, 32), np.int32)
    left[10:20, 20:32] = 7  # 12 px wide on the left of the seam at x = 32
    right[10:20, 0:5] = 2  # 5 px on the right: the centroid (x = 29.0) is in the left tile
    right[0:4, 20:24] = 3  # a nucleus of the right tile alone
    nuclei = stitch([TileLabels(1, 0, 0, left, {7: 4}), TileLabels(2, 32, 0, right, {2: 5, 3: 5})], default_class=1)
    assert len(nuclei) == 2
    cut = next(n for n in nuclei if n.area == 170)
    assert cut.bbox == (20, 10, 37, 20) and cut.tile_id == 1 and cut.class_id == 4 and set(cut.tiles) == {1, 2}


def test_an_overlap_the_owning_tile_left_empty_drops_the_neighbours_nucleus_there():
    a = np.zeros((40, 40), np.int32)
    b = np.zeros((40, 40), np.int32)
    b[2:8, 2:8] = 1  # tile b (x 24..64) draws a nucleus at x 26..32; its centroid belongs to tile a (x 0..40)
    a[30:36, 28:34] = 1  # a's nucleus at x 28..34 (centroid x 31, nearer a's centre 20 than b's 44): b left it out
    nuclei = stitch([TileLabels(1, 0, 0, a, {}), TileLabels(2, 24, 0, b, {})], default_class=1)
    assert [(n.tile_id, n.bbox) for n in nuclei] == [(1, (28, 30, 34, 36))]


# --- a generated data set imported at a tile size smaller than its images -------------------------

@pytest.fixture
def tiled_project(tmp_path):
    names = synth.write_dataset(tmp_path / "ds", 3, kind="he", size=160, seed=3)
    project = Project.objects.create(name="tiled", nucleus_classes=CLASSES, tile_size=64, tile_overlap=16)
    summary = import_path(path=tmp_path / "ds", project=project)
    assert summary.images == 3
    masks = {name: np.asarray(PILImage.open(tmp_path / "ds" / "masks" / f"{name}.png")).astype(np.int32) for name in names}
    return project, masks


def test_an_image_imported_in_tiles_exports_each_nucleus_once_in_image_coordinates(tiled_project, tmp_path):
    project, masks = tiled_project
    assert Tile.objects.filter(project=project).count() == 3 * 9  # 160 px in 64-px tiles, overlap 16: 3 x 3
    total = sum(nuclei_in(m) for m in masks.values())
    cut = sum(a.nucleus_count for a in Annotation.objects.filter(tile__project=project))
    assert cut > total  # per tile, border nuclei are counted in every tile they touch

    export, path = export_zip(project, "coco", tmp_path, layout="image")
    coco = json.loads((unzip(path) / "annotations" / "instances.json").read_text())
    assert len(coco["annotations"]) == total == export.manifest["counts"]["nuclei"]
    assert len(coco["images"]) == 3 and {(i["width"], i["height"]) for i in coco["images"]} == {(160, 160)}
    manifest = json.loads((unzip(path) / "manifest.json").read_text())
    assert manifest["layout"] == "image" and manifest["left_out"] == []
    for image in manifest["images"]:
        assert len(image["annotated_regions"]) == 9
        assert {(r["x"], r["y"]) for r in image["annotated_regions"]} == {(x, y) for x in (0, 48, 96) for y in (0, 48, 96)}
        assert image["nuclei"] == nuclei_in(masks[image["name"]])
    assert sum(t["nuclei_owned"] for t in manifest["tiles"]) == total

    _, path = export_zip(project, "png", tmp_path, layout="image")
    for name, mask in masks.items():
        exported = np.asarray(PILImage.open(unzip(path) / "masks" / f"{name}.png")).astype(np.int32)
        assert same_up_to_relabelling(exported, mask), name

    _, path = export_zip(project, "geojson", tmp_path, layout="image")
    for name, mask in masks.items():
        features = json.loads((unzip(path) / "geojson" / f"{name}.geojson").read_text())["features"]
        assert len(features) == nuclei_in(mask), name


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_in_the_image_layout_reads_back_as_the_source_masks(tiled_project, tmp_path, fmt):
    project, masks = tiled_project
    export, path = export_zip(project, fmt, tmp_path, layout="image")
    items = items_of(path)
    assert sorted(items) == sorted(masks)  # 160-px images: one PanNuke patch each
    for name, mask in masks.items():
        instances = items[name][1]
        if fmt == "labelstudio":  # holes are filled: compare counts
            assert nuclei_in(instances) == nuclei_in(mask), name
        else:
            assert same_up_to_relabelling(instances, mask), name
    assert export.manifest["counts"]["nuclei"] == sum(nuclei_in(m) for m in masks.values())


def test_export_import_export_in_the_image_layout_gives_the_same_nuclei(tiled_project, tmp_path):
    project, masks = tiled_project
    _, zip1 = export_zip(project, "coco", tmp_path, layout="image")
    copy = Project.objects.create(name="copy", nucleus_classes=CLASSES, tile_size=64, tile_overlap=16)
    import_path(path=zip1, project=copy)
    assert Tile.objects.filter(project=copy).count() == 27
    _, zip2 = export_zip(copy, "coco", tmp_path, layout="image")
    a, b = items_of(zip1), items_of(zip2)
    assert sorted(a) == sorted(b) == sorted(masks)
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1]), name


def test_pannuke_in_the_image_layout_cuts_256_px_patches_from_the_stitched_map(tmp_path):
    (name,) = synth.write_dataset(tmp_path / "ds", 1, kind="he", size=(300, 280), seed=5, prefix="wide")
    mask = np.asarray(PILImage.open(tmp_path / "ds" / "masks" / f"{name}.png")).astype(np.int32)
    assert mask.shape == (300, 280)
    project = Project.objects.create(name="patches", nucleus_classes=CLASSES, tile_size=96, tile_overlap=0)
    import_path(path=tmp_path / "ds", project=project)
    export, path = export_zip(project, "pannuke", tmp_path, layout="image")
    items = items_of(path)
    assert sorted(items) == sorted(f"{name}_x{x}_y{y}" for x in (0, 256) for y in (0, 256))
    for item, (_, instances, _) in items.items():
        x, y = (int(part[1:]) for part in item.rsplit("_", 2)[1:])
        assert same_up_to_relabelling(instances, mask[y : y + 256, x : x + 256]), item


def test_an_unknown_layout_is_refused(tiled_project, tmp_path):
    from backend.common.errors import KaryoError
    from backend.exports.services import create_export

    with pytest.raises(KaryoError, match="layout"):
        create_export(project=tiled_project[0], format="coco", filters={"options": {"layout": "slide"}})


# --- CPM-15 (when present) -------------------------------------------------------------------------

@pytest.mark.skipif(not (CPM15 / "manifest.csv").exists(), reason="CPM-15 is not in ../shared/data/cpm15")
@pytest.mark.parametrize("tile,overlap", [(256, 0), (128, 32)])
def test_cpm15_imported_in_tiles_exports_its_2905_nuclei_once_in_every_format(tmp_path, tile, overlap):
    project = Project.objects.create(name=f"cpm15-{tile}", nucleus_classes=CLASSES, tile_size=tile, tile_overlap=overlap)
    started = time.monotonic()
    import_path(path=CPM15, project=project)
    print(f"\nCPM-15 at tile {tile}/overlap {overlap}: {Tile.objects.filter(project=project).count()} tiles, "
          f"imported in {time.monotonic() - started:.1f} s")
    masks = {p.stem: np.asarray(PILImage.open(p)).astype(np.int32) for p in sorted((CPM15 / "masks").glob("*.png"))}
    if not masks:  # masks kept as text: the importer's reader knows the layout
        from backend.exports.importing import read_dataset

        dataset = read_dataset(CPM15)
        for item in dataset.items:
            w, h = PILImage.open(CPM15 / "images" / item.image_file).size
            masks[item.name] = item.load_labels(h, w).instances.astype(np.int32)
    assert sum(nuclei_in(m) for m in masks.values()) == 2905
    per_tile = sum(a.nucleus_count for a in Annotation.objects.filter(tile__project=project))
    print(f"  per-tile annotations hold {per_tile} nucleus pieces")
    # The checks (COCO, label maps, GeoJSON) at both tile sizes; every format at the default one.
    for fmt in FORMATS if tile == 256 else ["png", "coco", "geojson"]:
        started = time.monotonic()
        export, path = export_zip(project, fmt, tmp_path, layout="image")
        seconds = time.monotonic() - started
        items = items_of(path)
        counted = sum(nuclei_in(instances) for _, instances, _ in items.values())
        print(f"  {fmt:12s} nuclei in manifest {export.manifest['counts']['nuclei']}, read back {counted} "
              f"(PanNuke: per patch), export {seconds:.1f} s")
        assert export.manifest["counts"]["nuclei"] == 2905
        if fmt == "coco":
            coco = json.loads((unzip(path) / "annotations" / "instances.json").read_text())
            assert len(coco["annotations"]) == 2905 and len(coco["images"]) == 15
        if fmt in ("png", "coco", "geojson"):
            for name, mask in masks.items():
                assert same_up_to_relabelling(items[name][1], mask), (fmt, name)
        if fmt == "geojson":
            for name, mask in masks.items():
                features = json.loads((unzip(path) / "geojson" / f"{name}.geojson").read_text())["features"]
                assert len(features) == nuclei_in(mask), name


# --- the stored table (backend.images.truth) -------------------------------------------------------

def test_the_stored_table_follows_the_accepted_versions_and_a_nucleus_across_a_border_is_stored_once(
        tiled_project, django_capture_on_commit_callbacks):
    from django.core.files.storage import default_storage

    from backend.images.models import Image
    from backend.images.services import create_annotation
    from backend.images.truth import stitched_name, stitched_nuclei

    project, masks = tiled_project
    image = Image.objects.get(project=project, name="he_0000.png")
    mask = masks["he_0000"]
    nuclei = stitched_nuclei(image=image)
    assert len(nuclei) == nuclei_in(mask) and default_storage.exists(stitched_name(image_id=image.pk))
    assert same_up_to_relabelling(label_window(nuclei, x=0, y=0, w=160, h=160), mask)

    # A nucleus drawn over the border of the first two tiles (x 0..64 and 48..112, y 0..64) on a
    # background spot; each tile's new version holds the part it sees.
    spot = next((x, y) for y in range(4, 56) for x in range(50, 58) if not mask[y - 3 : y + 4, x - 8 : x + 9].any())
    drawn = mask.copy()
    drawn[spot[1] - 3 : spot[1] + 4, spot[0] - 8 : spot[0] + 9] = 999
    with django_capture_on_commit_callbacks(execute=True):
        for tile in Tile.objects.filter(image=image, y=0, x__in=[0, 48]):
            create_annotation(tile=tile, instances=drawn[0:64, tile.x : tile.x + 64], author=None)
    nuclei = stitched_nuclei(image=image)
    assert len(nuclei) == nuclei_in(mask) + 1
    assert same_up_to_relabelling(label_window(nuclei, x=0, y=0, w=160, h=160), drawn)


# --- imports in image coordinates (backend.exports.image_annotations) --------------------------------

@pytest.fixture
def unannotated_copy(tmp_path):
    """The same generated images in a second project, tiled 64/16, without annotations."""
    synth.write_dataset(tmp_path / "bare", 3, kind="he", size=160, seed=3)
    (tmp_path / "bare" / "masks").rename(tmp_path / "bare-masks")
    project = Project.objects.create(name="bare", nucleus_classes=CLASSES, tile_size=64, tile_overlap=16)
    import_path(path=tmp_path / "bare", project=project)
    assert not Annotation.objects.filter(tile__project=project).exists()
    return project


@pytest.mark.parametrize("fmt", ["geojson", "coco"])
def test_an_image_coordinate_file_becomes_tile_versions_and_exports_the_same_nuclei(
        tiled_project, unannotated_copy, tmp_path, fmt):
    from backend.exports.image_annotations import import_image_annotations

    project, masks = tiled_project
    _, zip1 = export_zip(project, fmt, tmp_path, layout="image")
    summary = import_image_annotations(project=unannotated_copy, path=zip1)
    assert summary.images == 3 and summary.nuclei == sum(nuclei_in(m) for m in masks.values())
    assert summary.tiles == 27  # the manifest's annotated regions cover every tile
    _, zip2 = export_zip(unannotated_copy, fmt, tmp_path, layout="image")
    a, b = items_of(zip1), items_of(zip2)
    assert sorted(a) == sorted(b) == sorted(masks)
    for name in a:
        assert same_up_to_relabelling(a[name][1], b[name][1]) and same_up_to_relabelling(b[name][1], masks[name]), name


def _square(x0, y0, size=6):
    return [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]


def test_bad_image_coordinate_files_are_refused_whole_with_every_offending_object(unannotated_copy, tmp_path):
    from backend.common.errors import InvalidUpload
    from backend.exports.image_annotations import import_image_annotations

    folder = tmp_path / "bad"
    (folder / "geojson").mkdir(parents=True)

    def feature(ring, fid):
        return {"type": "Feature", "id": fid, "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": "nucleus"}}}

    features = [
        feature(_square(10, 10), "fine"),
        feature(_square(150, 150, 20), "outside"),  # reaches x = 170 on a 160-px image
        feature(_square(40, 40, 10), "first"),
        feature(_square(45, 45, 10), "second"),  # overlaps "first"
        feature([[80, 80], [90, 90], [90, 80], [80, 90], [80, 80]], "bowtie"),  # self-intersecting
    ]
    (folder / "geojson" / "he_0000.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (folder / "annotations").mkdir()
    (folder / "annotations" / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "no_such_image.png", "width": 160, "height": 160}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [sum(_square(5, 5), [])], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "nucleus"}],
    }))
    with pytest.raises(InvalidUpload) as caught:
        import_image_annotations(project=unannotated_copy, path=folder)
    message = str(caught.value.detail)
    assert "nothing imported" in message
    assert "feature 1 (id outside)" in message and "outside the 160x160 image" in message
    assert "feature 2 (id first) and geojson/he_0000.geojson feature 3 (id second) overlap" in message
    assert "feature 4 (id bowtie): self-intersecting polygon" in message
    assert "'no_such_image.png'" in message and "no image of project 'bare'" in message
    assert "id fine" not in message
    assert not Annotation.objects.filter(tile__project=unannotated_copy).exists()


def test_the_import_command_puts_a_geojson_onto_the_projects_images(tiled_project, unannotated_copy, tmp_path, capsys):
    from django.core.management import call_command

    project, masks = tiled_project
    _, path = export_zip(project, "geojson", tmp_path, layout="image")
    call_command("import_dataset", str(path), "--project", "bare", "--onto-images")
    total = sum(nuclei_in(m) for m in masks.values())
    assert f"imported {total} nuclei (geojson) onto 3 images of 'bare' (27 tile versions)" in capsys.readouterr().out


def test_a_nucleus_drawn_in_the_workspace_across_a_tile_border_is_one_nucleus_of_the_image(team, tmp_path):
    """Through the workspace's API as the annotator: each tile's submission holds the part it
    shows; the image's stitched nuclei and a COCO export hold the nucleus once, whole."""
    from backend.common import geometry
    from backend.images.models import Image
    from backend.images.truth import stitched_nuclei
    from tests.backend.conftest import client_for

    project = team["project"]  # tile size 64, no overlap
    project.require_review = False
    project.save(update_fields=["require_review"])
    synth.write_dataset(tmp_path / "wide", 1, kind="he", size=(64, 128), seed=2)
    (tmp_path / "wide" / "masks").rename(tmp_path / "wide-masks")
    import_path(path=tmp_path / "wide", project=project)
    image = Image.objects.get(project=project)
    left, right = Tile.objects.filter(image=image).order_by("x")
    assert (left.x, right.x) == (0, 64)

    def box(x0, y0, x1, y1):
        points = geometry.to_percent(np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float), 64, 64)
        return {"id": "drawn1", "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
                "value": {"points": points, "polygonlabels": ["nucleus"]}}

    client = client_for(team["users"]["annotator"])
    for tile, region in ((left, box(50, 20, 64, 30)), (right, box(0, 20, 8, 30))):
        response = client.post(f"/api/tiles/{tile.pk}/regions/", {"base": {"kind": "empty"}, "regions": [region],
                                                                   "status": "submitted"}, format="json")
        assert response.status_code == 201, response.content
    nuclei = stitched_nuclei(image=image)
    assert [(n.bbox, n.area, n.tile_id) for n in nuclei] == [((50, 20, 72, 30), 220, left.pk)]
    _, path = export_zip(project, "coco", tmp_path, {"status": "submitted"}, layout="image")
    coco = json.loads((unzip(path) / "annotations" / "instances.json").read_text())
    assert [a["area"] for a in coco["annotations"]] == [220]
    assert [a["bbox"] for a in coco["annotations"]] == [[50, 20, 22, 10]]

    # The workspace's context picture of the left tile: the right tile is its margin (dimmed), and
    # the nucleus is outlined whole, in the colour of nuclei crossing the border.
    from backend.web.context import ACROSS, DIM

    response = client.get(f"/api/tiles/{left.pk}/context.png")
    assert response.status_code == 200 and response["X-Karyo-Context"] == "0,0,128,64,64"
    picture = np.asarray(PILImage.open(__import__("io").BytesIO(response.content)).convert("RGB"))
    assert picture.shape == (64, 128, 3)
    outline = np.all(picture == ACROSS, axis=-1)
    assert outline[20, 50:72].all() and outline[29, 50:72].all() and not outline[21:29, 51:71].any()
    original = np.asarray(PILImage.open(tmp_path / "wide" / "images" / f"{image.name}"))[..., :3]
    assert np.array_equal(picture[40:50, 10:40], original[40:50, 10:40])  # inside the tile: as it is
    dimmed = (original[40:50, 90:120] * DIM).astype(np.uint8)
    assert np.abs(picture[40:50, 90:120].astype(int) - dimmed).max() <= 1  # the margin: dimmed


def test_the_imports_api_puts_image_coordinate_nuclei_onto_the_projects_images(team, tiled_project, tmp_path):
    from tests.backend.conftest import client_for

    source, masks = tiled_project
    _, path = export_zip(source, "geojson", tmp_path, layout="image")
    synth.write_dataset(tmp_path / "bare", 3, kind="he", size=160, seed=3)
    (tmp_path / "bare" / "masks").rename(tmp_path / "bare-masks")
    project = team["project"]  # tile size 64, no overlap: 3 x 3 tiles per image
    import_path(path=tmp_path / "bare", project=project)
    url = f"/api/projects/{project.pk}/imports/"
    with open(path, "rb") as fh:
        refused = client_for(team["users"]["annotator"]).post(url, {"file": fh, "onto_images": "true"})
    assert refused.status_code == 403
    with open(path, "rb") as fh:
        response = client_for(team["users"]["admin"]).post(url, {"file": fh, "onto_images": "true"})
    assert response.status_code == 201, response.content
    body = response.json()
    total = sum(nuclei_in(m) for m in masks.values())
    assert (body["images"], body["tiles"], body["nuclei"], body["format"]) == (3, 27, total, "geojson")

    bad = tmp_path / "bad.zip"
    import zipfile

    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("geojson/he_0001.geojson", json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [0, 400], [9, 9], [0, 0]]]},
             "properties": {}}]}))
    before = Annotation.objects.filter(tile__project=project).count()
    with open(bad, "rb") as fh:
        response = client_for(team["users"]["admin"]).post(url, {"file": fh, "onto_images": "true"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_annotations" and "outside the 160x160 image" in error["message"]
    assert Annotation.objects.filter(tile__project=project).count() == before


def test_an_image_over_the_pixel_limit_gets_a_geojson_traced_nucleus_by_nucleus_and_no_label_map(
        tiled_project, tmp_path, monkeypatch):
    from backend.exports import services
    from backend.exports.formats.geojson import features_to_labels
    from backend.exports.services import create_export, run_export

    project, masks = tiled_project
    monkeypatch.setattr(services, "IMAGE_LAYOUT_MAX_PIXELS", 100 * 100)  # the 160-px images are "large"
    export, path = export_zip(project, "geojson", tmp_path, layout="image")
    folder = unzip(path)
    assert not (folder / "images").exists()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["left_out"] == [] and {i["label_map"] for i in manifest["images"]} == {False}
    for name, mask in masks.items():
        features = json.loads((folder / "geojson" / f"{name}.geojson").read_text())["features"]
        assert len(features) == nuclei_in(mask)
        assert same_up_to_relabelling(features_to_labels(features, 160, 160, name).instances, mask), name
    assert export.manifest["counts"]["nuclei"] == sum(nuclei_in(m) for m in masks.values())

    png = run_export(export_id=create_export(project=project, format="png", filters={"options": {"layout": "image"}}).pk)
    assert png.status == "failed" and 'use layout "tile"' in png.error
