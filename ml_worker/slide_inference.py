"""Whole-slide inference over a list of tile rectangles.

The slide is never decoded whole: each rectangle (level-0 pixels) is read at the model's
working resolution with :meth:`SlideReader.read_at_mpp` in a background thread that keeps
``prefetch`` batches ready, so decoding JPEG tiles overlaps the forward passes. Tiles of the
same size are stacked into batches on the device; on CUDA the forward runs under bf16
autocast (as in :mod:`ml_worker.inference`), on the CPU in float32.

A chunk of rectangles (``chunk_rects``) is the unit a worker takes: a worker that dies loses
only its chunk, and chunks of one slide can run on any number of workers.

Each tile may be read with ``context`` extra pixels on every side (at the working
resolution) so nuclei on the tile border are segmented with their surroundings; the
prediction is cropped back to the tile.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ml_worker.data import preprocess
from ml_worker.inference import _activation, pick_device

if TYPE_CHECKING:
    from ml_worker.slides import SlideReader

__all__ = ["chunk_rects", "predict_tiles", "tile_output_shape"]

Rect = tuple[int, int, int, int]


def chunk_rects(rects: Sequence[Any], chunk_size: int) -> list[list[Any]]:
    """Consecutive chunks of at most ``chunk_size`` items (the last one may be shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    items = list(rects)
    return [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]


def tile_output_shape(rect: Rect, *, slide_mpp: float | None, mpp: float) -> tuple[int, int]:
    """(h, w) of a level-0 rectangle at ``mpp`` (the instance map's shape)."""
    _, _, w, h = rect
    f = 1.0 if slide_mpp is None else slide_mpp / mpp
    return max(1, round(h * f)), max(1, round(w * f))


def _round_up(v: int, d: int) -> int:
    return int(math.ceil(v / d) * d)


_DONE = object()


def predict_tiles(
    model: torch.nn.Module,
    reader: SlideReader,
    rects: Sequence[Rect],
    *,
    mpp: float,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    normalizer: Any = None,
    amp: bool | None = None,
    prefetch: int = 2,
    progress: Callable[[int, int], None] | None = None,
    context: int = 0,
    keep_probs: bool = False,
) -> Iterator[tuple[Rect, np.ndarray, dict[str, Any]]]:
    """Predict nuclei in each rectangle of a slide, in input order.

    Args:
        model: a ``KaryoModel`` (``activation``, ``size_divisor``, ``to_instances``), e.g.
            from :func:`ml_worker.training.load_for_inference`.
        reader: an open :class:`~ml_worker.slides.SlideReader`.
        rects: ``(x, y, w, h)`` in level-0 pixels.
        mpp: the model's working resolution (um/px); the slide is resampled to it.
        batch_size: tiles per forward pass.
        device: default CUDA when available, else CPU.
        normalizer: the run's ``Preprocessing`` / stain normaliser (``data.preprocess``).
        amp: bf16 autocast; None = on for CUDA with bf16 support; never on the CPU.
        prefetch: batches read ahead by the reader thread.
        progress: called with (tiles done, total) after each batch.
        context: extra pixels read on each side (working resolution), cropped after.
        keep_probs: put the tile's (C, h, w) float16 probabilities in the summary.

    Yields:
        ``(rect, instances, summary)``: instances is an (h, w) int32 map at ``mpp`` (see
        :func:`tile_output_shape`; multiply its coordinates by ``summary["scale"]`` for
        level-0 pixels); summary has ``scale``, ``n_instances``, ``fg_fraction`` (share of
        pixels with nucleus probability > 0.5), ``mean_entropy`` (0..1) and optionally
        ``probs``.
    """
    from ml_worker.active_learning.analysis import output_kind
    from ml_worker.active_learning.scores import foreground_probability, pixel_entropy

    rects = [tuple(int(v) for v in r) for r in rects]
    total = len(rects)
    if total == 0:
        return
    dev = pick_device(device)
    is_cuda = dev.type == "cuda"
    use_amp = is_cuda and (torch.cuda.is_bf16_supported() if amp is None else bool(amp))
    div = int(getattr(model, "size_divisor", 1) or 1)
    slide_mpp = reader.mpp
    scale = 1.0 if slide_mpp is None else mpp / slide_mpp  # level-0 px per output px
    ctx = max(0, int(context))

    def load(rect: Rect) -> tuple[Rect, np.ndarray, tuple[int, int]]:
        oh, ow = tile_output_shape(rect, slide_mpp=slide_mpp, mpp=mpp)
        x, y = rect[0] - round(ctx * scale), rect[1] - round(ctx * scale)
        rgb = reader.read_at_mpp(x, y, ow + 2 * ctx, oh + 2 * ctx, mpp=mpp)
        arr = preprocess(rgb, normalizer)
        H, W = arr.shape[1:]
        ph, pw = _round_up(H, div), _round_up(W, div)
        if (ph, pw) != (H, W):  # mirror padding, as PatchDataset does past image borders
            arr = np.pad(arr, ((0, 0), (0, ph - H), (0, pw - W)), mode="symmetric")
        return rect, arr, (oh, ow)

    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch) * max(1, batch_size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Blocking put that gives up once the consumer has gone (generator closed)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            for r in rects:
                if not put(load(r)):
                    return
            put(_DONE)
        except BaseException as e:  # re-raised in the consumer
            put(e)

    thread = threading.Thread(target=producer, name="karyo-slide-prefetch", daemon=True)
    was_training = model.training
    model.eval()
    model.to(dev)
    kind = output_kind(model)
    thread.start()
    done = 0
    try:
        pending: list[tuple[Rect, np.ndarray, tuple[int, int]]] = []
        finished = False
        while not finished or pending:
            if not finished:
                item = q.get()
                if item is _DONE:
                    finished = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if pending and item[1].shape != pending[0][1].shape:
                        yield from _run_batch(
                            model,
                            pending,
                            dev,
                            use_amp,
                            ctx,
                            kind,
                            scale,
                            keep_probs,
                            foreground_probability,
                            pixel_entropy,
                        )
                        done += len(pending)
                        if progress:
                            progress(done, total)
                        pending = []
                    pending.append(item)
            if pending and (finished or len(pending) >= batch_size):
                yield from _run_batch(
                    model, pending, dev, use_amp, ctx, kind, scale, keep_probs, foreground_probability, pixel_entropy
                )
                done += len(pending)
                if progress:
                    progress(done, total)
                pending = []
    finally:
        stop.set()
        thread.join(timeout=5)
        model.train(was_training)


def _run_batch(
    model: torch.nn.Module,
    items: list[tuple[Rect, np.ndarray, tuple[int, int]]],
    dev: torch.device,
    use_amp: bool,
    ctx: int,
    kind: str,
    scale: float,
    keep_probs: bool,
    foreground_probability: Callable[..., np.ndarray],
    pixel_entropy: Callable[..., np.ndarray],
) -> Iterator[tuple[Rect, np.ndarray, dict[str, Any]]]:
    batch = torch.from_numpy(np.stack([a for _, a, _ in items])).to(dev, non_blocking=True)
    if dev.type == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = model(batch)
        probs = _activation(model, logits.float()).cpu().numpy()
    for (rect, _, (oh, ow)), p in zip(items, probs):
        p = np.ascontiguousarray(p[:, ctx : ctx + oh, ctx : ctx + ow])
        inst = np.asarray(model.to_instances(p), dtype=np.int32)  # type: ignore[operator]
        fg = foreground_probability(p, kind)
        summary: dict[str, Any] = {
            "scale": scale,
            "n_instances": int(np.unique(inst[inst > 0]).size),
            "fg_fraction": float((fg > 0.5).mean()),
            "mean_entropy": float(pixel_entropy(p, kind).mean()),
        }
        if keep_probs:
            summary["probs"] = p.astype(np.float16)
        yield rect, inst, summary
