"""Paper / fast presets (ml_worker/presets.py): every preset makes a valid TrainConfig and builds
its model; full-size paper models have about their papers' parameter counts; HSP-Net accepts the
paper's 400-px tiles; the random-walker split separates touching discs; the encoder gets its own
learning rate; the CLI and the catalog know the presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_worker import catalog
from ml_worker.models import create_model
from ml_worker.presets import PRESETS, apply_preset, inference_settings, preset_names
from ml_worker.train_config import TrainConfig

torch.set_num_threads(1)

# Tiny widths per architecture for the forward passes (the presets' other options stay).
TINY = {
    "unet": {"width": 4, "depth": 2},
    "pgunet_plus": {"width": 4},
    "unet_sharp": {"base_channels": 4, "layers": [1, 1, 1, 1], "cardinality": 2, "stem_channels": 4,
                   "branch_channels": 4, "decoder_channels": 8, "aspp_channels": 8},
    "dssnet": {"feature_channels": 8, "expand_channels": 8, "num_blocks": 1, "decoder_channels": 8,
               "sr_channels": 4, "sr_blocks": 1},
    "hspnet": {"base_channels": 4, "layers": [1, 1, 1, 1], "ds_widths": [4, 4, 8, 8], "ds_channels": 8,
               "head_channels": 8},
    "multihead_unet": {"width": 4, "depth": 2},
}
CASES = [(arch, name) for arch in PRESETS for name in preset_names(arch)]


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("arch,name", CASES)
def test_every_preset_is_a_valid_train_config_and_its_tiny_model_runs(arch: str, name: str) -> None:
    kwargs = apply_preset(arch, name, model_kwargs=TINY[arch], epochs=2)
    config = TrainConfig(**kwargs)
    assert config.epochs == 2 and config.arch == arch
    # every preset model option is one the catalog describes (and accepts)
    catalog.validate_model_options(arch, PRESETS[arch][name]["model_kwargs"])
    model = create_model(arch, **config.model_kwargs).eval()
    side = 64
    with torch.no_grad():
        out = model(torch.randn(1, 3, side, side))
    assert out.shape == (1, model.out_channels, side, side) and torch.isfinite(out).all()


def test_overrides_win_and_model_kwargs_merge_key_by_key() -> None:
    kwargs = apply_preset("dssnet", "paper", model_kwargs={"width": 8}, lr=0.05)
    assert kwargs["model_kwargs"]["width"] == 8 and kwargs["model_kwargs"]["decoder"] == "paper"
    assert kwargs["lr"] == 0.05 and kwargs["optimizer"] == "sgd" and kwargs["batch_size"] == 4
    assert apply_preset("unet") == {"arch": "unet", "model_kwargs": {}}  # default: fast
    # the preset's own data is not changed by a caller
    kwargs["model_kwargs"]["width"] = 1
    assert "width" not in PRESETS["dssnet"]["fast"]["model_kwargs"]
    assert PRESETS["dssnet"]["paper"]["model_kwargs"]["width"] == 30


def test_unknown_presets_are_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unet has no preset 'paper'; available: fast"):
        apply_preset("unet", "paper")
    with pytest.raises(ValueError, match="no presets for architecture 'bogus'"):
        apply_preset("bogus", "fast")


def test_the_catalog_lists_the_presets_of_each_architecture() -> None:
    for arch in catalog.ARCHITECTURES:
        assert [p.name for p in arch.presets] == preset_names(arch.name)
        assert all(p.help for p in arch.presets)
        assert arch.as_dict()["presets"][0]["name"] == "fast"
    assert {p.name for p in catalog.architecture("hspnet").presets} == {"fast", "paper"}


# ---------------------------------------------------------------------------- full-size paper models
def test_pgunet_plus_paper_preset_has_about_13m_parameters_and_no_pyramid_input() -> None:
    model = create_model("pgunet_plus", **PRESETS["pgunet_plus"]["paper"]["model_kwargs"])
    assert 12.0 < n_params(model) < 14.0, n_params(model)
    assert not model.pyramid_input
    # the fast preset (width 64) is the 31 M model
    assert 30.0 < n_params(create_model("pgunet_plus", **PRESETS["pgunet_plus"]["fast"]["model_kwargs"])) < 32.0


def test_unet_sharp_paper_preset_builds_resnext101_32x4d_with_a_relu_encoder() -> None:
    model = create_model("unet_sharp", **PRESETS["unet_sharp"]["paper"]["model_kwargs"])
    enc = model.encoder
    assert [len(layer) for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)] == [3, 4, 23, 3]
    assert enc.layer1[0].conv2.groups == 32 and enc.layer1[0].conv2.out_channels == 128  # 32 x 4d
    assert isinstance(enc.layer3[5].act, torch.nn.ReLU) and isinstance(model.fuse["0"][2], torch.nn.Mish)
    # ResNeXt-101 32x4d (timm's resnext101_32x4d) has 44.2 M parameters, 42.1 M without its classifier
    trunk = sum(p.numel() for p in enc.parameters()) / 1e6
    assert 42.0 < trunk < 42.3, trunk


def test_hspnet_paper_preset_is_resnet101_with_pyramid_blocks_32_to_256() -> None:
    model = create_model("hspnet", **PRESETS["hspnet"]["paper"]["model_kwargs"])
    assert [len(layer) for layer in (model.encoder.layer1, model.encoder.layer2, model.encoder.layer3,
                                     model.encoder.layer4)] == [3, 4, 23, 3]
    assert [ds.project[0].out_channels for ds in model.v_hsp] == [32, 64, 128, 256]


def test_dssnet_paper_decoder_runs_two_convs_at_full_resolution_without_skip_fusions() -> None:
    model = create_model("dssnet", **PRESETS["dssnet"]["paper"]["model_kwargs"]).eval()
    assert not hasattr(model, "fuse1") and not hasattr(model, "seg_head")
    full_res = []
    hooks = [m.register_forward_hook(lambda mod, i, o: full_res.append(mod) if o.shape[-1] == 64 else None)
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    # the down-sampling's first conv and the decoder's last two
    assert len(full_res) == 3, full_res


# ---------------------------------------------------------------------------- HSP-Net stitching
def test_hspnet_predicts_with_the_papers_400_px_tiles_and_100_px_stride() -> None:
    from ml_worker.inference import predict_probs

    model = create_model("hspnet", **{**PRESETS["hspnet"]["paper"]["model_kwargs"], **TINY["hspnet"]}).eval()
    assert model.size_divisor == 1
    with torch.no_grad():
        out = model(torch.randn(1, 3, 400, 400))
    assert out.shape == (1, 2, 400, 400)
    settings = inference_settings("hspnet", "paper")
    assert settings == {"tile_size": 400, "overlap": 300}
    image = np.random.default_rng(0).integers(0, 255, (500, 520, 3), dtype=np.uint8)
    probs = predict_probs(model, image, device="cpu", **settings)
    assert probs.shape == (2, 500, 520) and np.allclose(probs.sum(0), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------- encoder learning rate
def test_encoder_lr_factor_puts_the_encoder_in_its_own_group() -> None:
    from ml_worker.schedule import configure, make_plan

    config = TrainConfig(**apply_preset("hspnet", "paper", model_kwargs=TINY["hspnet"], lr=1e-3, tile_size=64))
    model = create_model("hspnet", **config.model_kwargs)
    groups = configure(model, make_plan(config, model), 0, config)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == pytest.approx(1e-4) and by_name["decoder"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in by_name["encoder"]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="encoder_lr_factor"):
        TrainConfig(arch="hspnet", encoder_lr_factor=0)


# ---------------------------------------------------------------------------- random walker
def test_random_walker_split_separates_two_touching_discs() -> None:
    from ml_worker.instances import multihead_to_instances

    yy, xx = np.mgrid[:64, :64]
    a = (yy - 32) ** 2 + (xx - 22) ** 2 <= 100
    b = (yy - 32) ** 2 + (xx - 41) ** 2 <= 100
    assert (a & b).any()  # they overlap: one blob in the nucleus channel
    nucleus = (a | b).astype(np.float32)
    borderless = (((yy - 32) ** 2 + (xx - 22) ** 2 <= 36) | ((yy - 32) ** 2 + (xx - 41) ** 2 <= 36)).astype(np.float32)
    borders = ((a & b) & (np.abs(xx - 31.5) < 1.5)).astype(np.float32)
    inst = multihead_to_instances(nucleus, borderless, borders, method="random_walker")
    assert inst.dtype == np.int32 and inst.max() == 2
    left, right = inst[32, 15], inst[32, 48]
    assert left and right and left != right
    assert (inst > 0).sum() == nucleus.sum()  # the whole blob is assigned
    with pytest.raises(ValueError, match="unknown method"):
        multihead_to_instances(nucleus, borderless, borders, method="flood")


def test_multihead_paper_preset_uses_selu_xception_and_the_random_walker() -> None:
    model = create_model("multihead_unet", **{**PRESETS["multihead_unet"]["paper"]["model_kwargs"], **TINY[
        "multihead_unet"]})
    from ml_worker.models.multihead_unet import XceptionDown

    assert model.postprocess == "random_walker"
    assert all(isinstance(block, XceptionDown) for block in model.down)
    # SELU everywhere but inside the squeeze-and-excitation gates
    se_relus = {id(m) for block in model.dec for m in block.se.modules()}
    assert not [m for m in model.modules() if isinstance(m, torch.nn.ReLU) and id(m) not in se_relus]
    assert any(isinstance(m, torch.nn.SELU) for m in model.modules())
