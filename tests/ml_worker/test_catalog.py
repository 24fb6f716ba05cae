"""The engine catalog (ml_worker/catalog.py) describes the engine's registries exactly, imports
without torch, and refuses bad training options with errors that name the field."""
from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_worker import catalog
from ml_worker.catalog import CatalogError

ROOT = Path(__file__).resolve().parents[2]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_importing_the_catalog_does_not_import_torch_or_numpy():
    code = ("import sys, ml_worker.catalog; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'django', 'rest_framework'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---------------------------------------------------------------------------------- architectures

def test_the_catalog_lists_exactly_the_registered_architectures():
    from ml_worker.models import model_names

    assert sorted(catalog.architecture_names()) == model_names()
    assert catalog.DEFAULT_ARCHITECTURE in catalog.architecture_names()


@pytest.mark.parametrize("name", catalog.architecture_names())
def test_architecture_options_are_the_constructor_arguments_with_their_defaults(name):
    from ml_worker.models import MODELS

    arch = catalog.architecture(name)
    cls = MODELS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name not in ("self", "in_channels", "num_classes")]
    assert [p.name for p in params] == [o.name for o in arch.options if o.name not in catalog.CREATE_MODEL_OPTIONS]
    for p in params:
        assert _plain(p.default) == _plain(arch.option(p.name).default), p.name
    assert arch.default_loss == cls.default_loss
    assert arch.width_option is None or arch.width_option in [o.name for o in arch.options]
    for option in arch.options:
        if option.settable:  # every default is accepted by its own option
            assert option.clean(option.default) == _plain(option.default), option.name


@pytest.mark.parametrize("name", catalog.architecture_names())
def test_each_architecture_builds_from_the_catalog_defaults(name):
    from ml_worker.active_learning import output_kind
    from ml_worker.models import create_model

    arch = catalog.architecture(name)
    defaults = {o.name: o.default for o in arch.options if o.settable}
    model = create_model(name, **catalog.validate_model_options(name, defaults))
    assert model.arch_name == name
    assert model.size_divisor == arch.size_divisor
    assert output_kind(model) == arch.output
    assert arch.default_loss in catalog.training_loss_names(name)


@pytest.mark.parametrize("name", catalog.architecture_names())
def test_a_runs_width_builds_a_small_model_of_every_architecture(name):
    from ml_worker.models import create_model

    arch = catalog.architecture(name)
    model = create_model(name, **catalog.model_kwargs_for(name, 4)).eval()
    side = max(32, arch.size_divisor)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, side, side))
    assert out.shape[-2:] == (side, side)
    assert model.init_kwargs[arch.width_option] == 4


def test_model_options_are_refused_by_name():
    with pytest.raises(CatalogError, match="unet has no option 'layers'; valid: width, depth") as info:
        catalog.validate_model_options("unet", {"layers": [1, 1, 1, 1]})
    assert info.value.field == "layers"
    with pytest.raises(CatalogError, match="set by the platform"):
        catalog.validate_model_options("hspnet", {"encoder_weights": "/etc/passwd"})
    with pytest.raises(CatalogError, match=r"depth must be one of: 18, 34, 50, 101, 152"):
        catalog.validate_model_options("hspnet", {"depth": 35})
    with pytest.raises(CatalogError, match=r"layers must be a list of integers from 1 to 64 \(exactly 4\)"):
        catalog.validate_model_options("unet_sharp", {"layers": [1, 1]})
    assert catalog.validate_model_options("unet", {"width": "8", "depth": 2.0}) == {"width": 8, "depth": 2}


# ---------------------------------------------------------------------------------- losses & choices

def test_losses_optimizers_stain_normalizers_and_presets_match_the_engine():
    from ml_worker.augment import AugmentConfig
    from ml_worker.losses import LOSSES
    from ml_worker.stain import NORMALIZERS
    from ml_worker.training import OPTIMIZERS

    assert set(catalog.loss_names()) == set(LOSSES)
    assert catalog.optimizer_names() == list(OPTIMIZERS)
    assert set(catalog.stain_normalizer_names()) == set(NORMALIZERS)
    for preset in catalog.augment_preset_names():
        AugmentConfig.preset(preset)  # raises on a name the engine does not know


