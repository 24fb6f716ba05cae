"""Tests for ml_worker.stain (stain normalisation, z-score)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml_worker.augment import hed_jitter
from ml_worker.stain import (
    IdentityNormalizer,
    MacenkoNormalizer,
    ReinhardNormalizer,
    make_normalizer,
    normalizer_from_dict,
    tissue_mask,
    zscore,
)
from ml_worker.synth import generate


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    return generate("he", 128, seed=11)[0]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _shifted(img: np.ndarray) -> np.ndarray:
    """Same tissue, different staining: weaker hematoxylin, stronger eosin, warm cast."""
    out = hed_jitter(img, np.array([0.6, 1.5, 1.0]), np.zeros(3))
    return np.clip(out * np.array([1.0, 0.95, 0.9]), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_normalising_an_image_to_itself_is_nearly_the_identity(ref, name):
    norm = make_normalizer(name).fit(ref)
    assert norm.fitted
    out = norm.transform(ref)
    assert out.dtype == np.uint8 and out.shape == ref.shape
    assert _mad(out, ref) < 2.0


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_a_colour_shifted_copy_moves_towards_the_reference(ref, name):
    shifted = _shifted(ref)
    before = _mad(shifted, ref)
    after = _mad(make_normalizer(name).fit(ref).transform(shifted), ref)
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("name", ["macenko", "reinhard"])
def test_tiles_with_little_tissue_are_left_unchanged(ref, name):
    rng = np.random.default_rng(0)
    blank = np.clip(240 + rng.normal(0, 2, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(blank).mean() < 0.01
    norm = make_normalizer(name).fit(ref)
    np.testing.assert_array_equal(norm.transform(blank), blank)
    # A blank reference leaves the normaliser unfitted, which is the identity.
    unfitted = make_normalizer(name).fit(blank)
    assert not unfitted.fitted
    np.testing.assert_array_equal(unfitted.transform(ref), ref)


@pytest.mark.parametrize("name", ["none", "macenko", "reinhard"])
def test_a_fitted_normaliser_survives_a_json_round_trip(ref, name):
    norm = make_normalizer(name).fit(ref)
    back = normalizer_from_dict(json.loads(json.dumps(norm.to_dict())))
    assert type(back) is type(norm)
    shifted = _shifted(ref)
    np.testing.assert_array_equal(back.transform(shifted), norm.transform(shifted))


def test_macenko_puts_hematoxylin_first(ref):
    stains = MacenkoNormalizer().fit(ref).stain_matrix
    # Hematoxylin absorbs red far more than eosin does.
    assert stains[0, 0] > stains[0, 1]
    assert MacenkoNormalizer.default_he().fitted


def test_make_normalizer_knows_its_names():
    assert isinstance(make_normalizer(None), IdentityNormalizer)
    assert isinstance(make_normalizer("Reinhard"), ReinhardNormalizer)
    with pytest.raises(ValueError):
        make_normalizer("vahadane")
    assert isinstance(normalizer_from_dict(None), IdentityNormalizer)


def test_zscore_standardises_each_channel(ref):
    z = zscore(ref)
    assert z.dtype == np.float32 and z.shape == ref.shape
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1)), 1, atol=1e-3)


def test_zscore_does_not_amplify_a_flat_tile_into_noise():
    rng = np.random.default_rng(0)
    flat = np.clip(230 + rng.normal(0, 1, (32, 32, 3)), 0, 255).astype(np.uint8)
    z = zscore(flat)
    assert np.all(np.isfinite(z)) and z.std() < 0.3
    assert np.all(zscore(np.zeros((4, 4, 3), np.uint8)) == 0)
