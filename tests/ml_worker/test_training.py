"""Tests for ml_worker.training: config round trip, the loop, checkpoints, resume,
cancellation, PGU-net+ progressive growing, U-Net# two-phase fine-tuning.

Tiny models on 64x64 patches of a few synthetic 96x96 images, one torch thread: the whole
file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ml_worker.checkpoint import load_checkpoint
from ml_worker.data import DataError, Sample, load_folder, split_by_image
from ml_worker.synth import write_dataset
from ml_worker.training import (
    TrainConfig,
    load_for_inference,
    stage_sizes,
    train,
    train_from_folder,
)

torch.set_num_threads(1)

TINY_UNET = {"width": 4, "depth": 2}
METRIC_KEYS = {"dice", "precision", "recall", "iou", "miou", "pixel_accuracy", "dsb_map", "object_f1", "aji",
               "dq", "sq", "pq", "n_pred", "n_true"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_dataset(d, 4, kind="he", size=96, seed=0)
    return d


@pytest.fixture(scope="module")
def split(data_dir: Path) -> tuple[list[Sample], list[Sample]]:
    return split_by_image(load_folder(data_dir), 0.25, seed=0)


def tiny_config(out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "arch": "unet", "model_kwargs": dict(TINY_UNET), "epochs": 2, "batch_size": 2, "tile_size": 64,
        "steps_per_epoch": 4, "lr": 1e-3, "augment": "light", "out_dir": str(out), "num_threads": 1,
    }
    base.update(kw)
    return TrainConfig(**base)


# ============================================================================ config
def test_config_round_trip_through_json() -> None:
    cfg = TrainConfig(arch="hspnet", model_kwargs={"layers": (1, 1, 1, 1), "base_channels": 8}, epochs=3,
                      optimizer="sgd", loss="dice", stain_norm="macenko", augment={"preset": "light", "noise_p": 0.1},
                      early_stopping_patience=None, resume="runs/x/last.pt")
    d = cfg.to_dict()
    again = TrainConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert again.model_kwargs["layers"] == [1, 1, 1, 1]  # tuples become lists (JSON)
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.parametrize(
    "bad",
    [{"arch": "nope"}, {"epochs": 0}, {"optimizer": "lbfgs"}, {"stain_norm": "vahadane"}, {"val_fraction": 1.0},
     {"loss": "nope"}, {"augment": "extreme"}, {"batch_size": 0}],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"arch": "unet", "colour": "blue"})


# ============================================================================ the loop
def test_train_writes_checkpoints_metrics_and_progress(tmp_path: Path, split) -> None:
    train_s, val_s = split
    events: list[dict[str, Any]] = []
    cfg = tiny_config(tmp_path / "run", stain_norm="reinhard")
    result = train(cfg, train_s, val_s, progress=events.append)

    assert result.status == "completed" and result.epochs_completed == 2
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert result.best_epoch in (1, 2) and result.best_score == result.history[result.best_epoch - 1]["val"]["dice"]

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["epochs"] == 2 for e in epochs)
    assert all(np.isfinite(e["train_loss"]) for e in epochs)
    assert METRIC_KEYS <= set(epochs[0]["val"])
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 2 * 2  # 4 patches / batch 2, per epoch
    prog = [e["progress"] for e in events if e["event"] in ("step", "epoch")]
    assert prog == sorted(prog) and prog[-1] == pytest.approx(1.0) and 0 < prog[0] <= 1

    model, meta = load_checkpoint(tmp_path / "run" / "last.pt")
    assert meta["arch"] == "unet" and meta["init_kwargs"]["width"] == 4
    assert TrainConfig.from_dict(meta["config"]) == cfg
    assert len(meta["history"]) == 2 and METRIC_KEYS <= set(meta["history"][-1]["val"])
    assert meta["stain"]["name"] == "reinhard"
    assert meta["train_state"]["epoch"] == 2 and "optimizer" in meta["train_state"]

    model, normalizer, best_meta = load_for_inference(tmp_path / "run" / "best.pt")
    assert normalizer is not None and normalizer.name == "reinhard" and normalizer.fitted
    assert best_meta["epoch"] == result.best_epoch and METRIC_KEYS <= set(best_meta["metrics"])
    assert "train_state" not in best_meta  # best.pt is for inference: no optimizer state
    assert not model.training


def test_train_without_validation_keeps_last_epoch_as_best(tmp_path: Path, split) -> None:
    train_s, _ = split
    # Grayscale input is accepted (replicated to 3 channels).
    gray = [Sample(s.name, s.image[..., 0].copy(), s.instances) for s in train_s]
    result = train(tiny_config(tmp_path / "run", epochs=1, early_stopping_patience=1), gray, [])
    assert result.status == "completed" and result.best_epoch == 1 and result.best_score is None
    assert result.history[0]["val"] == {}
    assert Path(result.best_path).is_file()


def test_train_rejects_empty_training_set(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        train(tiny_config(tmp_path / "run"), [], [])


def test_tile_size_must_fit_the_model_stride(tmp_path: Path, split) -> None:
    with pytest.raises(ValueError, match="multiple"):
        train(tiny_config(tmp_path / "run", tile_size=66), split[0], [])


def test_early_stopping_on_val_dice(tmp_path: Path, split, monkeypatch: pytest.MonkeyPatch) -> None:
    import ml_worker.training as training

    train_s, val_s = split
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # best at epoch 2, then 2 epochs without gain

    def fake_eval(*args: Any, **kwargs: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        return {"dice": next(scores), "aji": 0.0, "pq": 0.0, "dsb_map": 0.0}, []

    monkeypatch.setattr(training, "evaluate_samples", fake_eval)
    result = train(tiny_config(tmp_path / "run", epochs=6, early_stopping_patience=2), train_s, val_s)
    assert result.status == "early_stopped"
    assert result.epochs_completed == 4 and result.best_epoch == 2 and result.best_score == 0.7
    _, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["epoch"] == 2
    # Resuming an early-stopped run does nothing more.
    again = train(tiny_config(tmp_path / "run", epochs=6, early_stopping_patience=2,
                              resume=str(tmp_path / "run" / "last.pt")), train_s, val_s)
    assert again.status == "early_stopped" and again.epochs_completed == 4


# ============================================================================ resume / cancel
def test_resume_continues_at_the_next_epoch_with_identical_results(tmp_path: Path, split) -> None:
    train_s, val_s = split
    full = train(tiny_config(tmp_path / "full", epochs=3), train_s, val_s)

    first = train(tiny_config(tmp_path / "part", epochs=1), train_s, val_s)
    assert first.epochs_completed == 1
    events: list[dict[str, Any]] = []
    resumed = train(tiny_config(tmp_path / "part", epochs=3, resume=str(tmp_path / "part" / "last.pt")),
                    train_s, val_s, progress=events.append)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2, 3]
    assert resumed.epochs_completed == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["val"]["dice"] == pytest.approx(b["val"]["dice"], abs=1e-6)
    m_full, _ = load_checkpoint(tmp_path / "full" / "last.pt")
    m_res, _ = load_checkpoint(tmp_path / "part" / "last.pt")
    for (k, v1), v2 in zip(m_full.state_dict().items(), m_res.state_dict().values(), strict=True):
        assert torch.allclose(v1.float(), v2.float(), atol=1e-5), k
    assert full.best_epoch == resumed.best_epoch


def test_resume_into_a_new_folder_and_arch_mismatch(tmp_path: Path, split) -> None:
    train_s, val_s = split
    train(tiny_config(tmp_path / "a", epochs=1), train_s, val_s)
    res = train(tiny_config(tmp_path / "b", epochs=2, resume=str(tmp_path / "a" / "last.pt")), train_s, val_s)
    assert res.epochs_completed == 2 and (tmp_path / "b" / "best.pt").is_file()
    with pytest.raises(ValueError, match="resume"):
        train(tiny_config(tmp_path / "c", arch="dssnet", model_kwargs={}, resume=str(tmp_path / "a" / "last.pt")),
              train_s, val_s)


def test_should_stop_cancels_cleanly_between_steps(tmp_path: Path, split) -> None:
    train_s, val_s = split
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # epoch 1: 2 steps + the check before validation; stop in epoch 2

    events: list[dict[str, Any]] = []
    cfg = tiny_config(tmp_path / "run", epochs=5)
    result = train(cfg, train_s, val_s, progress=events.append, should_stop=should_stop)
    assert result.status == "cancelled" and result.epochs_completed == 1
    assert events[-1] == {**events[-1], "event": "end", "status": "cancelled"}
    _, meta = load_checkpoint(tmp_path / "run" / "last.pt")
    assert meta["train_state"]["epoch"] == 1  # the interrupted epoch is not saved
    # ... and the run resumes from there.
    res = train(cfg.replace(epochs=2, resume=str(tmp_path / "run" / "last.pt")), train_s, val_s)
    assert res.status == "completed" and res.epochs_completed == 2


def test_cancel_before_the_first_step_writes_nothing(tmp_path: Path, split) -> None:
    result = train(tiny_config(tmp_path / "run"), split[0], split[1], should_stop=lambda: True)
    assert result.status == "cancelled" and result.epochs_completed == 0
    assert result.best_path is None and result.last_path is None


# ============================================================================ PGU-net+
def test_stage_sizes_are_capped_by_the_tile_size() -> None:
    size = lambda s: 32 * 2 ** (s - 1)  # noqa: E731
    assert stage_sizes(4, size, 256) == [32, 64, 128, 256]
    assert stage_sizes(4, size, 128) == [32, 64, 128, 128]
    assert stage_sizes(2, size, 64) == [32, 64]


def test_pgunet_progressive_growing_visits_32_then_64_and_carries_weights(tmp_path: Path, split) -> None:
    train_s, val_s = split
    snapshot = tmp_path / "after_stage1.pt"

    def progress(ev: dict[str, Any]) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == 1:
            shutil.copyfile(tmp_path / "run" / "last.pt", snapshot)

    cfg = tiny_config(tmp_path / "run", arch="pgunet_plus", model_kwargs={"width": 4, "num_stages": 2},
                      epochs_per_stage=1)
    result = train(cfg, train_s, val_s, progress=progress)
    assert result.status == "completed"
    assert [h["input_size"] for h in result.history] == [32, 64]
    assert [h["stage"] for h in result.history] == [1, 2]
    # RMSprop; stage 1 trains only new layers at 1e-4, stage 2 new 1e-4 / carried 1e-6.
    assert result.history[0]["lr"] == [1e-4] and result.history[1]["lr"] == [1e-4, 1e-6]
    assert result.best_epoch == 2  # best.pt = the full model, only at the last stage

    m1, meta1 = load_checkpoint(snapshot)
    m2, meta2 = load_checkpoint(tmp_path / "run" / "last.pt")
    assert meta1["stage"] == 1 and meta2["stage"] == 2
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    new, old = m2.stage_parameters(2)
    new_names = {n for n, p in m2.named_parameters() if any(p is q for q in new)}
    old_names = {n for n, p in m2.named_parameters() if any(p is q for q in old)}
    assert new_names and old_names
    # Carried layers: kept from stage 1, barely moved at lr 1e-6 (not re-initialised).
    for n in old_names:
        assert torch.allclose(p1[n], p2[n], atol=1e-4), n
    # The added level trained at lr 1e-4: it moved.
    assert max(float((p1[n] - p2[n]).detach().abs().max()) for n in new_names) > 1e-5
    # The stage-1 model was saved as is (stage 1 trained the core); inference loads the full model.
    model, _, _ = load_for_inference(tmp_path / "run" / "best.pt")
    assert model.stage == model.num_stages == 2


# ============================================================================ two-phase (U-Net#)
UNET_SHARP_TINY = {"base_channels": 8, "layers": [1, 1, 1, 1], "cardinality": 2, "width_per_group": 2,
                   "stem_channels": 4, "branch_channels": 4, "decoder_channels": 8, "aspp_channels": 8}


def test_two_phase_freezes_the_encoder_then_batchnorm(tmp_path: Path, split) -> None:
    from ml_worker.models import create_model

    train_s, _ = split
    weights = tmp_path / "encoder.pt"
    torch.manual_seed(1)
    torch.save(create_model("unet_sharp", **UNET_SHARP_TINY).encoder.state_dict(), weights)
    snap = tmp_path / "phase1.pt"

    def progress(ev: dict[str, Any]) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == 1:
            shutil.copyfile(tmp_path / "run" / "last.pt", snap)

    cfg = tiny_config(tmp_path / "run", arch="unet_sharp", model_kwargs=UNET_SHARP_TINY, tile_size=64,
                      encoder_weights=str(weights), phase1_epochs=1, epochs=2)
    result = train(cfg, train_s, [], progress=progress)
    assert [h["phase"] for h in result.history] == [1, 2]
    assert result.history[1]["lr"] == [pytest.approx(1e-4)]  # lr * phase2_lr_factor

    ref = torch.load(weights, weights_only=True)
    m1, _ = load_checkpoint(snap)
    m2, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    enc1, enc2 = m1.encoder.state_dict(), m2.encoder.state_dict()
    # Phase 1: encoder weights untouched (BN running stats are buffers and may move).
    for k, v in ref.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(enc1[k], v), k
    # Phase 2: encoder convs train, BatchNorm affine parameters (and statistics) stay.
    bn = {n for n, mod in m2.encoder.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)}
    conv_moved = bn_moved = False
    for k in enc2:
        mod = k.rsplit(".", 1)[0]
        changed = not torch.equal(enc1[k], enc2[k])
        if mod in bn:
            bn_moved |= changed
        elif k.endswith("weight"):
            conv_moved |= changed
    assert conv_moved and not bn_moved


# ============================================================================ folder wrapper
def test_train_from_folder_splits_by_image_with_a_fixed_seed(tmp_path: Path, data_dir: Path) -> None:
    events: list[dict[str, Any]] = []
    cfg = tiny_config(tmp_path / "run", epochs=1, val_fraction=0.25)
    result = train_from_folder(cfg, data_dir, progress=events.append)
    start = events[0]
    assert start["n_train"] == 3 and start["n_val"] == 1
    assert result.status == "completed" and result.best_score is not None


def test_warm_start_from_another_checkpoint(tmp_path: Path, split) -> None:
    train_s, _ = split
    first = train(tiny_config(tmp_path / "a", epochs=1), train_s, [])
    src, _ = load_checkpoint(first.best_path)
    # epochs=1 with lr ~0: the warm-started model keeps the source weights.
    cfg = tiny_config(tmp_path / "b", epochs=1, lr=1e-12, weight_decay=0.0, init_weights=first.best_path)
    res = train(cfg, train_s, [])
    assert res.history[0]["epoch"] == 1  # a new run, not a resume
    warm, meta = load_checkpoint(res.best_path)
    for (k, a), b in zip(src.named_parameters(), warm.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k
    assert meta["config"]["init_weights"] == first.best_path
    with pytest.raises(ValueError, match="warm-start"):
        train(tiny_config(tmp_path / "c", arch="dssnet", model_kwargs={}, init_weights=first.best_path), train_s, [])


def test_config_treats_empty_strings_as_unset() -> None:
    cfg = TrainConfig(arch="unet", loss="", optimizer="", steps_per_epoch="", init_weights="")
    assert cfg.loss is None and cfg.optimizer is None and cfg.steps_per_epoch is None and cfg.init_weights is None
