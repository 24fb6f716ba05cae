"""The engine's vocabulary, in one torch-free place.

Every name a user or the platform may choose — architectures and their constructor options,
losses, optimizers, stain normalisers, augmentation presets, the training options a run may
set, and the active-learning strategies with the score each ranks by — is described here as
plain data with a one-line explanation. The backend validates project fields and run configs
against it and serves it as JSON (``GET /api/catalog/``); the admin UI shows the explanations.

Importing this module imports nothing but the standard library (no torch, no numpy), so the
web server can use it. The engine's own registries (``ml_worker.models.MODELS``,
``ml_worker.losses.LOSSES``, ``ml_worker.active_learning.STRATEGIES``, ``TrainConfig``...)
stay the implementation; ``tests/ml_worker/test_catalog.py`` checks that this description and
those registries agree, so adding an architecture, loss or strategy without describing it
here fails a test.

Extending: add an entry to the matching tuple below (``ARCHITECTURES``, ``LOSSES``,
``STRATEGIES``, ``TRAINING_OPTIONS``...). Lookups (``architecture(name)``...) and the JSON
view are derived from the tuples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ml_worker.presets import PRESETS as _PRESETS
from ml_worker.presets import preset_names

__all__ = [
    "ARCHITECTURES",
    "AUGMENT_PRESETS",
    "DEFAULT_ARCHITECTURE",
    "DEFAULT_STRATEGY",
    "LOSSES",
    "MC_DROPOUT_SAMPLES",
    "OPTIMIZERS",
    "SCORES",
    "STAIN_NORMALIZERS",
    "STRATEGIES",
    "TRAINING_OPTIONS",
    "WIDTH_OPTION",
    "Architecture",
    "CatalogError",
    "Choice",
    "Loss",
    "Option",
    "Score",
    "Strategy",
    "analysis_kwargs",
    "architecture",
    "architecture_names",
    "as_dict",
    "augment_preset_names",
    "loss_names",
    "model_kwargs_for",
    "optimizer_names",
    "run_option_names",
    "score_key",
    "stain_normalizer_names",
    "strategy",
    "strategy_names",
    "training_loss_names",
    "validate_architecture",
    "validate_model_options",
    "validate_stain_normalizer",
    "validate_strategy",
    "validate_training_options",
]


class CatalogError(ValueError):
    """A value the engine does not accept. ``field`` names what was wrong, ``valid`` says what
    would be accepted (a list of names, or ``{"minimum": ..., "maximum": ...}`` bounds)."""

    def __init__(self, message: str, *, field: str, valid: Any = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.valid = valid
        self.value = value

    def details(self) -> dict[str, Any]:
        """JSON-friendly ``{"field", "valid"}`` (the API puts it in its error ``details``)."""
        return {"field": self.field, "valid": self.valid}


# ============================================================================ building blocks
@dataclass(frozen=True)
class Choice:
    """A named choice (optimizer, stain normaliser, augmentation preset) and what it does."""

    name: str
    label: str
    help: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "help": self.help}


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "int_list": "a list of integers", "path": "a file path"}


@dataclass(frozen=True)
class Option:
    """One setting: its type, default, bounds or choices, and a one-line explanation.

    ``type`` is ``int``, ``float``, ``str``, ``bool``, ``int_list`` or ``path``. ``choices``
    restricts the value to a list; ``minimum`` / ``maximum`` bound numbers (``exclusive_*``
    makes a bound strict). ``nullable``: None (or "" from a web form) means "not set, use the
    engine's default". ``settable`` False: the platform sets it (a file on the worker), a
    request may not. ``length``: exact length of an ``int_list``.
    """

    name: str
    type: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    settable: bool = True
    length: int | None = None

    # ---------------------------------------------------------------- description
    def bounds(self) -> dict[str, Any] | None:
        if self.minimum is None and self.maximum is None:
            return None
        d: dict[str, Any] = {}
        if self.minimum is not None:
            d["exclusive_minimum" if self.exclusive_minimum else "minimum"] = self.minimum
        if self.maximum is not None:
            d["exclusive_maximum" if self.exclusive_maximum else "maximum"] = self.maximum
        return d

    def valid(self) -> Any:
        """What is accepted, for error messages and the JSON view."""
        if self.choices is not None:
            return list(self.choices)
        return self.bounds() or _TYPE_WORDS[self.type]

    def describe(self) -> str:
        """E.g. ``an integer from 1 to 512``, ``a number > 0 and < 1``, ``one of: a, b``."""
        if self.choices is not None:
            text = "one of: " + ", ".join(str(c) for c in self.choices)
        else:
            text = _TYPE_WORDS[self.type]
            lo, hi = self.minimum, self.maximum
            if lo is not None and hi is not None and not self.exclusive_minimum and not self.exclusive_maximum:
                text += f" from {_num(lo)} to {_num(hi)}"
            else:
                parts = []
                if lo is not None:
                    parts.append(f"{'>' if self.exclusive_minimum else '>='} {_num(lo)}")
                if hi is not None:
                    parts.append(f"{'<' if self.exclusive_maximum else '<='} {_num(hi)}")
                if parts:
                    text += " " + " and ".join(parts)
        if self.length is not None:
            text += f" (exactly {self.length})"
        if self.nullable:
            text += ", or empty for the default"
        return text

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "default": _plain(self.default), "help": self.help,
                             "nullable": self.nullable}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        bounds = self.bounds()
        if bounds:
            d.update(bounds)
        if self.length is not None:
            d["length"] = self.length
        if not self.settable:
            d["settable"] = False
        return d

    # ---------------------------------------------------------------- validation
    def clean(self, value: Any, *, field: str | None = None) -> Any:
        """The value converted to this option's type and checked against its bounds/choices.

        Integral floats (``5.0``) and numeric strings (web forms) are accepted for numbers;
        booleans are not numbers here. Raises :class:`CatalogError`.
        """
        name = field or self.name
        if not self.settable:
            raise CatalogError(f"{name} is set by the platform and cannot be given", field=name, value=value)
        if value is None or (isinstance(value, str) and not value.strip()):
            if self.nullable:
                return None
            raise CatalogError(f"{name} must be {self.describe()}; it cannot be empty", field=name,
                               valid=self.valid(), value=value)
        try:
            converted = _convert(self.type, value, self.length)
        except (TypeError, ValueError, OverflowError):
            raise CatalogError(f"{name} must be {self.describe()}, got {value!r}", field=name, valid=self.valid(),
                               value=value) from None
        if self.choices is not None and converted not in self.choices:
            raise CatalogError(f"{name} must be {self.describe()} (got {value!r})", field=name, valid=self.valid(),
                               value=value)
        items = converted if isinstance(converted, list) else [converted]
        if self.type in ("int", "float", "int_list") and not all(self._in_bounds(v) for v in items):
            raise CatalogError(f"{name} must be {self.describe()}, got {value!r}", field=name, valid=self.valid(),
                               value=value)
        return converted

    def _in_bounds(self, v: float) -> bool:
        too_low = self.minimum is not None and (v <= self.minimum if self.exclusive_minimum else v < self.minimum)
        too_high = self.maximum is not None and (v >= self.maximum if self.exclusive_maximum else v > self.maximum)
        return not (too_low or too_high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _convert(kind: str, value: Any, length: int | None) -> Any:
    if kind == "int":
        return _to_int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        f = float(value.strip()) if isinstance(value, str) else float(value)
        if not math.isfinite(f):
            raise ValueError("not finite")
        return f
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError("not a boolean")
        return value
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise TypeError("not a string")
        return value
    if kind == "int_list":
        if not isinstance(value, (list, tuple)) or not value:
            raise TypeError("not a list")
        out = [_to_int(v) for v in value]
        if length is not None and len(out) != length:
            raise ValueError("wrong length")
        return out
    raise ValueError(f"unknown option type {kind!r}")  # pragma: no cover - catalog bug


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int):
        return value
    f = float(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError("not a whole number")
    return int(f)


# ============================================================================ architectures
def _width(default: int, help: str = "channels of the first level; every level down doubles them") -> Option:
    return Option("width", "int", default, help, minimum=1, maximum=512)


def _depth(default: int) -> Option:
    return Option("depth", "int", default, "down/up-sampling levels; the input side must be a multiple of 2^depth",
                  minimum=1, maximum=7)


_ENCODER_WEIGHTS = Option(
    "encoder_weights", "path", None,
    "a local file of pre-trained ResNet/ResNeXt encoder weights (torchvision key names); nothing is downloaded",
    nullable=True, settable=False,
)
_ACTS = ("relu", "mish", "silu", "leaky_relu", "gelu", "selu", "prelu")
_LAYERS = Option("layers", "int_list", None, "blocks per encoder stage, overriding the depth's standard counts",
                 nullable=True, minimum=1, maximum=64, length=4)


@dataclass(frozen=True)
class Architecture:
    """A segmentation architecture of ``ml_worker.models``.

    ``options``: its constructor keyword arguments besides ``in_channels`` / ``num_classes``,
    in signature order, with the constructor's defaults. ``default_loss``: the loss it trains
    with when the run sets none. ``output``: ``softmax`` (class map, class 0 background) or
    ``sigmoid`` (independent channels). ``size_divisor``: input sides must be multiples of it
    (with the default options). ``width_option``: the constructor option a run's ``width``
    sets (None: the run's ``width`` does not apply to this architecture).
    """

    name: str
    label: str
    help: str
    default_loss: str
    output: str
    size_divisor: int
    width_option: str | None
    options: tuple[Option, ...]
    schedule: str = ""
    #: named set-ups (``ml_worker.presets``): ``fast`` and, for the seed papers, ``paper``
    presets: tuple[Choice, ...] = ()

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    @property
    def target(self) -> str:
        """The loss target kind: ``class_map`` (softmax models) or ``multi_label`` (sigmoid)."""
        return "class_map" if self.output == "softmax" else "multi_label"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "help": self.help, "default_loss": self.default_loss,
                "output": self.output, "size_divisor": self.size_divisor, "width_option": self.width_option,
                "schedule": self.schedule, "options": [o.as_dict() for o in self.options],
                "presets": [p.as_dict() for p in self.presets]}


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "unet", "U-Net",
        "the classic encoder-decoder with skip connections (Ronneberger 2015): a solid, fast baseline",
        default_loss="ce_dice", output="softmax", size_divisor=16, width_option="width",
        options=(_width(64), _depth(4)),
    ),
    Architecture(
        "pgunet_plus", "PGU-net+",
        "U-Net with residual decoder heads, trained by progressive growing from 32 px to the full tile "
        "(Zhao 2019): learns well from few annotations",
        default_loss="ce_dice", output="softmax", size_divisor=16, width_option="width",
        schedule="progressive growing: stages at 32, 64, 128... px, RMSprop, new/old layers at 1e-4/1e-6",
        options=(
            _width(64),
            Option("num_stages", "int", 4, "growing stages; each adds one finer level (input sizes 32, 64, 128, 256)",
                   minimum=1, maximum=6),
            Option("core_depth", "int", 1, "levels the first stage trains", minimum=1, maximum=4),
            Option("base_size", "int", 32, "input size of the first stage; it doubles every stage",
                   minimum=8, maximum=1024),
            Option("pyramid_input", "bool", True,
                   "also feed every level the image down-sampled to its scale (Karyo's addition; the paper has none)"),
        ),
    ),
    Architecture(
        "unet_sharp", "U-Net#",
        "ResNeXt encoder, full-scale skips with attention gates and an ASPP bridge, Focal Tversky loss: "
        "the most accurate and the heaviest",
        default_loss="focal_tversky", output="softmax", size_divisor=32, width_option="base_channels",
        schedule="two-phase fine-tuning when encoder weights are given (decoder first, then all but BatchNorm)",
        options=(
            Option("base_channels", "int", 64, "channels of the encoder stem; the stages widen from it",
                   minimum=1, maximum=512),
            Option("depth", "int", 50, "ResNeXt depth (50, 101 or 152 layers)", choices=(50, 101, 152)),
            _LAYERS,
            Option("cardinality", "int", 32, "groups of the ResNeXt grouped convolutions", minimum=1, maximum=64),
            Option("width_per_group", "int", 4, "channels per group in the ResNeXt blocks", minimum=1, maximum=64),
            Option("stem_channels", "int", 32, "channels of the full-resolution stem", minimum=1, maximum=512),
            Option("branch_channels", "int", 32, "channels of each full-scale skip branch", minimum=1, maximum=512),
            Option("decoder_channels", "int", 128, "channels of each decoder stage", minimum=1, maximum=1024),
            Option("aspp_channels", "int", 256, "channels of the ASPP bridge", minimum=1, maximum=2048),
            Option("act", "str", "mish", "activation of the decoder (and of the encoder unless encoder_act is set)",
                   choices=_ACTS),
            Option("encoder_act", "str", None,
                   "activation inside the ResNeXt encoder; relu to use ImageNet weights; empty: the same as act",
                   choices=_ACTS, nullable=True),
            _ENCODER_WEIGHTS,
        ),
    ),
    Architecture(
        "dssnet", "DSSNet",
        "small and fast: supervised down-sampling, an auxiliary super-resolution head and an edge head "
        "(CE + SSIM + edge losses); the engine's default",
        default_loss="ce", output="softmax", size_divisor=8, width_option="width",
        options=(
            _width(30, "channels of the supervised down-sampling path"),
            Option("feature_channels", "int", 64, "channels of the 1/8-scale feature extractor", minimum=1, maximum=1024),
            Option("expand_channels", "int", 104, "expansion channels inside each extractor block",
                   minimum=1, maximum=2048),
            Option("num_blocks", "int", 10, "blocks of the feature extractor", minimum=1, maximum=64),
            Option("decoder_channels", "int", 32, "channels of the fusion / up-sampling path", minimum=2, maximum=512),
            Option("sr_channels", "int", 32, "channels of the super-resolution head (training only)",
                   minimum=1, maximum=512),
            Option("sr_blocks", "int", 2, "residual blocks of the super-resolution head", minimum=0, maximum=16),
            Option("ssim_weight", "float", 0.25, "weight of the super-resolution SSIM loss", minimum=0, maximum=10),
            Option("edge_weight", "float", 0.4, "weight of the edge loss", minimum=0, maximum=10),
            Option("decoder", "str", "fusion",
                   "fusion: fuse the down-sampling map of every scale on the way up (Karyo's); paper: the reference "
                   "decoder, no skip fusions and two convs at full resolution", choices=("fusion", "paper")),
        ),
    ),
    Architecture(
        "hspnet", "HSP-Net",
        "ResNet encoder with vertical and horizontal spatial-pyramid (ASPP) blocks over four scales: "
        "good on nuclei of very different sizes",
        default_loss="ce_dice", output="softmax", size_divisor=1, width_option="base_channels",
        schedule="two-phase fine-tuning when encoder weights are given; any tile size (padded to 32 inside)",
        options=(
            Option("depth", "int", 34, "ResNet depth (34 and 101 are the paper's)", choices=(18, 34, 50, 101, 152)),
            Option("base_channels", "int", 64, "channels of the ResNet stem; the stages widen from it",
                   minimum=1, maximum=512),
            _LAYERS,
            Option("ds_channels", "int", 128, "channels of each spatial-pyramid block", minimum=1, maximum=1024),
            Option("head_channels", "int", 64, "channels of the segmentation head", minimum=1, maximum=512),
            Option("rates", "int_list", (6, 12, 18), "dilation rates of the spatial-pyramid convolutions",
                   minimum=1, maximum=64),
            Option("ds_widths", "int_list", None,
                   "widths of the four vertical pyramid blocks (x/4 to x/32; the paper's 32, 64, 128, 256); "
                   "empty: all ds_channels", nullable=True, minimum=1, maximum=1024, length=4),
            _ENCODER_WEIGHTS,
        ),
    ),
    Architecture(
        "multihead_unet", "Multi-head U-Net",
        "U-Net with Inception/SE decoder blocks predicting nucleus, core and touching-border maps "
        "(sigmoid), split by a marker watershed: separates crowded nuclei",
        default_loss="bce_dice", output="sigmoid", size_divisor=16, width_option="width",
        options=(
            _width(32),
            _depth(4),
            Option("target_radius", "int", 2, "pixels nuclei are shrunk by for the core target and the border width",
                   minimum=1, maximum=16),
            Option("encoder", "str", "unet", "unet: double 3x3 convs and max-pooling; xception: separable-conv "
                   "blocks with strided shortcuts", choices=("unet", "xception")),
            Option("act", "str", "relu", "activation everywhere (SELU in the DSB 2018 model)", choices=_ACTS),
            Option("postprocess", "str", "watershed",
                   "how cores grow into nuclei: marker watershed, or random walker (slower, smoother cuts)",
                   choices=("watershed", "random_walker")),
        ),
    ),
)

#: options every softmax architecture takes through ``create_model`` (not its constructor)
INSTANCE_HEAD_OPTION = Option(
    "instance_head", "str", None,
    "extra output that separates touching nuclei: 'hv' regresses HoVer-Net-style distance maps to each "
    "nucleus' centre (marker watershed on their gradients); empty: the architecture's own split",
    choices=("hv",), nullable=True,
)
CREATE_MODEL_OPTIONS = ("instance_head",)
ARCHITECTURES = tuple(
    replace(a, options=(*a.options, INSTANCE_HEAD_OPTION)) if a.output == "softmax" else a for a in ARCHITECTURES
)
ARCHITECTURES = tuple(
    replace(a, presets=tuple(Choice(n, n, _PRESETS[a.name][n]["help"]) for n in preset_names(a.name)))
    for a in ARCHITECTURES
)

#: what a project trains when it says nothing else (also ``TrainConfig.arch``'s default)
DEFAULT_ARCHITECTURE = "dssnet"


# ============================================================================ losses
@dataclass(frozen=True)
class Loss:
    """A loss of ``ml_worker.losses.LOSSES``. ``targets``: the segmentation targets it
    accepts (``class_map`` for softmax models, ``multi_label`` for sigmoid ones); empty for the
    auxiliary losses, which only an architecture's own extra heads use."""

    name: str
    label: str
    help: str
    targets: tuple[str, ...]

    @property
    def trainable(self) -> bool:
        """Whether a run may choose it as its segmentation loss."""
        return bool(self.targets)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "help": self.help, "targets": list(self.targets),
                "trainable": self.trainable}


