"""The browser UI's server side: pages (sign-in, membership), the editor's polygons out and
edits in (backend.web.editing), review diffs, the dashboard summary."""
from __future__ import annotations

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.images.models import Annotation, AnnotationSource, Tile
from backend.images.services import create_annotation
from backend.common import geometry
from backend.web import editing
from tests.backend.conftest import client_for
from tests.backend.factories import disc_labels, finish_ingest, rgb_png

CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}, {"id": 2, "name": "lymphocyte", "color": "#3cb44b"}]


def polygon(region_id: str, xy: list[tuple[float, float]], size: int = 64, label: str = "nucleus") -> dict:
    return {"id": region_id, "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
            "value": {"points": geometry.to_percent(np.array(xy, float), size, size), "polygonlabels": [label]}}


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# --- polygons out -----------------------------------------------------------------------------

def test_editor_regions_are_one_simplified_polygon_per_nucleus_part_with_stable_ids():
    labels = disc_labels(centres=((20, 20), (40, 44)), radius=8).astype(np.int32)
    labels[5:8, 55:58] = 2  # a detached fragment of nucleus 2
    result = editing.editor_regions(labels, classes={"2": 2}, nucleus_classes=CLASSES)
    ids = [r["id"] for r in result]
    assert sorted(ids) == ["k1p1", "k2p1", "k2p2"]
    by_id = {r["id"]: r for r in result}
    assert by_id["k2p1"]["value"]["polygonlabels"] == ["lymphocyte"] and by_id["k1p1"]["value"]["polygonlabels"] == ["nucleus"]
    area = {k: geometry.rasterize_polygon(geometry.from_percent(r["value"]["points"], 64, 64), 64, 64).sum()
            for k, r in by_id.items()}
    assert area["k2p1"] > area["k2p2"] == 9  # piece 1 is the nucleus, piece 2 the 3x3 fragment
    exact = {r.label: len(r.points) for r in geometry.mask_to_regions(labels) if r.piece == 1}
    assert len(by_id["k1p1"]["value"]["points"]) <= exact[1]
    # The simplified outline still covers the nucleus: IoU with the true disc.
    drawn = geometry.rasterize_polygon(geometry.from_percent(by_id["k1p1"]["value"]["points"], 64, 64), 64, 64)
    truth = labels == 1
    assert (drawn & truth).sum() / (drawn | truth).sum() > 0.85


def test_the_editor_config_has_one_polygon_label_per_class_and_escapes_names():
    config = editing.editor_config([*CLASSES, {"id": 3, "name": 'odd "name" <x>', "color": "#000000"}])
    assert config.count("<Label ") == 3 and "BrushLabels" not in config
    assert "&quot;name&quot; &lt;x&gt;" in config or "'odd \"name\" &lt;x&gt;'" in config


# --- edits in -----------------------------------------------------------------------------------

@pytest.fixture
def base():
    labels = disc_labels(centres=((16, 16), (16, 46), (46, 30)), radius=7).astype(np.int32)
    return labels, {"1": 1, "2": 1, "3": 2}


def test_untouched_nuclei_keep_their_exact_pixels(base):
    labels, classes = base
    result = editing.apply_edits(labels, classes, regions=[], deleted=[], merges=[], nucleus_classes=CLASSES)
    assert np.array_equal(result.instances, labels) and result.classes == classes and result.untouched == 3


def test_reshape_delete_add_and_relabel(base):
    labels, classes = base
    reshaped = polygon("k1p1", box(8, 8, 30, 24))
    drawn = polygon("Xk2_9aQ", box(50, 50, 60, 60), label="lymphocyte")
    result = editing.apply_edits(labels, classes, regions=[reshaped, drawn], deleted=[2], merges=[], nucleus_classes=CLASSES)
    out = result.instances
    assert not (out == 2).any()  # deleted
    assert np.array_equal(out == 3, labels == 3)  # untouched, exact
    expected = geometry.rasterize_polygon(geometry.from_percent(reshaped["value"]["points"], 64, 64), 64, 64)
    assert np.array_equal(out == 1, expected)
    new_id = result.new_ids["Xk2_9aQ"]
    assert new_id == 4 and (out == 4).sum() == 100 and result.classes["4"] == 2
    assert (result.changed, result.deleted, result.untouched) == (2, 1, 1)


