"""Benchmark output: the printed table, the plot and JSON-safe results."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

METRIC_KEYS = ("dice", "aji", "pq", "dsb_map")


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
    typed = any("typed" in r for r in result["rows"])
    hdr = (f"{'model':<22} {'params':>9} {'GFLOPs':>8} {f'tiles/s@{s1} b{b1}':>15} {f'tiles/s@{s2} b{b2}':>15} "
           f"{'Dice':>6} {'AJI':>6} {'PQ':>6} {'mAP':>6} {'train s':>8}" + (f" {'mPQ':>6} {'bPQ':>6}" if typed else ""))
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
            + (f" {_fmt((r.get('typed') or {}).get('mpq'), '.3f'):>6} "
               f"{_fmt((r.get('typed') or {}).get('bpq'), '.3f'):>6}" if typed else "")
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
    for key in ("aji", "pq"):
        k = f"best_karyo_vs_baselines_{key}"
        if k in c:
            x = c[k]
            others = ", ".join(f"{n} {v:.3f}" for n, v in x["baselines"].items())
            lines.append(f"{key.upper()} target: best Karyo {x['best_karyo']} {x['best_karyo_value']:.3f} vs {others}: "
                         f"margin {x['margin']:+.3f} (target >= +0.05): {'MET' if x['target_met'] else 'NOT MET'}")
    if "best_karyo_dice" in c:
        x = c["best_karyo_dice"]
        lines.append(f"Dice target: best Karyo {x['best_karyo']} {x['dice']:.3f} (target >= 0.82): "
                     f"{'MET' if x['target_met'] else 'NOT MET'}")
    for name, x in (c.get("instance_head_vs_default") or {}).items():
        lines.append(f"instance head: {name} AJI {x['aji_head']:.3f} / PQ {x['pq_head']:.3f} vs {x['default']} (default "
                     f"post-processing) AJI {x['aji_default']:.3f} / PQ {x['pq_default']:.3f} (target: better AJI): "
                     f"{'MET' if x['improves_aji'] else 'NOT MET'}")
    if typed:
        scored = [r for r in result["rows"] if (r.get("typed") or {}).get("mpq") is not None]
        if scored:
            best = max(scored, key=lambda r: r["typed"]["mpq"])
            lines.append(f"typed set (mPQ/bPQ columns: the same models trained on the generated typed images): best "
                         f"mPQ {best['name']} {best['typed']['mpq']:.3f} (target >= 0.5): "
                         f"{'MET' if best['typed']['mpq'] >= 0.5 else 'NOT MET'}")
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


def json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        return json_safe(o.item())
    return o
