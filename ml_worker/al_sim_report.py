"""Active-learning simulation results: learning-curve areas, labels needed to reach a target,
the printed report and the plot (``python -m ml_worker.al_sim`` prints and writes these)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_FRACTION = 0.95


# ============================================================================ summary
def _auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) divided by the x range (the mean of y over the budget)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or x[-1] == x[0]:
        return float(y[0]) if y.size else float("nan")
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0 / (x[-1] - x[0]))


def _first_reaching(x: Sequence[float], y: Sequence[float], target: float) -> int | None:
    for xi, yi in zip(x, y):
        if yi >= target:
            return int(xi)
    return None


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Mean / std curves, AUCs, labels to reach 95 % of the full-data Dice and effort
    per round, per strategy, from the raw runs."""
    full_dice = np.array([f["dice"] for f in results["full_data"]], float)
    full_aji = np.array([f["aji"] for f in results["full_data"]], float)
    target = TARGET_FRACTION * float(full_dice.mean())
    out: dict[str, Any] = {
        "full_dice_mean": float(full_dice.mean()), "full_dice_std": float(full_dice.std()),
        "full_aji_mean": float(full_aji.mean()), "full_aji_std": float(full_aji.std()),
        "target_fraction": TARGET_FRACTION, "target_dice": target, "strategies": {},
    }
    for name, runs in results["runs"].items():
        n = min(len(r["dice"]) for r in runs)
        x = runs[0]["labelled"][:n]
        dice = np.array([r["dice"][:n] for r in runs], float)
        aji = np.array([r["aji"][:n] for r in runs], float)
        nuclei = np.array([r["nuclei_labelled"][:n] for r in runs], float)
        auc_d = np.array([_auc(x, d) for d in dice])
        auc_a = np.array([_auc(x, a) for a in aji])
        n_eff = min(len(r["effort"]) for r in runs)
        eff_keys = ("added_or_redrawn_share", "deleted_share", "added_share", "redrawn_share", "n_true", "n_pred")
        eff = {k: np.array([[r["effort"][i][k] for i in range(n_eff)] for r in runs], float) for k in eff_keys}
        per_seed_95 = [_first_reaching(x, d, TARGET_FRACTION * float(fd)) for d, fd in
                       zip(dice, full_dice if full_dice.size == dice.shape[0] else np.full(dice.shape[0], full_dice.mean()))]
        out["strategies"][name] = {
            "labelled": [int(v) for v in x],
            "dice_mean": dice.mean(0).tolist(), "dice_std": dice.std(0).tolist(),
            "aji_mean": aji.mean(0).tolist(), "aji_std": aji.std(0).tolist(),
            "nuclei_labelled_mean": nuclei.mean(0).tolist(),
            "auc_dice_mean": float(auc_d.mean()), "auc_dice_std": float(auc_d.std()),
            "auc_aji_mean": float(auc_a.mean()), "auc_aji_std": float(auc_a.std()),
            "labels_to_target": _first_reaching(x, dice.mean(0), target),
            "labels_to_target_per_seed": per_seed_95,
            "effort_rounds": list(range(1, n_eff + 1)),
            **{f"effort_{k}_mean": v.mean(0).tolist() for k, v in eff.items()},
            **{f"effort_{k}_std": v.std(0).tolist() for k, v in eff.items() if k.endswith("share")},
            "effort_added_or_redrawn_overall": float(eff["added_or_redrawn_share"].mean()) if n_eff else None,
            "effort_deleted_overall": float(eff["deleted_share"].mean()) if n_eff else None,
        }
    # the headline comparison: default strategy vs random
    if "random" in out["strategies"]:
        rnd = out["strategies"]["random"]
        max_x = rnd["labelled"][-1]
        for name, s in out["strategies"].items():
            if name == "random":
                continue
            a, b = s["labels_to_target"], rnd["labels_to_target"]
            if a is not None and b is not None:
                s["vs_random"] = {"ratio": a / b, "text": f"{a}/{b} = {a / b:.2f} of random's labels"}
            elif a is not None:
                s["vs_random"] = {"ratio_upper_bound": a / max_x,
                                  "text": f"random not reached within {max_x}: ratio < {a / max_x:.2f}"}
            else:
                s["vs_random"] = {"text": "not reached" if b is not None else "neither reached the target"}
    return out


def _pm(m: float, s: float, nd: int = 3) -> str:
    return f"{m:.{nd}f}±{s:.{nd}f}"


