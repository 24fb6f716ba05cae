"""Tests for ml_worker.al_sim (smoke run on synthetic data) and the correction-effort
measure (ml_worker.active_learning.effort)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ml_worker.active_learning import aggregate_effort, correction_effort
from ml_worker.al_sim import SimConfig, cut_tiles, main, summarize
from ml_worker.data import Sample

# ----------------------------------------------------------------------------- effort


def _two_nuclei() -> np.ndarray:
    inst = np.zeros((20, 20), np.int32)
    inst[2:8, 2:8] = 1
    inst[10:18, 10:18] = 2
    return inst


def test_effort_perfect_prediction_is_zero():
    t = _two_nuclei()
    e = correction_effort(t, t)
    assert e["added_or_redrawn_share"] == 0.0 and e["deleted_share"] == 0.0
    assert e["n_true"] == 2 and e["n_pred"] == 2 and e["n_kept"] == 2
    assert e["mean_matched_iou"] == 1.0
    # ids do not matter
    assert correction_effort(np.where(t > 0, 3 - t, 0), t)["added_or_redrawn_share"] == 0.0


def test_effort_missing_nucleus_is_added():
    t = _two_nuclei()
    pred = np.where(t == 1, 1, 0)
    e = correction_effort(pred, t)
    assert e["added_or_redrawn_share"] == 0.5 and e["added_share"] == 0.5
    assert e["deleted_share"] == 0.0 and e["n_added"] == 1


def test_effort_extra_prediction_is_deleted():
    t = _two_nuclei()
    pred = t.copy()
    pred[0:2, 15:19] = 7  # false positive
    e = correction_effort(pred, t)
    assert e["added_or_redrawn_share"] == 0.0
    assert e["deleted_share"] == pytest.approx(1 / 3) and e["n_deleted"] == 1


def test_effort_low_iou_match_is_redrawn():
    t = np.zeros((20, 20), np.int32)
    t[0:10, 0:10] = 1  # 100 px
    pred = np.zeros_like(t)
    pred[0:10, 0:6] = 1  # 60 px inside: IoU 0.6
    e = correction_effort(pred, t)
    assert e["added_or_redrawn_share"] == 1.0 and e["redrawn_share"] == 1.0 and e["n_redrawn"] == 1
    assert e["deleted_share"] == 0.0 and e["mean_matched_iou"] == pytest.approx(0.6)
    assert correction_effort(pred, t, iou_threshold=0.5)["added_or_redrawn_share"] == 0.0


def test_effort_merged_prediction_and_empty_cases():
    t = _two_nuclei()
    merged = np.zeros_like(t)
    merged[2:18, 2:18] = 1  # one blob over both nuclei: IoU < 0.5 with each
    e = correction_effort(merged, t)
    assert e["n_added"] == 2 and e["n_deleted"] == 1
    empty = np.zeros_like(t)
    assert correction_effort(empty, empty)["added_or_redrawn_share"] == 0.0
    assert correction_effort(empty, t)["added_or_redrawn_share"] == 1.0
    assert correction_effort(t, empty)["deleted_share"] == 1.0
    agg = aggregate_effort([correction_effort(t, t), correction_effort(empty, t)])
    assert agg["added_or_redrawn_share"] == 0.5 and agg["n_true"] == 4 and agg["n_tiles"] == 2
    with pytest.raises(ValueError):
        correction_effort(t, t, iou_threshold=0.3)


# ----------------------------------------------------------------------------- simulation


def test_cut_tiles_disjoint_by_image():
    img = np.zeros((130, 70, 3), np.uint8)
    inst = np.arange(130 * 70, dtype=np.int32).reshape(130, 70)
    tiles = cut_tiles([Sample("a", img, inst), Sample("b", img[:40], inst[:40])], 64)
    assert [t.name for t in tiles] == ["a@0,0", "a@64,0", "b@0,0"]
    assert tiles[1].instances[0, 0] == inst[64, 0] and tiles[2].image.shape == (40, 64, 3)


def test_al_sim_smoke(tmp_path, capsys):
    from ml_worker.synth import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 3, "he", 128, seed=0)
    out = tmp_path / "out"
    rc = main([
        "--data", str(data), "--strategy", "hybrid,random", "--rounds", "2", "--batch", "2", "--init", "2",
        "--seeds", "1", "--tile", "64", "--patch", "64", "--held-out", "1", "--epoch-patches", "8",
        "--init-epochs", "1", "--width", "4", "--out", str(out),
    ])
    assert rc == 0
    assert (out / "al_sim.png").stat().st_size > 1000
    res = json.loads((out / "al_sim.json").read_text())
    assert res["dataset"]["pool_tiles"] == 8 and len(res["dataset"]["held_out"]) == 1
    summ = res["summary"]
    for name in ("hybrid", "random"):
        st = summ["strategies"][name]
        assert st["labelled"] == [2, 4, 6]
        for key in ("dice_mean", "aji_mean", "dice_std"):
            assert len(st[key]) == 3 and all(0.0 <= v <= 1.0 for v in st[key])
        assert len(st["effort_added_or_redrawn_share_mean"]) == 2
        assert all(0.0 <= v <= 1.0 for v in st["effort_added_or_redrawn_share_mean"] + st["effort_deleted_share_mean"])
        assert 0.0 <= st["auc_dice_mean"] <= 1.0
        run = res["runs"][name][0]
        assert len(run["selected"]) == 2 and all(len(b) == 2 for b in run["selected"])
        # no tile is labelled twice
        assert len({t for b in run["selected"] for t in b}) == 4
    assert 0.0 <= summ["full_dice_mean"] <= 1.0
    printed = capsys.readouterr().out
    assert "tiles->95%" in printed and "correction effort" in printed
    # the summary is a pure function of the raw runs
    assert summarize(res)["target_dice"] == pytest.approx(summ["target_dice"])


def test_al_sim_rejects_unknown_strategy(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--strategy", "hybrid,nope"]) == 2
    assert "known strategies" in capsys.readouterr().err
    with pytest.raises(ValueError):
        SimConfig(data="x", rounds=0).validate()


# ---------------------------------------------------------------------------------- issue 16 study

def _fake_results(own_aji, rnd_aji, x=(4, 8, 12, 16), full_aji=0.5):
    def runs(curves):
        return [{"labelled": list(x), "nuclei_labelled": list(x), "dice": c, "aji": c, "pq": c,
                 "effort": [{"added_or_redrawn_share": 0.5, "deleted_share": 0.1, "added_share": 0.2,
                             "redrawn_share": 0.3, "n_true": 10, "n_pred": 10}] * (len(x) - 1)} for c in curves]

    return {"full_data": [{"dice": full_aji, "aji": full_aji}] * len(own_aji),
            "runs": {"adaptive": runs(own_aji), "random": runs(rnd_aji)}}


def test_labels_to_reach_interpolates_and_says_when_never():
    from ml_worker.al_sim_report import labels_to_reach

    assert labels_to_reach([4, 8, 12], [0.2, 0.4, 0.6], 0.5) == pytest.approx(10.0)
    assert labels_to_reach([4, 8, 12], [0.6, 0.7, 0.8], 0.5) == 4.0
    assert labels_to_reach([4, 8, 12], [0.2, 0.3, 0.4], 0.5) is None


def test_the_summary_pairs_each_strategy_with_random_by_seed():
    rng = np.random.default_rng(0)
    # five seeds: the strategy reaches 0.45+ (90 % of 0.5) at 8 tiles, random only at 16
    own = [[0.3, 0.47, 0.49, 0.5 + 0.01 * rng.random()] for _ in range(5)]
    rnd = [[0.3, 0.35, 0.40, 0.46 + 0.01 * rng.random()] for _ in range(5)]
    s = summarize(_fake_results(own, rnd))["strategies"]
    vs = s["adaptive"]["aji_targets_vs_random"]["0.90"]
    own_l, rnd_l = s["adaptive"]["aji_labels_to"]["0.90"], s["random"]["aji_labels_to"]["0.90"]
    assert vs["ratio"] == pytest.approx(np.mean(own_l) / np.mean(rnd_l)) and np.mean(own_l) < 9
    assert vs["ratio_ci"][1] < 1.0 and vs["diff_ci"][1] < 0  # fewer labels, interval excluding parity
    assert s["adaptive"]["below_random_at"] == []
    assert len(s["adaptive"]["pq_ci"]) == 4 and s["adaptive"]["aji_ci"][0] == pytest.approx(0.0)
    # the other way round: below random beyond the seed spread, and never reaching 95 % -> censored
    s2 = summarize(_fake_results(rnd, own))["strategies"]
    assert s2["adaptive"]["below_random_at"] == [8, 12, 16]
    assert s2["adaptive"]["aji_targets_vs_random"]["0.95"]["censored_own"] == 5


def test_a_study_with_a_cold_start_and_a_pretrained_encoder_runs_on_a_generated_pap_set(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--data", "synth:pap:3:256", "--budget", "quick", "--strategy", "adaptive+ssl,random", "--rounds", "1",
               "--seeds", "1", "--held-out", "1", "--epoch-patches", "4", "--init-epochs", "1", "--width", "4",
               "--pool-limit", "8", "--ssl-steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "al_sim.json").read_text())
    assert res["config"]["tile"] == 128 and res["dataset"]["pool_tiles"] == 8
    assert res["ssl"] and res["ssl"][0]["steps"] == 2
    cold, rnd = res["runs"]["adaptive+ssl"][0], res["runs"]["random"][0]
    assert len(cold["init"]) == len(rnd["init"]) == 2 and len(cold["pq"]) == 2
    printed = capsys.readouterr().out
    assert "PQ on held-out images" in printed and "target 90 %" in printed
    assert main(["--data", "synth:nope", "--strategy", "random", "--out", str(out)]) == 2
