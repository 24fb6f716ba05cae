"""Named training set-ups per architecture: ``paper`` (the seed paper's sizes, loss, optimizer,
schedule and stitching, as far as the paper and the authors' code say) and ``fast`` (Karyo's own
lighter defaults, the default on CPU).

``PRESETS[arch][name]`` is plain data::

    {"help": one line, "model_kwargs": constructor options, "train": TrainConfig fields,
     "inference": {"tile_size": ..., "overlap": ...}}   # stitching; may be empty

``apply_preset(arch, name, **overrides)`` merges a preset with a run's own settings into
``TrainConfig`` keyword arguments (overrides win; ``model_kwargs`` are merged key by key).
What each paper preset follows and where it departs from the paper is written in the
architecture's module docstring (``ml_worker/models/<arch>.py``).

Torch-free (the catalog imports it).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "PRESET_NAMES", "DEFAULT_PRESET", "apply_preset", "preset_names", "inference_settings"]

#: the preset a run gets when it names none (the paper presets are sized for a GPU)
DEFAULT_PRESET = "fast"
PRESET_NAMES = ("fast", "paper")

_FAST_HELP = "Karyo's lighter defaults (the default; trains in minutes on a CPU)"

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "fast": {"help": _FAST_HELP, "model_kwargs": {}, "train": {}, "inference": {}},
    },
    "pgunet_plus": {
        "fast": {
            "help": _FAST_HELP + ": width 64 with an image-pyramid input, epochs split over the 4 stages",
            "model_kwargs": {"pyramid_input": True},
            "train": {},
            "inference": {},
        },
        "paper": {
            "help": "Zhao 2019: ~13 M parameters, no pyramid input, 4 stages x 40 epochs at 32-256 px, RMSprop with "
                    "new layers at 1e-4 and carried ones at 1e-6",
            "model_kwargs": {"width": 42, "num_stages": 4, "core_depth": 1, "base_size": 32, "pyramid_input": False},
            "train": {"progressive": True, "epochs": 160, "epochs_per_stage": 40, "tile_size": 256,
                      "optimizer": "rmsprop", "stage_lr_new": 1e-4, "stage_lr_old": 1e-6, "lr_schedule": "constant",
                      "early_stopping_patience": None},
            "inference": {"tile_size": 256, "overlap": 32},
        },
    },
    "unet_sharp": {
        "fast": {
            "help": _FAST_HELP + ": ResNeXt-50 32x4d, Mish everywhere",
            "model_kwargs": {},
            "train": {},
            "inference": {},
        },
        "paper": {
            "help": "ResNeXt-101 32x4d encoder (ReLU, for ImageNet weights) with a Mish decoder, Focal Tversky, "
                    "AdamW in place of AdaBound, Macenko; two-phase fine-tuning when encoder weights are given",
            "model_kwargs": {"depth": 101, "cardinality": 32, "width_per_group": 4, "act": "mish",
                             "encoder_act": "relu"},
            "train": {"loss": "focal_tversky", "optimizer": "adamw", "lr": 1e-3, "stain_norm": "macenko",
                      "phase2_lr_factor": 0.1},
            "inference": {},
        },
    },
    "dssnet": {
        "fast": {
            "help": _FAST_HELP + ": a decoder that fuses the down-sampling maps of every scale",
            "model_kwargs": {"decoder": "fusion"},
            "train": {},
            "inference": {},
        },
        "paper": {
            "help": "the reference decoder (no skip fusions, two convs at full resolution), 12 extractor blocks "
                    "of 42 channels, SGD, batch 4, cosine over 400 epochs",
            "model_kwargs": {"decoder": "paper", "width": 30, "feature_channels": 42, "expand_channels": 126,
                             "num_blocks": 12, "decoder_channels": 32, "sr_channels": 64, "sr_blocks": 5,
                             "ssim_weight": 0.25, "edge_weight": 0.4},
            "train": {"optimizer": "sgd", "lr": 1e-3, "batch_size": 4, "epochs": 400, "lr_schedule": "cosine",
                      "loss": "ce", "early_stopping_patience": None},
            "inference": {},
        },
    },
    "hspnet": {
        "fast": {
            "help": _FAST_HELP + ": ResNet-34, pyramid blocks all 128 wide",
            "model_kwargs": {},
            "train": {},
            "inference": {},
        },
        "paper": {
            "help": "ResNet-101, pyramid blocks 32/64/128/256 wide, encoder at 0.1x the learning rate, 400-px tiles "
                    "stitched every 100 px with Gaussian weights",
            "model_kwargs": {"depth": 101, "ds_widths": [32, 64, 128, 256], "ds_channels": 128},
            "train": {"encoder_lr_factor": 0.1, "tile_size": 400},
            "inference": {"tile_size": 400, "overlap": 300},
        },
    },
    "multihead_unet": {
        "fast": {
            "help": _FAST_HELP + ": U-Net encoder, ReLU, watershed split",
            "model_kwargs": {},
            "train": {},
            "inference": {},
        },
        "paper": {
            "help": "DSB 2018: Xception-style encoder, SELU, step decay of the learning rate, random-walker split",
            "model_kwargs": {"encoder": "xception", "act": "selu", "postprocess": "random_walker"},
            "train": {"lr_schedule": "step", "lr_step_gamma": 0.1},
            "inference": {},
        },
    },
}


def preset_names(arch: str) -> list[str]:
    """Presets of ``arch`` (``fast`` first); ValueError for an unknown architecture."""
    if arch not in PRESETS:
        raise ValueError(f"no presets for architecture {arch!r}; known: {', '.join(sorted(PRESETS))}")
    return [n for n in PRESET_NAMES if n in PRESETS[arch]]


def _preset(arch: str, preset: str | None) -> dict[str, Any]:
    name = preset or DEFAULT_PRESET
    names = preset_names(arch)
    if name not in names:
        raise ValueError(f"{arch} has no preset {name!r}; available: {', '.join(names)}")
    return PRESETS[arch][name]


def apply_preset(arch: str, preset: str | None = None, **overrides: Any) -> dict[str, Any]:
    """``TrainConfig`` keyword arguments of ``preset`` (None: :data:`DEFAULT_PRESET`) for
    ``arch``, with ``overrides`` on top (``model_kwargs`` merged key by key, other keys
    replaced). The result is a fresh dict: ``TrainConfig(**apply_preset(...))``.

    Raises:
        ValueError: unknown architecture or preset (the message lists the valid ones).
    """
    p = _preset(arch, preset)
    kwargs: dict[str, Any] = {"arch": arch, **copy.deepcopy(p["train"])}
    model_kwargs = {**copy.deepcopy(p["model_kwargs"]), **dict(overrides.pop("model_kwargs", None) or {})}
    overrides.pop("arch", None)
    kwargs.update(overrides)
    kwargs["model_kwargs"] = model_kwargs
    return kwargs


def inference_settings(arch: str, preset: str | None = None) -> dict[str, Any]:
    """Tile size and overlap the preset stitches predictions with ({} = the caller's defaults)."""
    return dict(_preset(arch, preset)["inference"])
