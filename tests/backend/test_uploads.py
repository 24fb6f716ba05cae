from __future__ import annotations

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.images.models import Image, Tile
from tests.backend.factories import encode, finish_ingest, rgb_png, zip_of

pytestmark = pytest.mark.django_db


def upload(client, project, name: str, data: bytes, **extra):
    response = client.post(
        f"/api/projects/{project.pk}/images/", {"file": SimpleUploadedFile(name, data), **extra}, format="multipart"
    )
    finish_ingest()  # what the cpu worker does after the upload answered
    return response


def stored_files() -> list[str]:
    found = []

    def walk(path: str) -> None:
        dirs, files = default_storage.listdir(path)
        found.extend(f"{path}/{f}".lstrip("/") for f in files)
        for d in dirs:
            walk(f"{path}/{d}".lstrip("/"))

    try:
        walk("")
    except FileNotFoundError:
        pass
    return found


def assert_nothing_stored(project) -> None:
    assert Image.objects.filter(project=project).count() == 0
    assert Tile.objects.filter(project=project).count() == 0
    assert stored_files() == []


def test_it_answers_at_once_with_the_image_ingesting_and_the_worker_cuts_it_into_tiles(team, api):
    project = team["project"]  # tile size 64, working resolution 0.5 um/px
    project.working_mpp = 0.25
    project.save()
    response = api("admin").post(f"/api/projects/{project.pk}/images/",
                                 {"file": SimpleUploadedFile("slide.png", rgb_png(150, 100)), "microns_per_pixel": 0.25},
                                 format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["created"] == 1 and body["duplicates"] == 0
    assert body["images"][0]["state"] == "ingesting" and body["images"][0]["tile_count"] == 0
    assert finish_ingest() == ["ready"]
    image = Image.objects.get(project=project)
    assert (image.width, image.height, image.format, image.microns_per_pixel) == (150, 100, "png", 0.25)
    assert (image.state, image.kind, image.levels, image.tiles_grid, image.tiles_kept) == ("ready", "image", 1, 6, 6)
    assert image.thumbnail.name and default_storage.exists(image.thumbnail.name)
    tiles = list(Tile.objects.filter(image=image).values_list("x", "y", "w", "h"))
    # 150 wide -> x at 0, 64, and 86 (shifted back to end at the border); 100 high -> y at 0, 36.
    assert sorted(tiles) == sorted((x, y, 64, 64) for x in (0, 64, 86) for y in (0, 36))
    assert not any(Tile.objects.filter(image=image).values_list("file", flat=True))  # no PNG per tile
    assert api("viewer").get(f"/api/images/{image.pk}/").json()["tile_count"] == 6


def test_a_small_image_becomes_one_tile_of_its_own_size(team, api):
    response = upload(api("admin"), team["project"], "small.png", rgb_png(40, 30))
    assert response.status_code == 201
    assert list(Tile.objects.values_list("w", "h")) == [(40, 30)]


def test_the_same_bytes_uploaded_twice_are_stored_once(team, api):
    data = rgb_png(64, 64, seed=3)
    first = upload(api("admin"), team["project"], "a.png", data)
    second = upload(api("admin"), team["project"], "b.png", data)
    assert first.status_code == 201
    assert second.status_code == 200 and second.json()["duplicates"] == 1
    assert Image.objects.count() == 1
    assert len([f for f in stored_files() if f.startswith("images/")]) == 1


def test_it_accepts_jpeg_and_16_bit_tiff(team, api):
    import io

    import tifffile

    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert upload(api("admin"), team["project"], "a.jpg", encode(rgb, "JPEG")).status_code == 201
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (rgb.astype(np.uint16) * 257))
    response = upload(api("admin"), team["project"], "b.tif", buffer.getvalue())
    assert response.status_code == 201, response.content
    assert sorted(Image.objects.values_list("format", flat=True)) == ["jpeg", "tiff"]


def test_a_zip_of_images_is_ingested_whole(team, api):
    archive = zip_of({"dir/one.png": rgb_png(64, 64, 1), "dir/two.png": rgb_png(64, 64, 2), "__MACOSX/._one.png": b"junk"})
    response = upload(api("admin"), team["project"], "batch.zip", archive)
    assert response.status_code == 201, response.content
    assert sorted(Image.objects.values_list("name", flat=True)) == ["one.png", "two.png"]