_BOTH = ("class_map", "multi_label")
LOSSES: tuple[Loss, ...] = (
    Loss("ce", "Cross-entropy", "pixel-wise cross-entropy (binary cross-entropy for sigmoid models)", _BOTH),
    Loss("bce", "Binary cross-entropy", "the same function as ce; the usual name for sigmoid models", _BOTH),
    Loss("dice", "Soft Dice", "1 - soft Dice over the foreground: insensitive to how few pixels are nuclei", _BOTH),
    Loss("ce_dice", "CE + Dice", "cross-entropy plus soft Dice: stable gradients and good overlap", _BOTH),
    Loss("bce_dice", "BCE + Dice", "the same function as ce_dice; the usual name for sigmoid models", _BOTH),
    Loss("focal_tversky", "Focal Tversky",
         "Tversky index weighting missed nuclei over false alarms (beta 0.7), focused on hard images", _BOTH),
    Loss("border_ce", "Border-weighted CE",
         "U-Net's cross-entropy weighted up on the thin background between touching nuclei", ("class_map",)),
    Loss("ssim", "SSIM", "1 - structural similarity of a reconstructed image (DSSNet's super-resolution head only)",
         ()),
    Loss("edge_l1", "Edge L1", "L1 between predicted and true contours (DSSNet's edge head only)", ()),
)


