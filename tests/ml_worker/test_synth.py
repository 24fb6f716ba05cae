"""Tests for ml_worker.synth (synthetic tiles with exact instance masks)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from ml_worker.data import load_folder
from ml_worker.synth import _draw_nuclei, generate, write_dataset

KINDS = ["pap", "he"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_seed_gives_the_same_tile(kind):
    a = generate(kind, 96, seed=4)
    b = generate(kind, 96, seed=4)
    c = generate(kind, 96, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_masks_are_exact_consecutive_and_connected(kind, seed):
    img, inst = generate(kind, (120, 150), seed=seed)
    assert img.shape == (120, 150, 3) and img.dtype == np.uint8
    assert inst.shape == (120, 150) and inst.dtype == np.uint16
    n = int(inst.max())
    assert n > 0
    sizes = np.bincount(inst.ravel(), minlength=n + 1)
    assert np.all(sizes[1:] > 0)  # ids 1..N, none empty
    cross = ndi.generate_binary_structure(2, 1)
    for i, sl in enumerate(ndi.find_objects(inst), start=1):
        _, k = ndi.label(inst[sl] == i, structure=cross)
        assert k == 1, f"instance {i} has {k} 4-connected pieces"


@pytest.mark.parametrize("kind", KINDS)
def test_nuclei_are_darker_than_their_surroundings(kind):
    img, inst = generate(kind, 128, seed=0)
    gray = img.astype(np.float32).mean(2)
    ring = ndi.binary_dilation(inst > 0, iterations=3) & (inst == 0)
    assert gray[inst > 0].mean() < gray[ring].mean() - 30


def test_the_later_drawn_nucleus_owns_the_overlap():
    rng = np.random.default_rng(0)
    # Two round, smooth nuclei (aspect 1, irregularity 0) overlapping around x = 30.
    labels, _, _ = _draw_nuclei(rng, (40, 60), [(20, 22, 10, 1.0, 1.0, 0.0),
                                               (20, 38, 10, 1.0, 1.0, 0.0)])
    assert labels.max() == 2
    assert labels[20, 30] == 2 and labels[20, 15] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_256_tile_renders_quickly(kind):
    generate(kind, 256, seed=0)  # warm-up
    t0 = time.perf_counter()
    for s in range(5):
        generate(kind, 256, seed=s)
    # Typically ~0.04 s on one core; the bound leaves room for a loaded CI machine.
    assert (time.perf_counter() - t0) / 5 < 0.2


def test_size_radius_and_count_options():
    img, inst = generate("he", (64, 80), seed=1, n_nuclei=5, nucleus_radius=(6, 7))
    assert img.shape == (64, 80, 3)
    assert 1 <= inst.max() <= 5
    small = generate("he", 128, seed=1, nucleus_radius=(3, 4))[1]
    large = generate("he", 128, seed=1, nucleus_radius=(9, 11))[1]
    mean_area = lambda m: np.bincount(m.ravel())[1:].mean()  # noqa: E731
    assert mean_area(small) < mean_area(large)
    with pytest.raises(ValueError):
        generate("ihc")
    with pytest.raises(ValueError):
        generate("he", 64, nucleus_radius=(5, 2))


def test_write_dataset_uses_the_common_layout(tmp_path):
    names = write_dataset(tmp_path, 2, kind="he", size=48, seed=3)
    assert names == ["he_0000", "he_0001"]
    m = Image.open(tmp_path / "masks" / "he_0001.png")
    assert m.mode.startswith("I;16")
    assert Image.open(tmp_path / "images" / "he_0001.png").mode == "RGB"
    samples = load_folder(tmp_path)
    np.testing.assert_array_equal(samples[1].instances, generate("he", 48, seed=4)[1])
