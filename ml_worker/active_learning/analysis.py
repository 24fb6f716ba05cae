"""``analyze_tile``: one model pass over a candidate tile -> everything the strategies need.

torch is imported lazily (inside the functions), so ``ml_worker.active_learning`` stays
importable by torch-free processes that only rank (``rank`` works on plain score dicts).

What one call computes (see :class:`TileAnalysis`):

* probabilities with ``ml_worker.inference.predict_probs`` (the same tiled, Gaussian-blended
  inference the platform uses for pre-annotation) and instances via ``model.to_instances``;
* the cheap scores ``entropy``, ``margin``, ``boundary`` (``scores.uncertainty_scores``);
* the **embedding**: during that same pass a forward hook on the model's bottleneck module
  (the module whose output ``model.bottleneck`` returns) global-average-pools the deep
  features of every inference tile; the embedding is their mean. For a tile no larger than
  ``tile_size`` (the usual case: candidates are tiles) that is exactly ``model.embed`` of
  the whole tile, mirror-padded to a multiple of ``size_divisor`` — no extra forward pass.
  Models whose bottleneck is not a module output fall back to ``model.embed`` on the
  central ``tile_size`` crop (mirror-padded when smaller);
* optionally ``mc_dropout`` / ``mc_mutual_info`` (``mc_samples`` extra passes with dropout
  on the bottleneck features) and ``tta`` (3 extra passes: horizontal flip, vertical
  flip, rot90; each prediction is transformed back before comparing).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_worker.active_learning.scores import (
    binary_entropy,
    foreground_probability,
    uncertainty_scores,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ml_worker.stain import StainNormalizer

__all__ = [
    "TileAnalysis",
    "analyze_tile",
    "analyze_tiles",
    "output_kind",
    "find_bottleneck_module",
    "bottleneck_dropout",
    "TTA_TRANSFORMS",
    "embed_tile",
]


@dataclass
class TileAnalysis:
    """Result of :func:`analyze_tile` for one candidate tile.

    Attributes:
        instances: (H, W) int32 predicted instance map (``model.to_instances``).
        probs: (C, H, W) float32 probabilities of the plain pass (callers may set it to
            None to save memory once scored).
        embedding: (D,) float32 mean pooled bottleneck features (module docstring).
        nucleus_count: number of predicted nuclei (the expected annotation cost).
        scores: ``entropy``, ``margin``, ``boundary``, ``expected_fixes`` always;
            ``mc_dropout`` and ``mc_mutual_info`` when ``mc_samples > 0``; ``tta`` and
            ``instance_flips`` when ``tta=True``. The pixel scores are in [0, 1] (variances in
            [0, 0.25]); ``expected_fixes`` and ``instance_flips`` count nuclei (see
            ``active_learning.nuclei``); higher = more uncertain.
        kind: ``"softmax"`` (semantic, class 0 = background) or ``"sigmoid"`` (channel 0 =
            nucleus) — how ``probs`` are read.
    """

    instances: np.ndarray
    probs: np.ndarray | None
    embedding: np.ndarray
    nucleus_count: int
    scores: dict[str, float] = field(default_factory=dict)
    kind: str = "softmax"


# ----------------------------------------------------------------------------- helpers


def output_kind(model: "nn.Module", channels: int | None = None) -> str:
    """``"softmax"`` when the model's activation makes its channels a distribution (they
    sum to 1), ``"sigmoid"`` otherwise (independent channels, channel 0 = nucleus).

    Probed by activating zero logits: softmax gives 1/C per channel, sigmoid 0.5.
    """
    import torch

    c = int(channels or getattr(model, "out_channels", 0) or 0)
    if c <= 1:
        return "sigmoid"
    act = getattr(model, "activation", None)
    if not callable(act):  # plain modules: inference uses softmax for C > 1
        return "softmax"
    with torch.no_grad():
        s = float(act(torch.zeros(1, c, 1, 1)).sum())
    return "softmax" if abs(s - 1.0) < 1e-4 else "sigmoid"


def _class_probs(model: Any, probs: np.ndarray) -> np.ndarray:
    """The class-distribution channels (an instance head's distance maps are not classes)."""
    fn = getattr(model, "class_probabilities", None)
    return fn(probs) if callable(fn) else probs


def _tempered(probs: np.ndarray, temperature: float | None, kind: str) -> np.ndarray:
    if temperature is None or float(temperature) == 1.0:
        return probs
    from ml_worker.active_learning.nuclei import apply_temperature

    return apply_temperature(probs, float(temperature), kind=kind)


def _instance_flips(instances: np.ndarray, samples: list[np.ndarray]) -> float:
    """Expected nuclei that vanish, split, merge or appear across the TTA samples."""
    from ml_worker.active_learning.nuclei import instance_disagreement

    flips, appear = instance_disagreement(instances, samples)
    return float(sum(flips.values()) + appear)


_BOTTLENECK_CACHE: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def find_bottleneck_module(model: "nn.Module") -> "nn.Module | None":
    """The sub-module whose output tensor is what ``model.bottleneck(x)`` returns (the
    outermost one when nested modules return the same tensor), or None when the model has
    no ``bottleneck`` or it returns a computed tensor. Found once per model by one small
    dummy pass in eval mode, then cached.
    """
    import torch

    if model in _BOTTLENECK_CACHE:
        name = _BOTTLENECK_CACHE[model]
        return None if name is None else model.get_submodule(name)
    found: str | None = None
    if callable(getattr(model, "bottleneck", None)):
        outputs: list[tuple[str, Any]] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, out, n=n: outputs.append((n, out)))
            for n, m in model.named_modules()
            if n  # the model itself is not a candidate
        ]
        div = int(getattr(model, "size_divisor", 1) or 1)
        side = max(div * 2, ((32 + div - 1) // div) * div)
        try:
            p = next(iter(model.parameters()), None)
            dev = p.device if p is not None else torch.device("cpu")
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    b = model.bottleneck(torch.zeros(1, int(getattr(model, "in_channels", 3)), side, side, device=dev))
            finally:
                model.train(was_training)
            # The outermost module finishes last among those returning the same tensor.
            for n, out in reversed(outputs):
                if out is b:
                    found = n
                    break
        except Exception:  # a model that cannot run the probe: no hook, use the fallback
            found = None
        finally:
            for h in hooks:
                h.remove()
    _BOTTLENECK_CACHE[model] = found
    return None if found is None else model.get_submodule(found)


def _dropout_target(model: "nn.Module") -> tuple["nn.Module", bool]:
    """(module, on_output): the bottleneck module (dropout on its output), else the last
    parameterised leaf module (dropout on its input: the deepest features before the
    head)."""
    m = find_bottleneck_module(model)
    if m is not None:
        return m, True
    leaves = [mod for mod in model.modules() if not list(mod.children()) and any(True for _ in mod.parameters())]
    if not leaves:
        raise ValueError("mc_dropout: the model has no bottleneck() module and no parameterised layer to drop out")
    return leaves[-1], False


class bottleneck_dropout:  # noqa: N801 - used as a context manager
    """Context manager: element-wise dropout (rate ``p``, inverted scaling) on the model's
    bottleneck features during every forward pass, whatever ``model.training`` is — MC
    dropout for models trained without dropout layers. Masks come from a private
    ``torch.Generator`` seeded with ``seed`` (reproducible; the global RNG is untouched).
    The hook is removed on exit, so the model is exactly as before.
    """

    def __init__(self, model: "nn.Module", p: float = 0.2, seed: int = 0) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout rate must be in (0, 1), got {p}")
        self.model, self.p, self.seed = model, float(p), int(seed)
        self._handle: Any = None
        self._gen: dict[Any, Any] = {}

    def _drop(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch

        g = self._gen.get(t.device)
        if g is None:
            g = torch.Generator(device=t.device)
            g.manual_seed(self.seed)
            self._gen[t.device] = g
        keep = torch.empty(t.shape, device=t.device, dtype=torch.float32).bernoulli_(1.0 - self.p, generator=g)
        return t * keep.to(t.dtype) / (1.0 - self.p)

    def __enter__(self) -> "bottleneck_dropout":
        module, on_output = _dropout_target(self.model)
        if on_output:
            self._handle = module.register_forward_hook(lambda _m, _i, out: self._drop(out))
        else:
            self._handle = module.register_forward_pre_hook(
                lambda _m, args: (self._drop(args[0]), *args[1:])
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _hflip(a: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    return np.flip(a, axis=axes[1])


def _vflip(a: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    return np.flip(a, axis=axes[0])


#: name -> (forward on an (H, W, 3) image, inverse on a (C, H, W) prediction)
TTA_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "hflip": (lambda im: im[:, ::-1], lambda p: p[:, :, ::-1]),
    "vflip": (lambda im: im[::-1], lambda p: p[:, ::-1]),
    "rot90": (lambda im: np.rot90(im, 1, axes=(0, 1)), lambda p: np.rot90(p, -1, axes=(1, 2))),
    "rot180": (lambda im: im[::-1, ::-1], lambda p: p[:, ::-1, ::-1]),
    "rot270": (lambda im: np.rot90(im, -1, axes=(0, 1)), lambda p: np.rot90(p, 1, axes=(1, 2))),
}


def _center_embedding(model: "nn.Module", x: np.ndarray, tile: int, dev: Any) -> np.ndarray:
    """``model.embed`` of the central ``tile`` crop of the preprocessed (3, H, W) array,
    mirror-padded to the model's divisor."""
    import torch

    div = int(getattr(model, "size_divisor", 1) or 1)
    _, H, W = x.shape
    th, tw = min(tile, H), min(tile, W)
    y0, x0 = (H - th) // 2, (W - tw) // 2
    crop = x[:, y0 : y0 + th, x0 : x0 + tw]
    ph, pw = -(-th // div) * div, -(-tw // div) * div
    if (ph, pw) != (th, tw):
        crop = np.pad(crop, ((0, 0), (0, ph - th), (0, pw - tw)), mode="symmetric")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            e = model.embed(torch.from_numpy(np.ascontiguousarray(crop))[None].to(dev))  # type: ignore[operator]
    finally:
        model.train(was_training)
    return e[0].float().cpu().numpy().astype(np.float32)


def embed_tile(
    model: "nn.Module",
    image: np.ndarray,
    *,
    normalizer: "StainNormalizer | None" = None,
    tile_size: int = 256,
    device: "str | torch.device | None" = None,
) -> np.ndarray:
    """(D,) float32 embedding of a tile without predicting it — e.g. for the already
    labelled tiles passed to ``rank(..., labelled_embeddings=...)``. ``model.embed`` of the
    central ``tile_size`` crop, mirror-padded to the model's divisor: for a tile no larger
    than ``tile_size`` this equals :attr:`TileAnalysis.embedding` of :func:`analyze_tile`.
    """
    from ml_worker.data import preprocess
    from ml_worker.inference import pick_device

    dev = pick_device(device)
    model.to(dev)
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return _center_embedding(model, preprocess(img, normalizer), int(tile_size), dev)


# ----------------------------------------------------------------------------- main entry


def analyze_tile(
    model: "nn.Module",
    image: np.ndarray,
    *,
    normalizer: "StainNormalizer | None" = None,
    tile_size: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    device: "str | torch.device | None" = None,
    mc_samples: int = 0,
    tta: bool = False,
    mc_dropout_p: float = 0.2,
    tta_transforms: Sequence[str] = ("hflip", "vflip", "rot90"),
    band: int = 2,
    seed: int = 0,
    temperature: float | None = None,
) -> TileAnalysis:
    """Predict one candidate tile and score it for active learning.

    Args:
        model: a ``KaryoModel`` (``to_instances``, ``embed``/``bottleneck``, ``activation``).
        image: (H, W, 3) uint8 RGB tile (any size; large ones are tiled).
        normalizer, tile_size, overlap, batch_size, device: as in
            ``ml_worker.inference.predict_probs`` (use the training normaliser).
        mc_samples: T > 0 adds ``mc_dropout`` (mean per-pixel variance of the nucleus
            probability over T passes with dropout on the bottleneck) and
            ``mc_mutual_info`` (BALD: H(mean p) - mean H(p) of the nucleus probability).
        tta: adds ``tta`` (mean per-pixel variance of the nucleus probability over the
            identity and ``tta_transforms``, each transformed back).
        mc_dropout_p: dropout rate of the MC passes.
        tta_transforms: names in :data:`TTA_TRANSFORMS`.
        band: contour band half-width (px) of the ``boundary`` score.
        seed: seeds the MC-dropout masks.
        temperature: the model version's calibration (``calibration.fit_model_temperature``):
            the cheap scores are computed on the re-tempered class probabilities; the
            instances (and ``probs``) stay those of the plain pass.

    Returns:
        :class:`TileAnalysis`.
    """
    import torch

    from ml_worker.data import preprocess
    from ml_worker.inference import pick_device, predict_probs

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if mc_samples < 0:
        raise ValueError("mc_samples must be >= 0")
    unknown = [t for t in tta_transforms if t not in TTA_TRANSFORMS] if tta else []
    if unknown:
        raise ValueError(f"unknown TTA transform(s) {unknown}; known: {', '.join(TTA_TRANSFORMS)}")
    dev = pick_device(device)
    kw = dict(tile_size=tile_size, overlap=overlap, batch_size=batch_size, device=dev, normalizer=normalizer)

    # --- plain pass, pooling the bottleneck features of every inference tile on the way
    pooled: list[torch.Tensor] = []
    bmod = find_bottleneck_module(model)
    handle = None
    if bmod is not None:
        handle = bmod.register_forward_hook(lambda _m, _i, out: pooled.append(out.float().mean(dim=(2, 3)).cpu()))
    try:
        probs = predict_probs(model, img, **kw)
    finally:
        if handle is not None:
            handle.remove()
    if pooled:
        embedding = torch.cat(pooled).mean(0).numpy().astype(np.float32)
    else:
        embedding = _center_embedding(model, preprocess(img, normalizer), int(tile_size), dev)

    kind = output_kind(model, probs.shape[0])
    instances = np.asarray(model.to_instances(probs), dtype=np.int32)  # type: ignore[operator]
    count = int(np.count_nonzero(np.unique(instances)))
    scores = uncertainty_scores(_tempered(_class_probs(model, probs), temperature, kind), instances, kind=kind,
                                band=band)

    # --- epistemic uncertainty: MC dropout on the bottleneck
    if mc_samples > 0:
        fgs = []
        with bottleneck_dropout(model, mc_dropout_p, seed):
            for _ in range(int(mc_samples)):
                fgs.append(foreground_probability(predict_probs(model, img, **kw), kind))
        stack = np.stack(fgs)  # (T, H, W)
        scores["mc_dropout"] = float(stack.var(axis=0).mean())
        mi = binary_entropy(stack.mean(0)) - binary_entropy(stack).mean(0)
        scores["mc_mutual_info"] = float(np.clip(mi, 0.0, 1.0).mean())

    # --- test-time augmentation: disagreement between transformed predictions
    if tta:
        fgs = [foreground_probability(probs, kind)]
        samples = []
        for name in tta_transforms:
            fwd, inv = TTA_TRANSFORMS[name]
            p = np.ascontiguousarray(inv(predict_probs(model, np.ascontiguousarray(fwd(img)), **kw)))
            fgs.append(foreground_probability(p, kind))
            samples.append(np.asarray(model.to_instances(p), dtype=np.int32))  # type: ignore[operator]
        scores["tta"] = float(np.stack(fgs).var(axis=0).mean())
        scores["instance_flips"] = _instance_flips(instances, samples)

    return TileAnalysis(
        instances=instances,
        probs=probs,
        embedding=embedding,
        nucleus_count=count,
        scores=scores,
        kind=kind,
    )


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    return img


def analyze_tiles(
    model: "nn.Module",
    images: Sequence[np.ndarray],
    *,
    normalizer: "StainNormalizer | None" = None,
    tile_size: int = 256,
    overlap: int = 32,
    batch_size: int = 8,
    device: "str | torch.device | None" = None,
    mc_samples: int = 0,
    tta: bool = False,
    mc_dropout_p: float = 0.2,
    tta_transforms: Sequence[str] = ("hflip", "vflip", "rot90"),
    band: int = 2,
    seed: int = 0,
    temperature: float | None = None,
) -> list[TileAnalysis]:
    """:func:`analyze_tile` for many candidate tiles, batched: tiles that fit in one
    inference tile (both sides <= ``tile_size``) and share a shape go through the network
    ``batch_size`` at a time — the same numbers as :func:`analyze_tile` (which blends a
    single Gaussian-weighted tile for them, i.e. returns that tile's prediction), several
    times faster for small tiles. Larger images fall back to :func:`analyze_tile`.

    MC-dropout masks are drawn per batch, so ``mc_dropout`` values differ from per-tile
    calls (same distribution; reproducible for a given ``seed`` and batch layout).
    """
    import torch

    from ml_worker.data import preprocess
    from ml_worker.inference import pick_device

    imgs = [_as_rgb(im) for im in images]
    if mc_samples < 0:
        raise ValueError("mc_samples must be >= 0")
    unknown = [t for t in tta_transforms if t not in TTA_TRANSFORMS] if tta else []
    if unknown:
        raise ValueError(f"unknown TTA transform(s) {unknown}; known: {', '.join(TTA_TRANSFORMS)}")
    dev = pick_device(device)
    div = int(getattr(model, "size_divisor", 1) or 1)
    tile = -(-int(tile_size) // div) * div
    results: list[TileAnalysis | None] = [None] * len(imgs)
    groups: dict[tuple[int, int], list[int]] = {}
    single_kw = dict(normalizer=normalizer, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
                     device=dev, mc_samples=mc_samples, tta=tta, mc_dropout_p=mc_dropout_p,
                     tta_transforms=tta_transforms, band=band, seed=seed, temperature=temperature)
    for i, im in enumerate(imgs):
        h, w = im.shape[:2]
        if h <= tile and w <= tile:
            groups.setdefault((h, w), []).append(i)
        else:
            results[i] = analyze_tile(model, im, **single_kw)
    if not groups:
        return results  # type: ignore[return-value]

    was_training = model.training
    model.eval()
    model.to(dev)
    use_amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    bmod = find_bottleneck_module(model)
    kind = output_kind(model)

    def run(x: "torch.Tensor", pooled: list | None = None) -> np.ndarray:
        handle = None
        if pooled is not None and bmod is not None:
            handle = bmod.register_forward_hook(lambda _m, _i, out: pooled.append(out.float().mean(dim=(2, 3)).cpu()))
        try:
            with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x.to(dev))
            from ml_worker.inference import _activation

            return _activation(model, logits.float()).cpu().numpy()
        finally:
            if handle is not None:
                handle.remove()

    try:
        for (h, w), idx in groups.items():
            ph, pw = -(-h // div) * div, -(-w // div) * div
            for b0 in range(0, len(idx), batch_size):
                chunk = idx[b0 : b0 + batch_size]
                arr = np.stack([preprocess(imgs[i], normalizer) for i in chunk])  # (B, 3, h, w)
                if (ph, pw) != (h, w):
                    arr = np.pad(arr, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)), mode="symmetric")
                x = torch.from_numpy(np.ascontiguousarray(arr))
                pooled: list = []
                probs = run(x, pooled)[:, :, :h, :w]  # (B, C, h, w)
                if pooled:
                    emb = torch.cat(pooled).numpy().astype(np.float32)
                else:
                    emb = np.stack([_center_embedding(model, a[:, :h, :w], int(tile_size), dev) for a in arr])
                mc_fg = tta_fg = None
                if mc_samples > 0:
                    with bottleneck_dropout(model, mc_dropout_p, seed + b0):
                        mc_fg = np.stack([
                            np.stack([foreground_probability(p[:, :h, :w], kind) for p in run(x)])
                            for _ in range(int(mc_samples))
                        ], axis=1)  # (B, T, h, w)
                tta_inst: list[list[np.ndarray]] = [[] for _ in chunk]
                if tta:
                    fgs = [np.stack([foreground_probability(p, kind) for p in probs])]
                    for name in tta_transforms:
                        fwd, inv = _TTA_TENSOR[name]
                        out = inv(run(fwd(x)))
                        fgs.append(np.stack([foreground_probability(p[:, :h, :w], kind) for p in out]))
                        for j, p in enumerate(out):
                            pj = np.ascontiguousarray(p[:, :h, :w], dtype=np.float32)
                            tta_inst[j].append(np.asarray(model.to_instances(pj), dtype=np.int32))  # type: ignore[operator]
                    tta_fg = np.stack(fgs, axis=1)  # (B, 1 + n, h, w)
                for j, i in enumerate(chunk):
                    p = np.ascontiguousarray(probs[j], dtype=np.float32)
                    inst = np.asarray(model.to_instances(p), dtype=np.int32)  # type: ignore[operator]
                    scores = uncertainty_scores(_tempered(_class_probs(model, p), temperature, kind), inst, kind=kind,
                                                band=band)
                    if mc_fg is not None:
                        st = mc_fg[j]
                        scores["mc_dropout"] = float(st.var(axis=0).mean())
                        mi = binary_entropy(st.mean(0)) - binary_entropy(st).mean(0)
                        scores["mc_mutual_info"] = float(np.clip(mi, 0.0, 1.0).mean())
                    if tta_fg is not None:
                        scores["tta"] = float(tta_fg[j].var(axis=0).mean())
                        scores["instance_flips"] = _instance_flips(inst, tta_inst[j])
                    results[i] = TileAnalysis(instances=inst, probs=p, embedding=emb[j],
                                              nucleus_count=int(np.count_nonzero(np.unique(inst))),
                                              scores=scores, kind=kind)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


#: the TTA transforms on (B, C, H, W) arrays / tensors (forward on the input batch,
#: inverse on the numpy prediction batch)
_TTA_TENSOR: dict[str, tuple[Callable[[Any], Any], Callable[[np.ndarray], np.ndarray]]] = {
    "hflip": (lambda x: x.flip(-1), lambda p: p[..., ::-1]),
    "vflip": (lambda x: x.flip(-2), lambda p: p[..., ::-1, :]),
    "rot90": (lambda x: x.rot90(1, dims=(-2, -1)), lambda p: np.rot90(p, -1, axes=(-2, -1))),
    "rot180": (lambda x: x.flip(-1).flip(-2), lambda p: p[..., ::-1, ::-1]),
    "rot270": (lambda x: x.rot90(-1, dims=(-2, -1)), lambda p: np.rot90(p, 1, axes=(-2, -1))),
}