# ============================================================================ simple choices
OPTIMIZERS: tuple[Choice, ...] = (
    Choice("adam", "Adam", "adaptive moments; the default (L2 weight decay)"),
    Choice("adamw", "AdamW", "Adam with decoupled weight decay"),
    Choice("rmsprop", "RMSprop", "the default of PGU-net+'s progressive growing"),
    Choice("sgd", "SGD", "stochastic gradient descent with Nesterov momentum 0.9"),
)

STAIN_NORMALIZERS: tuple[Choice, ...] = (
    Choice("none", "None", "use the colours as scanned"),
    Choice("macenko", "Macenko",
           "map the H&E stain vectors to a reference image's (for H&E; estimated from the tissue's optical density)"),
    Choice("reinhard", "Reinhard", "match the colour mean and spread of a reference image in LAB space (any stain)"),
)

AUGMENT_PRESETS: tuple[Choice, ...] = (
    Choice("none", "None", "no augmentation"),
    Choice("light", "Light", "flips and 90-degree rotations only"),
    Choice("default", "Default", "flips, rotations, affine and elastic warps, stain (HED) jitter, blur and noise"),
)


# ============================================================================ training options
def _names(choices: tuple[Choice, ...] | tuple[Loss, ...]) -> tuple[str, ...]:
    return tuple(c.name for c in choices)


