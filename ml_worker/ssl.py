"""Self-supervised pretraining of a Karyo model's encoder on a project's unlabelled tiles.

SimSiam (Chen & He, CVPR 2021), small: two random views of the same tile (crop, flips, rot90,
per-channel brightness / contrast jitter as a stain proxy, Gaussian noise) go through the
model's ``bottleneck`` (global-average pooled), a projector MLP and a predictor MLP; the loss
is the negative cosine similarity between one view's prediction and the other view's
projection, with the gradient stopped on the projection (symmetrised). No negatives, no
momentum encoder, no large batches — it runs in CPU minutes on small tiles and does not
collapse thanks to the stop-gradient and the predictor.

What it is for (issue 16):

* **cold-start embeddings**: ``model.embed`` of the pretrained model separates the project's
  kinds of tissue before any label exists (``active_learning.coldstart``);
* **starting weights**: :func:`pretrain` writes an ordinary Karyo checkpoint (architecture,
  kwargs, weights, the fitted input ``Preprocessing``) that ``TrainConfig.init_weights``
  warm-starts from; the decoder keeps its initialisation, only the encoder path was trained.

Only plain torch; the projector / predictor are discarded after pretraining.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["SSLConfig", "pretrain", "ssl_embeddings", "random_encoder_embeddings", "embed_batched", "INPUT_NORMS"]

#: how a tile becomes the encoder's input: ``dataset`` (channel statistics of all the tiles,
#: stored in the checkpoint) or ``image`` (each tile's own z-score, as training runs default to)
INPUT_NORMS = ("dataset", "image")


@dataclass
class SSLConfig:
    """Pretraining settings (stored in the checkpoint as ``ssl``).

    Attributes:
        arch, model_kwargs: the model (the same as the training runs will use).
        steps: optimizer steps.
        batch_size: tiles per step (two views each).
        crop: view side (px); tiles smaller than it are mirror-padded.
        lr: SGD learning rate (momentum 0.9, cosine decay).
        proj_dim: projector / predictor width.
        seed: views, initialisation.
        threads: torch CPU threads (None: torch's default).
        input_norm: :data:`INPUT_NORMS`; use the training runs' own (``TrainConfig.input_norm``)
            when the checkpoint is to start them.
        device: torch device (None: CUDA when available, else CPU); the views are made on
            the CPU either way.
    """

    arch: str = "unet"
    model_kwargs: dict[str, Any] | None = None
    steps: int = 200
    batch_size: int = 16
    crop: int = 64
    lr: float = 0.05
    proj_dim: int = 128
    seed: int = 0
    threads: int | None = None
    input_norm: str = "dataset"
    device: str | None = None


def _views(batch: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """One random view of each (3, H, W) preprocessed tile: crop, flips, rot90, per-channel
    gain / offset (stain variation), noise."""
    out = np.empty((batch.shape[0], 3, crop, crop), np.float32)
    for i, x in enumerate(batch):
        _, H, W = x.shape
        y0 = int(rng.integers(0, H - crop + 1))
        x0 = int(rng.integers(0, W - crop + 1))
        v = x[:, y0 : y0 + crop, x0 : x0 + crop]
        if rng.random() < 0.5:
            v = v[:, :, ::-1]
        if rng.random() < 0.5:
            v = v[:, ::-1]
        v = np.rot90(v, int(rng.integers(4)), axes=(1, 2))
        gain = rng.uniform(0.7, 1.3, (3, 1, 1))
        offset = rng.normal(0.0, 0.2, (3, 1, 1))
        v = v * gain + offset + rng.normal(0.0, 0.05, v.shape)
        out[i] = v
    return out


def pretrain(tiles: Sequence[np.ndarray], out_path: str | Path, config: SSLConfig | None = None, *,
             progress: Callable[[dict[str, Any]], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Pretrain the encoder of a fresh ``config.arch`` model on ``tiles`` and save it.

    Args:
        tiles: (H, W, 3) uint8 RGB tiles without labels (any sizes >= 8 px).
        out_path: the Karyo checkpoint to write (``TrainConfig.init_weights``-ready); written
            to a temporary file and renamed (``save_checkpoint``): never half-written.
        config: :class:`SSLConfig`.
        progress: called every ``steps // 20`` steps (at least 1, at most 25) and at the end with
            ``{"event": "step", "step", "steps", "loss", "progress"}``.
        should_stop: polled before every step; when it returns True nothing is written and
            the result's ``status`` is ``"cancelled"``.

    Returns:
        ``{"status": "done" | "cancelled", "path" (None when cancelled), "loss_first",
        "loss_last", "seconds", "steps"}``; the loss is the negative cosine similarity
        (-1 = views agree perfectly).
    """
    import torch
    from torch import nn

    from ml_worker.checkpoint import save_checkpoint
    from ml_worker.data import Preprocessing, preprocess
    from ml_worker.inference import pick_device
    from ml_worker.models import create_model

    cfg = config or SSLConfig()
    if not len(tiles):
        raise ValueError("self-supervised pretraining needs at least one tile")
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.crop < 8:
        raise ValueError("need steps >= 1, batch_size >= 2 and crop >= 8")
    if cfg.input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {cfg.input_norm!r}; choose from {', '.join(INPUT_NORMS)}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = create_model(cfg.arch, **(cfg.model_kwargs or {}))
    div = int(getattr(model, "size_divisor", 1) or 1)
    crop = max(div, (int(cfg.crop) // div) * div)
    imgs = [np.asarray(t) for t in tiles]
    prep = Preprocessing.fit(imgs) if cfg.input_norm == "dataset" else Preprocessing()
    arrays = []
    for im in imgs:
        x = preprocess(im, prep)
        ph, pw = max(0, crop - x.shape[1]), max(0, crop - x.shape[2])
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="symmetric")
        arrays.append(x)
    model.train()
    with torch.no_grad():
        dim = int(model.bottleneck(torch.zeros(2, 3, crop, crop)).shape[1])
    p = int(cfg.proj_dim)
    projector = nn.Sequential(nn.Linear(dim, p, bias=False), nn.BatchNorm1d(p), nn.ReLU(inplace=True),
                              nn.Linear(p, p, bias=False), nn.BatchNorm1d(p, affine=False))
    predictor = nn.Sequential(nn.Linear(p, p // 2, bias=False), nn.BatchNorm1d(p // 2), nn.ReLU(inplace=True),
                              nn.Linear(p // 2, p))
    dev = pick_device(cfg.device)
    model.to(dev)
    projector.to(dev)
    predictor.to(dev)
    params = list(model.parameters()) + list(projector.parameters()) + list(predictor.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    bs = min(int(cfg.batch_size), max(2, len(arrays)))
    losses: list[float] = []

    def neg_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -nn.functional.cosine_similarity(a, b.detach(), dim=1).mean()

    every = max(1, min(int(cfg.steps) // 20, 25))
    for step in range(int(cfg.steps)):
        if should_stop is not None and should_stop():
            log.info("ssl pretraining stopped at step %d/%d", step, cfg.steps)
            return {"status": "cancelled", "path": None, "steps": step, "seconds": time.perf_counter() - t0,
                    "loss_first": float(np.mean(losses[:1])) if losses else None,
                    "loss_last": losses[-1] if losses else None}
        pick = rng.choice(len(arrays), bs, replace=len(arrays) < bs)
        batch = [arrays[i] for i in pick]
        v1 = torch.from_numpy(np.stack([_views(b[None], crop, rng)[0] for b in batch])).to(dev)
        v2 = torch.from_numpy(np.stack([_views(b[None], crop, rng)[0] for b in batch])).to(dev)
        z1 = projector(model.bottleneck(v1).mean(dim=(2, 3)))
        z2 = projector(model.bottleneck(v2).mean(dim=(2, 3)))
        loss = 0.5 * (neg_cos(predictor(z1), z2) + neg_cos(predictor(z2), z1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            log.info("ssl step %d/%d: loss %.4f", step, cfg.steps, losses[-1])
        if progress is not None and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            progress({"event": "step", "step": step + 1, "steps": int(cfg.steps), "loss": losses[-1],
                      "progress": (step + 1) / int(cfg.steps)})
    model.eval().cpu()
    info = {"config": asdict(cfg), "loss_first": float(np.mean(losses[: max(1, len(losses) // 10)])),
            "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])), "steps": len(losses),
            "tiles": len(arrays)}
    path = save_checkpoint(out_path, model, ssl=info, preprocess=prep.to_dict())
    return {"status": "done", "path": str(path), **{k: info[k] for k in ("loss_first", "loss_last", "steps")},
            "seconds": time.perf_counter() - t0}


def embed_batched(model: Any, tiles: Sequence[np.ndarray], *, normalizer: Any = None, tile_size: int = 256,
                  batch_size: int = 32) -> np.ndarray:
    """(n, D) float32: ``active_learning.embed_tile`` of every tile (the central ``tile_size``
    crop, mirror-padded to the model's divisor), with tiles of one shape through the network
    ``batch_size`` at a time (the model in eval mode: the same values, fewer passes)."""
    import torch

    from ml_worker.data import preprocess

    div = int(getattr(model, "size_divisor", 1) or 1)
    crops = []
    for t in tiles:
        img = np.asarray(t)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        x = preprocess(img, normalizer)
        _, H, W = x.shape
        th, tw = min(tile_size, H), min(tile_size, W)
        y0, x0 = (H - th) // 2, (W - tw) // 2
        crop = x[:, y0 : y0 + th, x0 : x0 + tw]
        ph, pw = -(-th // div) * div, -(-tw // div) * div
        if (ph, pw) != (th, tw):
            crop = np.pad(crop, ((0, 0), (0, ph - th), (0, pw - tw)), mode="symmetric")
        crops.append(np.ascontiguousarray(crop, dtype=np.float32))
    if not crops:
        return np.zeros((0, 0), np.float32)
    out: list[np.ndarray | None] = [None] * len(crops)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(crops):
        by_shape.setdefault(c.shape, []).append(i)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in by_shape.values():
                for j in range(0, len(idx), batch_size):
                    part = idx[j : j + batch_size]
                    e = model.embed(torch.from_numpy(np.stack([crops[i] for i in part]))).float().cpu().numpy()
                    for i, row in zip(part, e):
                        out[i] = row.astype(np.float32)
    finally:
        model.train(was_training)
    return np.stack(out)


def ssl_embeddings(checkpoint: str | Path, tiles: Sequence[np.ndarray], *, tile_size: int = 256) -> np.ndarray:
    """(n, D) embeddings of ``tiles`` by a checkpoint's encoder (``model.embed``, the input
    preprocessed as stored in the checkpoint) — the cold-start features."""
    from ml_worker.checkpoint import load_checkpoint
    from ml_worker.data import Preprocessing

    model, meta = load_checkpoint(checkpoint)
    prep = Preprocessing.from_dict(meta["preprocess"]) if meta.get("preprocess") else None
    return embed_batched(model, tiles, normalizer=prep, tile_size=tile_size)


#: the encoder of :func:`random_encoder_embeddings` (small: it only has to tell tiles apart)
RANDOM_ENCODER = {"arch": "unet", "model_kwargs": {"width": 8}}


def random_encoder_embeddings(tiles: Sequence[np.ndarray], *, seed: int = 0, tile_size: int = 256) -> np.ndarray:
    """(n, D) cold-start features that need neither labels nor pretraining: ``model.embed`` of
    a randomly initialised :data:`RANDOM_ENCODER` (weights drawn from ``seed``, so the same
    tiles give the same features), the input standardised by the channel statistics of the
    tiles themselves. Random convolutional features still separate stain, density and
    texture; this is what ``ml_worker.al_sim``'s cold-start strategies use without ``+ssl``."""
    import torch

    from ml_worker.data import Preprocessing
    from ml_worker.models import create_model

    imgs = [np.asarray(t) for t in tiles]
    if not imgs:
        return np.zeros((0, 0), np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = create_model(RANDOM_ENCODER["arch"], **RANDOM_ENCODER["model_kwargs"]).eval()
    prep = Preprocessing.fit(imgs)
    return embed_batched(model, imgs, normalizer=prep, tile_size=tile_size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml_worker.ssl --data DIR --out ssl.pt``: pretrain on the images of a dataset
    folder (its masks, if any, are not read), cut into ``--tile`` tiles."""
    import argparse
    import json
    import sys

    from ml_worker.data import IMAGE_EXTS, DataError, read_image

    p = argparse.ArgumentParser(prog="python -m ml_worker.ssl", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of images (DIR/images or DIR)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--arch", default="unet")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--tile", type=int, default=128, help="cut the images into tiles of this side")
    p.add_argument("--steps", type=int, default=SSLConfig.steps)
    p.add_argument("--crop", type=int, default=SSLConfig.crop)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    try:
        root = Path(a.data) / "images" if (Path(a.data) / "images").is_dir() else Path(a.data)
        images = [read_image(f) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_EXTS]
        tiles = [im[y : y + a.tile, x : x + a.tile] for im in images
                 for y in range(0, max(1, im.shape[0] - a.tile + 1), a.tile)
                 for x in range(0, max(1, im.shape[1] - a.tile + 1), a.tile)]
        info = pretrain(tiles, a.out, SSLConfig(arch=a.arch, model_kwargs={"width": a.width}, steps=a.steps,
                                                crop=a.crop, threads=a.threads))
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
