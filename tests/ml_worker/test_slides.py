"""ml_worker.slides: the generated SVS-like writer, the readers and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from ml_worker.slides import SlideError, open_slide, write_pyramidal_tiff

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slide_path(tmp_path_factory) -> Path:
    """3000 x 2500 at 0.25 um/px: levels 3000, 1500, 750 px wide."""
    p = tmp_path_factory.mktemp("slides") / "small.svs"
    write_pyramidal_tiff(p, width=3000, height=2500, mpp=0.25, tissue_fraction=0.4, seed=1, n_textures=2)
    return p


@pytest.fixture(scope="session")
def big_slide_path(tmp_path_factory) -> Path:
    """20000 x 20000, 1% tissue: cheap to write, 1.2 GB decoded at level 0."""
    p = tmp_path_factory.mktemp("bigslide") / "big.svs"
    write_pyramidal_tiff(p, width=20000, height=20000, mpp=0.5, tissue_fraction=0.01, seed=2, n_textures=1)
    return p


def _box(a: np.ndarray, f: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).reduce(f)).astype(np.float64)


def test_the_writer_output_opens_in_openslide_as_svs_with_levels_and_mpp(slide_path):
    assert openslide.OpenSlide.detect_format(str(slide_path)) == "aperio"
    with openslide.OpenSlide(str(slide_path)) as osr:
        assert osr.level_dimensions == ((3000, 2500), (1500, 1250), (750, 625))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(osr.properties["openslide.objective-power"]) == pytest.approx(40)
        assert "thumbnail" in osr.associated_images
    with open_slide(slide_path) as r:
        assert r.format == "openslide:aperio"
        assert r.dimensions == (3000, 2500) and r.level_count == 3
        assert r.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        assert r.mpp == pytest.approx(0.25) and r.mpp_from_metadata
        assert r.objective_power == pytest.approx(40)
        assert "metadata" in r.mpp_message()


def test_the_writer_output_is_tiled_jpeg_and_tifffile_reads_the_same_pyramid(slide_path):
    with tifffile.TiffFile(slide_path) as tf:
        assert tf.is_svs
        page = tf.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        assert [lv.shape[:2] for lv in tf.series[0].levels] == [(2500, 3000), (1250, 1500), (625, 750)]


def test_read_region_at_two_levels_matches_the_downsampled_level_zero(slide_path):
    with open_slide(slide_path) as r:
        l0 = r.read_region(1000, 800, 512, 512, level=0)
        l1 = r.read_region(1000, 800, 256, 256, level=1)
        l2 = r.read_region(1000, 800, 128, 128, level=2)
        assert l0.shape == (512, 512, 3) and l0.dtype == np.uint8
        assert l0.std() > 10  # tissue, not glass: the comparison below means something
        # JPEG at each level: equal up to compression noise.
        assert np.abs(_box(l0, 2) - l1).mean() < 6
        assert np.abs(_box(l0, 4) - l2).mean() < 6


def test_reading_outside_the_slide_gives_white(slide_path):
    with open_slide(slide_path) as r:
        out = r.read_region(2950, 2450, 100, 100, level=0)
        assert (out[60:, :] == 255).all() and (out[:, 60:] == 255).all()
        assert out[:40, :40].max() < 255  # inside: glass gray, not white


def test_the_tifffile_reader_gives_the_same_pixels_as_openslide(slide_path):
    from ml_worker.slides import _inspect_tiff, _TiffReader

    tr = _TiffReader(str(slide_path), _inspect_tiff(str(slide_path), "small.svs", None))
    with tr, open_slide(slide_path) as osr:
        assert tr.level_dimensions == osr.level_dimensions and tr.mpp == pytest.approx(0.25)
        for level in (0, 1, 2):
            a = tr.read_region(700, 300, 300, 200, level=level)
            b = osr.read_region(700, 300, 300, 200, level=level)
            assert np.abs(a.astype(int) - b).max() <= 2


def test_read_at_mpp_reads_the_finer_level_and_resamples(slide_path):
    with open_slide(slide_path) as r:
        # 0.25 um/px slide read at 0.5: the 200 x 200 level-0 px region gives 100 x 100 px,
        # taken from level 1 (downsample 2) as is.
        at_half = r.read_at_mpp(1000, 800, 100, 100, mpp=0.5)
        assert at_half.shape == (100, 100, 3)
        np.testing.assert_array_equal(at_half, r.read_region(1000, 800, 100, 100, level=1))
        # 0.75 um/px: nearest finer level is level 1 (0.5), resampled by 1.5.
        at_075 = r.read_at_mpp(1000, 800, 100, 100, mpp=0.75)
        l0 = r.read_region(1000, 800, 300, 300, level=0)
        expected = np.asarray(Image.fromarray(l0).resize((100, 100), Image.Resampling.BOX)).astype(float)
        assert at_075.shape == (100, 100, 3)
        assert np.abs(at_075.astype(float) - expected).mean() < 8
        assert r.best_level_for_downsample(3.0) == 1 and r.best_level_for_downsample(0.5) == 0
        # Finer than level 0 (0.125 um/px): level 0 upsampled, 50 level-0 px -> 100 px.
        up = r.read_at_mpp(1000, 800, 100, 100, mpp=0.125)
        small = r.read_region(1000, 800, 50, 50, level=0)
        expected = np.asarray(Image.fromarray(small).resize((100, 100), Image.Resampling.BILINEAR)).astype(float)
        assert up.shape == (100, 100, 3) and np.abs(up.astype(float) - expected).mean() < 4


def test_thumbnail_keeps_the_aspect_ratio(slide_path):
    with open_slide(slide_path) as r:
        th = r.thumbnail(300)
    assert th.shape == (250, 300, 3)


def test_a_plain_tiff_reports_mpp_from_its_resolution_and_a_png_without_mpp_says_so(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "p.tif",
        img,
        photometric="rgb",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
        rowsperstrip=7,
        compression="zlib",
    )
    with open_slide(tmp_path / "p.tif") as r:
        assert r.format.startswith("tifffile") and r.dimensions == (400, 300)
        assert r.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read_region(10, 20, 50, 40), img[20:60, 10:60])
    Image.fromarray(img).save(tmp_path / "p.png")
    with open_slide(tmp_path / "p.png", default_mpp=0.5) as r:
        assert r.format == "pillow:png" and r.dimensions == (400, 300)
        assert r.mpp == 0.5 and not r.mpp_from_metadata
        assert "no resolution metadata" in r.mpp_message() and "0.5" in r.mpp_message()
        np.testing.assert_array_equal(r.read_region(10, 20, 50, 40), img[20:60, 10:60])


def test_an_ome_tiff_pyramid_is_read_with_its_subifd_levels_and_physical_size(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    p = tmp_path / "p.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.25}
        tw.write(img, subifds=1, tile=(128, 128), photometric="rgb", metadata=meta)
        tw.write(img[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
    with open_slide(p) as r:
        assert r.format == "tifffile:ome" and r.level_dimensions == [(640, 512), (320, 256)]
        assert r.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(r.read_region(100, 50, 200, 100), img[50:150, 100:300])
        np.testing.assert_array_equal(r.read_region(100, 50, 100, 50, level=1), img[::2, ::2][25:75, 50:150])
        np.testing.assert_array_equal(r.read_at_mpp(100, 50, 100, 50, mpp=0.5), img[::2, ::2][25:75, 50:150])


def test_it_rejects_a_file_that_is_not_an_image(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is not a slide\n" * 20)
    with pytest.raises(SlideError, match="not a supported slide or image"):
        open_slide(p)


def test_it_rejects_a_truncated_slide(tmp_path, slide_path):
    data = slide_path.read_bytes()
    p = tmp_path / "cut.svs"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(p)
    p.write_bytes(data[:200])
    with pytest.raises(SlideError, match="corrupt or truncated|truncated"):
        open_slide(p)


def test_it_rejects_a_slide_whose_decoded_cost_over_all_levels_exceeds_max_pixels(slide_path):
    level0 = 3000 * 2500 * 3
    total = (3000 * 2500 + 1500 * 1250 + 750 * 625) * 3
    with pytest.raises(SlideError) as e:
        open_slide(slide_path, max_pixels=level0 + 1)  # level 0 alone would fit
    assert f"{total:,}" in str(e.value) and f"{level0 + 1:,}" in str(e.value)
    open_slide(slide_path, max_pixels=total).close()
    # A separate, higher limit for tiled pyramids (decoded a tile at a time).
    open_slide(slide_path, max_pixels=level0 + 1, max_tiled_pixels=total).close()
    with pytest.raises(SlideError, match="KARYO_MAX_SLIDE_PIXELS"):
        open_slide(slide_path, max_pixels=None, max_tiled_pixels=level0 + 1)


def test_it_rejects_a_tiff_with_300_samples_per_pixel(tmp_path):
    p = tmp_path / "spectral.tif"
    tifffile.imwrite(p, np.zeros((32, 32, 300), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(SlideError, match="300 samples per pixel"):
        open_slide(p)


def test_it_rejects_volumetric_and_multi_plane_tiffs_instead_of_transposing_them(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((8, 64, 64), np.uint8), volumetric=True, tile=(8, 16, 16))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 64, 64, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "planes.tif", np.zeros((300, 32, 32), np.uint8))
    for name in ("z.tif", "stack.tif", "planes.tif"):
        with pytest.raises(SlideError, match="not a resolution pyramid"):
            open_slide(tmp_path / name)


def test_it_counts_pillow_bands_against_max_pixels(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    with pytest.raises(SlideError, match="30,000 samples"):
        open_slide(tmp_path / "a.png", max_pixels=29_999)


_RSS_PROBE = """
import json, sys
import numpy as np
from ml_worker.slides import open_slide
def rss():  # VmHWM: ru_maxrss would include the parent's RSS at fork time (kept across execve)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = rss()
with open_slide(sys.argv[1]) as r:
    w, h = r.dimensions
    opened = rss()
    a = r.read_region(w // 2, h // 2, 1024, 1024, level=0)
    t = r.thumbnail(512)
    m = r.read_at_mpp(w // 3, h // 3, 512, 512, mpp=1.0)
print(json.dumps({"before": before, "opened": opened, "after": rss(), "w": w, "h": h, "sum": int(a.sum() + t.sum() + m.sum())}))
"""


@pytest.mark.slow
def test_reading_a_region_of_a_large_slide_does_not_load_level_zero(big_slide_path):
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(big_slide_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    level0_bytes = m["w"] * m["h"] * 3
    assert level0_bytes == 1_200_000_000
    grown = m["after"] - m["before"]
    # A 1024^2 region + thumbnail + 512^2 resample + OpenSlide's tile cache: tens of MB,
    # against 1.2 GB for level 0.
    assert grown < 150 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