def format_report(results: dict[str, Any]) -> str:
    """The printed table."""
    s = results["summary"]
    cfg, ds = results["config"], results["dataset"]
    lines = [
        f"AL simulation — {Path(cfg['data']).name}: {ds['pool_tiles']} pool tiles of {ds['tile']}px "
        f"({ds['pool_nuclei']} nuclei) from {len(ds['pool_images'])} images; held out: {', '.join(ds['held_out'])}",
        f"model {cfg['arch']} width {cfg['width']}; seed set {cfg['init'] or cfg['batch']}, {cfg['rounds']} rounds of "
        f"{cfg['batch']}; {cfg['seeds']} seed(s) (mean ± std); train {cfg['init_epochs']}+{cfg['epochs_per_round']}/round "
        f"epochs of {cfg['epoch_patches']} patches {cfg['patch']}px, warm start",
        f"full data (all {ds['pool_tiles']} tiles, {cfg['init_epochs'] + cfg['rounds'] * cfg['epochs_per_round']} "
        f"epochs): Dice {_pm(s['full_dice_mean'], s['full_dice_std'])}, AJI {_pm(s['full_aji_mean'], s['full_aji_std'])}"
        f"; target 95% Dice = {s['target_dice']:.3f}",
    ]
    names = list(s["strategies"])
    w = max(10, *(len(n) for n in names)) + 1
    for metric in ("dice", "aji"):
        xs = s["strategies"][names[0]]["labelled"]
        lines.append("")
        lines.append(f"{metric.upper()} on held-out images vs labelled tiles")
        lines.append("labelled".ljust(w) + "".join(f"{x:>14d}" for x in xs))
        for n in names:
            st = s["strategies"][n]
            lines.append(n.ljust(w) + "".join(f"{_pm(m, d):>14s}" for m, d in zip(st[f"{metric}_mean"], st[f"{metric}_std"])))
    lines.append("")
    lines.append("strategy".ljust(w) + f"{'AUC Dice':>14s}{'AUC AJI':>14s}{'tiles->95%':>12s}{'nuclei lab.':>12s}  vs random")
    for n in names:
        st = s["strategies"][n]
        reach = st["labels_to_target"]
        reach_s = str(reach) if reach is not None else "not reached"
        vs = st.get("vs_random", {}).get("text", "")
        lines.append(n.ljust(w) + f"{_pm(st['auc_dice_mean'], st['auc_dice_std']):>14s}"
                     f"{_pm(st['auc_aji_mean'], st['auc_aji_std']):>14s}{reach_s:>12s}"
                     f"{st['nuclei_labelled_mean'][-1]:>12.0f}  {vs}")
    lines.append("")
    lines.append("correction effort on each round's batch, predictions before labelling "
                 "(added-or-redrawn share of true nuclei / deleted share of predicted nuclei)")
    rounds = s["strategies"][names[0]]["effort_rounds"]
    lines.append("round".ljust(w) + "".join(f"{r:>14d}" for r in rounds) + f"{'mean':>14s}")
    for n in names:
        st = s["strategies"][n]
        cells = [f"{a:.2f}/{d:.2f}" for a, d in zip(st["effort_added_or_redrawn_share_mean"],
                                                    st["effort_deleted_share_mean"])]
        mean = (f"{st['effort_added_or_redrawn_overall']:.2f}/{st['effort_deleted_overall']:.2f}"
                if st["effort_added_or_redrawn_overall"] is not None else "-")
        lines.append(n.ljust(w) + "".join(f"{c:>14s}" for c in cells) + f"{mean:>14s}")
    t = results["timing_s"]
    lines.append("")
    lines.append(f"time: total {t['total']:.0f}s (training {t['train']:.0f}s, evaluation {t['evaluate']:.0f}s)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> None:
    """Learning curves (Dice, AJI; mean ± std bands) and effort per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, (name, st) in enumerate(s["strategies"].items()):
        c = colors[ci % len(colors)]
        x = np.array(st["labelled"])
        for ax, metric in ((axes[0], "dice"), (axes[1], "aji")):
            m, d = np.array(st[f"{metric}_mean"]), np.array(st[f"{metric}_std"])
            ax.plot(x, m, "-o", color=c, label=name, ms=4)
            ax.fill_between(x, m - d, m + d, color=c, alpha=0.18)
        r = np.array(st["effort_rounds"])
        if r.size:
            axes[2].plot(r, st["effort_added_or_redrawn_share_mean"], "-o", color=c, ms=4,
                         label=f"{name}: added/redrawn")
            axes[2].plot(r, st["effort_deleted_share_mean"], "--s", color=c, ms=4, label=f"{name}: deleted")
    axes[0].axhline(s["full_dice_mean"], color="k", lw=1, label="full data")
    axes[0].axhline(s["target_dice"], color="k", lw=1, ls=":", label="95% of full")
    axes[1].axhline(s["full_aji_mean"], color="k", lw=1, label="full data")
    axes[0].set(title="Dice (held-out images)", xlabel="labelled tiles", ylabel="Dice")
    axes[1].set(title="AJI (held-out images)", xlabel="labelled tiles", ylabel="AJI")
    axes[2].set(title="Correction effort on the batch just labelled", xlabel="round", ylabel="share",
                ylim=(0, 1.02))
    for ax, ref in ((axes[0], s["full_dice_mean"]), (axes[1], s["full_aji_mean"])):
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, ref + 0.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(f"AL simulation: {Path(cfg['data']).name}, {cfg['arch']} w{cfg['width']}, "
                 f"{cfg['seeds']} seed(s), batch {cfg['batch']}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