#: what a training run's config may set; every name is a ``ml_worker.training.TrainConfig``
#: field and every default is that field's default
TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("epochs", "int", 50, "passes over the training patches", minimum=1, maximum=10000),
    Option("batch_size", "int", 8, "patches per optimizer step", minimum=1, maximum=1024),
    Option("lr", "float", 1e-3, "learning rate", minimum=0, maximum=1, exclusive_minimum=True,
           exclusive_maximum=True),
    Option("weight_decay", "float", 1e-4, "weight decay (L2 penalty)", minimum=0, maximum=1, exclusive_maximum=True),
    Option("optimizer", "str", None, "optimizer; empty: RMSprop for progressive growing, Adam otherwise",
           choices=_names(OPTIMIZERS), nullable=True),
    Option("loss", "str", None, "segmentation loss; empty: the architecture's default",
           choices=tuple(lo.name for lo in LOSSES if lo.trainable), nullable=True),
    Option("tile_size", "int", 256, "training patch side in pixels (a multiple of the architecture's size divisor)",
           minimum=32, maximum=4096),
    Option("steps_per_epoch", "int", None, "training patches per epoch; empty: enough to cover the images once",
           minimum=1, maximum=1_000_000, nullable=True),
    Option("seed", "int", 0, "seed of the initialisation and the patch sampling", minimum=0, maximum=2**32 - 1),
    Option("stain_norm", "str", "none", "stain normalisation fitted on a reference training image",
           choices=_names(STAIN_NORMALIZERS)),
    Option("augment", "str", "default", "augmentation preset", choices=_names(AUGMENT_PRESETS)),
    Option("foreground_bias", "float", 0.0, "probability of centring a training patch on a nucleus",
           minimum=0, maximum=1),
    Option("early_stopping_patience", "int", 10,
           "stop after this many epochs without a better validation Dice; 0 or empty: never stop early",
           minimum=0, maximum=10000, nullable=True),
    Option("val_every", "int", 1, "validate every this many epochs (and always at the last)", minimum=1,
           maximum=10000),
    Option("encoder_lr_factor", "float", 1.0,
           "learning rate of a pre-trained encoder relative to the rest (HSP-Net's paper: 0.1)", minimum=0,
           maximum=1, exclusive_minimum=True),
    Option("grad_clip", "float", None, "clip the gradient norm to this value; empty: no clipping", minimum=0,
           maximum=1e6, exclusive_minimum=True, nullable=True),
    Option("lr_schedule", "str", "constant",
           "learning-rate schedule after the warm-up: constant, cosine (down to 1 % over the run) or step decay",
           choices=("constant", "cosine", "step")),
    Option("warmup_epochs", "int", 0, "epochs of linear learning-rate warm-up", minimum=0, maximum=1000),
    Option("lr_step_epochs", "int", None, "period of the step schedule in epochs; empty: a third of the run",
           minimum=1, maximum=10000, nullable=True),
    Option("lr_step_gamma", "float", 0.1, "factor of each step of the step schedule", minimum=0, maximum=1,
           exclusive_minimum=True),
    Option("ema_decay", "float", None,
           "average the weights over steps (validated and exported); 0.99-0.999; empty: off",
           minimum=0, maximum=1, exclusive_maximum=True, nullable=True),
    Option("bn_recalibrate", "bool", True,
           "recompute BatchNorm statistics with the final weights before validating (steadier curves)"),
    Option("input_norm", "str", "image",
           "input standardisation: each image's own channel statistics (robust to stain differences; "
           "the default) or fixed statistics of the training images (same input for a tile and a slide)",
           choices=("image", "dataset")),
)

