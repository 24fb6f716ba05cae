"""``KaryoModel``: the contract every architecture implements (docs/ml_worker.md).

A model maps a normalised image batch (B, C_in, H, W) to logits (B, out_channels, H, W).
Semantic models (the default here) predict ``num_classes`` softmax channels, class 0 being
background; the multi-head model overrides the target/activation/instance hooks to predict
sigmoid channels instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["KaryoModel"]


class KaryoModel(nn.Module):
    """Base class of all Karyo segmentation architectures.

    Subclasses set ``size_divisor`` / ``default_loss`` / ``embed_dim``, implement
    :meth:`forward` and :meth:`bottleneck` (features pooled by :meth:`embed`), and may add
    auxiliary heads by overriding :meth:`forward_train` and :meth:`compute_loss`.
    """

    #: registry name, set by ``@register`` / ``create_model``
    arch_name: str = ""
    #: H and W of the input must be multiples of this
    size_divisor: int = 1
    #: name in ``ml_worker.losses.LOSSES`` used when ``compute_loss`` gets no ``loss_name``
    default_loss: str = "ce_dice"
    #: extra instance head (``ml_worker.instance_heads``), set by ``create_model(instance_head=...)``:
    #: its channels follow the ``num_classes`` class channels of the output
    instance_head: str | None = None

    def __init__(self, in_channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.out_channels: int = num_classes
        #: dimension D of :meth:`embed`'s output; set by subclasses
        self.embed_dim: int = 0
        #: constructor kwargs, filled by ``create_model`` (saved in checkpoints)
        self.init_kwargs: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes}
        self._bn_frozen = False

    # ------------------------------------------------------------------ forward passes
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, C_in, H, W) → logits (B, out_channels, H, W)."""
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs needed by :meth:`compute_loss`; at least ``"seg"`` (B, out_channels, H, W)."""
        return {"seg": self(x)}

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Deepest feature map (B, embed_dim, h, w) of the network for :meth:`embed`."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled bottleneck features (B, embed_dim), for active-learning
        diversity sampling. Runs without gradients; call ``eval()`` first for
        deterministic BatchNorm behaviour."""
        return self.bottleneck(x).mean(dim=(2, 3))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error when ``x`` is not (B, in_channels, H, W) with H, W multiples of
        :attr:`size_divisor` (otherwise skip connections fail with cryptic size errors)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch_name or type(self).__name__} expects (B, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        d = self.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"{self.arch_name or type(self).__name__}: input size {h}x{w} must be a "
                f"multiple of size_divisor={d} (pad the tile)"
            )

    # ------------------------------------------------------------------ losses
    def loss_target(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Target of the segmentation loss: the semantic mask (B, H, W) long."""
        return batch["mask"]

    def compute_loss(
        self,
        outputs: Mapping[str, torch.Tensor],
        batch: Mapping[str, torch.Tensor],
        loss_name: str | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Segmentation loss ``LOSSES[loss_name or default_loss]`` on ``outputs["seg"]``.

        Args:
            outputs: from :meth:`forward_train`.
            batch: ``"image"`` (B, C, H, W) float, ``"mask"`` (B, H, W) long,
                ``"instances"`` (B, H, W) long.
            loss_name: overrides :attr:`default_loss`.

        Returns:
            (scalar loss tensor, ``{"loss": ..., "seg": ...}`` floats for logging).
        """
        from ml_worker.losses import get_loss  # lazy: keeps model import light

        fn = get_loss(loss_name or self.default_loss)
        logits = outputs["seg"]
        if self.instance_head is None:
            seg = fn(logits, self.loss_target(batch), batch.get("instances"))
            return seg, {"loss": float(seg.detach()), "seg": float(seg.detach())}
        from ml_worker.instance_heads import hv_loss

        k = self.num_classes
        seg = fn(logits[:, :k], self.loss_target(batch), batch.get("instances"))
        head = hv_loss(logits[:, k:k + 2], batch["instances"])
        total = seg + head
        return total, {"loss": float(total.detach()), "seg": float(seg.detach()), "hv": float(head.detach())}

    # ------------------------------------------------------------------ post-processing
    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) → class probabilities (softmax over K); with an instance head,
        its channels follow, through tanh."""
        if self.instance_head is None:
            return torch.softmax(logits, dim=1)
        k = self.num_classes
        return torch.cat([torch.softmax(logits[:, :k], dim=1), torch.tanh(logits[:, k:])], dim=1)

    def class_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """The class-distribution channels of activated outputs (C, H, W): all of them,
        except an instance head's maps (uncertainty scores are computed on these)."""
        return probs if self.instance_head is None else probs[: self.num_classes]

    def to_instances(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (out_channels, H, W) of one image → instance map int32 (H, W).

        Semantic models: foreground probability = 1 - P(background), then threshold,
        connected components and watershed split (``ml_worker.instances``).
        """
        from ml_worker.instances import semantic_to_instances  # lazy: numpy/scipy only

        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[0] != self.out_channels:
            raise ValueError(f"expected probs of shape ({self.out_channels}, H, W), got {probs.shape}")
        foreground = 1.0 - probs[0].astype(np.float32)
        if self.instance_head == "hv":
            from ml_worker.instance_heads import hv_to_instances

            k = self.num_classes
            return hv_to_instances(foreground, probs[k:k + 2])
        return np.asarray(semantic_to_instances(foreground), dtype=np.int32)

    # ------------------------------------------------------------------ fine-tuning helpers
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (possibly pre-trained) encoder; models with an ``encoder``
        sub-module expose it, others have none."""
        enc = getattr(self, "encoder", None)
        return iter(()) if enc is None else enc.parameters()

    def non_encoder_parameters(self) -> Iterator[nn.Parameter]:
        """All parameters that are not in :meth:`encoder_parameters` (the decoder/heads)."""
        enc_ids = {id(p) for p in self.encoder_parameters()}
        return (p for p in self.parameters() if id(p) not in enc_ids)

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze the encoder — phase 1 of the two-phase schedule
        trains only the decoder on top of pre-trained encoder weights."""
        for p in self.encoder_parameters():
            p.requires_grad_(trainable)

    def freeze_batchnorm(self, frozen: bool = True) -> None:
        """Freeze every BatchNorm (affine parameters and running statistics) — phase 2 of
        the two-phase schedule fine-tunes everything *but* BatchNorm, because small
        annotation batches give poor batch statistics. Survives later ``train()`` calls."""
        self._bn_frozen = frozen
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for p in m.parameters():
                    p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> KaryoModel:
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
