"""What keeps validation curves from swinging on small CPU budgets: an exponential moving
average of the weights (EMA) and "precise BN" (BatchNorm running statistics recomputed with the
final weights). Both act on the model that is validated and exported, never on the one being
optimised.

Why both: with batches of 2-8 patches the BatchNorm running statistics are averages collected
while the weights were still moving, and single-step weights are noisy; measured on CPM-15
(``al_sim``): held-out Dice 0.82 -> 0.64 -> 0.82 across consecutive epochs without
recalibration, 0.80-0.82 with it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ml_worker.data import Sample

__all__ = ["WeightEMA", "recalibrate_batchnorm", "recalibrate_batchnorm_on", "swapped_state"]


class WeightEMA:
    """EMA of every floating-point tensor of a model's state dict (parameters and BatchNorm
    buffers; integer buffers such as ``num_batches_tracked`` are copied). The decay ramps up
    as ``min(decay, (1 + n) / (10 + n))`` so that the average is not stuck near the random
    initialisation after a short run."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in model.state_dict().items():
            avg = self.state.get(k)
            if avg is None or avg.shape != v.shape:  # a new PGU-net+ level: start from its weights
                self.state[k] = v.detach().clone()
            elif v.dtype.is_floating_point:
                avg.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                avg.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.decay = float(d["decay"])
        self.updates = int(d["updates"])
        self.state = {k: v.clone() for k, v in d["state"].items()}


class swapped_state:
    """Context manager: the model holds ``state`` (if given) inside the block and gets its own
    weights and buffers back afterwards, whatever the block did to them (e.g. recalibrated BN)."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None) -> None:
        self.model = model
        self.state = state
        self.saved: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> torch.nn.Module:
        self.saved = copy.deepcopy(self.model.state_dict())
        if self.state is not None:
            self.model.load_state_dict(self.state, strict=False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        assert self.saved is not None
        self.model.load_state_dict(self.saved)


def recalibrate_batchnorm(
    model: Any, samples: Sequence[Sample], size: int, *, normalizer: Any = None, n_patches: int = 64,
    batch_size: int = 16, seed: int = 0, device: str | torch.device | None = None,
) -> bool:
    """Recompute every BatchNorm's running mean / variance with the current weights
    ("precise BN"): cumulative averages over ``n_patches`` un-augmented ``size`` patches of
    ``samples``, forward passes in train mode without gradients; the model is left in eval
    mode. ``normalizer`` is the stain normaliser or the :class:`~ml_worker.data.Preprocessing`
    of the run. Returns False (and does nothing) for a model without BatchNorm or frozen BN."""
    from ml_worker.data import PatchDataset

    if not samples or not _batchnorms(model):
        return False
    ds = PatchDataset(list(samples), tile_size=int(size), augment=None, normalizer=normalizer,
                      length=int(n_patches), seed=int(seed))
    return recalibrate_batchnorm_on(model, ds, batch_size=batch_size, device=device)


def _batchnorms(model: Any) -> list[torch.nn.Module]:
    if getattr(model, "_bn_frozen", False):
        return []
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def recalibrate_batchnorm_on(model: Any, ds: Any, *, batch_size: int = 16,
                             device: str | torch.device | None = None) -> bool:
    """:func:`recalibrate_batchnorm` over every patch of an un-augmented
    :class:`~ml_worker.data.PatchDataset` built by the caller (a training run keeps one and
    only changes its seed, instead of re-reading and re-standardising every image each epoch)."""
    from ml_worker.inference import pick_device

    bns = _batchnorms(model)
    if not bns:
        return False
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model.to(dev)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        with torch.no_grad():
            for b in range(0, len(ds), batch_size):
                x = torch.stack([ds[i]["image"] for i in range(b, min(b + batch_size, len(ds)))])
                if x.shape[0] < 2:
                    break
                model(x.to(dev))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return True