#: a run's model size, applied to the architecture's ``width_option`` (not a TrainConfig field)
WIDTH_OPTION = Option("width", "int", None,
                      "model width (channels of the first level); empty: the architecture's default",
                      minimum=1, maximum=512, nullable=True)


# ============================================================================ active learning
@dataclass(frozen=True)
class Score:
    """A per-tile uncertainty score of ``ml_worker.active_learning`` (higher = more uncertain).
    ``needs``: the extra analysis pass that computes it (``mc_dropout``, ``tta``) — empty for the
    scores every prediction has."""

    name: str
    help: str
    needs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "help": self.help, "needs": list(self.needs)}


SCORES: tuple[Score, ...] = (
    Score("entropy", "mean pixel entropy of the predicted class distribution, 0..1"),
    Score("margin", "mean 1 - (top probability - second probability), 0..1"),
    Score("boundary", "mean entropy in a band around the predicted nucleus contours, where corrections happen"),
    Score("mc_dropout", "variance of the nucleus probability over repeated passes with dropout on the bottleneck",
          ("mc_dropout",)),
    Score("mc_mutual_info", "BALD mutual information of the nucleus probability over the dropout passes",
          ("mc_dropout",)),
    Score("expected_fixes", "expected number of nuclei to fix on the tile: 1 - soft IoU of each predicted nucleus "
          "with the probabilities, plus blobs the model half-sees"),
    Score("tta", "variance of the nucleus probability over flipped / rotated copies of the tile", ("tta",)),
    Score("instance_flips", "expected nuclei that vanish, split, merge or appear across flipped / rotated copies",
          ("tta",)),
)


