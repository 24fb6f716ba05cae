"""The S3 path of the storage layer, against a real S3-compatible server on loopback."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile
from minio import Minio

from backend.common.storage import read_label_map
from backend.images.models import Annotation, Image, Tile
from tests.backend.factories import disc_labels, finish_ingest, label_png, rgb_png

pytestmark = pytest.mark.django_db


def test_uploads_tiles_and_masks_land_in_the_bucket(team, api, s3_storage, s3_server):
    assert default_storage.__class__.__name__ == "S3Storage"
    response = api("admin").post(
        f"/api/projects/{team['project'].pk}/images/", {"file": SimpleUploadedFile("s.png", rgb_png(100, 64))}, format="multipart"
    )
    assert response.status_code == 201, response.content
    finish_ingest()
    tile = Tile.objects.first()
    response = api("annotator").post(
        f"/api/tiles/{tile.pk}/annotations/", {"mask": SimpleUploadedFile("m.png", label_png(disc_labels()))}, format="multipart"
    )
    assert response.status_code == 201, response.content

    client = Minio(s3_server["endpoint"].removeprefix("http://"), access_key=s3_server["access_key"],
                   secret_key=s3_server["secret_key"], secure=False)
    keys = sorted(o.object_name for o in client.list_objects(s3_storage, recursive=True))
    image = Image.objects.get()
    assert image.file.name in keys and image.thumbnail.name in keys
    assert not any(t.file for t in Tile.objects.all())  # tiles are read from the image, not stored apart
    annotation = Annotation.objects.get()
    assert annotation.mask.name in keys
    assert np.array_equal(read_label_map(annotation.mask.name), disc_labels())


def test_a_presigned_url_serves_the_image_to_a_browser_and_its_tiles_are_read_from_the_bucket(team, api, s3_storage):
    from backend.images.pixels import read_tile_rgb

    data = rgb_png(64, 64)
    api("admin").post(
        f"/api/projects/{team['project'].pk}/images/", {"file": SimpleUploadedFile("s.png", data)}, format="multipart"
    )
    finish_ingest()
    image = Image.objects.get()
    url = image.file.url
    assert "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    tile = Tile.objects.get()
    from PIL import Image as PILImage
    import io

    assert np.array_equal(read_tile_rgb(tile), np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB")))


def test_a_failed_upload_leaves_the_bucket_empty(team, api, s3_storage, s3_server):
    from tests.backend.factories import zip_of

    archive = zip_of({"good.png": rgb_png(64, 64, 1), "bad.png": rgb_png(64, 64, 2)[:200]})
    response = api("admin").post(
        f"/api/projects/{team['project'].pk}/images/", {"file": SimpleUploadedFile("z.zip", archive)}, format="multipart"
    )
    assert response.status_code == 400
    client = Minio(s3_server["endpoint"].removeprefix("http://"), access_key=s3_server["access_key"],
                   secret_key=s3_server["secret_key"], secure=False)
    assert list(client.list_objects(s3_storage, recursive=True)) == []
