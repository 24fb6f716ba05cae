"""Model checkpoints: self-describing, atomically written, safely loaded.

A checkpoint is a ``torch.save``'d dict::

    {"format": 1, "arch": "unet", "init_kwargs": {...}, "state_dict": {...}, **extra}

``extra`` is free-form training state (epoch, metrics, config, optimizer state, stage...).
It must be plain data — dicts, lists, tuples, str, int, float, bool, None, tensors — because
checkpoints are loaded with ``torch.load(weights_only=True)`` (a checkpoint file must never
be able to run code). Dataclasses, ``pathlib.Path`` and numpy scalars/arrays are converted
to plain data automatically on save.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_worker.models import MODELS, KaryoModel, create_model

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
_RESERVED = ("format", "arch", "init_kwargs", "state_dict")
# Constructor kwargs that only matter when building from scratch: the state dict already
# holds the trained weights, and the file may not exist where the checkpoint is loaded.
_TRANSIENT_KWARGS = ("encoder_weights",)


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, incomplete, or describes an unknown architecture."""


def _to_plain(obj: Any) -> Any:
    """Recursively convert ``obj`` to data ``torch.load(weights_only=True)`` accepts."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _to_plain(dataclasses.asdict(obj))
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        plain = [_to_plain(v) for v in obj]
        return plain if isinstance(obj, list) else tuple(plain)  # namedtuples → tuples
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint; pass plain data (dict/list/str/number/tensor)")


def save_checkpoint(path: str | PathLike[str], model: KaryoModel, **extra: Any) -> Path:
    """Save ``model`` (architecture, constructor kwargs, weights) plus ``extra`` to ``path``.

    The file is written to a temporary file in the same directory, flushed to disk and then
    renamed over ``path`` (``os.replace`` is atomic), so a crash leaves either the old file
    or the new one — never a truncated checkpoint.

    Returns:
        The checkpoint path.
    """
    path = Path(path)
    if not getattr(model, "arch_name", "") or model.arch_name not in MODELS:
        raise CheckpointError(f"model {type(model).__name__} is not a registered architecture")
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ValueError(f"extra keys {clash} are reserved checkpoint fields")
    init_kwargs = {k: v for k, v in model.init_kwargs.items() if k not in _TRANSIENT_KWARGS}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch_name,
        "init_kwargs": _to_plain(init_kwargs),
        # Detached CPU copies: loadable on any machine, independent of later training.
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **_to_plain(extra),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[KaryoModel, dict[str, Any]]:
    """Rebuild the model stored in ``path`` with :func:`create_model` and load its weights.

    Returns:
        ``(model, meta)``: the model in eval mode on ``map_location``, and every other
        stored field (``arch``, ``init_kwargs``, ``format`` and the ``extra`` of
        :func:`save_checkpoint`).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is corrupt/not a checkpoint, names an unknown
            architecture, or its weights do not fit the rebuilt model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or not a checkpoint): {exc}") from exc
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in ("arch", "init_kwargs", "state_dict")):
        raise CheckpointError(f"{path} is not a Karyo checkpoint (missing arch/init_kwargs/state_dict)")
    arch = ckpt["arch"]
    if arch not in MODELS:
        raise CheckpointError(
            f"checkpoint {path} has unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}"
        )
    kwargs = dict(ckpt["init_kwargs"])
    try:
        model = create_model(arch, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot rebuild {arch!r} from checkpoint {path}: {exc}") from exc
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit {arch!r}: {exc}") from exc
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