@dataclass(frozen=True)
class Strategy:
    """An active-learning strategy of ``ml_worker.active_learning.STRATEGIES``.

    ``score_key``: the score it ranks by, which the queue also stores as each entry's score
    (``random`` ranks by nothing; its queue shows ``entropy`` for comparison). ``needs``:
    what the predictions must carry — ``embeddings`` (diversity), ``mc_dropout`` / ``tta``
    (an extra analysis pass when predicting).
    """

    name: str
    label: str
    help: str
    score_key: str
    needs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "help": self.help, "score_key": self.score_key,
                "needs": list(self.needs)}


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("random", "Random", "a seeded random order: the baseline every other strategy must beat", "entropy"),
    Strategy("entropy", "Entropy", "the tiles whose pixels the model is least sure about first", "entropy"),
    Strategy("margin", "Margin", "the tiles where the two likeliest classes are closest first", "margin"),
    Strategy("boundary", "Boundary", "the tiles with the most uncertain nucleus outlines first", "boundary"),
    Strategy("mc_dropout", "MC dropout",
             "the tiles whose prediction changes most under dropout first (8 extra passes per tile)", "mc_dropout",
             ("mc_dropout",)),
    Strategy("tta", "Test-time augmentation",
             "the tiles whose prediction changes most when flipped or rotated first (3 extra passes per tile)", "tta",
             ("tta",)),
    Strategy("hybrid", "Hybrid (default)",
             "the most uncertain tiles by entropy, thinned to a batch of different-looking ones (k-center on the "
             "model's features); while labels are few the queue starts with typical tiles (all up to 8 labelled "
             "tiles, none from 24)", "entropy", ("embeddings",)),
    Strategy("hybrid_boundary", "Hybrid on boundaries",
             "as hybrid, with the uncertainty measured on the nucleus outlines", "boundary", ("embeddings",)),
    Strategy("hybrid_rep", "Hybrid, representative",
             "as hybrid, thinned to the tiles that best represent the whole pool (facility location)", "entropy",
             ("embeddings",)),
    Strategy("typical", "Typical (cold start)",
             "the most typical tile of each kind of tissue no label covers yet (k-means on the model's features); "
             "shows the expected fixes for comparison", "expected_fixes", ("embeddings",)),
    Strategy("fixes", "Expected fixes per minute",
             "the tiles with the most nuclei to fix per minute of correction, one per kind of tissue",
             "expected_fixes", ("embeddings",)),
    Strategy("adaptive", "Adaptive",
             "typical tiles while labels are few (up to 8), the most nuclei to fix per minute once the model has "
             "seen enough (from 24), mixed in between", "expected_fixes", ("embeddings",)),
)

DEFAULT_STRATEGY = "hybrid"

#: the product's warm-up (``ml_worker.active_learning.warmup``): with no model, or with fewer
#: labelled tiles than ``WARM_FROM``, part of every batch is typical tiles (all of it up to
#: ``COLD_UNTIL``); every strategy but ``random``, ``typical`` and ``adaptive`` gets it
WARM_UP = {"cold_until": 8, "warm_from": 24, "not_for": ["random", "typical", "adaptive"]}


