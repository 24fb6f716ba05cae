from __future__ import annotations

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationStatus, AppendOnlyViolation, Tile
from backend.images.selectors import training_annotations
from tests.backend.factories import disc_labels, encode, finish_ingest, label_png, rgb_png

pytestmark = pytest.mark.django_db


@pytest.fixture
def tile(team, api):
    response = api("admin").post(
        f"/api/projects/{team['project'].pk}/images/", {"file": SimpleUploadedFile("t.png", rgb_png(64, 64))}, format="multipart"
    )
    assert response.status_code == 201
    finish_ingest()
    return Tile.objects.get()


def submit(client, tile, mask_bytes: bytes, **fields):
    return client.post(
        f"/api/tiles/{tile.pk}/annotations/", {"mask": SimpleUploadedFile("mask.png", mask_bytes), **fields}, format="multipart"
    )


def test_a_submitted_mask_is_stored_exactly_as_version_1(tile, api):
    labels = disc_labels()
    response = submit(api("annotator"), tile, label_png(labels))
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["version"], body["status"], body["nucleus_count"], body["author"]) == (1, "submitted", 2, "annotator")
    stored = read_label_map(Annotation.objects.get().mask.name)
    assert np.array_equal(stored, labels)


def test_a_correction_appends_a_version_and_keeps_the_old_one(tile, api):
    first = submit(api("annotator"), tile, label_png(disc_labels())).json()
    corrected = disc_labels(centres=((20, 20), (40, 44), (50, 12)))
    second = submit(api("annotator"), tile, label_png(corrected)).json()
    assert second["version"] == 2 and second["parent"] == first["id"] and second["nucleus_count"] == 3
    history = api("viewer").get(f"/api/tiles/{tile.pk}/annotations/").json()["results"]
    assert [a["version"] for a in history] == [2, 1]
    assert np.array_equal(read_label_map(Annotation.objects.get(version=1).mask.name), disc_labels())


def test_stored_versions_cannot_be_overwritten_or_deleted(tile, api):
    submit(api("annotator"), tile, label_png(disc_labels()))
    annotation = Annotation.objects.get()
    annotation.nucleus_count = 99
    with pytest.raises(AppendOnlyViolation):
        annotation.save()
    with pytest.raises(AppendOnlyViolation):
        annotation.delete()
    assert Annotation.objects.get().nucleus_count == 2


def test_a_mask_whose_size_differs_from_its_tile_is_rejected(tile, api):
    response = submit(api("annotator"), tile, label_png(disc_labels(32, 64)))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "mask_size_mismatch"
    assert "64x32" in response.json()["error"]["message"]
    assert Annotation.objects.count() == 0


def test_an_rgb_mask_is_rejected(tile, api):
    response = submit(api("annotator"), tile, encode(np.zeros((64, 64, 3), np.uint8), "PNG"))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_mask"


def test_a_jpeg_mask_is_rejected(tile, api):
    response = submit(api("annotator"), tile, encode(np.zeros((64, 64), np.uint8), "JPEG"))
    assert response.status_code == 415


def test_unknown_class_ids_are_rejected(tile, api):
    response = submit(api("annotator"), tile, label_png(disc_labels()), classes='{"1": 7}')
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_classes"


def test_a_reviewer_accepts_and_training_uses_the_latest_accepted_version(tile, api, team):
    v1 = submit(api("annotator"), tile, label_png(disc_labels())).json()
    v2 = submit(api("annotator"), tile, label_png(disc_labels(centres=((30, 30),))), status="draft").json()
    accepted = api("reviewer").post(f"/api/annotations/{v1['id']}/review/", {"decision": "accept", "comment": "fine"})
    assert accepted.status_code == 200 and accepted.json()["status"] == "reviewed"
    # The draft v2 is newer but not accepted: training uses v1.
    assert [a.pk for a in training_annotations(project=team["project"])] == [v1["id"]]
    again = api("reviewer").post(f"/api/annotations/{v1['id']}/review/", {"decision": "reject"})
    assert again.status_code == 409
    assert Annotation.objects.get(pk=v2["id"]).status == AnnotationStatus.DRAFT


def test_the_same_external_annotation_delivered_twice_creates_one_version(tile, team):
    from backend.images.services import create_annotation

    a, created_a = create_annotation(tile=tile, instances=disc_labels().astype(np.int32), author=None, external_id="ls-17")
    b, created_b = create_annotation(tile=tile, instances=disc_labels().astype(np.int32), author=None, external_id="ls-17")
    assert (created_a, created_b) == (True, False) and a.pk == b.pk
    assert Annotation.objects.count() == 1


def test_the_overlay_and_mask_endpoints_return_pngs(tile, api):
    from PIL import Image
    import io

    v1 = submit(api("annotator"), tile, label_png(disc_labels())).json()
    overlay = api("viewer").get(f"/api/tiles/{tile.pk}/overlay.png")
    assert overlay.status_code == 200 and overlay["Content-Type"] == "image/png"
    rgb = np.asarray(Image.open(io.BytesIO(overlay.content)))
    plain = np.asarray(Image.open(io.BytesIO(api("viewer").get(f"/api/tiles/{tile.pk}/image.png").content)))
    inside = disc_labels() > 0
    assert not np.array_equal(rgb[inside], plain[inside]) and np.array_equal(rgb[~inside], plain[~inside])
    mask = api("viewer").get(f"/api/annotations/{v1['id']}/mask.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(mask.content))), disc_labels())
