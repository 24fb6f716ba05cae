"""End-to-end tests of ``python -m ml_worker`` and ``python -m ml_worker.bench`` (subprocesses).

Tiny models on a few synthetic 96x96 images, 64x64 tiles, one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_worker.data import read_mask
from ml_worker.synth import write_dataset

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"dice", "precision", "recall", "iou", "miou", "pixel_accuracy", "dsb_map", "object_f1", "aji",
               "dq", "sq", "pq"}


def run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset (via the CLI) and a tiny trained run in one folder."""
    root = tmp_path_factory.mktemp("cli")
    p = run("-m", "ml_worker", "synth", "--kind", "he", "--n", "4", "--size", "96", "--out", "data", cwd=root)
    assert p.returncode == 0, p.stderr
    p = run("-m", "ml_worker", "train", "--arch", "unet", "--data", "data", "--out", "run", "--epochs", "2",
            "--tile-size", "64", "--width", "4", "--model-kw", "depth=2", "--batch-size", "2",
            "--steps-per-epoch", "4", "--augment", "light", "--threads", "1", cwd=root)
    assert p.returncode == 0, p.stderr
    assert "epoch 2/2" in p.stderr
    return root


def test_synth_writes_the_common_layout(trained: Path) -> None:
    images = sorted((trained / "data" / "images").glob("*.png"))
    masks = sorted((trained / "data" / "masks").glob("*.png"))
    assert len(images) == 4 and [m.name for m in masks] == [i.name for i in images]


def test_train_writes_best_and_last(trained: Path) -> None:
    from ml_worker.checkpoint import load_checkpoint

    assert (trained / "run" / "best.pt").is_file() and (trained / "run" / "last.pt").is_file()
    _, meta = load_checkpoint(trained / "run" / "last.pt")
    assert meta["arch"] == "unet" and meta["init_kwargs"]["width"] == 4 and meta["init_kwargs"]["depth"] == 2
    assert len(meta["history"]) == 2 and meta["config"]["tile_size"] == 64