# ============================================================================ self-supervised pretraining
#: options of a project's encoder pretraining (``ml_worker.ssl.SSLConfig``; the model is the
#: project's default architecture and width, the input standardisation its training runs')
SSL_OPTIONS: tuple[Option, ...] = (
    Option("steps", "int", 200, "optimizer steps (200: a few CPU minutes on a width-8 U-Net)", minimum=1,
           maximum=100000),
    Option("batch_size", "int", 16, "tiles per step (two random views of each)", minimum=2, maximum=1024),
    Option("crop", "int", 64, "side of a view in pixels (smaller tiles are mirror-padded)", minimum=16,
           maximum=1024),
    Option("lr", "float", 0.05, "SGD learning rate (momentum 0.9, cosine decay)", minimum=0, maximum=1,
           exclusive_minimum=True),
    Option("max_tiles", "int", 512, "at most this many of the project's unlabelled tiles (a seeded sample)",
           minimum=2, maximum=100000),
)
_SSL_BY_NAME = {o.name: o for o in SSL_OPTIONS}


def ssl_defaults() -> dict[str, Any]:
    return {o.name: o.default for o in SSL_OPTIONS}


def validate_ssl_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Pretraining options, checked and converted, over :func:`ssl_defaults`.

    Raises:
        CatalogError: naming the option and what it accepts.
    """
    if options is not None and not isinstance(options, Mapping):
        raise CatalogError("the pretraining config must be an object of option: value", field="config",
                           valid=list(_SSL_BY_NAME), value=options)
    clean = ssl_defaults()
    for key, value in (options or {}).items():
        if key not in _SSL_BY_NAME:
            raise CatalogError(f"unknown pretraining option {key!r}; valid: {', '.join(_SSL_BY_NAME)}",
                               field=str(key), valid=list(_SSL_BY_NAME), value=value)
        clean[key] = _SSL_BY_NAME[key].clean(value)
    return clean


# ============================================================================ lookups
_ARCH_BY_NAME = {a.name: a for a in ARCHITECTURES}
_STRATEGY_BY_NAME = {s.name: s for s in STRATEGIES}
_TRAINING_BY_NAME = {o.name: o for o in TRAINING_OPTIONS}


def architecture_names() -> list[str]:
    return [a.name for a in ARCHITECTURES]


def loss_names() -> list[str]:
    return [lo.name for lo in LOSSES]


def training_loss_names(arch: str | None = None) -> list[str]:
    """Losses a run may choose (for ``arch``: those accepting its target)."""
    target = architecture(arch).target if arch else None
    return [lo.name for lo in LOSSES if lo.trainable and (target is None or target in lo.targets)]


def optimizer_names() -> list[str]:
    return list(_names(OPTIMIZERS))


def stain_normalizer_names() -> list[str]:
    return list(_names(STAIN_NORMALIZERS))


def augment_preset_names() -> list[str]:
    return list(_names(AUGMENT_PRESETS))


def strategy_names() -> list[str]:
    return [s.name for s in STRATEGIES]


#: a run's named set-up (``ml_worker.presets``), applied under its own options; not a TrainConfig field
PRESET_OPTION = Option("preset", "str", None,
                       "named set-up of the architecture: 'fast' (CPU-sized) or 'paper' (the paper's sizes, "
                       "loss, optimizer and schedule); the run's own options win; empty: none",
                       choices=("fast", "paper"), nullable=True)
#: model-level options a run may set beside ``width`` (they go to ``create_model``)
_RUN_MODEL_OPTIONS = {WIDTH_OPTION.name: WIDTH_OPTION, PRESET_OPTION.name: PRESET_OPTION,
                      INSTANCE_HEAD_OPTION.name: INSTANCE_HEAD_OPTION}


def run_option_names() -> list[str]:
    """Keys a training run's config may hold: the training options, ``width``, ``preset`` and
    ``instance_head``."""
    return [o.name for o in TRAINING_OPTIONS] + list(_RUN_MODEL_OPTIONS)


def architecture(name: str | None) -> Architecture:
    """The architecture called ``name``; :class:`CatalogError` naming the valid ones otherwise."""
    return _ARCH_BY_NAME[validate_architecture(name)]


def strategy(name: str | None) -> Strategy:
    """The strategy called ``name``; :class:`CatalogError` naming the valid ones otherwise."""
    return _STRATEGY_BY_NAME[validate_strategy(name)]


def score_key(strategy_name: str) -> str:
    """The score a strategy ranks by (and the queue stores)."""
    return strategy(strategy_name).score_key


#: dropout passes per tile when a strategy needs the ``mc_dropout`` scores
MC_DROPOUT_SAMPLES = 8


def analysis_kwargs(strategy_name: str) -> dict[str, Any]:
    """Keyword arguments of ``ml_worker.active_learning.analyze_tile`` that compute the scores
    the strategy ranks by (the cheap scores need none)."""
    needs = strategy(strategy_name).needs
    return {"mc_samples": MC_DROPOUT_SAMPLES if "mc_dropout" in needs else 0, "tta": "tta" in needs}


# ============================================================================ validation
def _one_of(value: Any, names: list[str], *, field: str, what: str) -> str:
    if isinstance(value, str) and value in names:
        return value
    raise CatalogError(f"unknown {what} {value!r}; valid: {', '.join(names)}", field=field, valid=names, value=value)


def validate_architecture(name: Any, *, field: str = "architecture") -> str:
    return _one_of(name, architecture_names(), field=field, what="architecture")


def validate_strategy(name: Any, *, field: str = "strategy") -> str:
    return _one_of(name, strategy_names(), field=field, what="active-learning strategy")


def validate_stain_normalizer(name: Any, *, field: str = "stain_norm") -> str:
    return _one_of(name, stain_normalizer_names(), field=field, what="stain normaliser")


def validate_training_options(options: Mapping[str, Any] | None, *, architecture: str | None = None) -> dict[str, Any]:
    """A training run's config, checked and converted: only :func:`run_option_names` keys,
    each of its type and within its bounds. With ``architecture``, also what depends on it:
    the loss must accept its target, ``tile_size`` must be a multiple of its size divisor,
    ``width`` must apply to it. Empty optional values become None.

    Raises:
        CatalogError: naming the field and what it accepts.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise CatalogError("the training config must be an object of option: value", field="config",
                           valid=run_option_names(), value=options)
    arch = _ARCH_BY_NAME[validate_architecture(architecture)] if architecture is not None else None
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key in _RUN_MODEL_OPTIONS:
            clean[key] = _RUN_MODEL_OPTIONS[key].clean(value)
        elif key in _TRAINING_BY_NAME:
            clean[key] = _TRAINING_BY_NAME[key].clean(value)
        else:
            names = run_option_names()
            raise CatalogError(f"unknown training option {key!r}; valid: {', '.join(names)}", field=str(key),
                               valid=names, value=value)
    if arch is not None:
        loss = clean.get("loss")
        if loss is not None and loss not in training_loss_names(arch.name):
            valid = training_loss_names(arch.name)
            raise CatalogError(f"loss {loss!r} does not fit {arch.name} ({arch.output} outputs); valid: "
                               f"{', '.join(valid)}", field="loss", valid=valid, value=loss)
        tile = clean.get("tile_size")
        if tile is not None and tile % arch.size_divisor:
            raise CatalogError(f"tile_size must be a multiple of {arch.size_divisor} for {arch.name}, got {tile}",
                               field="tile_size", valid={"multiple_of": arch.size_divisor}, value=tile)
        if clean.get("width") is not None and arch.width_option is None:
            raise CatalogError(f"width does not apply to {arch.name}; leave it empty", field="width", valid=None,
                               value=clean["width"])
        preset = clean.get("preset")
        if preset is not None and preset not in [p.name for p in arch.presets]:
            valid = [p.name for p in arch.presets]
            raise CatalogError(f"{arch.name} has no {preset!r} preset; valid: {', '.join(valid)}", field="preset",
                               valid=valid, value=preset)
        if clean.get("instance_head") is not None and arch.output != "softmax":
            raise CatalogError(f"{arch.name} has its own instance outputs; instance_head works with softmax "
                               "architectures", field="instance_head", valid=None, value=clean["instance_head"])
    return clean


