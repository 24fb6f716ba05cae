"""Active-learning simulation results: learning-curve areas, labels needed to reach a target,
the printed report and the plot (``python -m ml_worker.al_sim`` prints and writes these)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_FRACTION = 0.95
#: fractions of the full-data AJI whose label cost is compared with random (paired bootstrap)
AJI_TARGETS = (0.90, 0.95)
BOOTSTRAP = 4000


def ci95(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Half-width of the 95 % confidence interval of the mean (Student t; 0 for one value)."""
    from scipy import stats

    v = np.asarray(values, float)
    n = v.shape[axis]
    if n < 2:
        return np.zeros(np.delete(v.shape, axis)) if v.ndim > 1 else np.asarray(0.0)
    return stats.t.ppf(0.975, n - 1) * v.std(axis=axis, ddof=1) / np.sqrt(n)


def labels_to_reach(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """Labelled tiles where the curve first reaches ``target``, linearly interpolated between
    the measured points (None: never reached)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    for i in range(len(x)):
        if y[i] >= target:
            if i == 0 or y[i] == y[i - 1]:
                return float(x[i])
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return None


def paired_label_bootstrap(own: Sequence[float | None], ref: Sequence[float | None], censor_at: float,
                           seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over seeds of the label cost ratio mean(own) / mean(ref) and of the
    mean difference. A seed that never reached the target counts ``censor_at`` (the budget
    plus one batch: a lower bound of its true cost), and is reported as censored."""
    a = np.array([censor_at if v is None else v for v in own], float)
    b = np.array([censor_at if v is None else v for v in ref], float)
    if a.size == 0 or a.size != b.size:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (BOOTSTRAP, a.size))
    ra, rb = a[idx].mean(1), b[idx].mean(1)
    ratio = ra / np.where(rb > 0, rb, np.nan)
    diff = ra - rb
    return {
        "ratio": float(a.mean() / b.mean()) if b.mean() > 0 else None,
        "ratio_ci": [float(np.nanpercentile(ratio, 2.5)), float(np.nanpercentile(ratio, 97.5))],
        "diff": float(a.mean() - b.mean()),
        "diff_ci": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
        "censored_own": int(sum(v is None for v in own)), "censored_ref": int(sum(v is None for v in ref)),
        "mean_own": float(a.mean()), "mean_ref": float(b.mean()),
    }


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
        pq = np.array([r.get("pq", [float("nan")] * n)[:n] for r in runs], float)
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
            "pq_mean": pq.mean(0).tolist(), "pq_std": pq.std(0).tolist(),
            "dice_ci": np.atleast_1d(ci95(dice)).tolist(), "aji_ci": np.atleast_1d(ci95(aji)).tolist(),
            "pq_ci": np.atleast_1d(ci95(pq)).tolist(),
            "aji_labels_to": {
                f"{f:.2f}": [labels_to_reach(x, a, f * float(fa)) for a, fa in zip(aji, _per_seed(full_aji, aji))]
                for f in AJI_TARGETS
            },
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
    # label cost to reach 90 / 95 % of the full-data AJI, and AJI at every budget, paired with random
    if "random" in out["strategies"]:
        rnd = out["strategies"]["random"]
        rnd_aji = np.array([r["aji"] for r in results["runs"]["random"]], float)
        for name, st in out["strategies"].items():
            x = st["labelled"]
            step = (x[-1] - x[-2]) if len(x) > 1 else 1
            st["aji_targets_vs_random"] = {
                f: paired_label_bootstrap(st["aji_labels_to"][f], rnd["aji_labels_to"][f], x[-1] + step)
                for f in st["aji_labels_to"]
            } if name != "random" else {}
            own = np.array([r["aji"] for r in results["runs"][name]], float)
            m = min(own.shape[1], rnd_aji.shape[1])
            if own.shape[0] == rnd_aji.shape[0] and name != "random":
                d = own[:, :m] - rnd_aji[:, :m]
                st["aji_diff_vs_random_mean"] = d.mean(0).tolist()
                st["aji_diff_vs_random_ci"] = np.atleast_1d(ci95(d)).tolist()
                # below random beyond the seed spread: the whole 95 % interval of the paired difference < 0
                st["below_random_at"] = [int(x[i]) for i in range(m)
                                         if d.shape[0] > 1 and d.mean(0)[i] + st["aji_diff_vs_random_ci"][i] < 0]
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


