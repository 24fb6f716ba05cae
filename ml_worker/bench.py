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
CPU), ``standard`` (mid-size models, a validation split, the typed set; about 35-40 min on
an idle 2-core CPU with ``--preset fast``, docs/ml_worker.md), ``full`` (the architectures'
reference configurations, long training with early stopping; for a GPU or a long run) and
``smoke`` (tiny everything; tests). ``--preset paper`` / ``both`` adds each seed
architecture's paper preset as a row ``arch:paper`` (see :func:`_preset_parts`). With a
budget's ``typed_images``, every softmax model is trained again on a generated typed data set
and scored by mPQ / bPQ (:func:`_typed_phase`). The issue-15 targets are printed with
MET / NOT MET. When the
trained models are smaller than the reference configurations (``quick``, ``smoke``),
throughput is also measured for ``unet`` at its reference width 64 and ``dssnet`` at its
default configuration (untrained: speed does not depend on the weights), and both
comparisons are printed, labelled. Every figure printed is measured in that run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ml_worker.bench_budgets import BUDGETS, PEER, Budget
from ml_worker.bench_measure import mean_metrics, count_gflops, measure_throughput, otsu_watershed
from ml_worker.bench_report import json_safe, format_table, plot
from ml_worker.data import DataError, Sample, load_folder, split_by_image
from ml_worker.models import MODELS, KaryoModel, create_model, register

__all__ = ["Budget", "BUDGETS", "MonaiUNet", "run_bench", "otsu_watershed", "count_gflops",
           "measure_throughput", "format_table", "main"]

KARYO_ARCHS = ("unet", "pgunet_plus", "unet_sharp", "dssnet", "hspnet", "multihead_unet")
BASELINE = "otsu_watershed"


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


# ============================================================================ run
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


#: model options that set a model's size; at CPU budgets a paper preset keeps the budget's sizes
#: and brings only its structure (decoder, activations, encoder kind...) and training recipe
_SIZE_OPTIONS = frozenset({"width", "base_channels", "depth", "layers", "cardinality", "width_per_group",
                           "feature_channels", "expand_channels", "num_blocks", "decoder_channels", "sr_channels",
                           "sr_blocks", "ds_widths", "ds_channels", "head_channels", "num_stages", "core_depth",
                           "base_size", "stem_channels", "branch_channels", "aspp_channels"})
#: training options the budget always decides (how long a run is)
_BUDGET_TRAIN = frozenset({"epochs", "epochs_per_stage", "steps_per_epoch", "early_stopping_patience"})
#: ... and, at CPU budgets, also the sizes of a step
_BUDGET_TRAIN_CPU = _BUDGET_TRAIN | {"batch_size", "tile_size", "stage_lr_new", "stage_lr_old"}


def row_name(arch: str, preset: str, head: str | None = None) -> str:
    """``arch`` for the fast preset (the historical row names), ``arch:paper`` otherwise; an extra
    instance head adds ``+head`` (``unet+hv``)."""
    name = arch if preset == "fast" else f"{arch}:{preset}"
    return f"{name}+{head}" if head else name