def test_splitting_a_merged_pair_by_drawing_over_half_of_it(base):
    labels, classes = base
    half = polygon("new1", box(9, 0, 17, 64))  # covers the left half of nucleus 1 (x 9..23)
    result = editing.apply_edits(labels, classes, regions=[half], deleted=[], merges=[], nucleus_classes=CLASSES)
    out = result.instances
    left, right = out[16, 12], out[16, 20]
    assert left == result.new_ids["new1"] and right == 1  # the rest keeps the old id


def test_merging_fragments_into_one_nucleus(base):
    labels, classes = base
    result = editing.apply_edits(labels, classes, regions=[], deleted=[], merges=[["k1p1", "n2"]], nucleus_classes=CLASSES)
    assert set(np.unique(result.instances)) == {0, 1, 3}  # n2: an id of tasks written before the codec
    assert np.array_equal(result.instances == 1, (labels == 1) | (labels == 2)) and result.merged == 1
    assert "2" not in result.classes


@pytest.mark.parametrize("regions,message", [
    ([{"id": "n1", "type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]]}}], "3 to"),
    ([{"id": "n1", "type": "polygonlabels", "value": {"points": [[1, "a"], [2, 2], [3, 3]]}}], "pairs of numbers"),
    ([{"id": "n1", "type": "rectanglelabels", "value": {}}], "polygonlabels"),
])
def test_bad_edits_are_refused_with_a_message(base, regions, message):
    labels, classes = base
    with pytest.raises(editing.EditError, match=message):
        editing.apply_edits(labels, classes, regions=regions, deleted=[], merges=[], nucleus_classes=CLASSES)


def test_comparing_an_annotation_with_its_prediction():
    prediction = disc_labels(centres=((16, 16), (16, 46), (46, 30)), radius=7).astype(np.int32)
    annotation = prediction.copy()
    annotation[annotation == 2] = 0  # removed
    annotation[50:60, 50:60] = 9  # added
    annotation[annotation == 3] = 0
    annotation[40:54, 22:40] = 3  # reshaped (a box instead of the disc, still IoU >= 0.5)
    diff = editing.compare(annotation, prediction)
    assert (diff["unchanged"], diff["reshaped"], diff["added"], diff["removed"]) == (1, 1, 1, 1)
    assert 0 < diff["pixel_dice"] < 1
    assert editing.compare(prediction, prediction)["pixel_dice"] == 1.0


# --- the API behind the pages -----------------------------------------------------------------

@pytest.fixture
def tile_with_prediction(team, api):
    from backend.common.storage import StagedWrites, encode_png
    from backend.ml.models import ModelVersion, Prediction
    from backend.ml.workflows import uncertainty_name

    project = team["project"]
    response = api("admin").post(f"/api/projects/{project.pk}/images/", {"file": SimpleUploadedFile("t.png", rgb_png(64, 64))},
                                 format="multipart")
    assert response.status_code == 201
    finish_ingest()
    tile = Tile.objects.get(project=project)
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/x.pt", status="active")
    labels = disc_labels(centres=((16, 16), (16, 46), (46, 30)), radius=7).astype(np.int32)
    with StagedWrites() as staged:
        name = staged.save(f"predictions/{version.pk}/{tile.pk}.png", encode_png(labels))
        staged.save(uncertainty_name(name), encode_png(np.full((64, 64, 3), 128, np.uint8)))
    prediction = Prediction.objects.create(tile=tile, model_version=version, mask=name, nucleus_count=3)
    return {"tile": tile, "prediction": prediction, "labels": labels, "project": project}


def test_the_editor_opens_the_prediction_and_a_submission_becomes_a_corrected_version(tile_with_prediction, api):
    tile, prediction, labels = (tile_with_prediction[k] for k in ("tile", "prediction", "labels"))
    opened = api("annotator").get(f"/api/tiles/{tile.pk}/regions/").json()
    assert opened["source"] == "prediction" and opened["prediction"]["id"] == prediction.pk and opened["nuclei"] == 3
    assert {r["id"] for r in opened["result"]} == {"k1p1", "k2p1", "k3p1"} and "<PolygonLabels" in opened["config"]

    body = {"base": {"kind": "prediction", "id": prediction.pk}, "regions": [polygon("k3p1", box(22, 38, 40, 54))], "deleted": [2]}
    response = api("annotator").post(f"/api/tiles/{tile.pk}/regions/", body, format="json")
    assert response.status_code == 201, response.content
    saved = response.json()
    assert saved["version"] == 1 and saved["source"] == AnnotationSource.CORRECTED_PREDICTION and saved["prediction"] == prediction.pk
    assert saved["edit"] == {**saved["edit"], "changed": 1, "deleted": 1, "untouched": 1}
    annotation = Annotation.objects.get(pk=saved["id"])
    from backend.common.storage import read_label_map

    stored = read_label_map(annotation.mask.name)
    assert np.array_equal(stored == 1, labels == 1) and not (stored == 2).any() and annotation.nucleus_count == 2

    # Opened again, the tile starts from that newer annotation; a second edit descends from it.
    again = api("annotator").get(f"/api/tiles/{tile.pk}/regions/").json()
    assert again["source"] == "annotation" and again["annotation"]["version"] == 1
    second = api("annotator").post(f"/api/tiles/{tile.pk}/regions/",
                                   {"base": {"kind": "annotation", "id": annotation.pk}, "merges": [["k1p1", "k3p1"]]}, format="json")
    assert second.status_code == 201 and second.json()["parent"] == annotation.pk and second.json()["nucleus_count"] == 1
    assert second.json()["prediction"] == prediction.pk

    diff = api("viewer").get(f"/api/annotations/{saved['id']}/diff/").json()
    assert diff["reference"]["kind"] == "prediction" and diff["diff"]["removed"] == 1 and diff["diff"]["unchanged"] == 1
    png = api("viewer").get(f"/api/annotations/{saved['id']}/diff.png?size=32")
    assert png.status_code == 200 and png["Content-Type"] == "image/png"

    review = api("reviewer").get(f"/api/projects/{tile.project_id}/review/").json()
    assert [a["version"] for a in review["results"]] == [2] and review["results"][0]["image_name"] == "t.png"


def test_a_bad_base_or_a_viewer_cannot_store_an_edit(tile_with_prediction, api, make_user):
    tile = tile_with_prediction["tile"]
    wrong = api("annotator").post(f"/api/tiles/{tile.pk}/regions/", {"base": {"kind": "prediction", "id": 999999}}, format="json")
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_base"
    bad = api("annotator").post(f"/api/tiles/{tile.pk}/regions/",
                                {"base": {"kind": "empty"}, "regions": [{"id": "x", "value": {"points": [[1, 1]]}}]}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_edit"
    assert api("viewer").post(f"/api/tiles/{tile.pk}/regions/", {"base": {"kind": "empty"}}, format="json").status_code == 403


def test_thumbnails_and_the_heat_map(tile_with_prediction, api):
    tile = tile_with_prediction["tile"]
    thumb = api("viewer").get(f"/api/tiles/{tile.pk}/prediction.png?size=32")
    assert thumb.status_code == 200 and thumb["X-Karyo-Prediction"] == str(tile_with_prediction["prediction"].model_version_id)
    from PIL import Image
    import io

    heat = Image.open(io.BytesIO(api("viewer").get(f"/api/tiles/{tile.pk}/uncertainty.png").content))
    assert heat.mode == "RGBA" and heat.size == (64, 64)
    assert api("viewer").get(f"/api/tiles/{tile.pk}/prediction.png?size=1").status_code == 400


def test_the_summary_counts_tiles_by_status(tile_with_prediction, api, team):
    project, tile = tile_with_prediction["project"], tile_with_prediction["tile"]
    create_annotation(tile=tile, instances=tile_with_prediction["labels"], author=team["users"]["annotator"])
    summary = api("viewer").get(f"/api/projects/{project.pk}/summary/").json()
    assert summary["counts"] == {**summary["counts"], "tiles": 1, "annotated": 1, "submitted": 1, "unlabelled": 0, "predicted": 1}
    assert summary["active_model"]["version"] == 1 and summary["project"]["my_role"] == "viewer"
    assert "unet" in summary["training_form"]["architectures"] and "hybrid" in summary["strategies"]
    images = api("viewer").get(f"/api/projects/{project.pk}/tiles-by-image/").json()["images"]
    assert images[0]["tiles"][0]["status"] == "submitted"


def test_the_worker_uncertainty_map_shows_the_nuclei_to_fix():
    from types import SimpleNamespace

    from PIL import Image
    import io

    from backend.ml.workflows import uncertainty_name, uncertainty_png

    yy, xx = np.mgrid[:32, :32]
    instances = np.zeros((32, 32), np.int32)
    instances[(yy - 8) ** 2 + (xx - 8) ** 2 <= 16] = 1
    instances[(yy - 22) ** 2 + (xx - 22) ** 2 <= 16] = 2
    fg = np.where(instances == 1, 0.99, np.where(instances == 2, 0.6, 0.01)).astype(np.float32)
    probs = np.stack([1 - fg, fg])
    analysis = SimpleNamespace(probs=probs, kind="softmax", instances=instances)
    image = np.asarray(Image.open(io.BytesIO(uncertainty_png(analysis)))).astype(int)
    # the doubtful nucleus is hot, the confident one and the empty background cold
    assert image[instances == 2].mean() > 3 * image[instances == 1].mean()
    assert image[0:3, 26:32].max() < 20
    assert uncertainty_png(SimpleNamespace(probs=None, kind="softmax")) is None
    assert uncertainty_name("predictions/3/7.png") == "predictions/3/7-uncertainty.png"


# --- pages --------------------------------------------------------------------------------------

def test_pages_need_a_signed_in_member(team, client):
    project = team["project"]
    pages = ["/", f"/projects/{project.pk}/", f"/projects/{project.pk}/queue/", f"/projects/{project.pk}/training/",
             f"/projects/{project.pk}/models/", f"/projects/{project.pk}/exports/", f"/projects/{project.pk}/review/"]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/?next="), url
    client.force_login(team["users"]["outsider"])
    assert client.get("/").status_code == 200
    for url in pages[1:]:
        assert client.get(url).status_code == 404, url
    client.force_login(team["users"]["viewer"])
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert b'id="karyo-config"' in response.content
    assert b'"my_role": "viewer"' in client.get(f"/projects/{project.pk}/training/").content


def test_a_tile_page_belongs_to_its_project(team, client, make_user):
    from backend.projects.services import create_project

    other = create_project(name="Other", created_by=team["users"]["staff"], tile_size=64)
    client_for(team["users"]["staff"]).post(f"/api/projects/{other.pk}/images/",
                                           {"file": SimpleUploadedFile("o.png", rgb_png(64, 64, seed=5))}, format="multipart")
    finish_ingest()
    tile = Tile.objects.get(project=other)
    client.force_login(team["users"]["admin"])
    assert client.get(f"/projects/{team['project'].pk}/tiles/{tile.pk}/").status_code == 404
    client.force_login(team["users"]["staff"])
    assert client.get(f"/projects/{other.pk}/tiles/{tile.pk}/").status_code == 200


def test_the_images_and_slide_pages_need_a_member_and_the_upload_page_an_admin(team, client, make_user):
    from backend.projects.services import create_project

    project = team["project"]
    other = create_project(name="Other slides", created_by=team["users"]["staff"], tile_size=64)
    for target in (project, other):
        client_for(team["users"]["staff"]).post(f"/api/projects/{target.pk}/images/",
                                               {"file": SimpleUploadedFile("s.png", rgb_png(64, 64, seed=target.pk))},
                                               format="multipart")
    finish_ingest()
    mine = Tile.objects.filter(project=project).latest("pk").image_id
    theirs = Tile.objects.get(project=other).image_id
    client.force_login(team["users"]["viewer"])
    assert client.get(f"/projects/{project.pk}/images/").status_code == 200
    page = client.get(f"/projects/{project.pk}/images/{mine}/")
    assert page.status_code == 200 and f'"image_id": {mine}'.encode() in page.content
    assert client.get(f"/projects/{project.pk}/images/{theirs}/").status_code == 404
    assert client.get(f"/projects/{project.pk}/upload/").status_code == 403
    client.force_login(team["users"]["admin"])
    assert client.get(f"/projects/{project.pk}/upload/").status_code == 200
    client.force_login(team["users"]["outsider"])
    for url in (f"/projects/{project.pk}/images/", f"/projects/{project.pk}/images/{mine}/", f"/projects/{project.pk}/upload/"):
        assert client.get(url).status_code == 404, url


def test_signing_in_and_out(team, client):
    page = client.get("/login/")
    assert page.status_code == 200 and b"Sign in" in page.content
    wrong = client.post("/login/", {"username": "annotator", "password": "nope"})
    assert wrong.status_code == 200 and b"do not match" in wrong.content
    right = client.post("/login/", {"username": "annotator", "password": "pw-for-tests-123"})
    assert right.status_code == 302 and right["Location"] == "/"
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302
