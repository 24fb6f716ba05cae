"""Tests for ml_worker.data (IO, common layout, splitting, patches, tiling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from ml_worker.data import (
    DataError,
    PatchDataset,
    Sample,
    load_folder,
    preprocess,
    read_image,
    read_mask,
    split_by_image,
    tile_grid,
    write_mask,
)
from ml_worker.synth import generate, write_dataset

torch.set_num_threads(1)

CPM15 = Path("/work/shared/data/cpm15")


# ------------------------------------------------------------------------- IO


def test_read_image_replicates_grayscale_and_drops_alpha(tmp_path):
    gray = (np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.all(out[..., 0] == gray) and np.all(out[..., 2] == gray)

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (5, 6, 3) and np.all(out[..., 0] == 200)


def test_read_image_scales_16_bit_and_reads_tiff(tmp_path):
    arr = np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "i16.png")[..., 1], [[0, 255], [100, 200]])
    rgb16 = np.stack([arr] * 3, -1)
    tifffile.imwrite(tmp_path / "x.tif", rgb16)
    np.testing.assert_array_equal(read_image(tmp_path / "x.tif")[..., 2], [[0, 255], [100, 200]])
    chw = np.zeros((3, 4, 5), np.uint8)
    chw[1] = 9
    tifffile.imwrite(tmp_path / "chw.tiff", chw, photometric="minisblack")
    out = read_image(tmp_path / "chw.tiff")
    assert out.shape == (4, 5, 3) and np.all(out[..., 1] == 9)


def test_read_image_reads_jpeg(tmp_path):
    img, _ = generate("he", 32, seed=0)
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    out = read_image(tmp_path / "x.jpg")
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - img).mean() < 6


def test_unreadable_or_missing_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        read_image(tmp_path / "bad.png")


def test_masks_round_trip_through_16_bit_png(tmp_path):
    inst = np.zeros((20, 30), np.int32)
    inst[2:5, 3:9] = 1
    inst[10:15, 10:20] = 65535
    write_mask(tmp_path / "sub" / "m.png", inst)
    assert Image.open(tmp_path / "sub" / "m.png").mode.startswith("I;16")
    back = read_mask(tmp_path / "sub" / "m.png")
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, inst)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.png"]  # no temp left


def test_write_mask_rejects_labels_that_do_not_fit_16_bits(tmp_path):
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", np.full((2, 2), 70000))


def test_read_mask_rejects_colour_masks(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="colour"):
        read_mask(tmp_path / "c.png")
    np.save(tmp_path / "m.npy", np.array([[0, 3], [3, 1]], np.int64))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.npy"), [[0, 3], [3, 1]])


# --------------------------------------------------------------- common layout


def test_load_folder_reads_a_synthetic_dataset(tmp_path):
    names = write_dataset(tmp_path, 3, kind="pap", size=(40, 50), seed=5)
    samples = load_folder(tmp_path)
    assert [s.name for s in samples] == sorted(names)
    img, inst = generate("pap", (40, 50), seed=5)
    np.testing.assert_array_equal(samples[0].image, img)
    np.testing.assert_array_equal(samples[0].instances, inst)
    assert samples[0].instances.dtype == np.int32


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "not found"),
        (lambda d: (d / "images").mkdir(parents=True), "no masks/ folder"),
        (lambda d: ((d / "images").mkdir(parents=True), (d / "masks").mkdir()), "no images"),
    ],
)
def test_load_folder_explains_layout_problems(tmp_path, setup, message):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_folder(root)


def test_load_folder_reports_an_image_without_its_mask(tmp_path):
    write_dataset(tmp_path, 2, kind="he", size=24, seed=0)
    (tmp_path / "masks" / "he_0001.png").unlink()
    with pytest.raises(DataError, match="without a mask.*he_0001"):
        load_folder(tmp_path)


def test_load_folder_reports_a_size_mismatch(tmp_path):
    write_dataset(tmp_path, 1, kind="he", size=24, seed=0)
    write_mask(tmp_path / "masks" / "he_0000.png", np.zeros((10, 24)))
    with pytest.raises(DataError, match="he_0000: image is 24x24 but mask is 10x24"):
        load_folder(tmp_path)


@pytest.mark.skipif(not CPM15.is_dir(), reason="CPM-15 data not available")
def test_load_folder_reads_the_cpm15_dataset():
    samples = load_folder(CPM15)
    assert len(samples) == 15
    # README: 2905 annotated nuclei, ids relabelled 1..N per image.
    assert sum(int(s.instances.max()) for s in samples) == 2905
    s = {x.name: x for x in samples}["image10"]
    assert s.image.shape == (808, 1032, 3) and s.image.dtype == np.uint8


def test_split_by_image_is_deterministic_and_disjoint():
    samples = [Sample(f"s{i}", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32))
               for i in range(10)]
    train, val = split_by_image(samples, 0.2, seed=1)
    assert len(val) == 2 and len(train) == 8
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    assert [s.name for s in split_by_image(samples, 0.2, seed=1)[1]] == [s.name for s in val]
    assert split_by_image(samples[:1], 0.5)[1] == []
    assert len(split_by_image(samples[:2], 0.01)[1]) == 1


# ----------------------------------------------------------------- tiling & patches


def test_tile_grid_covers_the_image_with_full_tiles():
    coords = tile_grid(100, 70, 32, 8)
    ys = sorted({y for y, _ in coords})
    xs = sorted({x for _, x in coords})
    assert ys == [0, 24, 48, 68] and xs == [0, 24, 38]
    cover = np.zeros((100, 70), int)
    for y, x in coords:
        cover[y : y + 32, x : x + 32] += 1
    assert cover.min() >= 1
    assert tile_grid(10, 10, 32, 8) == [(0, 0)]
    with pytest.raises(ValueError):
        tile_grid(10, 10, 8, 8)


def test_preprocess_returns_standardised_channels_first():
    img, _ = generate("he", 64, seed=0)
    x = preprocess(img)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x.mean(axis=(1, 2)), 0, atol=1e-4)


def test_patch_dataset_yields_aligned_fixed_size_patches():
    img, inst = generate("he", (100, 90), seed=2)
    ds = PatchDataset([Sample("a", img, inst.astype(np.int32))], tile_size=64, augment=None)
    assert len(ds) == 4  # ceil(100/64) * ceil(90/64)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].dtype == torch.int64 and item["instances"].dtype == torch.int64
    assert torch.equal(item["mask"], (item["instances"] > 0).long())
    # Without augmentation the patch is a crop: find it in the image by its instances.
    ins = item["instances"].numpy()
    found = [
        (y, x) for y in range(100 - 63) for x in range(90 - 63)
        if np.array_equal(inst[y : y + 64, x : x + 64], ins)
    ]
    assert found
    y, x = found[0]
    # Standardised with the statistics of the whole image, as inference does for that image.
    np.testing.assert_allclose(item["image"].numpy(), preprocess(img)[:, y : y + 64, x : x + 64], atol=1e-5)


def test_patch_dataset_pads_images_smaller_than_the_tile_and_augments():
    img, inst = generate("pap", (40, 50), seed=1)
    ds = PatchDataset([Sample("a", img, inst.astype(np.int32))], tile_size=64,
                      augment="default", seed=3, foreground_bias=0.5)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64)
        assert set(np.unique(item["instances"].numpy())) <= set(np.unique(inst))
    # Same (seed, epoch, index) -> same patch; a new epoch -> a different one.
    a = ds[0]["image"]
    assert torch.equal(a, ds[0]["image"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0]["image"])


def test_patch_dataset_works_with_a_dataloader():
    img, inst = generate("he", 80, seed=4)
    ds = PatchDataset([Sample("a", img, inst.astype(np.int32))], tile_size=32,
                      augment="default", length=6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 32, 32)


def test_patch_dataset_pickles_for_spawned_workers():
    import pickle

    img, inst = generate("he", 48, seed=4)
    ds = PatchDataset([Sample("a", img, inst.astype(np.int32))], tile_size=32, length=2)
    back = pickle.loads(pickle.dumps(ds))
    assert type(back) is PatchDataset
    assert torch.equal(back[1]["image"], ds[1]["image"])


def test_io_does_not_need_torch():
    import subprocess
    import sys

    code = (
        "import sys, ml_worker.data, ml_worker.synth, ml_worker.metrics, ml_worker.stain; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