def _per_seed(full: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """The full-data reference of each seed (the mean when the counts differ)."""
    return full if full.size == curves.shape[0] else np.full(curves.shape[0], full.mean())


def _pm(m: float, s: float, nd: int = 3) -> str:
    return f"{m:.{nd}f}±{s:.{nd}f}"


def _mean_labels(v: Sequence[float | None]) -> str:
    got = [x for x in v if x is not None]
    cens = len(v) - len(got)
    mean = f"{np.mean(got):.1f}" if got else "-"
    return f"{mean:>6s} tiles over {len(got)} seed(s)" + (f", cens. {cens}" if cens else "")


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
    for metric in ("dice", "aji", "pq"):
        xs = s["strategies"][names[0]]["labelled"]
        lines.append("")
        lines.append(f"{metric.upper()} on held-out images vs labelled tiles (mean ± 95 % CI half-width over seeds)")
        lines.append("labelled".ljust(w) + "".join(f"{x:>14d}" for x in xs))
        for n in names:
            st = s["strategies"][n]
            ci = st.get(f"{metric}_ci", st.get(f"{metric}_std"))
            if f"{metric}_mean" not in st:
                continue
            lines.append(n.ljust(w) + "".join(f"{_pm(m, d):>14s}" for m, d in zip(st[f"{metric}_mean"], ci)))
    if "random" in s["strategies"] and any("aji_targets_vs_random" in st for st in s["strategies"].values()):
        lines.append("")
        lines.append(f"labelled tiles to reach 90 % / 95 % of each seed's full-data AJI (mean over seeds; a seed that "
                     f"never reached it counts budget + 1 batch, 'cens.' = such seeds); ratio to random with paired "
                     f"bootstrap 95 % interval ({BOOTSTRAP} resamples)")
        for f in (f"{t:.2f}" for t in AJI_TARGETS):
            lines.append(f"  target {float(f) * 100:.0f} %:")
            rnd = s["strategies"]["random"]["aji_labels_to"][f]
            lines.append("    " + "random".ljust(w) + f"{_mean_labels(rnd)}")
            for n in names:
                vs = s["strategies"][n].get("aji_targets_vs_random", {}).get(f)
                if not vs:
                    continue
                lines.append("    " + n.ljust(w) + f"{_mean_labels(s['strategies'][n]['aji_labels_to'][f])}  ratio "
                             f"{vs['ratio']:.2f} [{vs['ratio_ci'][0]:.2f}, {vs['ratio_ci'][1]:.2f}], difference "
                             f"{vs['diff']:+.1f} [{vs['diff_ci'][0]:+.1f}, {vs['diff_ci'][1]:+.1f}] tiles")
        lines.append("")
        lines.append("AJI minus random's, paired by seed (mean ± 95 % CI); budgets where the strategy is below random "
                     "beyond the seed spread")
        for n in names:
            st = s["strategies"][n]
            if "aji_diff_vs_random_mean" not in st:
                continue
            cells = "".join(f"{_pm(m, d):>14s}" for m, d in zip(st["aji_diff_vs_random_mean"],
                                                                 st["aji_diff_vs_random_ci"]))
            below = ", ".join(map(str, st["below_random_at"])) or "none"
            lines.append(n.ljust(w) + cells + f"   below at: {below}")
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
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, (name, st) in enumerate(s["strategies"].items()):
        c = colors[ci % len(colors)]
        x = np.array(st["labelled"])
        for ax, metric in ((axes[0], "dice"), (axes[1], "aji"), (axes[2], "pq")):
            if f"{metric}_mean" not in st:
                continue
            m, d = np.array(st[f"{metric}_mean"]), np.array(st.get(f"{metric}_ci", st[f"{metric}_std"]))
            ax.plot(x, m, "-o", color=c, label=name, ms=4)
            ax.fill_between(x, m - d, m + d, color=c, alpha=0.18)
        r = np.array(st["effort_rounds"])
        if r.size:
            axes[3].plot(r, st["effort_added_or_redrawn_share_mean"], "-o", color=c, ms=4,
                         label=f"{name}: added/redrawn")
            axes[3].plot(r, st["effort_deleted_share_mean"], "--s", color=c, ms=4, label=f"{name}: deleted")
    axes[0].axhline(s["full_dice_mean"], color="k", lw=1, label="full data")
    axes[0].axhline(s["target_dice"], color="k", lw=1, ls=":", label="95% of full")
    axes[1].axhline(s["full_aji_mean"], color="k", lw=1, label="full data")
    axes[0].set(title="Dice (held-out images, 95 % CI)", xlabel="labelled tiles", ylabel="Dice")
    axes[1].set(title="AJI (held-out images, 95 % CI)", xlabel="labelled tiles", ylabel="AJI")
    axes[2].set(title="PQ (held-out images, 95 % CI)", xlabel="labelled tiles", ylabel="PQ")
    axes[3].set(title="Correction effort on the batch just labelled", xlabel="round", ylabel="share",
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


def markdown_summary(results: dict[str, Any]) -> str:
    """The study's headline table in Markdown (for docs/): AJI / PQ / Dice at the first and last
    budget with 95 % CIs, labels to 90 / 95 % of the full-data AJI with the paired ratio to
    random, the budgets where a strategy is below random beyond the seed spread, and effort."""
    s = results["summary"]
    rows = ["| strategy | AJI first → last (95 % CI) | PQ last | Dice last | tiles → 90 % AJI (ratio to random, 95 % CI) "
            "| tiles → 95 % AJI (ratio, 95 % CI) | below random at | added-or-redrawn / deleted |",
            "|---|---|---|---|---|---|---|---|"]
    for name, st in s["strategies"].items():
        cells = [name, f"{st['aji_mean'][0]:.3f} → {st['aji_mean'][-1]:.3f} ± {st['aji_ci'][-1]:.3f}",
                 f"{st['pq_mean'][-1]:.3f} ± {st['pq_ci'][-1]:.3f}", f"{st['dice_mean'][-1]:.3f} ± {st['dice_ci'][-1]:.3f}"]
        for f in (f"{t:.2f}" for t in AJI_TARGETS):
            own = st["aji_labels_to"][f]
            got = [v for v in own if v is not None]
            txt = (f"{np.mean(got):.1f}" if got else "–") + (f" ({len(own) - len(got)} of {len(own)} seeds never)"
                                                            if len(got) < len(own) else "")
            vs = st.get("aji_targets_vs_random", {}).get(f)
            if vs and vs.get("ratio") is not None:
                txt += f"; {vs['ratio']:.2f} [{vs['ratio_ci'][0]:.2f}, {vs['ratio_ci'][1]:.2f}]"
            cells.append(txt)
        below = st.get("below_random_at")
        cells.append("–" if below is None else (", ".join(map(str, below)) or "never"))
        eff = st.get("effort_added_or_redrawn_overall")
        cells.append(f"{eff:.2f} / {st['effort_deleted_overall']:.2f}" if eff is not None else "–")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