def _preset_parts(arch: str, preset: str, budget: Budget) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model kwargs, TrainConfig overrides) of ``preset`` under ``budget``: the budget's model
    and schedule for ``fast``; for ``paper`` the preset's recipe, with the paper's model sizes
    only under the ``full`` budget (a GPU run)."""
    from ml_worker.presets import PRESETS

    model_kwargs = dict(budget.model_kwargs.get(arch, {}))
    if preset == "fast" or arch not in PRESETS:
        return model_kwargs, {}
    p = PRESETS[arch][preset]
    full = budget.name == "full"
    keep = _BUDGET_TRAIN if full else _BUDGET_TRAIN_CPU
    structure = {k: v for k, v in p["model_kwargs"].items() if full or k not in _SIZE_OPTIONS}
    train = {k: v for k, v in p["train"].items() if k not in keep}
    return {**model_kwargs, **structure} if not full else structure, train


def _config_for(arch: str, budget: Budget, out_dir: Path, seed: int, device: str,
                preset: str = "fast", head: str | None = None):  # -> TrainConfig
    from ml_worker.training import TrainConfig

    model_kwargs, train = _preset_parts(arch, preset, budget)
    if head:
        model_kwargs = {**model_kwargs, "instance_head": head}
    base: dict[str, Any] = dict(
        arch=arch,
        model_kwargs=model_kwargs,
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
        out_dir=str(out_dir / "runs" / row_name(arch, preset, head).replace(":", "-")),
    )
    return TrainConfig(**{**base, **train})


def _typed_phase(runs: list[tuple[str, str, str | None]], budget: Budget, out: Path, seed: int,
                 device: str) -> dict[str, dict[str, Any]]:
    """Train every softmax model of ``runs`` again, on a generated typed data set (background + K
    nucleus types, ``synth.write_dataset(typed=True)``) with the same schedule, and score it on
    the held-out typed images: ``{row name: {"mpq", "bpq", "dice", "train_s"}}``. The multi-head
    model has no class channels and is left out."""
    from ml_worker import catalog
    from ml_worker.data import dataset_class_names
    from ml_worker.synth import write_dataset
    from ml_worker.training import evaluate_samples, load_for_inference, train

    folder = out / "typed-data"
    if not (folder / "images").is_dir():
        write_dataset(folder, budget.typed_images, kind=budget.typed_kind, size=budget.typed_size,
                      seed=budget.split_seed, typed=True)
    samples = load_folder(folder)
    names = dataset_class_names(folder)
    train_s, test_s = split_by_image(samples, budget.test_fraction, seed=budget.split_seed)
    _log(f"typed set {folder}: {len(train_s)} train / {len(test_s)} test images, classes {names}")
    results: dict[str, dict[str, Any]] = {}
    for arch, preset, head in runs:
        if head or (arch != PEER and catalog.architecture(arch).output != "softmax"):
            continue  # an instance-head row differs in how nuclei are split, not in their types
        name = row_name(arch, preset)
        t0 = time.perf_counter()
        cfg = _config_for(arch, budget, out, seed, device, preset)
        cfg = cfg.replace(classes=names, out_dir=str(out / "runs-typed" / name.replace(":", "-")))
        result = train(cfg, train_s, [])
        model, normalizer, _ = load_for_inference(result.best_path)  # type: ignore[arg-type]
        mean, _ = evaluate_samples(model, test_s, tile_size=budget.eval_tile, normalizer=normalizer,
                                   batch_size=budget.throughput_batches[0])
        results[name] = {"mpq": mean.get("mpq"), "bpq": mean.get("bpq"), "dice": mean.get("dice"),
                         "train_s": time.perf_counter() - t0}
        _log(f"{name} (typed): mPQ {results[name]['mpq']:.3f} bPQ {results[name]['bpq']:.3f}")
    return results


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
    presets: tuple[str, ...] = ("fast",),
    instance_heads: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run the benchmark; returns the result dict that is also written to ``bench.json``.

    ``presets``: ``fast`` (rows named by architecture) and/or ``paper`` (rows ``arch:paper``,
    for the architectures that have one; see :func:`_preset_parts` for what a CPU budget keeps
    of a paper preset). ``instance_heads`` (e.g. ``("hv",)``): every semantic (softmax) Karyo
    architecture is trained once more with that head, fast preset, rows ``arch+hv``, and the
    report compares its AJI/PQ with the same network's default post-processing."""
    from ml_worker.presets import PRESETS, inference_settings
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
        from ml_worker import catalog

        runs: list[tuple[str, str, str | None]] = [
            (arch, pr, None) for pr in presets for arch in archs if pr == "fast" or pr in PRESETS.get(arch, {})]
        runs += [(arch, "fast", head) for head in instance_heads for arch in archs
                 if arch in KARYO_ARCHS and catalog.architecture(arch).output == "softmax"]
        for arch, preset, head in runs:
            name = row_name(arch, preset, head)
            t_arch = time.perf_counter()
            cfg = _config_for(arch, budget, out, seed, device, preset, head)
            bar = tqdm(total=None, desc=f"train {name}", unit="step", file=sys.stderr, leave=False,
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
            # The paper's stitching (HSP-Net: 400-px tiles every 100 px) only at the paper's sizes.
            stitch = inference_settings(arch, preset) if preset != "fast" and budget.name == "full" else {}
            eval_tile = int(stitch.get("tile_size", budget.eval_tile))
            eval_overlap = int(stitch.get("overlap", eval_tile // 8))
            pairs = []
            for s in test_s:
                inst, _ = predict_instances(model, s.image, tile_size=eval_tile,
                                            overlap=eval_overlap, batch_size=budget.throughput_batches[0],
                                            normalizer=normalizer)
                pairs.append((s.name, inst, s.instances))
            mean, per = mean_metrics(pairs)
            t_eval = time.perf_counter() - t_eval0
            trained_models[name] = model.to("cpu")
            row = {
                "name": name,
                "arch": arch,
                "preset": preset,
                "instance_head": head,
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
            _log(f"{name}: {row['params'] / 1e6:.3f}M params, trained {t_train:.0f}s, evaluated {t_eval:.0f}s: "
                 f"dice {mean['dice']:.3f} aji {mean['aji']:.3f} pq {mean['pq']:.3f}")

        if budget.typed_images > 0:
            typed = _typed_phase(runs, budget, out, seed, device)
            for r in rows:
                if r["name"] in typed:
                    r["typed"] = typed[r["name"]]

        # classical baseline
        t_b = time.perf_counter()
        mean, per = mean_metrics([(s.name, otsu_watershed(s.image), s.instances) for s in test_s])
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
    heads = {}
    for r in karyo:
        base = by.get(row_name(r["arch"], r.get("preset", "fast")))
        if r.get("instance_head") and base is not None:
            heads[r["name"]] = {"default": base["name"], **{
                f"{k}_{side}": row["metrics"][k] for k in ("aji", "pq") for side, row in (("head", r), ("default", base))}}
            heads[r["name"]]["improves_aji"] = bool(r["metrics"]["aji"] > base["metrics"]["aji"])
    if heads:
        out["instance_head_vs_default"] = heads
    if PEER in by and karyo:
        peer = by[PEER]["metrics"]
        for key in ("aji", "pq"):
            best = max(karyo, key=lambda r: r["metrics"][key])
            out[f"best_karyo_vs_monai_{key}"] = {
                "best_karyo": best["name"], "best_karyo_value": best["metrics"][key], "monai_value": peer[key],
                "beats_monai": bool(best["metrics"][key] > peer[key]),
            }
    if karyo and (PEER in by or BASELINE in by):
        # Issue 15's target: the best Karyo model >= 0.05 above both baselines on AJI and PQ, Dice >= 0.82.
        for key in ("aji", "pq"):
            best = max(karyo, key=lambda r: r["metrics"][key])
            others = {n: by[n]["metrics"][key] for n in (PEER, BASELINE) if n in by}
            margin = best["metrics"][key] - max(others.values())
            out[f"best_karyo_vs_baselines_{key}"] = {
                "best_karyo": best["name"], "best_karyo_value": best["metrics"][key], "baselines": others,
                "margin": margin, "target_met": bool(margin >= 0.05),
            }
        best_dice = max(karyo, key=lambda r: r["metrics"]["dice"])
        out["best_karyo_dice"] = {"best_karyo": best_dice["name"], "dice": best_dice["metrics"]["dice"],
                                  "target_met": bool(best_dice["metrics"]["dice"] >= 0.82)}
    return out


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
    p.add_argument("--preset", default="fast", choices=["fast", "paper", "both"],
                   help="fast: the budget's models (rows 'arch'); paper: each seed architecture's paper preset "
                        "(rows 'arch:paper'; at CPU budgets its recipe at the budget's sizes); both: all rows")
    p.add_argument("--instance-head", nargs="*", default=[], choices=["hv"],
                   help="also train every semantic Karyo architecture with this instance head (rows 'arch+hv') "
                        "and compare its AJI/PQ with the same network's default post-processing")
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
                           threads=args.threads, device=args.device, show_progress=not args.quiet,
                           presets=("fast", "paper") if args.preset == "both" else (args.preset,),
                           instance_heads=tuple(args.instance_head))
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    plot(result, out / "bench.png")
    result["wall_time_s"] = time.perf_counter() - t_main  # everything, this process's start-up included
    table = format_table(result)
    (out / "bench.json").write_text(json.dumps(json_safe(result), indent=2))
    (out / "bench.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
