"""Nucleus-level scores, effort-aware ranking, calibration, cold start, the adaptive switch and the
self-supervised encoder (issue 16). Tiles with planted uncertainty; tiny models; seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ml_worker.active_learning import (
    STRATEGIES,
    AdaptiveStrategy,
    analyze_tiles,
    apply_temperature,
    expected_fixes_heatmap,
    fit_temperature,
    fix_rate,
    instance_disagreement,
    kmeans,
    nucleus_scores,
    rank,
    typical_diverse,
)
from ml_worker.active_learning.nuclei import nucleus_fix_probabilities

torch.set_num_threads(1)

S = 48


def _disks(centres, r: float = 5.0, size: int = S) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return inst


def _probs(fg: np.ndarray) -> np.ndarray:
    fg = np.clip(fg, 0.0, 1.0).astype(np.float32)
    return np.stack([1.0 - fg, fg])


def _blur(fg: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(fg.astype(np.float64), sigma)


CENTRES = [(10, 10), (10, 34), (34, 10), (34, 34), (22, 22)]


def _planted():
    """(probs, instances, name) of tiles with known uncertainty."""
    inst = _disks(CENTRES)
    crisp = np.where(inst > 0, 0.98, 0.02)
    blurred = _blur(inst > 0, 2.0) * 0.9 + 0.05  # the same nuclei with doubtful outlines
    faint_one = np.full((S, S), 0.02)
    faint_one[(np.mgrid[:S, :S][0] - 24) ** 2 + (np.mgrid[:S, :S][1] - 24) ** 2 <= 25] = 0.4  # one half-seen blob
    empty = np.full((S, S), 0.02)
    noisy_bg = np.full((S, S), 0.3)  # a young model's hazy background, no nucleus drawn
    tiles = [("crisp", crisp, inst), ("blurred", blurred, inst), ("faint_one", faint_one, np.zeros_like(inst)),
             ("empty", empty, np.zeros_like(inst)), ("hazy_background", noisy_bg, np.zeros_like(inst))]
    return [(_probs(p), i, n) for n, p, i in tiles]


def test_a_crisp_nucleus_needs_no_fix_and_a_faint_false_positive_does():
    inst = _disks([(12, 12), (30, 30)])
    fg = np.where(inst > 0, 0.97, 0.01)
    fg[inst == 2] = 0.55  # a faint blob the model drew as a nucleus
    p = nucleus_fix_probabilities(fg, inst)
    assert p[1] < 0.1 < 0.4 < p[2]


def test_expected_fixes_count_doubtful_nuclei_not_background_pixels():
    scores = {n: nucleus_scores(p, i) for p, i, n in _planted()}
    fixes = {n: s["expected_fixes"] for n, s in scores.items()}
    assert fixes["empty"] == pytest.approx(0.0, abs=1e-6)
    assert fixes["crisp"] < 0.5
    assert fixes["blurred"] > 1.5  # five doubtful outlines
    assert 0.3 < fixes["faint_one"] < 0.5  # one blob seen with p = 0.4
    assert fixes["blurred"] > fixes["hazy_background"]
    assert fixes["blurred"] > 4 * fixes["crisp"]


def test_instance_flips_see_nuclei_that_vanish_split_merge_or_appear():
    inst = _disks([(10, 10), (10, 34), (34, 22)])
    same = inst.copy()
    split = inst.copy()
    split[(split == 3) & (np.mgrid[:S, :S][1] > 22)] = 4  # nucleus 3 cut in two
    vanished = np.where(inst == 2, 0, inst)
    appeared = inst.copy()
    appeared[40:46, 40:46] = 9
    flips, appear = instance_disagreement(inst, [same, split, vanished, appeared])
    assert flips == {1: 0.0, 2: 0.25, 3: 0.25}
    assert appear == pytest.approx(0.25)  # one new nucleus in one of four samples (split halves overlap nucleus 3)
    assert nucleus_scores(_probs(np.where(inst > 0, 0.98, 0.02)), inst, samples=[same])["instance_flips"] == 0.0


def test_fix_rate_does_not_steer_to_empty_tiles():
    planted = _planted()
    fixes = np.array([nucleus_scores(p, i)["expected_fixes"] for p, i, _ in planted])
    counts = np.array([len(np.unique(i)) - 1 for _, i, _ in planted], float)
    rate = fix_rate(fixes, counts)
    names = [n for _, _, n in planted]
    assert names[int(np.argmax(rate))] == "blurred"
    assert rate[names.index("empty")] == 0.0
    # the old cost weighting (uncertainty / count) preferred the nucleus-free hazy tile
    from ml_worker.active_learning import cost_weighted, uncertainty_scores

    ent = np.array([uncertainty_scores(p, i)["entropy"] for p, i, _ in planted])
    assert names[int(np.argmax(cost_weighted(ent, counts)))] == "hazy_background"


def test_the_fixes_strategy_orders_planted_tiles_by_fixes_per_minute():
    planted = _planted()
    scores = [nucleus_scores(p, i) for p, i, _ in planted]
    counts = np.array([len(np.unique(i)) - 1 for _, i, _ in planted], float)
    emb = np.eye(len(planted))
    order = rank("fixes", scores, embeddings=emb, costs=counts, k=2)
    names = [planted[j][2] for j in order]
    assert names[0] == "blurred" and names[-1] == "empty"
    with pytest.raises(ValueError, match="expected_fixes"):
        rank("fixes", [{"entropy": 0.1}] * 5, embeddings=emb, k=2)


def test_heat_map_is_hottest_on_the_doubtful_nucleus():
    inst = _disks([(12, 12), (34, 34)])
    fg = np.where(inst > 0, 0.98, 0.02)
    fg[inst == 2] = 0.6
    heat = expected_fixes_heatmap(_probs(fg), inst)
    assert heat.shape == (S, S) and heat.dtype == np.float32 and 0.0 <= heat.min() <= heat.max() <= 1.0
    assert heat[inst == 2].mean() > 3 * heat[inst == 1].mean()
    assert heat[0:4, 40:48].max() < 0.1  # background far from any nucleus stays cold


def test_temperature_fitted_on_held_out_pixels_recovers_the_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (4, 64, 64))
    true_p = 1 / (1 + np.exp(-z))  # labels drawn from the calibrated probabilities
    labels = (rng.random(z.shape) < true_p).astype(np.int64)
    over = 1 / (1 + np.exp(-2.5 * z))  # the model is 2.5x overconfident
    probs = [_probs(o) for o in over]
    t_soft = fit_temperature(probs, list(labels), kind="softmax")
    t_sig = fit_temperature([o[None] for o in over], list(labels), kind="sigmoid")
    assert t_soft == pytest.approx(2.5, rel=0.08) and t_sig == pytest.approx(2.5, rel=0.08)
    fixed = apply_temperature(probs[0], t_soft)
    np.testing.assert_allclose(fixed[1], true_p[0], atol=0.05)
    np.testing.assert_allclose(apply_temperature(probs[0], 1.0), probs[0], atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(probs[0], 0.0)
    with pytest.raises(ValueError, match="do not match"):
        fit_temperature(probs[:1], [labels[0][:10]])


# ----------------------------------------------------------------------------- cold start

def _three_clusters(rng, n=(30, 20, 10), d=6):
    centres = np.eye(d)[:3] * 5
    x = np.concatenate([c + rng.normal(0, 0.3, (k, d)) for c, k in zip(centres, n)])
    which = np.repeat(np.arange(3), n)
    return x, which


def test_kmeans_separates_well_separated_clusters():
    x, which = _three_clusters(np.random.default_rng(1))
    labels, centres = kmeans(x, 3, seed=0)
    assert centres.shape == (3, x.shape[1])
    for c in range(3):
        assert len(set(labels[which == c])) == 1
    assert len(set(labels)) == 3


def test_cold_start_picks_cover_every_cluster_with_typical_tiles():
    rng = np.random.default_rng(2)
    x, which = _three_clusters(rng)
    x = np.concatenate([x, np.eye(6)[3:4] * 5 + 3.0])  # one outlier
    which = np.append(which, -1)
    picks = typical_diverse(x, 3, seed=0)
    assert sorted(which[picks]) == [0, 1, 2]  # one per cluster, not the outlier
    for i in picks:  # typical: close to its cluster's centre
        members = x[which == which[i]]
        d = np.linalg.norm(members - members.mean(0), axis=1)
        assert np.linalg.norm(x[i] - members.mean(0)) <= np.percentile(d, 50)
    # a labelled tile covers its cluster: the batch goes to the other two
    labelled = x[which == 0][:1] + 0.01
    assert sorted(which[typical_diverse(x, 2, labelled_embeddings=labelled, seed=0)]) == [1, 2]
    order = rank("typical", [{}] * len(x), embeddings=x, k=3)
    assert sorted(order) == list(range(len(x))) and sorted(which[order[:3]]) == [0, 1, 2]


def test_adaptive_switches_from_typical_to_expected_fixes_as_labels_grow():
    rng = np.random.default_rng(3)
    x, which = _three_clusters(rng)
    # the most doubtful tiles all sit in the largest cluster (its 30 > the 4·k pre-selected)
    fixes = np.where(which == 0, 3.0 + rng.random(len(x)), 0.1 * rng.random(len(x)))
    scores = [{"expected_fixes": float(f)} for f in fixes]
    counts = np.full(len(x), 10.0)
    strat: AdaptiveStrategy = STRATEGIES["adaptive"]  # type: ignore[assignment]
    assert strat.uncertain_share(0) == 0.0 and strat.uncertain_share(strat.warm_from) == 1.0
    assert 0.0 < strat.uncertain_share((strat.cold_until + strat.warm_from) // 2) < 1.0

    def labelled(m):
        return x[which == 1][:1].repeat(m, axis=0) if m else None

    cold = rank("adaptive", scores, embeddings=x, costs=counts, k=3, labelled_embeddings=labelled(0))
    assert sorted(which[cold[:3]]) == [0, 1, 2]  # typical: one per cluster
    assert cold[:3] == rank("typical", scores, embeddings=x, k=3)[:3]
    warm = rank("adaptive", scores, embeddings=x, costs=counts, k=3, labelled_embeddings=labelled(strat.warm_from))
    assert list(which[warm[:3]]) == [0, 0, 0]  # all by expected fixes
    assert warm[:3] == rank("fixes", scores, embeddings=x, costs=counts, k=3)[:3]
    mid = rank("adaptive", scores, embeddings=x, costs=counts, k=4,
               labelled_embeddings=labelled((strat.cold_until + strat.warm_from) // 2))
    assert 1 <= int(np.sum(which[mid[:4]] == 0)) < 4 and sorted(mid) == list(range(len(x)))


# ----------------------------------------------------------------------------- tiny models

class _ContrastModel(nn.Module):
    """A fixed 1x1 'network': nucleus logit = 3 * (darkness - threshold); dark = nucleus, so
    faint (low-contrast) nuclei come out with probabilities near 0.7, crisp ones near 1."""

    out_channels = 2
    size_divisor = 1
    in_channels = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.0)
            self.conv.bias.fill_(0.0)
            self.conv.weight[0, :, 0, 0] = -1.0  # feature 0: darkness, 0 between faint and background
            self.conv.bias[0] = 2.5
            self.conv.weight[1, :, 0, 0] = 1.0
        self.drop = nn.Identity()

    def bottleneck(self, x):
        return self.conv(x)

    def forward(self, x):
        f = self.drop(self.conv(x))
        fg = 3.0 * f[:, 0:1]
        return torch.cat([-fg, fg], 1)

    def activation(self, logits):
        return torch.softmax(logits, 1)

    def to_instances(self, probs):
        from ml_worker.instances import semantic_to_instances

        return semantic_to_instances(probs[1], min_size=4)


def _tile(contrast: float, with_nuclei: bool = True) -> np.ndarray:
    img = np.full((S, S, 3), 200.0)
    if with_nuclei:
        img[_disks(CENTRES) > 0] = 200.0 - contrast
    return np.clip(img, 0, 255).astype(np.uint8)


def test_each_new_strategy_orders_tiles_planted_through_a_tiny_model():
    from ml_worker.data import Preprocessing

    tiles = [_tile(150), _tile(25), _tile(0, with_nuclei=False), _tile(150)]  # crisp, faint, empty, crisp
    prep = Preprocessing(None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fixed: no per-tile z-score
    model = _ContrastModel().eval()
    an = analyze_tiles(model, tiles, normalizer=prep, tile_size=S, overlap=0, device="cpu", tta=True)
    fixes = [a.scores["expected_fixes"] for a in an]
    assert fixes[1] > fixes[0] and fixes[1] > fixes[2]  # the faint nuclei are the ones to fix
    assert all(a.scores["instance_flips"] >= 0.0 for a in an)
    scores = [a.scores for a in an]
    emb = np.stack([a.embedding for a in an])
    costs = np.array([a.nucleus_count for a in an], float)
    assert rank("fixes", scores, embeddings=emb, costs=costs, k=1)[0] == 1
    warm = np.repeat(emb[:1], STRATEGIES["adaptive"].warm_from, axis=0)  # type: ignore[attr-defined]
    assert rank("adaptive", scores, embeddings=emb, costs=costs, k=1, labelled_embeddings=warm)[0] == 1
    # cold: the two identical crisp tiles are one kind of tissue; two picks cover two kinds
    cold = rank("typical", scores, embeddings=emb, k=2)
    assert not {cold[0], cold[1]} <= {0, 3}


# ----------------------------------------------------------------------------- self-supervised

def test_self_supervised_pretraining_writes_weights_a_training_run_starts_from(tmp_path):
    from ml_worker.checkpoint import load_checkpoint
    from ml_worker.data import Sample
    from ml_worker.ssl import SSLConfig, pretrain, ssl_embeddings
    from ml_worker.synth import generate
    from ml_worker.training import TrainConfig, train

    tiles = [generate("pap", 48, seed=i) for i in range(4)]
    cfg = SSLConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, steps=4, batch_size=4, crop=32, threads=1)
    info = pretrain([t[0] for t in tiles], tmp_path / "ssl.pt", cfg)
    assert np.isfinite(info["loss_first"]) and np.isfinite(info["loss_last"]) and info["steps"] == 4
    model, meta = load_checkpoint(info["path"])
    assert meta["arch"] == "unet" and meta["ssl"]["steps"] == 4 and meta.get("preprocess")
    emb = ssl_embeddings(info["path"], [t[0] for t in tiles], tile_size=48)
    assert emb.shape == (4, model.embed_dim) and np.isfinite(emb).all()
    run = train(TrainConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, epochs=1, batch_size=2,
                            tile_size=32, steps_per_epoch=1, val_fraction=0.0, device="cpu",
                            init_weights=info["path"], out_dir=str(tmp_path / "run")),
                [Sample(f"t{i}", im, inst) for i, (im, inst) in enumerate(tiles)], [])
    assert run.status == "completed"
    with pytest.raises(ValueError, match="at least one tile"):
        pretrain([], tmp_path / "x.pt", cfg)


def test_a_model_versions_temperature_is_fitted_on_held_out_tiles_and_tempers_only_the_scores():
    from ml_worker.active_learning.calibration import fit_model_temperature
    from ml_worker.data import Preprocessing, Sample

    prep = Preprocessing(None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = _ContrastModel().eval()
    inst = _disks(CENTRES)
    held_out = [Sample("a", _tile(150), inst), Sample("b", _tile(40), inst)]
    t = fit_model_temperature(model, held_out, normalizer=prep, tile_size=S, device="cpu")
    assert 0.05 < t < 20 and t != pytest.approx(1.0)
    assert fit_model_temperature(model, [], normalizer=prep) == 1.0
    plain, hot = (analyze_tiles(model, [_tile(25)], normalizer=prep, tile_size=S, overlap=0, device="cpu",
                                temperature=temp)[0] for temp in (None, 3.0))
    np.testing.assert_array_equal(plain.instances, hot.instances)  # the masks do not change
    assert hot.scores["entropy"] > plain.scores["entropy"]  # softer probabilities: more uncertain


def test_the_ssl_command_pretrains_on_a_folder_and_refuses_a_missing_one(tmp_path, capsys):
    import json

    from ml_worker.checkpoint import load_checkpoint
    from ml_worker.ssl import main
    from ml_worker.synth import write_dataset

    write_dataset(tmp_path / "d", 2, "pap", 64, seed=0)
    out = tmp_path / "ssl.pt"
    assert main(["--data", str(tmp_path / "d"), "--out", str(out), "--tile", "64", "--steps", "2", "--crop", "32",
                 "--width", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert load_checkpoint(out)[1]["ssl"]["tiles"] == 2
    assert main(["--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
