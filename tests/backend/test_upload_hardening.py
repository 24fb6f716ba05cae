"""Upload limits and crafted files (issue 13): zips decoded one member at a time, Pillow's limit
aligned with Karyo's, corrupt archives and odd TIFFs refused with a 4xx (never a 500), and a
property test over arbitrary bytes. The crafted-file corpus is generated here, never committed."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image as PILImage

from backend.common.errors import KaryoError
from backend.images.validation import decode_image, decode_upload
from tests.backend.factories import rgb_png, zip_of
from tests.backend.test_uploads import assert_nothing_stored, upload

pytestmark = pytest.mark.django_db


def png_header_only(width: int, height: int, mode_bytes=(8, 2)) -> bytes:
    """A PNG whose IHDR claims width x height with one tiny IDAT: costs nothing to send."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, mode_bytes[0], mode_bytes[1], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def bad_crc_zip() -> bytes:
    data = bytearray(zip_of({"a.png": rgb_png(64, 64, 1)}))
    # The stored member's payload starts after the 30-byte local header and its name; flip a byte in it.
    offset = 30 + len("a.png") + 40
    data[offset] ^= 0xFF
    return bytes(data)


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def crafted_corpus() -> dict[str, bytes]:
    """Files an attacker (or a broken scanner) sends; each must be refused with a clear 4xx."""
    return {
        "bad-crc.zip": bad_crc_zip(),
        "file-and-folder.zip": zip_of({"a.png": rgb_png(32, 32, 1), "a.png/b.png": rgb_png(32, 32, 2)}),
        "volumetric.tif": tiff_bytes(np.zeros((4, 32, 32, 3), np.uint8), photometric="rgb", volumetric=True, tile=(16, 16)),
        "truncated.png": rgb_png(64, 64, 3)[:120],
        "huge-header.png": png_header_only(60_000, 60_000),
        "zero-size.png": png_header_only(0, 10),
        "not-an-image.png": b"GIF89a" + b"\x00" * 100,
        "empty.zip": zip_of({}),
        "lying-size.zip": b"PK\x03\x04" + b"\x00" * 200,
        "nested.zip": zip_of({"inner.zip": zip_of({"a.png": rgb_png(16, 16)})}),
    }


@pytest.mark.parametrize("name", sorted(crafted_corpus()))
def test_a_crafted_upload_is_refused_with_a_clear_4xx_and_stores_nothing(team, api, name):
    response = upload(api("admin"), team["project"], name, crafted_corpus()[name])
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:300])
    error = response.json()["error"]
    assert error["code"] and error["message"]
    assert_nothing_stored(team["project"])


def test_a_zip_member_with_a_bad_crc_names_the_member(team, api):
    response = upload(api("admin"), team["project"], "crc.zip", bad_crc_zip())
    assert response.status_code == 400 and response.json()["error"]["code"] == "corrupt_archive"
    assert "a.png" in response.json()["error"]["message"]


def test_a_dataset_zip_with_a_file_and_a_folder_of_the_same_name_is_a_400(tmp_path):
    from backend.exports.archive import extract_archive

    path = tmp_path / "clash.zip"
    path.write_bytes(zip_of({"images/a.png": rgb_png(16, 16), "images/a.png/b.png": rgb_png(16, 16)}))
    with pytest.raises(KaryoError) as error:
        extract_archive(path, tmp_path / "out", label="clash.zip")
    assert error.value.code == "corrupt_archive" and str(tmp_path) not in str(error.value.detail)


def test_a_volumetric_tiff_is_refused_as_unsupported_not_a_crash():
    with pytest.raises(KaryoError) as error:
        decode_image("stack.tif", tiff_bytes(np.zeros((5, 32, 32, 3), np.uint8), photometric="rgb", volumetric=True,
                                             tile=(16, 16)))
    assert error.value.status_code == 400 and "volumetric" in str(error.value.detail)


@pytest.mark.slow
def test_a_9500_square_png_under_the_configured_limit_is_accepted(settings):
    # 90.25 M pixels: over Pillow's default 89.5 M bomb limit, under Karyo's 100 M.
    settings.KARYO_MAX_IMAGE_PIXELS = 100_000_000
    buffer = io.BytesIO()
    PILImage.new("L", (9500, 9500)).save(buffer, format="PNG", compress_level=1)
    decoded = decode_image("big.png", buffer.getvalue())
    assert (decoded.width, decoded.height) == (9500, 9500)
    with pytest.raises(KaryoError) as error:
        decode_image("bigger.png", png_header_only(10_001, 10_000))
    assert error.value.code == "image_too_large"


def test_a_zip_is_decoded_one_member_at_a_time_in_bounded_memory():
    side = 1200  # 4.3 MB decoded (RGB) per member, a few kB compressed
    member = io.BytesIO()
    PILImage.new("RGB", (side, side), (200, 10, 10)).save(member, format="PNG")
    archive = zip_of({f"m{i}.png": member.getvalue() for i in range(6)})
    one_image = side * side * 3
    tracemalloc.start()
    try:
        names = []
        for decoded in decode_upload("six.zip", archive):  # what ingest_images does: store, then the next
            names.append(decoded.name)
            del decoded
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert names == [f"m{i}.png" for i in range(6)]
    assert peak < 3 * one_image, f"peak {peak:,} bytes for members of {one_image:,}: members were held together"


def test_zip_checks_that_need_no_decoding_run_before_any_member_is_decoded(monkeypatch):
    import backend.images.validation as validation

    decoded = []
    monkeypatch.setattr(validation, "decode_image", lambda name, data: decoded.append(name))
    archive = zip_of({"a.png": rgb_png(16, 16), "notes.txt": b"hello"})
    with pytest.raises(KaryoError):
        validation.decode_upload("mixed.zip", archive)
    assert decoded == []


# --- property test: whatever the bytes, a clear error or images, never a crash -------------------

SEEDS = {
    "png": rgb_png(24, 24, 5),
    "zip": zip_of({"a.png": rgb_png(16, 16, 6), "b.png": rgb_png(16, 16, 7)}),
    "tiff": tiff_bytes(np.zeros((16, 16, 3), np.uint8), photometric="rgb"),
}


@st.composite
def mangled_files(draw) -> bytes:
    seed = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(seed) - 1))
        seed[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(8, len(seed)))
    return bytes(seed[:cut])


@hsettings(max_examples=150, derandomize=True, deadline=None, database=None,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.one_of(mangled_files(), st.binary(min_size=1, max_size=512)))
def test_any_bytes_decode_to_images_or_a_clear_upload_error(data):
    try:
        images = list(decode_upload("fuzz.bin", data))
    except KaryoError as error:
        assert 400 <= error.status_code < 500 and str(error.detail)
    else:
        assert images and all(i.pixels.ndim == 3 and i.pixels.shape[2] == 3 for i in images)