@pytest.mark.parametrize(
    "name,data,status,code",
    [
        ("empty.png", b"", 400, "empty_upload"),
        ("notes.txt", b"these are not pixels", 415, "unsupported_format"),
        ("anim.gif", encode(np.zeros((8, 8), np.uint8), "GIF"), 415, "unsupported_format"),
        ("cut.png", rgb_png(64, 64)[:300], 400, "corrupt_image"),
    ],
    ids=["empty", "text", "gif", "truncated-png"],
)
def test_it_rejects_bad_files_with_a_clear_error_and_stores_nothing(team, api, name, data, status, code):
    response = upload(api("admin"), team["project"], name, data)
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert error["code"] == code and name in error["message"]
    assert_nothing_stored(team["project"])


def test_it_rejects_a_decompression_bomb_before_decoding_it(team, api, settings):
    settings.KARYO_MAX_IMAGE_PIXELS = 10_000
    response = upload(api("admin"), team["project"], "bomb.png", rgb_png(200, 200))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_too_large"
    assert "40,000 pixels" in response.json()["error"]["message"]
    assert_nothing_stored(team["project"])


def test_it_rejects_a_real_pixel_bomb_png(team, api):
    # 30000 x 30000 of zeros compresses to a few hundred kB but would need 2.7 GB decoded.
    import zlib
    import struct

    width = height = 30000
    raw = zlib.compress(b"\x00" * (width // 8 + 1) * height, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    response = upload(api("admin"), team["project"], "bomb.png", png)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_too_large"
    assert_nothing_stored(team["project"])


def test_a_zip_with_parent_paths_is_rejected_whole(team, api):
    archive = zip_of({"ok.png": rgb_png(64, 64, 1), "../../etc/evil.png": rgb_png(64, 64, 2)})
    response = upload(api("admin"), team["project"], "evil.zip", archive)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsafe_archive"
    assert "../../etc/evil.png" in response.json()["error"]["message"]
    assert_nothing_stored(team["project"])


def test_a_zip_with_one_corrupt_member_stores_none_of_them(team, api):
    archive = zip_of({"good.png": rgb_png(64, 64, 1), "bad.png": rgb_png(64, 64, 2)[:200]})
    response = upload(api("admin"), team["project"], "mixed.zip", archive)
    assert response.status_code == 400
    assert "bad.png" in response.json()["error"]["message"]
    assert_nothing_stored(team["project"])


def test_a_zip_with_non_images_lists_them(team, api):
    archive = zip_of({"good.png": rgb_png(64, 64, 1), "readme.txt": b"hello"})
    response = upload(api("admin"), team["project"], "mixed.zip", archive)
    assert response.status_code == 415
    assert response.json()["error"]["details"] == ["readme.txt"]
    assert_nothing_stored(team["project"])


def test_an_upload_without_a_file_field_is_a_clear_400(team, api):
    response = api("admin").post(f"/api/projects/{team['project'].pk}/images/", {}, format="multipart")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_file"


def test_a_storage_failure_during_ingest_leaves_the_image_failed_without_tiles_or_files(team, api, monkeypatch):
    from backend.images import ingest

    def full_disk(rgb, quality=85):
        raise OSError("disk full")

    monkeypatch.setattr(ingest, "_jpeg", full_disk)
    response = upload(api("admin"), team["project"], "slide.png", rgb_png(200, 64))
    assert response.status_code == 201
    image = Image.objects.get(project=team["project"])
    assert image.state == "failed" and "disk full" in image.state_reason
    assert Tile.objects.filter(project=team["project"]).count() == 0
    assert stored_files() == []
    # The same file uploaded again (disk freed) replaces the failed attempt.
    monkeypatch.undo()
    assert upload(api("admin"), team["project"], "slide.png", rgb_png(200, 64)).status_code == 201
    image = Image.objects.get(project=team["project"])
    assert image.state == "ready" and image.tiles_kept == Tile.objects.filter(image=image).count() == 4