def test_train_resume_continues(trained: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(trained / "run", tmp_path / "run")
    p = run("-m", "ml_worker", "train", "--arch", "unet", "--data", str(trained / "data"), "--out", "run",
            "--epochs", "3", "--tile-size", "64", "--width", "4", "--model-kw", "depth=2", "--batch-size", "2",
            "--steps-per-epoch", "4", "--augment", "light", "--threads", "1", "--resume", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "epoch 3/3" in p.stderr and "epoch 1/3" not in p.stderr


def test_predict_writes_16bit_masks_with_the_same_names(trained: Path, tmp_path: Path) -> None:
    # A grayscale image is accepted too.
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    src = sorted((trained / "data" / "images").glob("*.png"))
    for f in src[:2]:
        (imgs / f.name).write_bytes(f.read_bytes())
    gray = np.asarray(Image.open(src[2]).convert("L"))
    Image.fromarray(gray).save(imgs / "gray.png")
    p = run("-m", "ml_worker", "predict", "--checkpoint", str(trained / "run" / "best.pt"), "--images", str(imgs),
            "--out", "pred", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = sorted(f.name for f in (tmp_path / "pred").iterdir())
    assert out == sorted([f.name for f in src[:2]] + ["gray.png"])
    for name in out:
        with Image.open(tmp_path / "pred" / name) as im:
            assert im.mode.startswith("I") and im.size == (96, 96)  # 16-bit grayscale
        assert read_mask(tmp_path / "pred" / name).shape == (96, 96)


def test_evaluate_prints_one_json_object(trained: Path) -> None:
    p = run("-m", "ml_worker", "evaluate", "--checkpoint", "run/best.pt", "--data", "data", "--quiet", cwd=trained)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)  # the whole stdout is one JSON document
    assert result["arch"] == "unet" and result["n_images"] == 4
    assert METRIC_KEYS <= set(result["mean"])
    assert len(result["per_image"]) == 4 and METRIC_KEYS | {"name"} <= set(result["per_image"][0])
    dice = [r["dice"] for r in result["per_image"]]
    assert result["mean"]["dice"] == pytest.approx(sum(dice) / 4)


# ============================================================================ errors
def test_error_wrong_path_in_a_real_process(trained: Path) -> None:
    p = run("-m", "ml_worker", "train", "--arch", "unet", "--data", "nowhere", "--out", "r", cwd=trained)
    assert_one_line_error(p, "nowhere")


def main_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process (no interpreter start-up); assert exit 2 and one stderr line."""
    from ml_worker.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert out == ""
    return lines[0]


def test_error_wrong_path(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "nowhere" in main_error(capsys, "predict", "--checkpoint", str(trained / "run" / "best.pt"),
                                   "--images", str(trained / "nowhere"), "--out", str(trained / "o"))
    assert "nowhere" in main_error(capsys, "evaluate", "--checkpoint", str(trained / "run" / "best.pt"),
                                   "--data", str(trained / "nowhere"))


def test_error_empty_folder(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    assert "no images" in main_error(capsys, "train", "--arch", "unet", "--data", str(tmp_path / "empty"),
                                     "--out", str(tmp_path / "r"))
    assert "no images" in main_error(capsys, "predict", "--checkpoint", str(trained / "run" / "best.pt"),
                                     "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))


def test_error_image_without_mask(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_dataset(tmp_path / "d", 2, kind="pap", size=64, seed=0)
    (tmp_path / "d" / "masks" / "pap_0001.png").unlink()
    assert "pap_0001" in main_error(capsys, "evaluate", "--checkpoint", str(trained / "run" / "best.pt"),
                                    "--data", str(tmp_path / "d"))
    assert "pap_0001" in main_error(capsys, "train", "--arch", "dssnet", "--data", str(tmp_path / "d"),
                                    "--out", str(tmp_path / "r"))


def test_error_missing_or_corrupt_checkpoint(trained: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert "missing.pt" in main_error(capsys, "evaluate", "--checkpoint", str(tmp_path / "missing.pt"),
                                      "--data", str(trained / "data"))
    (tmp_path / "bad.pt").write_bytes(b"\x00not a checkpoint" * 10)
    assert "bad.pt" in main_error(capsys, "predict", "--checkpoint", str(tmp_path / "bad.pt"), "--images",
                                  str(trained / "data"), "--out", str(tmp_path / "o"))
    assert "resume" in main_error(capsys, "train", "--arch", "unet", "--data", str(trained / "data"), "--out",
                                  str(tmp_path / "fresh"), "--resume")


def test_error_bad_options(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = str(trained / "data"), str(trained / "r")
    assert "resnet9000" in main_error(capsys, "train", "--arch", "resnet9000", "--data", data, "--out", out)
    assert "--epochs" in main_error(capsys, "train", "--arch", "unet", "--data", data, "--out", out,
                                    "--epochs", "0")
    assert "multiple" in main_error(capsys, "train", "--arch", "unet", "--data", data, "--out", out,
                                    "--tile-size", "70", "--width", "4")
    assert "--arch" in main_error(capsys, "train", "--data", data, "--out", out)


# ============================================================================ bench
def test_bench_smoke_writes_json_and_png_with_every_row(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 3, kind="he", size=96, seed=0)
    p = run("-m", "ml_worker.bench", "--data", "data", "--budget", "smoke", "--out", "bench", "--threads", "1",
            "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["unet", "pgunet_plus", "unet_sharp", "dssnet", "hspnet", "multihead_unet", "monai_unet",
                     "otsu_watershed"]
    for r in result["rows"]:
        assert {"dice", "aji", "pq", "dsb_map"} <= set(r["metrics"])
        if r["kind"] != "baseline":
            assert r["params"] > 0 and r["gflops_256"] > 0
            assert r["tiles_per_s_64"] > 0 and r["tiles_per_s_128"] > 0
    # the typed phase: every softmax model (not the sigmoid multi-head one) also scored by mPQ / bPQ
    for r in result["rows"]:
        if r["kind"] != "baseline" and r["name"] != "multihead_unet":
            assert 0.0 <= r["typed"]["mpq"] <= 1.0 and 0.0 <= r["typed"]["bpq"] <= 1.0, r["name"]
    assert "typed" not in next(r for r in result["rows"] if r["name"] == "multihead_unet")
    assert {"best_karyo_vs_baselines_aji", "best_karyo_vs_baselines_pq", "best_karyo_dice"} <= set(
        result["comparisons"])
    assert {r["name"] for r in result["references"]} == {"unet@ref", "dssnet@ref"}
    assert {"reference_dssnet_vs_unet", "trained_dssnet_vs_unet", "best_karyo_vs_monai_aji",
            "best_karyo_vs_monai_pq"} <= set(result["comparisons"])
    assert result["budget"]["name"] == "smoke" and result["wall_time_s"] > 0
    png = (tmp_path / "bench" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The table is printed on stdout: one line per row, the budget and the comparisons.
    for name in names:
        assert name in p.stdout
    assert "budget 'smoke'" in p.stdout and "MONAI" in p.stdout and "dssnet/unet" in p.stdout
    assert "mPQ" in p.stdout and "(target >= 0.5)" in p.stdout and "(target >= +0.05)" in p.stdout


def test_bench_missing_data_is_a_one_line_error(tmp_path: Path) -> None:
    p = run("-m", "ml_worker.bench", "--data", "nowhere", "--budget", "smoke", "--out", "b", cwd=tmp_path)
    assert_one_line_error(p, "nowhere")
    assert not (tmp_path / "b").exists()


# ============================================================================ presets
def test_train_with_the_paper_preset_takes_its_recipe_and_lets_the_command_line_override_it(
        trained: Path, tmp_path: Path) -> None:
    from ml_worker.checkpoint import load_checkpoint

    p = run("-m", "ml_worker", "train", "--arch", "dssnet", "--preset", "paper", "--data", str(trained / "data"),
            "--out", "run", "--epochs", "1", "--tile-size", "64", "--width", "8", "--model-kw", "num_blocks=1",
            "--steps-per-epoch", "4", "--augment", "light", "--threads", "1", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "paper preset" in p.stderr
    _, meta = load_checkpoint(tmp_path / "run" / "last.pt")
    config = meta["config"]
    # the paper's optimizer, batch and schedule; the command line's epochs, tile and width
    assert (config["optimizer"], config["batch_size"], config["lr_schedule"]) == ("sgd", 4, "cosine")
    assert (config["epochs"], config["tile_size"]) == (1, 64)
    assert meta["init_kwargs"]["decoder"] == "paper" and meta["init_kwargs"]["width"] == 8
    assert meta["init_kwargs"]["num_blocks"] == 1 and meta["init_kwargs"]["feature_channels"] == 42


def test_a_preset_the_architecture_lacks_is_a_one_line_error(trained: Path, tmp_path: Path) -> None:
    p = run("-m", "ml_worker", "train", "--arch", "unet", "--preset", "paper", "--data", str(trained / "data"),
            "--out", "run", cwd=tmp_path)
    assert_one_line_error(p, "unet has no preset 'paper'; available: fast")


def test_bench_paper_preset_rows_use_the_papers_recipe(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 3, kind="he", size=96, seed=0)
    p = run("-m", "ml_worker.bench", "--data", "data", "--budget", "smoke", "--out", "bench", "--threads", "1",
            "--archs", "dssnet", "hspnet", "--preset", "paper", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"dssnet:paper", "hspnet:paper", "otsu_watershed"}
    assert rows["dssnet:paper"]["preset"] == "paper" and rows["dssnet:paper"]["model_kwargs"]["decoder"] == "paper"
    # at a CPU budget the budget keeps its model sizes
    assert rows["dssnet:paper"]["model_kwargs"]["width"] == 8
    assert rows["hspnet:paper"]["params"] > 0 and rows["hspnet:paper"]["tiles_per_s_64"] > 0
    from ml_worker.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "bench" / "runs" / "hspnet-paper" / "last.pt")
    assert meta["config"]["encoder_lr_factor"] == 0.1
    assert "dssnet:paper" in p.stdout and "hspnet:paper" in p.stdout


def test_bench_instance_head_rows_are_compared_with_the_same_networks_default(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", 3, kind="he", size=96, seed=0)
    p = run("-m", "ml_worker.bench", "--data", "data", "--budget", "smoke", "--out", "bench", "--threads", "1",
            "--archs", "unet", "multihead_unet", "--instance-head", "hv", "--quiet", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    # the multi-head model has its own instance outputs: no hv row for it
    assert set(rows) == {"unet", "multihead_unet", "unet+hv", "otsu_watershed"}
    assert rows["unet+hv"]["model_kwargs"]["instance_head"] == "hv" and rows["unet+hv"]["instance_head"] == "hv"
    assert "typed" not in rows["unet+hv"] and "typed" in rows["unet"]
    x = result["comparisons"]["instance_head_vs_default"]["unet+hv"]
    assert x["default"] == "unet" and x["aji_head"] == rows["unet+hv"]["metrics"]["aji"]
    assert x["improves_aji"] == (x["aji_head"] > x["aji_default"])
    assert "instance head: unet+hv AJI" in p.stdout
    from ml_worker.checkpoint import load_checkpoint

    _, meta = load_checkpoint(tmp_path / "bench" / "runs" / "unet+hv" / "last.pt")
    assert meta["init_kwargs"]["instance_head"] == "hv"
