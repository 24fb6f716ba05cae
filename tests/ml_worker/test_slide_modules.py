"""ml_worker.tissue, ml_worker.deepzoom and ml_worker.slide_inference on generated slides."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from ml_worker.deepzoom import DeepZoom
from ml_worker.models import create_model
from ml_worker.slide_inference import chunk_rects, predict_tiles, tile_output_shape
from ml_worker.slides import _inspect_tiff, _TiffReader, open_slide, write_pyramidal_tiff
from ml_worker.synth import generate
from ml_worker.tissue import tile_tissue_fractions, tissue_from_reader, tissue_mask

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """2048 x 1536 at 0.25 um/px, ~35% tissue; levels 2048, 1024, 512 px wide."""
    p = tmp_path_factory.mktemp("slide") / "s.svs"
    write_pyramidal_tiff(p, width=2048, height=1536, mpp=0.25, tissue_fraction=0.35, seed=4, n_textures=2)
    return p


def test_tissue_mask_keeps_a_stained_region_and_drops_glass_specks_and_fills_small_holes():
    img = np.full((200, 300, 3), 242, np.uint8)
    tissue, _ = generate("he", (100, 120), seed=1)
    img[50:150, 100:220] = tissue
    img[95:98, 150:153] = 242  # a 3x3 hole inside the tissue
    img[10:12, 10:12] = (120, 60, 140)  # a 2x2 speck on the glass
    mask = tissue_mask(img)
    assert mask[50:150, 100:220].mean() > 0.85  # the H&E texture has white lumina of its own
    assert mask[95:98, 150:153].all()  # filled
    assert not mask[10:12, 10:12].any()  # removed
    assert not mask[:40, 150:].any() and not mask[160:, :].any()


def test_tissue_mask_of_an_all_glass_image_is_empty():
    rng = np.random.default_rng(0)
    glass = np.clip(242 + rng.normal(0, 2, (100, 100, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_tile_tissue_fractions_uses_level_zero_rects():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    fr = tile_tissue_fractions(
        mask,
        downsample=16,
        grid=[(0, 0, 80, 80), (0, 0, 160, 160), (80, 80, 80, 80), (0, 0, 40, 80), (200, 200, 64, 64)],
    )
    assert fr == pytest.approx([1.0, 0.25, 0.0, 1.0, 0.0])


def test_the_tissue_mask_keeps_tissue_tiles_and_drops_background_tiles_of_a_slide(slide_path):
    with open_slide(slide_path) as r:
        mask, ds = tissue_from_reader(r, max_side=512)
        W, H = r.dimensions
        grid = [(x, y, 256, 256) for y in range(0, H, 256) for x in range(0, W, 256)]
        fr = tile_tissue_fractions(mask, downsample=ds, grid=grid)
        kept = [g for g, f in zip(grid, fr) if f >= 0.05]
        dropped = [g for g, f in zip(grid, fr) if f == 0.0]
        assert 0 < len(kept) < len(grid) and dropped
        assert sum(fr) / len(fr) == pytest.approx(0.35, abs=0.05)  # the writer's tissue_fraction
        for x, y, w, h in dropped:  # glass (the writer's plain gray), at most a faint blob edge
            t = r.read_region(x, y, w, h).astype(int)
            assert (np.abs(t - 242).max(axis=2) > 20).mean() < 0.1
        stds = [r.read_region(x, y, w, h).std() for x, y, w, h in kept if fr[grid.index((x, y, w, h))] > 0.9]
        assert stds and min(stds) > 15  # stained texture


def test_deepzoom_descriptor_and_a_tile_at_two_levels(slide_path):
    with open_slide(slide_path) as r:
        dz = DeepZoom(r)
        root = ET.fromstring(dz.dzi_xml())
        assert root.attrib["TileSize"] == "254" and root.attrib["Overlap"] == "1" and root.attrib["Format"] == "jpeg"
        size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
        assert (size.attrib["Width"], size.attrib["Height"]) == ("2048", "1536")
        assert dz.level_count == 12  # ceil(log2(2048)) + 1
        top = Image.open(io.BytesIO(dz.tile(11, 1, 1)))
        assert top.format == "JPEG" and top.size == (256, 256)  # 254 + overlap on both sides
        # One level down shows the same place at half the scale.
        below = Image.open(io.BytesIO(dz.tile(10, 0, 0)))
        assert below.size == (255, 255)
        full = r.read_region(0, 0, 508, 508)
        half = np.asarray(Image.fromarray(full).reduce(2)).astype(float)
        assert np.abs(np.asarray(below.convert("RGB")).astype(float)[:254, :254] - half).mean() < 8
        assert dz.tile(11, 1, 1) == dz.tile(11, 1, 1)  # cached
        with pytest.raises(ValueError):
            dz.tile(11, 99, 0)
        with pytest.raises(ValueError):
            dz.tile(12, 0, 0)


def test_the_generic_deepzoom_has_the_openslide_layout(slide_path):
    with open_slide(slide_path) as r:
        tr = _TiffReader(str(slide_path), _inspect_tiff(str(slide_path), "s.svs", None))
        with tr:
            a, b = DeepZoom(r), DeepZoom(tr)
            assert a.level_count == b.level_count and a.level_tiles == b.level_tiles
            assert a.level_dimensions == b.level_dimensions
            for level, col, row in [(11, 2, 3), (10, 1, 1), (11, 8, 6)]:
                ta, tb = a.tile_image(level, col, row), b.tile_image(level, col, row)
                assert ta.shape == tb.shape
                assert np.abs(ta.astype(int) - tb).mean() < 1


def test_chunk_rects_splits_in_order():
    assert chunk_rects(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        chunk_rects([1], 0)


def test_whole_slide_inference_returns_one_result_per_rect_at_the_working_resolution(slide_path):
    model = create_model("unet", width=8, depth=2)
    rects = [(x, y, 256, 256) for y in (0, 512, 1024) for x in (0, 768, 1536)] + [(1900, 1400, 200, 180)]
    seen = []
    with open_slide(slide_path) as r:
        out = list(
            predict_tiles(
                model,
                r,
                rects,
                mpp=0.5,
                batch_size=4,
                device="cpu",
                context=8,
                progress=lambda d, t: seen.append((d, t)),
            )
        )
    assert [o[0] for o in out] == rects
    for rect, inst, summary in out:
        assert inst.dtype == np.int32 and inst.shape == tile_output_shape(rect, slide_mpp=0.25, mpp=0.5)
        assert summary["scale"] == 2.0 and 0 <= summary["mean_entropy"] <= 1
        assert summary["n_instances"] == len(np.unique(inst[inst > 0]))
    assert out[0][1].shape == (128, 128) and out[-1][1].shape == (90, 100)
    assert seen[-1] == (len(rects), len(rects))


def test_whole_slide_inference_equals_predicting_the_read_tile_directly(slide_path):
    from ml_worker.data import preprocess
    from ml_worker.inference import _activation

    model = create_model("unet", width=8, depth=2).eval()
    with open_slide(slide_path) as r:
        [(rect, inst, s)] = list(
            predict_tiles(model, r, [(512, 512, 256, 256)], mpp=0.5, device="cpu", keep_probs=True)
        )
        tile = r.read_at_mpp(512, 512, 128, 128, mpp=0.5)
    with torch.no_grad():
        p = _activation(model, model(torch.from_numpy(preprocess(tile))[None]))[0].numpy()
    assert np.abs(s["probs"].astype(np.float32) - p).max() < 2e-3


class _FailingReader:
    """A real reader whose third tile read fails like a damaged slide would."""

    def __init__(self, reader):
        self.reader, self.calls = reader, 0

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def read_at_mpp(self, *args, **kwargs):
        from ml_worker.slides import SlideError

        self.calls += 1
        if self.calls == 3:
            raise SlideError("the slide's pixel data cannot be decoded")
        return self.reader.read_at_mpp(*args, **kwargs)


def test_a_read_error_in_the_prefetch_thread_reaches_the_caller(slide_path):
    from ml_worker.slides import SlideError

    model = create_model("unet", width=8, depth=2)
    rects = [(x, 0, 128, 128) for x in range(0, 1024, 128)]
    with open_slide(slide_path) as r:
        with pytest.raises(SlideError, match="cannot be decoded"):
            list(predict_tiles(model, _FailingReader(r), rects, mpp=0.25, batch_size=2, device="cpu"))


def test_closing_the_result_iterator_early_stops_the_prefetch_thread(slide_path):
    import threading

    model = create_model("unet", width=8, depth=2)
    rects = [(x, y, 128, 128) for y in range(0, 1024, 128) for x in range(0, 1024, 128)]
    with open_slide(slide_path) as r:
        it = predict_tiles(model, r, rects, mpp=0.25, batch_size=2, prefetch=1, device="cpu")
        next(it)
        it.close()
    assert not any(t.name == "karyo-slide-prefetch" and t.is_alive() for t in threading.enumerate())
