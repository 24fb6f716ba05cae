"""Tests for ml_worker.augment (mask-consistent augmentation)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_worker.augment import AugmentConfig, Augmenter, hed_jitter
from ml_worker.synth import generate


def _encoded(shape=(48, 64), seed=0):
    """Instances and an image whose red channel *is* the instance id (ids < 256)."""
    _, inst = generate("he", shape, seed=seed)
    inst = inst.astype(np.int32)
    img = np.zeros(shape + (3,), np.uint8)
    img[..., 0] = inst
    img[..., 1] = 255 - inst
    return img, inst


@pytest.mark.parametrize("shape", [(48, 48), (48, 64)])
def test_flips_and_rot90_keep_image_and_instances_aligned(shape):
    img, inst = _encoded(shape)
    aug = Augmenter("light", seed=0)
    shapes = set()
    for _ in range(20):
        a_img, a_inst = aug(img, inst)
        np.testing.assert_array_equal(a_img[..., 0], a_inst)
        assert a_inst.dtype == inst.dtype and a_img.dtype == np.uint8
        assert a_img.flags.c_contiguous and a_inst.flags.c_contiguous
        assert sorted(np.unique(a_inst)) == sorted(np.unique(inst))  # ids preserved
        shapes.add(a_inst.shape)
    # Non-square inputs keep their shape (only 0 / 180 degree turns).
    assert shapes == {shape}


def test_warps_use_nearest_neighbour_for_instances():
    img, inst = _encoded((64, 64))
    cfg = AugmentConfig(affine_p=1.0, elastic_p=1.0, hed_p=0, blur_p=0, noise_p=0)
    aug = Augmenter(cfg, seed=1)
    for _ in range(5):
        a_img, a_inst = aug(img, inst)
        assert a_inst.dtype == inst.dtype
        assert set(np.unique(a_inst)) <= set(np.unique(inst))  # no blended labels
        # Bilinear image vs nearest mask agree wherever the image is locally constant,
        # i.e. everywhere but a thin band along boundaries.
        assert np.mean(a_img[..., 0] == a_inst) > 0.85


def test_the_output_is_the_centre_of_a_larger_context_window():
    img, inst = _encoded((80, 80))
    a_img, a_inst = Augmenter("none")(img, inst, out_shape=(40, 40))
    np.testing.assert_array_equal(a_inst, inst[20:60, 20:60])
    np.testing.assert_array_equal(a_img, img[20:60, 20:60])
    aug = Augmenter("default")
    assert aug.context(256) > 0 and Augmenter("light").context(256) == 0
    with pytest.raises(ValueError):
        aug(img, inst, out_shape=(100, 100))


def test_it_is_deterministic_for_a_seed():
    img, inst = generate("he", 64, seed=0)
    a = [Augmenter("default", seed=7)(img, inst) for _ in range(2)]
    np.testing.assert_array_equal(a[0][0], a[1][0])
    np.testing.assert_array_equal(a[0][1], a[1][1])
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    aug = Augmenter("default", seed=0)
    np.testing.assert_array_equal(aug(img, inst, rng=rng_a)[0], aug(img, inst, rng=rng_b)[0])


def test_photometric_changes_leave_the_mask_untouched():
    img, inst = generate("he", 64, seed=0)
    cfg = AugmentConfig(flip=False, rot90=False, affine_p=0, elastic_p=0, hed_p=1.0,
                        blur_p=1.0, noise_p=1.0)
    a_img, a_inst = Augmenter(cfg, seed=0)(img, inst)
    np.testing.assert_array_equal(a_inst, inst)
    assert not np.array_equal(a_img, img)


def test_hed_jitter_is_the_identity_without_jitter_and_changes_stain_otherwise():
    img, _ = generate("he", 64, seed=0)
    same = hed_jitter(img, np.ones(3), np.zeros(3))
    assert np.abs(same - img).max() < 0.01
    darker = hed_jitter(img, np.array([1.3, 1.0, 1.0]), np.zeros(3))
    assert darker.mean() < img.mean()


def test_config_round_trips_through_a_dict_and_rejects_unknown_keys():
    cfg = AugmentConfig.from_dict({"preset": "light", "noise_p": 0.5, "scale": [0.9, 1.1]})
    assert cfg.affine_p == 0 and cfg.noise_p == 0.5 and cfg.scale == (0.9, 1.1)
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        AugmentConfig.from_dict({"flipp": True})
