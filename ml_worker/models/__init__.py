"""Model registry: ``create_model(name, in_channels=3, num_classes=2, instance_head=None, **kw)``.

``instance_head="hv"`` adds HoVer-Net-style distance-map channels to any semantic architecture
(``ml_worker.instance_heads``).

Architectures register themselves with ``@register("name")``; importing this package
imports every architecture module so the registry is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .base import KaryoModel

__all__ = ["MODELS", "register", "create_model", "model_names", "KaryoModel"]

MODELS: dict[str, type[KaryoModel]] = {}

_M = TypeVar("_M", bound=type[KaryoModel])


def register(name: str) -> Callable[[_M], _M]:
    """Class decorator adding a :class:`KaryoModel` subclass to :data:`MODELS`."""

    def deco(cls: _M) -> _M:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is already registered by {MODELS[name].__name__}")
        cls.arch_name = name
        MODELS[name] = cls
        return cls

    return deco


def model_names() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(MODELS)


def create_model(name: str, in_channels: int = 3, num_classes: int = 2, **kw: Any) -> KaryoModel:
    """Build the architecture ``name``.

    ``arch_name`` and ``init_kwargs`` (everything needed to rebuild the model, saved in
    checkpoints) are recorded on the instance.

    Raises:
        KeyError: unknown architecture name (the message lists the known ones).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    head = kw.pop("instance_head", None) or None
    if head is None:
        model = MODELS[name](in_channels=in_channels, num_classes=num_classes, **kw)
    else:
        from ml_worker.instance_heads import INSTANCE_HEADS

        if head not in INSTANCE_HEADS:
            raise ValueError(f"unknown instance_head {head!r}; available: {', '.join(sorted(INSTANCE_HEADS))}")
        cls = MODELS[name]
        if cls.activation is not KaryoModel.activation:
            raise ValueError(f"{name!r} has its own instance outputs; instance_head works with semantic models")
        # The host's head gets the extra channels; class channels stay first.
        model = cls(in_channels=in_channels, num_classes=num_classes + INSTANCE_HEADS[head], **kw)
        model.num_classes = num_classes
        model.instance_head = head
        kw = {**kw, "instance_head": head}
    model.arch_name = name
    model.init_kwargs = {"in_channels": in_channels, "num_classes": num_classes, **kw}
    return model


# Imported for their @register side effect (after `register` exists: they import it).
from . import dssnet, hspnet, multihead_unet, pgunet_plus, unet, unet_sharp  # noqa: E402,F401
