"""The schedule of a training run as a pure function of the epoch: which stage (PGU-net+
progressive growing) or phase (U-Net# two-phase fine-tuning), which input size, which parameter
groups and optimizer, and the learning-rate multiplier of every step (warm-up, cosine, step decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ml_worker.models import KaryoModel
from ml_worker.train_config import TrainConfig

__all__ = ["Plan", "make_plan", "configure", "configure_model_only", "make_optimizer", "stage_sizes",
           "lr_factor", "apply_lr"]


def stage_sizes(num_stages: int, stage_input_size: Callable[[int], int], tile_size: int) -> list[int]:
    """Training input side per progressive stage: ``min(stage_input_size(s), tile_size)``,
    the last stage always at ``tile_size``."""
    sizes = [min(int(stage_input_size(s)), int(tile_size)) for s in range(1, num_stages + 1)]
    sizes[-1] = int(tile_size)
    return sizes


@dataclass
class Plan:
    """Pure function of the epoch index: which stage / phase / input size / optimizer."""

    total_epochs: int
    progressive: bool
    num_stages: int
    epochs_per_stage: int
    sizes: list[int]
    two_phase: bool
    phase1_epochs: int

    def stage(self, epoch: int) -> int | None:
        if not self.progressive:
            return None
        return min(self.num_stages, epoch // self.epochs_per_stage + 1)

    def phase(self, epoch: int) -> int | None:
        if not self.two_phase:
            return None
        return 1 if epoch < self.phase1_epochs else 2

    def size(self, epoch: int, tile_size: int) -> int:
        s = self.stage(epoch)
        return tile_size if s is None else self.sizes[s - 1]

    def key(self, epoch: int) -> str:
        """Identifies the optimizer layout; a new key means a fresh optimizer."""
        if self.progressive:
            return f"stage{self.stage(epoch)}"
        if self.two_phase:
            return f"phase{self.phase(epoch)}"
        return "all"

    def final(self, epoch: int) -> bool:
        """Whether epoch's model is the full (inference) model."""
        return not self.progressive or self.stage(epoch) == self.num_stages


def make_plan(config: TrainConfig, model: KaryoModel) -> Plan:
    can_grow = callable(getattr(model, "set_stage", None)) and hasattr(model, "num_stages")
    progressive = can_grow if config.progressive is None else bool(config.progressive)
    if progressive and not can_grow:
        raise ValueError(f"progressive growing needs a model with set_stage (e.g. pgunet_plus), not {config.arch!r}")
    has_encoder = any(True for _ in model.encoder_parameters())
    two_phase = bool(config.encoder_weights) if config.two_phase is None else bool(config.two_phase)
    if two_phase and not has_encoder:
        raise ValueError(f"two-phase training needs a model with an encoder (unet_sharp, hspnet), not {config.arch!r}")
    if progressive and two_phase:
        raise ValueError("progressive growing and two-phase training cannot be combined")
    if progressive:
        S = int(model.num_stages)  # type: ignore[attr-defined]
        eps = int(config.epochs_per_stage or math.ceil(config.epochs / S))
        sizes = stage_sizes(S, model.stage_input_size, config.tile_size)  # type: ignore[attr-defined]
        for s, t in enumerate(sizes, start=1):
            model.set_stage(s)  # type: ignore[attr-defined]
            if t % model.size_divisor:
                raise ValueError(
                    f"stage {s} input size {t} is not a multiple of {model.size_divisor}; "
                    f"use a tile_size that is a multiple of {model.size_divisor}"
                )
        model.set_stage(S)  # type: ignore[attr-defined]
        return Plan(S * eps, True, S, eps, sizes, False, 0)
    if config.tile_size % model.size_divisor:
        raise ValueError(
            f"tile_size {config.tile_size} must be a multiple of {model.size_divisor} for {config.arch!r}"
        )
    p1 = int(config.phase1_epochs) if config.phase1_epochs is not None else max(1, config.epochs // 4)
    if two_phase and not 0 < p1 < config.epochs:
        raise ValueError(f"phase1_epochs must be in 1..epochs-1, got {p1} for {config.epochs} epochs")
    return Plan(int(config.epochs), False, 1, int(config.epochs), [config.tile_size], two_phase, p1)


def configure(model: KaryoModel, plan: Plan, epoch: int, config: TrainConfig) -> list[dict[str, Any]]:
    """Put the model in the state of ``epoch`` and return its optimizer param groups."""
    wd = float(config.weight_decay)
    if plan.progressive:
        s = plan.stage(epoch)
        model.set_stage(s)  # type: ignore[attr-defined]
        groups = model.stage_param_groups(  # type: ignore[attr-defined]
            s, lr_old=config.stage_lr_old, lr_new=config.stage_lr_new
        )
        # Parameters of levels not active yet take no part (they get no gradient).
        return [dict(g, weight_decay=wd) for g in groups]
    if plan.two_phase:
        if plan.phase(epoch) == 1:
            model.freeze_batchnorm(False)
            model.set_encoder_trainable(False)
            params = [p for p in model.non_encoder_parameters() if p.requires_grad]
            return [{"params": params, "lr": float(config.lr), "weight_decay": wd, "name": "decoder"}]
        model.set_encoder_trainable(True)
        model.freeze_batchnorm(True)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = float(config.lr) * float(config.phase2_lr_factor)
        return [{"params": params, "lr": lr, "weight_decay": wd, "name": "all_but_bn"}]
    factor = float(config.encoder_lr_factor)
    if factor != 1.0 and any(True for _ in model.encoder_parameters()):
        # Pre-trained encoder at a lower rate than the new decoder (HSP-Net: 0.1x).
        enc = [p for p in model.encoder_parameters() if p.requires_grad]
        rest = [p for p in model.non_encoder_parameters() if p.requires_grad]
        return [{"params": rest, "lr": float(config.lr), "weight_decay": wd, "name": "decoder"},
                {"params": enc, "lr": float(config.lr) * factor, "weight_decay": wd, "name": "encoder"}]
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": float(config.lr),
             "weight_decay": wd, "name": "all"}]


def make_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}")


def configure_model_only(model: KaryoModel, plan: Plan, epoch: int) -> None:
    """Model state of ``epoch`` when the optimizer is reused (same key)."""
    if plan.progressive:
        model.set_stage(plan.stage(epoch))  # type: ignore[attr-defined]


def lr_factor(config: TrainConfig, plan: Plan, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multiplier of every parameter group's base learning rate at ``step`` (0-based) of
    ``epoch`` (0-based): linear warm-up over ``warmup_epochs``, then the schedule over the
    remaining epochs of the whole plan (for PGU-net+ the whole growing schedule, so later
    stages train at lower rates, as their layers carry more of the result)."""
    n = max(1, int(steps_per_epoch))
    t = epoch * n + step  # steps already taken
    warm = int(config.warmup_epochs) * n
    if warm and t < warm:
        return (t + 1) / warm
    name = str(config.lr_schedule).lower()
    if name == "constant":
        return 1.0
    if name == "step":
        period = int(config.lr_step_epochs or max(1, plan.total_epochs // 3))
        return float(config.lr_step_gamma) ** (max(0, epoch - int(config.warmup_epochs)) // period)
    if name == "cosine":
        total = max(1, plan.total_epochs * n - warm)
        progress = min(1.0, (t - warm) / total)
        floor = 0.01
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set each group's rate to its base rate (remembered on first use) times ``factor``."""
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = float(base) * factor
