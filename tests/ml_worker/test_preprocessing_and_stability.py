"""One preprocessing for training and inference, learning-rate schedules, EMA of weights and
precise BatchNorm (issue 15: "training and inference see different inputs", "stable training")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_worker.checkpoint import load_checkpoint
from ml_worker.data import Preprocessing, Sample, load_folder, preprocess, split_by_image
from ml_worker.inference import predict_probs
from ml_worker.models import create_model
from ml_worker.schedule import lr_factor, make_plan
from ml_worker.stabilize import WeightEMA, recalibrate_batchnorm, swapped_state
from ml_worker.stain import make_normalizer
from ml_worker.synth import generate, write_dataset
from ml_worker.training import TrainConfig, load_for_inference, train

torch.set_num_threads(1)
TINY_UNET = {"width": 4, "depth": 2}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    d = tmp_path_factory.mktemp("synth")
    write_dataset(d, 4, kind="he", size=96, seed=3)
    return load_folder(d)


def _config(out: Path, **kw) -> TrainConfig:
    base = {"arch": "unet", "model_kwargs": dict(TINY_UNET), "epochs": 2, "batch_size": 2, "tile_size": 64,
            "steps_per_epoch": 4, "augment": "none", "out_dir": str(out), "num_threads": 1}
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ one preprocessing
def test_a_pixel_gets_the_same_input_value_in_a_patch_and_in_the_whole_image() -> None:
    # Without stain normalisation: Reinhard and Macenko estimate the *source* statistics from
    # the image they are given, so they are crop-dependent by design (see docs/ml_worker.md).
    image, _ = generate(kind="he", size=160, seed=1)
    prep = Preprocessing.fit([image])
    whole = preprocess(image, prep)
    crop = preprocess(image[40:104, 24:88], prep)
    np.testing.assert_allclose(whole[:, 40:104, 24:88], crop, rtol=0, atol=1e-5)
    # The per-image z-score used before did not have this property: that was the bug.
    old_whole, old_crop = preprocess(image), preprocess(image[40:104, 24:88])
    assert np.abs(old_whole[:, 40:104, 24:88] - old_crop).max() > 0.05


def test_predicting_a_large_image_equals_predicting_its_tiles_one_by_one(samples: list[Sample]) -> None:
    torch.manual_seed(0)
    model = create_model("unet", **TINY_UNET).eval()
    image, _ = generate(kind="he", size=128, seed=5)
    prep = Preprocessing.fit([s.image for s in samples])
    whole = predict_probs(model, image, tile_size=64, overlap=0, normalizer=prep)
    for y in (0, 64):
        for x in (0, 64):
            tile = predict_probs(model, image[y:y + 64, x:x + 64], tile_size=64, overlap=0, normalizer=prep)
            np.testing.assert_allclose(whole[:, y:y + 64, x:x + 64], tile, atol=1e-5)


def test_training_stores_the_input_statistics_and_inference_uses_them(samples: list[Sample], tmp_path: Path) -> None:
    train_s, val_s = split_by_image(samples, 0.25, seed=0)
    result = train(_config(tmp_path / "run", stain_norm="reinhard", input_norm="dataset"), train_s, val_s)
    _, meta = load_checkpoint(result.best_path)
    stored = meta["preprocess"]
    assert len(stored["mean"]) == 3 and len(stored["std"]) == 3 and stored["stain"]["name"] == "reinhard"
    expected = Preprocessing.fit([s.image for s in train_s], make_normalizer("reinhard").fit(
        max(train_s, key=lambda s: s.image.size).image))
    _, normalizer, _ = load_for_inference(result.best_path)
    assert isinstance(normalizer, Preprocessing)
    assert normalizer.name == "reinhard" and normalizer.fitted
    assert all(0.0 < m < 1.0 for m in normalizer.mean) and all(0.0 < s < 0.5 for s in normalizer.std)
    # Statistics are those of the stain-normalised training images (the reference image may
    # differ from the largest one, so compare loosely).
    assert np.allclose(normalizer.mean, expected.mean, atol=0.1)


def test_a_training_patch_is_standardised_like_its_whole_image_at_inference(samples: list[Sample]) -> None:
    from ml_worker.data import PatchDataset

    ds = PatchDataset(samples[:1], tile_size=64, augment=None, length=4, seed=0)
    whole = preprocess(samples[0].image)  # what inference feeds the model for that image
    for i in range(4):
        patch = ds[i]["image"].numpy()
        # find the patch in the whole image by its first row (patches lie inside a 96-px image)
        hits = [(y, x) for y in range(0, 33) for x in range(0, 33)
                if np.allclose(whole[:, y:y + 64, x:x + 64], patch, atol=1e-5)]
        assert hits, "a training patch must be a crop of the whole image's standardised input"


def test_image_input_norm_keeps_the_per_image_zscore(samples: list[Sample], tmp_path: Path) -> None:
    result = train(_config(tmp_path / "run", input_norm="image", epochs=1), samples[:3], [])
    _, normalizer, _ = load_for_inference(result.best_path)
    assert isinstance(normalizer, Preprocessing) and normalizer.mean is None
    image = samples[0].image
    np.testing.assert_allclose(preprocess(image, normalizer), preprocess(image), atol=1e-6)


# ------------------------------------------------------------------ schedules
def _plan(**kw):
    cfg = TrainConfig(arch="unet", model_kwargs=dict(TINY_UNET), tile_size=64, **kw)
    return cfg, make_plan(cfg, create_model("unet", **TINY_UNET))


def test_cosine_schedule_warms_up_then_decays_to_one_percent() -> None:
    cfg, plan = _plan(epochs=10, lr_schedule="cosine", warmup_epochs=2)
    n = 5
    assert lr_factor(cfg, plan, 0, 0, n) == pytest.approx(1 / 10)
    assert lr_factor(cfg, plan, 1, 4, n) == pytest.approx(1.0)
    mid = lr_factor(cfg, plan, 6, 0, n)  # half-way through the 8 post-warm-up epochs
    assert mid == pytest.approx(0.01 + 0.99 * 0.5, abs=1e-6)
    assert lr_factor(cfg, plan, 9, 4, n) < 0.02
    factors = [lr_factor(cfg, plan, e, s, n) for e in range(2, 10) for s in range(n)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_step_schedule_divides_the_rate_every_period() -> None:
    cfg, plan = _plan(epochs=9, lr_schedule="step", lr_step_epochs=3, lr_step_gamma=0.5)
    assert [lr_factor(cfg, plan, e, 0, 4) for e in (0, 2, 3, 6, 8)] == [1.0, 1.0, 0.5, 0.25, 0.25]


def test_the_schedule_is_applied_to_every_step_of_training(samples: list[Sample], tmp_path: Path) -> None:
    result = train(_config(tmp_path / "run", epochs=3, lr=1e-2, lr_schedule="step", lr_step_epochs=1,
                           lr_step_gamma=0.1), samples[:3], [])
    lrs = [h["lr"][0] for h in result.history]
    assert lrs == pytest.approx([1e-2, 1e-3, 1e-4])


@pytest.mark.parametrize("bad", [{"lr_schedule": "bogus"}, {"warmup_epochs": -1}, {"ema_decay": 1.5},
                                 {"lr_step_gamma": 0}, {"input_norm": "global"}])
def test_it_rejects_an_inconsistent_stability_option(bad: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(arch="unet", **bad)


# ------------------------------------------------------------------ EMA and precise BN
def test_the_weight_average_ramps_up_and_follows_the_weights() -> None:
    model = torch.nn.Linear(2, 1)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay ramps: min(0.9, 2/11)
    d = 2 / 11
    before = ema.state["weight"].clone()
    assert torch.all(before != 1.0)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.state["weight"], torch.ones_like(before), atol=1e-6)
    assert d < 0.9


def test_best_checkpoint_holds_the_averaged_weights(samples: list[Sample], tmp_path: Path) -> None:
    train_s, val_s = split_by_image(samples, 0.25, seed=0)
    result = train(_config(tmp_path / "run", epochs=2, ema_decay=0.9, lr=5e-3), train_s, val_s)
    last_model, last_meta = load_checkpoint(result.last_path)
    ema_state = last_meta["train_state"]["ema"]["state"]
    raw = last_model.state_dict()
    differs = [k for k, v in raw.items() if v.dtype.is_floating_point and not torch.allclose(v, ema_state[k])]
    assert differs, "the averaged weights should differ from the last step's weights"
    if result.best_epoch == 2:
        best_model, _ = load_checkpoint(result.best_path)
        best = best_model.state_dict()
        conv = [k for k in raw if k.endswith("weight") and raw[k].dim() == 4][0]
        assert torch.allclose(best[conv], ema_state[conv])


def test_precise_bn_recomputes_the_statistics_and_swapping_restores_the_model(samples: list[Sample]) -> None:
    torch.manual_seed(0)
    model = create_model("unet", **TINY_UNET)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    with swapped_state(model, None):
        assert recalibrate_batchnorm(model, samples, 64, n_patches=8, batch_size=4)
        assert not torch.allclose(bn.running_mean, before)
    assert torch.allclose(bn.running_mean, before)
    assert math.isfinite(float(bn.running_var.sum()))