def validate_model_options(arch_name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Constructor options for ``arch_name`` (``TrainConfig.model_kwargs``), checked and
    converted; options the platform sets (encoder weights) are refused."""
    arch = architecture(arch_name)
    clean: dict[str, Any] = {}
    for key, value in (options or {}).items():
        try:
            opt = arch.option(key)
        except KeyError:
            names = [o.name for o in arch.options if o.settable]
            raise CatalogError(f"{arch.name} has no option {key!r}; valid: {', '.join(names)}", field=str(key),
                               valid=names, value=value) from None
        clean[key] = opt.clean(value)
    return clean


def model_kwargs_for(arch_name: str, width: int | None) -> dict[str, Any]:
    """The constructor options a run's ``width`` stands for on ``arch_name`` ({} when unset)."""
    arch = architecture(arch_name)
    if width is None:
        return {}
    if arch.width_option is None:
        raise CatalogError(f"width does not apply to {arch.name}; leave it empty", field="width", value=width)
    return {arch.width_option: int(width)}


# ============================================================================ JSON view
def as_dict() -> dict[str, Any]:
    """The whole catalog as plain JSON-ready data (``GET /api/catalog/``)."""
    return {
        "architectures": [a.as_dict() for a in ARCHITECTURES],
        "default_architecture": DEFAULT_ARCHITECTURE,
        "losses": [lo.as_dict() for lo in LOSSES],
        "optimizers": [c.as_dict() for c in OPTIMIZERS],
        "stain_normalizers": [c.as_dict() for c in STAIN_NORMALIZERS],
        "augment_presets": [c.as_dict() for c in AUGMENT_PRESETS],
        "training_options": [o.as_dict() for o in (*TRAINING_OPTIONS, *_RUN_MODEL_OPTIONS.values())],
        "scores": [s.as_dict() for s in SCORES],
        "strategies": [s.as_dict() for s in STRATEGIES],
        "default_strategy": DEFAULT_STRATEGY,
        "warm_up": dict(WARM_UP),
        "ssl_options": [o.as_dict() for o in SSL_OPTIONS],
    }

