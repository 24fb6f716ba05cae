"""Typed nuclei in the engine (issue 15): the typed generator, class maps in the common layout,
class targets through augmentation, per-nucleus classes and confidences, PanNuke's mPQ / bPQ,
typed training and the CLI's evaluate report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_worker.cli import main as cli_main
from ml_worker.data import DataError, PatchDataset, Sample, dataset_class_names, load_folder, split_by_image
from ml_worker.instances import class_map, instance_classes
from ml_worker.metrics import typed_panoptic_quality
from ml_worker.synth import CLASS_NAMES, generate, generate_typed, write_dataset
from ml_worker.training import TrainConfig, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def typed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("typed")
    write_dataset(d, 4, kind="he", size=96, seed=0, typed=True)
    return d


@pytest.mark.parametrize("kind", ["he", "pap"])
def test_every_nucleus_of_a_typed_tile_has_exactly_one_class(kind: str) -> None:
    _, inst, cls = generate_typed(kind, 256, seed=4)
    assert cls.dtype == np.uint8 and cls.shape == inst.shape
    assert np.all((cls > 0) == (inst > 0))
    for label in range(1, int(inst.max()) + 1):
        assert len(np.unique(cls[inst == label])) == 1
    assert set(np.unique(cls)) - {0} <= set(range(1, len(CLASS_NAMES[kind]) + 1))


def test_types_differ_in_size_so_that_class_learning_is_testable() -> None:
    areas: dict[int, list[int]] = {}
    for seed in range(4):
        _, inst, cls = generate_typed("he", 256, seed=seed)
        for label in range(1, int(inst.max()) + 1):
            c = int(cls[inst == label][0])
            areas.setdefault(c, []).append(int((inst == label).sum()))
    lymphocyte, epithelial = np.median(areas[2]), np.median(areas[1])
    assert lymphocyte < 0.7 * epithelial


def test_the_untyped_generator_is_unchanged_by_the_typed_one() -> None:
    a, inst_a = generate("he", 128, seed=2)
    b, inst_b = generate("he", 128, seed=2)
    assert np.array_equal(a, b) and np.array_equal(inst_a, inst_b)


def test_a_typed_dataset_loads_with_its_class_maps_and_names(typed_dir: Path) -> None:
    samples = load_folder(typed_dir)
    assert all(s.classes is not None and s.classes.shape == s.instances.shape for s in samples)
    assert dataset_class_names(typed_dir) == list(CLASS_NAMES["he"])


def test_it_refuses_a_dataset_whose_class_maps_are_incomplete(typed_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(typed_dir, d)
    next((d / "classes").iterdir()).unlink()
    with pytest.raises(DataError, match="without a class map"):
        load_folder(d)


def test_patch_targets_carry_each_nucleus_class_through_augmentation(typed_dir: Path) -> None:
    samples = load_folder(typed_dir)
    ds = PatchDataset(samples, tile_size=64, augment="default", length=8, seed=1)
    for i in range(8):
        item = ds[i]
        mask, inst = item["mask"].numpy(), item["instances"].numpy()
        assert np.all((mask > 0) == (inst > 0))
        for label in np.unique(inst)[1:]:
            assert len(np.unique(mask[inst == label])) == 1


def test_each_predicted_nucleus_gets_its_soft_majority_class_and_a_confidence() -> None:
    inst = np.zeros((4, 6), np.int32)
    inst[:, :3] = 1
    inst[:, 3:] = 2
    probs = np.zeros((3, 4, 6), np.float32)
    probs[1, :, :3], probs[2, :, :3] = 0.7, 0.3   # nucleus 1: class 1, 70 %
    probs[1, :, 3:], probs[2, :, 3:] = 0.1, 0.9   # nucleus 2: class 2, 90 %
    classes, conf = instance_classes(inst, probs)
    assert classes.tolist() == [0, 1, 2]
    assert conf[1] == pytest.approx(0.7) and conf[2] == pytest.approx(0.9)
    assert class_map(inst, classes)[0].tolist() == [1, 1, 1, 2, 2, 2]


def test_typed_pq_matches_per_class_and_leaves_absent_classes_out() -> None:
    inst = np.zeros((8, 8), np.int32)
    inst[1:4, 1:4], inst[5:8, 5:8] = 1, 2
    true_cls = class_map(inst, np.array([0, 1, 2]))
    right = typed_panoptic_quality(inst, true_cls, inst, true_cls, num_classes=3)
    assert right["bpq"] == 1.0 and right["mpq"] == 1.0
    assert right["per_class"][1] == 1.0 and math.isnan(right["per_class"][3])
    swapped = class_map(inst, np.array([0, 2, 1]))
    wrong = typed_panoptic_quality(inst, swapped, inst, true_cls, num_classes=3)
    assert wrong["bpq"] == 1.0 and wrong["mpq"] == 0.0


def test_a_typed_run_predicts_classes_and_reports_mpq(typed_dir: Path, tmp_path: Path) -> None:
    train_s, val_s = split_by_image(load_folder(typed_dir), 0.25, seed=0)
    cfg = TrainConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, epochs=1, batch_size=2, tile_size=64,
                      steps_per_epoch=4, out_dir=str(tmp_path / "run"), classes=dataset_class_names(typed_dir),
                      num_threads=1)
    result = train(cfg, train_s, val_s)
    assert {"mpq", "bpq", "pq_class1"} <= set(result.best_metrics)
    from ml_worker.checkpoint import load_checkpoint

    model, meta = load_checkpoint(result.best_path)
    assert meta["classes"] == list(CLASS_NAMES["he"]) and model.num_classes == 4


def test_it_refuses_classes_beyond_the_runs_class_list(typed_dir: Path, tmp_path: Path) -> None:
    samples = load_folder(typed_dir)
    cfg = TrainConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, epochs=1, batch_size=2, tile_size=64,
                      steps_per_epoch=2, out_dir=str(tmp_path / "run"), classes=["only_one"])
    with pytest.raises(DataError, match="class id"):
        train(cfg, samples, [])


def test_a_model_without_class_outputs_refuses_a_typed_run(typed_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(arch="multihead_unet", model_kwargs={"width": 4, "depth": 2}, epochs=1, batch_size=2,
                      tile_size=64, steps_per_epoch=2, out_dir=str(tmp_path / "run"), classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="predicts no nucleus classes"):
        train(cfg, load_folder(typed_dir), [])


def test_a_binary_run_ignores_the_class_maps(typed_dir: Path, tmp_path: Path) -> None:
    s = load_folder(typed_dir)[:2]
    result = train(TrainConfig(arch="unet", model_kwargs={"width": 4, "depth": 2}, epochs=1, batch_size=2,
                               tile_size=64, steps_per_epoch=2, out_dir=str(tmp_path / "run")), s, [])
    assert result.status == "completed"


def test_the_cli_reports_mpq_bpq_and_per_class_pq_for_typed_data(typed_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli_main(["train", "--arch", "unet", "--data", str(typed_dir), "--out", str(run), "--epochs", "1",
                     "--tile-size", "64", "--width", "4", "--model-kw", "depth=2", "--batch-size", "2",
                     "--steps-per-epoch", "2", "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(typed_dir), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["per_class"]) <= set(CLASS_NAMES["he"]) and report["per_class"]
    assert 0.0 <= report["bpq"] <= 1.0 and 0.0 <= report["mpq"] <= 1.0
    out = tmp_path / "pred"
    assert cli_main(["predict", "--checkpoint", str(run / "best.pt"), "--images", str(typed_dir / "images"),
                     "--out", str(out), "--quiet"]) == 0
    assert len(list((out / "classes").glob("*.png"))) == 4


def test_a_sample_without_class_pixels_for_a_nucleus_falls_back_to_the_first_class() -> None:
    inst = np.array([[1, 1, 0, 2]], np.int32)
    cls = np.array([[0, 0, 0, 3]], np.uint8)
    assert Sample("x", np.zeros((1, 4, 3), np.uint8), inst, cls).instance_classes().tolist() == [0, 1, 3]
