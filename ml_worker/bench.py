"""Benchmark: every Karyo architecture vs MONAI's UNet vs a classical baseline.

    python -m ml_worker.bench --data ../shared/data/cpm15 --budget quick [--out DIR] [--archs ...]

For each architecture (``unet``, ``pgunet_plus``, ``unet_sharp``, ``dssnet``, ``hspnet``,
``multihead_unet``) and for the peer ``monai.networks.nets.UNet`` (wrapped as a
``KaryoModel`` so it trains in the same loop: same data, augmentation, epochs, patches):

* parameters and GFLOPs per 256² tile (``torch.utils.flop_counter.FlopCounterMode``:
  convolutions / matmuls, one multiply-add = 2 FLOPs),
* CPU throughput in tiles/s at 256² and 512² (batch 8, ``inference_mode``, warm-up, timed
  loop),
* Dice, AJI, PQ and DSB mAP on held-out images (image-level split, fixed seed) after
  training with :func:`ml_worker.training.train`,

plus a classical baseline with no training (Otsu threshold on the hematoxylin channel +
distance-transform watershed) on the same images. Prints one table and the comparisons
(DSSNet speed-up over the reference U-Net and their Dice difference; best Karyo model vs
MONAI UNet on AJI and PQ), and writes ``bench.json`` and ``bench.png`` to ``--out``.

Budgets: ``quick`` (small models, short training, single timed batch; < 10 min on a 2-core
CPU), ``full`` (the architectures' reference configurations, long training with early
stopping; for a GPU or a long run) and ``smoke`` (tiny everything; tests). When the
trained models are smaller than the reference configurations (``quick``, ``smoke``),
throughput is also measured for ``unet`` at its reference width 64 and ``dssnet`` at its
default configuration (untrained: speed does not depend on the weights), and both
comparisons are printed, labelled. Every figure printed is measured in that run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_worker.data import DataError, Sample, load_folder, split_by_image
from ml_worker.models import MODELS, KaryoModel, create_model, register

__all__ = ["Budget", "BUDGETS", "MonaiUNet", "run_bench", "otsu_watershed", "count_gflops",
           "measure_throughput", "format_table", "main"]

KARYO_ARCHS = ("unet", "pgunet_plus", "unet_sharp", "dssnet", "hspnet", "multihead_unet")
PEER = "monai_unet"
BASELINE = "otsu_watershed"
METRIC_KEYS = ("dice", "aji", "pq", "dsb_map")


# ============================================================================ MONAI adapter
class MonaiUNet(KaryoModel):
    """``monai.networks.nets.UNet`` (2-D, residual units) behind the ``KaryoModel`` contract,
    so the benchmark trains it in exactly the same loop as the Karyo models.

    Semantic softmax output (background + nucleus), CE + Dice loss (the same default as
    Karyo's U-Net), instances by the shared post-processing of ``KaryoModel.to_instances``.
    """

    default_loss = "ce_dice"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        strides: tuple[int, ...] = (2, 2, 2, 2),
        num_res_units: int = 2,
    ) -> None:
        super().__init__(in_channels, num_classes)
        from monai.networks.nets import UNet

        self.net = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
        )
        self.size_divisor = int(math.prod(strides))
        self.embed_dim = int(channels[-1])
        self._bottom = self._find_bottom()

    def _find_bottom(self) -> torch.nn.Module:
        """Innermost block of MONAI's nested ``SkipConnection`` structure (the bottleneck)."""
        from monai.networks.layers import SkipConnection

        node: torch.nn.Module = self.net.model
        while True:
            skip = next((m for m in node.children() if isinstance(m, SkipConnection)), None)
            if skip is None:
                return node
            sub = skip.submodule
            if not any(isinstance(m, SkipConnection) for m in sub.children()):
                return sub
            node = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(x)  # (B, K, H, W)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self._bottom.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            self.forward(x)
        finally:
            handle.remove()
        return captured[0]


if PEER not in MODELS:  # `python -m ml_worker.bench` and `import ml_worker.bench` both run this file
    register(PEER)(MonaiUNet)


# ============================================================================ budgets
@dataclass(frozen=True)
class Budget:
    """Everything a benchmark run depends on (printed and stored in the JSON)."""

    name: str
    description: str
    tile_size: int  # training patch side
    batch_size: int
    epochs: int
    patches_per_epoch: int
    lr: float
    augment: str
    model_kwargs: dict[str, dict[str, Any]]
    epochs_per_stage: int | None  # PGU-net+ (its run lasts num_stages * epochs_per_stage epochs)
    stage_lr_new: float
    stage_lr_old: float
    test_fraction: float
    val_fraction: float  # of the training images, for early stopping (0 = none; best = last)
    patience: int
    eval_tile: int
    throughput_sizes: tuple[int, int]
    throughput_batches: tuple[int, int]  # batch size at each throughput size
    throughput_max_iters: int  # timed batches: until min_time is reached or max_iters done
    throughput_min_time_s: float
    warmup_batch: int
    warmup_iters: int
    reference_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    split_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        d["summary"] = self.summary()
        return d

    def summary(self) -> str:
        """One line describing the training schedule, built from the fields."""
        steps = math.ceil(self.patches_per_epoch / self.batch_size)
        pg = self.model_kwargs.get("pgunet_plus", {})
        n_st = int(pg.get("num_stages", 4))
        text = (
            f"{self.epochs} epochs x {steps * self.batch_size} patches of {self.tile_size}px "
            f"({self.epochs * steps} steps of batch {self.batch_size}), Adam lr {self.lr:g}, augmentation "
            f"'{self.augment}'; PGU-net+: RMSprop, {n_st} stages x {self.epochs_per_stage} epoch(s), "
            f"lr new/old {self.stage_lr_new:g}/{self.stage_lr_old:g}; "
        )
        text += (f"validation {self.val_fraction:g} of the training images, early stopping patience {self.patience}"
                 if self.val_fraction > 0 else "no validation (last epoch evaluated)")
        return text + f"; test {self.test_fraction:g} of the images"


_REFERENCE = {"unet": {"width": 64}, "dssnet": {}}

BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        name="quick",
        description=(
            "small models (U-Nets width 8, reduced encoders / DSSNet / MONAI UNet) and a short "
            "training run; PGU-net+ learning rates are 10x the paper's because of the short run; "
            "no validation split (the last epoch is evaluated); 512px throughput at batch 2 to fit "
            "the time budget"
        ),
        tile_size=128,
        batch_size=4,
        epochs=3,
        patches_per_epoch=32,
        lr=2e-3,
        augment="default",
        model_kwargs={
            "unet": {"width": 8, "depth": 4},
            "pgunet_plus": {"width": 8, "num_stages": 3, "core_depth": 2},
            "unet_sharp": {"base_channels": 8, "layers": [1, 1, 1, 1], "cardinality": 4, "width_per_group": 4,
                           "stem_channels": 8, "branch_channels": 8, "decoder_channels": 16, "aspp_channels": 16},
            "dssnet": {"width": 16, "feature_channels": 32, "expand_channels": 48, "num_blocks": 4,
                       "decoder_channels": 16, "sr_channels": 16, "sr_blocks": 1},
            "hspnet": {"depth": 18, "base_channels": 16, "layers": [1, 1, 1, 1], "ds_channels": 32,
                       "head_channels": 16},
            "multihead_unet": {"width": 8, "depth": 4},
            PEER: {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        epochs_per_stage=1,
        stage_lr_new=1e-3,
        stage_lr_old=1e-5,
        test_fraction=0.2,
        val_fraction=0.0,
        patience=0,
        eval_tile=256,
        throughput_sizes=(256, 512),
        throughput_batches=(8, 2),
        throughput_max_iters=2,
        throughput_min_time_s=0.5,
        warmup_batch=1,
        warmup_iters=1,
        reference_kwargs=_REFERENCE,
    ),
    "full": Budget(
        name="full",
        description=(
            "reference configurations (U-Net width 64, paper-sized models, MONAI UNet channels "
            "16..256), long training with a validation split and early stopping; for a GPU or a "
            "long run"
        ),
        tile_size=256,
        batch_size=8,
        epochs=100,
        patches_per_epoch=256,
        lr=1e-3,
        augment="default",
        model_kwargs={
            "unet": {"width": 64},
            "pgunet_plus": {"width": 64},
            "unet_sharp": {},
            "dssnet": {},
            "hspnet": {},
            "multihead_unet": {},
            PEER: {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2},
        },
        epochs_per_stage=25,
        stage_lr_new=1e-4,
        stage_lr_old=1e-6,
        test_fraction=0.2,
        val_fraction=0.2,
        patience=15,
        eval_tile=256,
        throughput_sizes=(256, 512),
        throughput_batches=(8, 8),
        throughput_max_iters=10,
        throughput_min_time_s=5.0,
        warmup_batch=8,
        warmup_iters=2,
        reference_kwargs=_REFERENCE,
    ),
    "smoke": Budget(
        name="smoke",
        description="tests only: tiny models, throughput at 64/128px",
        tile_size=64,
        batch_size=2,
        epochs=1,
        patches_per_epoch=4,
        lr=1e-3,
        augment="light",
        model_kwargs={
            "unet": {"width": 4, "depth": 2},
            "pgunet_plus": {"width": 4, "num_stages": 2, "core_depth": 1},
            "unet_sharp": {"base_channels": 8, "layers": [1, 1, 1, 1], "cardinality": 4, "width_per_group": 2,
                           "stem_channels": 4, "branch_channels": 4, "decoder_channels": 8, "aspp_channels": 8},
            "dssnet": {"width": 8, "feature_channels": 8, "expand_channels": 8, "num_blocks": 1,
                       "decoder_channels": 8, "sr_channels": 8, "sr_blocks": 1},
            "hspnet": {"depth": 18, "base_channels": 8, "layers": [1, 1, 1, 1], "ds_channels": 8, "head_channels": 8},
            "multihead_unet": {"width": 4, "depth": 2},
            PEER: {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        },
        epochs_per_stage=1,
        stage_lr_new=1e-3,
        stage_lr_old=1e-5,
        test_fraction=0.34,
        val_fraction=0.0,
        patience=0,
        eval_tile=64,
        throughput_sizes=(64, 128),
        throughput_batches=(2, 2),
        throughput_max_iters=1,
        throughput_min_time_s=0.0,
        warmup_batch=1,
        warmup_iters=1,
        reference_kwargs={"unet": {"width": 64, "depth": 2}, "dssnet": {}},
    ),
}


# ============================================================================ measurements
def count_gflops(model: torch.nn.Module, size: int = 256) -> float:
    """GFLOPs of one forward pass on a (1, 3, size, size) tile (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def measure_throughput(
    model: torch.nn.Module,
    size: int,
    batch: int = 8,
    max_iters: int = 1,
    min_time_s: float = 0.0,
    warmup_batch: int = 1,
    warmup_iters: int = 1,
) -> float:
    """CPU tiles/s of ``model`` on (batch, 3, size, size) inputs under ``inference_mode``.

    ``warmup_iters`` untimed passes of ``warmup_batch`` tiles (allocator, oneDNN kernels),
    then timed passes of ``batch`` tiles until ``min_time_s`` has elapsed or ``max_iters``
    passes are done (at least one). Returns ``batch`` / the fastest pass (like ``timeit``:
    other processes on a shared CPU can only make a pass slower).
    """
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    best = math.inf
    with torch.inference_mode():
        for _ in range(warmup_iters):
            model(x[:warmup_batch])
        n, t_start = 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
            n += 1
            if n >= max_iters or time.perf_counter() - t_start >= min_time_s:
                break
    return batch / best


def otsu_watershed(image: np.ndarray, min_size: int = 16) -> np.ndarray:
    """Classical baseline, no training: Otsu on the hematoxylin channel (grey when the
    image has no stain contrast) + distance-transform watershed split.

    Returns:
        (H, W) int32 instances.
    """
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    from ml_worker.instances import fill_small_holes, remove_small_instances, split_touching

    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    hema = rgb2hed(img)[..., 0]
    if float(hema.std()) < 1e-6:  # no stain signal: dark = nucleus on the grey image
        hema = 1.0 - img.astype(np.float32).mean(axis=2) / 255.0
    hema = gaussian(hema, sigma=1.0)
    if float(hema.max() - hema.min()) < 1e-9:
        return np.zeros(img.shape[:2], np.int32)
    mask = hema > threshold_otsu(hema)
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3), bool))
    mask = fill_small_holes(mask, 4 * min_size)
    inst = split_touching(mask)
    return np.asarray(remove_small_instances(inst, min_size), dtype=np.int32)


def _mean_metrics(pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from ml_worker.metrics import all_metrics

    per = [{"name": n, **all_metrics(p, t)} for n, p, t in pairs]
    keys = [k for k in per[0] if k != "name"]
    return {k: float(np.mean([r[k] for r in per])) for k in keys}, per


# ============================================================================ run
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _config_for(arch: str, budget: Budget, out_dir: Path, seed: int, device: str):  # -> TrainConfig
    from ml_worker.training import TrainConfig

    return TrainConfig(
        arch=arch,
        model_kwargs=dict(budget.model_kwargs.get(arch, {})),
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=budget.lr,
        tile_size=budget.tile_size,
        steps_per_epoch=budget.patches_per_epoch,
        val_fraction=budget.val_fraction,
        seed=seed,
        augment=budget.augment,
        early_stopping_patience=budget.patience,
        device=device,
        epochs_per_stage=budget.epochs_per_stage if arch == "pgunet_plus" else None,
        stage_lr_new=budget.stage_lr_new,
        stage_lr_old=budget.stage_lr_old,
        out_dir=str(out_dir / "runs" / arch),
    )


def _throughput_phase(models: dict[str, torch.nn.Module], budget: Budget) -> dict[str, dict[str, float]]:
    """GFLOPs and CPU tiles/s of every model, measured together after all training.

    Two rounds over all models (the second in reverse order, without warm-up), each model
    keeping its fastest pass: on a shared CPU a burst of load in one round does not decide a
    ratio. The pairs compared in the report are measured next to each other (trained
    ``unet`` then ``dssnet``; ``dssnet@ref`` then ``unet@ref``).
    """
    s1, s2 = budget.throughput_sizes
    b1, b2 = budget.throughput_batches
    kw = {"max_iters": budget.throughput_max_iters, "min_time_s": budget.throughput_min_time_s,
          "warmup_batch": budget.warmup_batch}
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        model.to("cpu").eval()
        out[name] = {"gflops_256": count_gflops(model, 256)}
    first = [n for n in ("unet", "dssnet") if n in models]
    refs = [n for n in ("dssnet@ref", "unet@ref") if n in models]
    order = first + [n for n in models if n not in first and n not in refs] + refs
    for rnd, names in enumerate((order, order[::-1])):
        for name in names:
            for size, batch in ((s1, b1), (s2, b2)):
                rate = measure_throughput(models[name], size, batch=batch,
                                          warmup_iters=budget.warmup_iters if rnd == 0 else 0, **kw)
                key = f"tiles_per_s_{size}"
                out[name][key] = max(out[name].get(key, 0.0), rate)
    return out


def run_bench(
    data_dir: str | os.PathLike[str],
    budget: Budget,
    out_dir: str | os.PathLike[str],
    archs: list[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; returns the result dict that is also written to ``bench.json``."""
    from tqdm import tqdm

    from ml_worker.inference import predict_instances
    from ml_worker.training import train

    t0 = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads or os.cpu_count() or 1))
    archs = list(archs or [*KARYO_ARCHS, PEER])
    try:
        samples = load_folder(data_dir)
        if len(samples) < 2:
            raise DataError(f"{data_dir}: the benchmark needs at least 2 images (train / test split)")
        train_s, test_s = split_by_image(samples, budget.test_fraction, seed=budget.split_seed)
        val_s: list[Sample] = []
        if budget.val_fraction > 0 and len(train_s) >= 2:
            train_s, val_s = split_by_image(train_s, budget.val_fraction, seed=budget.split_seed + 1)
        _log(f"budget {budget.name}: {budget.description}; {budget.summary()}")
        _log(f"data {data_dir}: {len(train_s)} train, {len(val_s)} val, {len(test_s)} test images "
             f"({', '.join(s.name for s in test_s)}); torch threads {torch.get_num_threads()}")

        rows: list[dict[str, Any]] = []
        trained_models: dict[str, torch.nn.Module] = {}
        for arch in archs:
            t_arch = time.perf_counter()
            cfg = _config_for(arch, budget, out, seed, device)
            bar = tqdm(total=None, desc=f"train {arch}", unit="step", file=sys.stderr, leave=False,
                       disable=not show_progress, dynamic_ncols=True)

            def progress(ev: dict[str, Any], bar: Any = bar) -> None:
                if ev["event"] == "start":
                    bar.reset(total=ev["epochs"] * ev["steps_per_epoch"])
                elif ev["event"] == "step":
                    bar.update(1)
                    bar.set_postfix(loss=f"{ev['loss']:.3f}", refresh=False)

            result = train(cfg, train_s, val_s, progress=progress)
            bar.close()
            t_train = time.perf_counter() - t_arch
            from ml_worker.training import load_for_inference

            model, normalizer, _ = load_for_inference(result.best_path)  # type: ignore[arg-type]
            t_eval0 = time.perf_counter()
            pairs = []
            for s in test_s:
                inst, _ = predict_instances(model, s.image, tile_size=budget.eval_tile,
                                            overlap=budget.eval_tile // 8, batch_size=budget.throughput_batches[0],
                                            normalizer=normalizer)
                pairs.append((s.name, inst, s.instances))
            mean, per = _mean_metrics(pairs)
            t_eval = time.perf_counter() - t_eval0
            trained_models[arch] = model.to("cpu")
            row = {
                "name": arch,
                "kind": "peer" if arch == PEER else "karyo",
                "trained": True,
                "model_kwargs": cfg.model_kwargs,
                "params": model.num_parameters(),
                "metrics": mean,
                "per_image": per,
                "epochs": result.epochs_completed,
                "best_epoch": result.best_epoch,
                "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
                "train_s": t_train,
                "eval_s": t_eval,
                "total_s": time.perf_counter() - t_arch,
            }
            rows.append(row)
            _log(f"{arch}: {row['params'] / 1e6:.3f}M params, trained {t_train:.0f}s, evaluated {t_eval:.0f}s: "
                 f"dice {mean['dice']:.3f} aji {mean['aji']:.3f} pq {mean['pq']:.3f}")

        # classical baseline
        t_b = time.perf_counter()
        mean, per = _mean_metrics([(s.name, otsu_watershed(s.image), s.instances) for s in test_s])
        rows.append({"name": BASELINE, "kind": "baseline", "trained": False, "params": 0, "gflops_256": None,
                     f"tiles_per_s_{budget.throughput_sizes[0]}": None,
                     f"tiles_per_s_{budget.throughput_sizes[1]}": None, "metrics": mean, "per_image": per,
                     "total_s": time.perf_counter() - t_b})

        # reference configurations (speed only) when the trained models are smaller
        references: list[dict[str, Any]] = []
        speed_models: dict[str, torch.nn.Module] = dict(trained_models)
        for arch, kw in budget.reference_kwargs.items():
            trained = next((r for r in rows if r["name"] == arch), None)
            if trained is not None and trained["model_kwargs"] == kw:
                continue  # the trained model is the reference configuration
            torch.manual_seed(0)
            model = create_model(arch, **kw)
            speed_models[f"{arch}@ref"] = model
            references.append({"name": f"{arch}@ref", "arch": arch, "kind": "reference", "trained": False,
                               "model_kwargs": kw, "params": model.num_parameters()})
        t_s = time.perf_counter()
        _log(f"throughput of {len(speed_models)} models ({', '.join(speed_models)})")
        speed = _throughput_phase(speed_models, budget)
        for r in rows + references:
            r.update(speed.get(r["name"], {}))
        throughput_s = time.perf_counter() - t_s
        _log(f"throughput measured in {throughput_s:.0f}s")
        del speed_models, trained_models

        result = {
            "budget": budget.to_dict(),
            "data": str(data_dir),
            "split": {"train": [s.name for s in train_s], "val": [s.name for s in val_s],
                      "test": [s.name for s in test_s], "seed": budget.split_seed},
            "rows": rows,
            "references": references,
            "comparisons": _comparisons(rows, references, budget),
            "environment": {
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "python": platform.python_version(),
                "train_device": device, "loadavg_start": load_start,
                "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            },
            "seed": seed,
            "throughput_s": throughput_s,
        }
        result["wall_time_s"] = time.perf_counter() - t0
        return result
    finally:
        torch.set_num_threads(prev_threads)


def _comparisons(rows: list[dict[str, Any]], refs: list[dict[str, Any]], budget: Budget) -> dict[str, Any]:
    s1, s2 = budget.throughput_sizes
    by = {r["name"]: r for r in rows}
    ref = {r["arch"]: r for r in refs}
    out: dict[str, Any] = {}

    def speed_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        return {f"at_{s}": a[f"tiles_per_s_{s}"] / b[f"tiles_per_s_{s}"] for s in (s1, s2)}

    if "dssnet" in by and "unet" in by:
        d, u = by["dssnet"], by["unet"]
        out["trained_dssnet_vs_unet"] = {
            "dssnet_params": d["params"], "unet_params": u["params"],
            "speed_ratio": speed_ratio(d, u),
            "dice_diff_points": 100.0 * (d["metrics"]["dice"] - u["metrics"]["dice"]),
        }
    # Reference speed: unet at width 64, dssnet at its default configuration; a trained model
    # that already is the reference configuration stands for it.
    def reference(arch: str) -> dict[str, Any] | None:
        if arch in ref:
            return ref[arch]
        if arch in by and by[arch]["model_kwargs"] == budget.reference_kwargs.get(arch):
            return by[arch]
        return None

    u_ref, d_ref = reference("unet"), reference("dssnet")
    if u_ref is not None and d_ref is not None:
        out["reference_dssnet_vs_unet"] = {
            "dssnet_params": d_ref["params"], "unet_params": u_ref["params"],
            "dssnet_trained": bool(d_ref.get("trained")), "unet_trained": bool(u_ref.get("trained")),
            "speed_ratio": speed_ratio(d_ref, u_ref),
        }
    if "dssnet" in by and u_ref is not None:
        out["trained_dssnet_vs_reference_unet_speed"] = speed_ratio(by["dssnet"], u_ref)
    karyo = [r for r in rows if r["kind"] == "karyo"]
    if PEER in by and karyo:
        peer = by[PEER]["metrics"]
        for key in ("aji", "pq"):
            best = max(karyo, key=lambda r: r["metrics"][key])
            out[f"best_karyo_vs_monai_{key}"] = {
                "best_karyo": best["name"], "best_karyo_value": best["metrics"][key], "monai_value": peer[key],
                "beats_monai": bool(best["metrics"][key] > peer[key]),
            }
    return out


# ============================================================================ output
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return format(v, spec)


def _kw(budget: dict[str, Any], arch: str) -> str:
    kw = budget["reference_kwargs"].get(arch) or {}
    return "(" + (", ".join(f"{k}={v}" for k, v in kw.items()) or "default config") + ")"


def _loads(result: dict[str, Any], key: str) -> str:
    v = result["environment"].get(key)
    return "/".join(f"{x:.1f}" for x in v) if v else "n/a"


def format_table(result: dict[str, Any]) -> str:
    """The printed report: budget line, one table, comparisons."""
    b = result["budget"]
    s1, s2 = b["throughput_sizes"]
    lines = [
        f"Karyo benchmark - budget '{b['name']}': {b['description']}",
        f"training: {b['summary']}",
        f"data: {result['data']}  train {len(result['split']['train'])} / val {len(result['split']['val'])} / "
        f"test {len(result['split']['test'])} images (split by image, seed {result['split']['seed']}); "
        f"test: {', '.join(result['split']['test'])}",
        f"throughput: CPU, {result['environment']['threads']} torch threads, inference_mode, batch "
        f"{b['throughput_batches'][0]} at {s1}x{s1} and {b['throughput_batches'][1]} at {s2}x{s2}, "
        f"{b['warmup_iters']} warm-up pass(es) of batch {b['warmup_batch']}, then timed batches for >= "
        f"{b['throughput_min_time_s']:g} s (at most {b['throughput_max_iters']}, at least 1), two rounds after "
        f"all training, fastest batch kept; "
        f"GFLOPs per 256x256 tile (FlopCounterMode: conv/matmul, multiply-add = 2 FLOPs)",
        f"load average (1/5/15 min) at the start: {_loads(result, 'loadavg_start')}, at the end: "
        f"{_loads(result, 'loadavg_end')} on {result['environment']['cpu_count']} cores (other processes share "
        f"this CPU; all timings are wall-clock)",
        "",
    ]
    b1, b2 = b["throughput_batches"]
    hdr = (f"{'model':<22} {'params':>9} {'GFLOPs':>8} {f'tiles/s@{s1} b{b1}':>15} {f'tiles/s@{s2} b{b2}':>15} "
           f"{'Dice':>6} {'AJI':>6} {'PQ':>6} {'mAP':>6} {'train s':>8}")
    lines += [hdr, "-" * len(hdr)]
    for r in result["rows"] + result["references"]:
        m = r.get("metrics") or {}
        name = r["name"] + (" (MONAI)" if r["kind"] == "peer" else "")
        if r["kind"] == "reference":
            name = f"{r['arch']} ref (untrained)"
        params = f"{r['params'] / 1e6:.3f}M" if r["params"] else "0"
        lines.append(
            f"{name:<22} {params:>9} {_fmt(r.get('gflops_256'), '.2f'):>8} "
            f"{_fmt(r.get(f'tiles_per_s_{s1}'), '.2f'):>15} {_fmt(r.get(f'tiles_per_s_{s2}'), '.2f'):>15} "
            f"{_fmt(m.get('dice'), '.3f'):>6} {_fmt(m.get('aji'), '.3f'):>6} {_fmt(m.get('pq'), '.3f'):>6} "
            f"{_fmt(m.get('dsb_map'), '.3f'):>6} {_fmt(r.get('train_s'), '.0f'):>8}"
        )
    for r in result["rows"]:
        m = r.get("metrics") or {}
        if r["kind"] != "baseline" and m.get("n_pred") == 0:
            lines.append(f"note: {r['name']} predicted no nucleus on any test image (mean n_pred = 0; its "
                         f"training loss ended at {_fmt(r.get('final_train_loss'), '.3f')}): it did not train "
                         f"far enough in this budget, so its quality columns are 0")
    lines.append("")
    c = result["comparisons"]
    if "reference_dssnet_vs_unet" in c:
        x = c["reference_dssnet_vs_unet"]
        lines.append(
            f"speed, reference configs (dssnet {_kw(b, 'dssnet')} {x['dssnet_params'] / 1e6:.2f}M vs unet "
            f"{_kw(b, 'unet')} {x['unet_params'] / 1e6:.2f}M): dssnet/unet tiles/s = "
            f"{x['speed_ratio'][f'at_{s1}']:.2f}x @{s1}, "
            f"{x['speed_ratio'][f'at_{s2}']:.2f}x @{s2} (target >= 5x): "
            f"{'MET' if min(x['speed_ratio'].values()) >= 5 else 'NOT MET'}"
        )
    if "trained_dssnet_vs_unet" in c:
        x = c["trained_dssnet_vs_unet"]
        lines.append(
            f"speed, trained '{b['name']}' configs (dssnet {x['dssnet_params'] / 1e6:.3f}M vs unet "
            f"{x['unet_params'] / 1e6:.3f}M): {x['speed_ratio'][f'at_{s1}']:.2f}x @{s1}, "
            f"{x['speed_ratio'][f'at_{s2}']:.2f}x @{s2}"
        )
        if "trained_dssnet_vs_reference_unet_speed" in c:
            y = c["trained_dssnet_vs_reference_unet_speed"]
            lines.append(f"speed, trained dssnet vs unet {_kw(b, 'unet')}: {y[f'at_{s1}']:.2f}x @{s1}, "
                         f"{y[f'at_{s2}']:.2f}x @{s2}")
        d = x["dice_diff_points"]
        lines.append(
            f"Dice, trained '{b['name']}' models: dssnet - unet = {d:+.2f} points (target: dssnet at most 1 point "
            f"below unet): "
            f"{'MET' if d >= -1.0 else 'NOT MET'}"
        )
    for key in ("aji", "pq"):
        k = f"best_karyo_vs_monai_{key}"
        if k in c:
            x = c[k]
            lines.append(
                f"{key.upper()}: best Karyo model {x['best_karyo']} {x['best_karyo_value']:.3f} vs MONAI UNet "
                f"{x['monai_value']:.3f} -> {'beats' if x['beats_monai'] else 'does NOT beat'} MONAI"
            )
    lines.append(f"wall time: {result['wall_time_s']:.0f} s")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Two panels: test metrics per model, CPU throughput per model (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = result["budget"]
    s1 = b["throughput_sizes"][0]
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    w = 0.2
    for i, key in enumerate(METRIC_KEYS):
        ax1.bar(x + (i - 1.5) * w, [r["metrics"][key] for r in rows], w, label=key)
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylim(0, 1)
    ax1.set_title(f"held-out test images ({len(result['split']['test'])}), budget '{b['name']}'")
    ax1.legend(ncol=4, fontsize=8)
    sp = [r for r in rows + result["references"] if r.get(f"tiles_per_s_{s1}")]
    labels = [r["name"] if r["kind"] != "reference" else f"{r['arch']} ref" for r in sp]
    palette = {"reference": "tab:gray", "peer": "tab:orange"}
    colors = [palette.get(r["kind"], "tab:blue") for r in sp]
    ax2.bar(np.arange(len(sp)), [r[f"tiles_per_s_{s1}"] for r in sp], color=colors)
    ax2.set_yscale("log")
    ax2.set_xticks(np.arange(len(sp)), labels, rotation=30, ha="right")
    ax2.set_ylabel(f"CPU tiles/s at {s1}x{s1} (batch {b['throughput_batches'][0]})")
    ax2.set_title("throughput (blue: Karyo trained, orange: MONAI, grey: reference configs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_json_safe(v) for v in o]
    if isinstance(o, np.generic):
        return _json_safe(o.item())
    return o


# ============================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    t_main = time.perf_counter()
    from ml_worker.cli import _Parser, _one_line

    p = _Parser(prog="python -m ml_worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder (DIR/images + DIR/masks), e.g. ../shared/data/cpm15")
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS))
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.png and the training runs")
    p.add_argument("--archs", nargs="+", default=None, help=f"subset of {', '.join([*KARYO_ARCHS, PEER])}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", help="training device (throughput is always measured on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from ml_worker.checkpoint import CheckpointError

    archs = args.archs
    if archs:
        unknown = [a for a in archs if a not in [*KARYO_ARCHS, PEER]]
        if unknown:
            print(f"error: unknown architectures {unknown}; choose from {[*KARYO_ARCHS, PEER]}", file=sys.stderr)
            return 2
    data = Path(args.data)
    if not data.is_dir():
        print(f"error: dataset folder not found: {data}", file=sys.stderr)
        return 2
    try:
        result = run_bench(data, BUDGETS[args.budget], args.out, archs=archs, seed=args.seed,
                           threads=args.threads, device=args.device, show_progress=not args.quiet)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    plot(result, out / "bench.png")
    result["wall_time_s"] = time.perf_counter() - t_main  # everything, this process's start-up included
    table = format_table(result)
    (out / "bench.json").write_text(json.dumps(_json_safe(result), indent=2))
    (out / "bench.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