def test_a_sigmoid_model_is_not_offered_a_class_map_only_loss():
    assert "border_ce" in catalog.training_loss_names("unet")
    assert "border_ce" not in catalog.training_loss_names("multihead_unet")
    # auxiliary losses (DSSNet's extra heads) are never a run's segmentation loss
    assert not {"ssim", "edge_l1"} & set(catalog.training_loss_names())


# ---------------------------------------------------------------------------------- training options

def test_every_training_option_is_a_train_config_field_with_the_same_default():
    from ml_worker.training import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for option in catalog.TRAINING_OPTIONS:
        assert option.name in fields, option.name
        f = fields[option.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == option.default, option.name
        if default is None:
            assert option.nullable, option.name
    assert catalog.WIDTH_OPTION.name not in fields  # a model option, applied through model_kwargs


def test_every_value_the_catalog_accepts_is_accepted_by_train_config():
    from ml_worker.training import TrainConfig

    for option in catalog.TRAINING_OPTIONS:
        values = list(option.choices or [])
        if option.type in ("int", "float"):
            lo = option.minimum if not option.exclusive_minimum else option.minimum + 1e-6
            hi = option.maximum if not option.exclusive_maximum else option.maximum - 1e-6
            values += [lo, hi] if option.type == "float" else [int(lo), int(hi)]
        for value in values:
            clean = catalog.validate_training_options({option.name: value}, architecture="unet")
            TrainConfig(arch="unet", **clean)  # raises ValueError when the engine disagrees


def test_the_catalog_refuses_bad_training_options_naming_the_field_and_the_bounds():
    cases = {
        "width": (1e9, {"minimum": 1, "maximum": 512}),
        "epochs": (1e30, {"minimum": 1, "maximum": 10000}),
        "early_stopping_patience": (-1, {"minimum": 0, "maximum": 10000}),
        "lr": (0, {"exclusive_minimum": 0, "exclusive_maximum": 1}),
        "batch_size": (2.5, {"minimum": 1, "maximum": 1024}),
        "seed": (True, {"minimum": 0, "maximum": 2**32 - 1}),
        "weight_decay": (float("nan"), {"minimum": 0, "exclusive_maximum": 1}),
    }
    for name, (value, bounds) in cases.items():
        with pytest.raises(CatalogError) as info:
            catalog.validate_training_options({name: value})
        assert info.value.field == name and info.value.valid == bounds
        assert str(info.value).startswith(f"{name} must be")
    with pytest.raises(CatalogError, match="loss must be one of: ce, bce, dice") as info:
        catalog.validate_training_options({"loss": "bogus"})
    assert info.value.valid == catalog.training_loss_names()
    with pytest.raises(CatalogError, match="unknown training option 'arch'; valid: epochs, batch_size"):
        catalog.validate_training_options({"arch": "unet"})


def test_options_that_depend_on_the_architecture_are_checked_against_it():
    with pytest.raises(CatalogError, match="tile_size must be a multiple of 32 for unet_sharp") as info:
        catalog.validate_training_options({"tile_size": 48}, architecture="unet_sharp")
    assert info.value.valid == {"multiple_of": 32}
    assert catalog.validate_training_options({"tile_size": 48}, architecture="dssnet") == {"tile_size": 48}
    with pytest.raises(CatalogError, match="loss 'border_ce' does not fit multihead_unet"):
        catalog.validate_training_options({"loss": "border_ce"}, architecture="multihead_unet")
    with pytest.raises(CatalogError, match="unknown architecture 'bogus'; valid: unet, pgunet_plus"):
        catalog.validate_training_options({}, architecture="bogus")


def test_form_values_are_converted_and_empty_means_the_default():
    clean = catalog.validate_training_options(
        {"epochs": "5", "lr": "0.01", "batch_size": 4.0, "loss": "", "steps_per_epoch": None, "width": "8"})
    assert clean == {"epochs": 5, "lr": 0.01, "batch_size": 4, "loss": None, "steps_per_epoch": None, "width": 8}
    assert type(clean["batch_size"]) is int
    with pytest.raises(CatalogError, match="epochs must be an integer from 1 to 10000; it cannot be empty"):
        catalog.validate_training_options({"epochs": ""})


# ---------------------------------------------------------------------------------- active learning

def test_the_catalog_lists_exactly_the_engine_strategies_with_what_they_read():
    from ml_worker.active_learning import CHEAP_SCORES, DEFAULT_STRATEGY, STRATEGIES

    assert set(catalog.strategy_names()) == set(STRATEGIES)
    assert catalog.DEFAULT_STRATEGY == DEFAULT_STRATEGY
    scores = {s.name: s for s in catalog.SCORES}
    assert [s.name for s in catalog.SCORES if not s.needs] == list(CHEAP_SCORES)
    for entry in catalog.STRATEGIES:
        engine = STRATEGIES[entry.name]
        assert entry.score_key in scores
        expected = () if entry.name in ("random", "typical") else (entry.score_key,)  # they read no score
        assert tuple(engine.required_scores) == expected, entry.name
        assert engine.needs_embeddings == ("embeddings" in entry.needs), entry.name
        analysis_needs = {n for n in entry.needs if n != "embeddings"}
        assert analysis_needs == set(scores[entry.score_key].needs), entry.name
        if hasattr(engine, "key"):
            assert engine.key == entry.score_key, entry.name


def test_every_catalog_score_is_what_the_analysis_computes():
    from ml_worker.active_learning import analyze_tile
    from ml_worker.models import create_model

    torch.manual_seed(0)
    model = create_model("unet", width=4, depth=2).eval()
    tile = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    cheap = analyze_tile(model, tile, tile_size=32, device="cpu")
    full = analyze_tile(model, tile, tile_size=32, device="cpu", mc_samples=2, tta=True)
    assert set(cheap.scores) == {s.name for s in catalog.SCORES if not s.needs}
    assert set(full.scores) == {s.name for s in catalog.SCORES}
    for name in catalog.strategy_names():  # what the platform computes for a strategy has its score
        kwargs = catalog.analysis_kwargs(name)
        assert kwargs["mc_samples"] in (0, catalog.MC_DROPOUT_SAMPLES)
        kwargs["mc_samples"] = min(kwargs["mc_samples"], 2)  # fewer passes, same scores
        scores = analyze_tile(model, tile, tile_size=32, device="cpu", **kwargs).scores
        assert catalog.score_key(name) in scores, name


def test_unknown_strategies_and_stain_normalizers_name_the_valid_ones():
    with pytest.raises(CatalogError, match="unknown active-learning strategy 'bogus'; valid: random, entropy"):
        catalog.validate_strategy("bogus")
    with pytest.raises(CatalogError, match="unknown stain normaliser 'bogus'; valid: none, macenko, reinhard"):
        catalog.validate_stain_normalizer("bogus")
    assert catalog.score_key("hybrid_rep") == "entropy"
    assert catalog.score_key("hybrid_boundary") == "boundary"


def test_the_json_view_has_every_entry_with_an_explanation():
    data = json.loads(json.dumps(catalog.as_dict()))
    assert [a["name"] for a in data["architectures"]] == catalog.architecture_names()
    assert [s["name"] for s in data["strategies"]] == catalog.strategy_names()
    assert {o["name"] for o in data["training_options"]} == set(catalog.run_option_names())
    for section in ("architectures", "losses", "optimizers", "stain_normalizers", "augment_presets",
                    "training_options", "scores", "strategies"):
        for entry in data[section]:
            assert entry["help"].strip(), (section, entry["name"])
    epochs = next(o for o in data["training_options"] if o["name"] == "epochs")
    assert epochs == {"name": "epochs", "type": "int", "default": 50, "help": epochs["help"], "nullable": False,
                      "minimum": 1, "maximum": 10000}
