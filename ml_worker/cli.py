"""Command line: ``python -m ml_worker train|predict|evaluate|synth``.

* ``train --arch dssnet --data DIR --out RUN [...]`` → ``RUN/best.pt``, ``RUN/last.pt``
* ``predict --checkpoint RUN/best.pt --images DIR --out DIR`` → 16-bit instance masks,
  same names as the images (``NAME.png``)
* ``evaluate --checkpoint RUN/best.pt --data DIR`` → one JSON object on stdout: every
  metric averaged over images (``mean``) and per image (``per_image``)
* ``synth --kind pap|he --n 10 --size 256 --out DIR`` → synthetic dataset, common layout

Progress bars (tqdm) and messages go to stderr; stdout carries only results (JSON).
User errors — a wrong path, an empty folder, an image without its mask, a missing or
corrupt checkpoint, a bad option — print one ``error: ...`` line on stderr and exit with
status 2 (no traceback). Ctrl-C during training stops after the current step; the run
resumes with ``--resume``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user error reported as one line with exit status 2."""


def _one_line(msg: object, limit: int = 400) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(msg: object) -> int:
    print(f"error: {_one_line(msg)}", file=sys.stderr)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        prog = self.prog
        print(f"error: {prog}: {_one_line(message)} (see {prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(v: str) -> int:
    try:
        i = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if i < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}")
    return i


def _kv(v: str) -> tuple[str, Any]:
    if "=" not in v:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {v!r}")
    k, raw = v.split("=", 1)
    try:
        val = json.loads(raw)
    except json.JSONDecodeError:
        val = raw
    return k.strip(), val


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ml_worker", description="Karyo nucleus segmentation engine")
    sub = p.add_subparsers(dest="command", metavar="{train,predict,evaluate,synth}", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model on DIR/images + DIR/masks")
    t.add_argument("--arch", required=True,
                   help="architecture (unet, pgunet_plus, unet_sharp, dssnet, hspnet, multihead_unet)")
    t.add_argument("--data", required=True, help="dataset folder (DIR/images/NAME.png + DIR/masks/NAME.png)")
    t.add_argument("--out", required=True, help="run folder for best.pt / last.pt")
    t.add_argument("--preset", default="fast", choices=["fast", "paper"],
                   help="fast: Karyo's lighter defaults; paper: the seed paper's sizes, loss, optimizer and schedule "
                        "(ml_worker/presets.py); options given here override the preset's")
    # Defaults None: the preset's value, else TrainConfig's (shown in brackets).
    t.add_argument("--epochs", type=_positive_int, default=None, help="[50]")
    t.add_argument("--tile-size", type=_positive_int, default=None, help="[256]")
    t.add_argument("--width", type=_positive_int, default=None,
                   help="model width (width / base_channels, whichever the architecture has)")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="[8]")
    t.add_argument("--lr", type=float, default=None, help="[0.001]")
    t.add_argument("--weight-decay", type=float, default=None, help="[0.0001]")
    t.add_argument("--optimizer", default=None, help="adam, adamw, rmsprop, sgd (default: adam; rmsprop for PGU-net+)")
    t.add_argument("--loss", default=None, help="override the model's default loss")
    t.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="training patches per epoch (rounded up to whole batches)")
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--stain-norm", default=None, help="none, macenko, reinhard [none]")
    t.add_argument("--augment", default=None, help="none, light, default [default]")
    t.add_argument("--patience", type=int, default=None, help="early stopping patience on val Dice (0 = off) [10]")
    t.add_argument("--epochs-per-stage", type=_positive_int, default=None, help="PGU-net+ epochs per growing stage")
    t.add_argument("--no-progressive", action="store_true", help="PGU-net+: train the full model directly")
    t.add_argument("--encoder-weights", default=None, help="local pre-trained encoder weights (two-phase training)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--model-kw", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra model constructor argument (JSON value), repeatable")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="LAST_PT",
                   help="continue a run (default: OUT/last.pt)")
    t.add_argument("--binary", action="store_true",
                   help="train one 'nucleus' class even when the data has classes/ (typed nuclei)")
    t.add_argument("--instance-head", default=None, choices=["hv"],
                   help="extra head that separates touching nuclei (HoVer-Net-style distance maps)")
    t.add_argument("--lr-schedule", default=None, choices=["constant", "cosine", "step"], help="[constant]")
    t.add_argument("--warmup-epochs", type=int, default=None, help="[0]")
    t.add_argument("--ema-decay", type=float, default=None, help="average the weights (e.g. 0.99); default off")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    pr = sub.add_parser("predict", help="instance masks for every image in a folder")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--images", required=True, help="folder of images (or a dataset folder with images/)")
    pr.add_argument("--out", required=True, help="output folder for NAME.png 16-bit instance masks")
    pr.add_argument("--tile-size", type=_positive_int, default=None, help="default: the training tile size")
    pr.add_argument("--overlap", type=int, default=None,
                    help="pixels shared by neighbouring tiles, blended with Gaussian weights (default: tile / 8; "
                         "HSP-Net's paper: 300 on 400-px tiles, i.e. a 100-px stride)")
    pr.add_argument("--batch-size", type=_positive_int, default=8)
    pr.add_argument("--device", default="auto")
    pr.add_argument("--threads", type=_positive_int, default=None)
    pr.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on DIR/images + DIR/masks (JSON on stdout)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--tile-size", type=_positive_int, default=None)
    ev.add_argument("--batch-size", type=_positive_int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--threads", type=_positive_int, default=None)
    ev.add_argument("--quiet", action="store_true")

    sy = sub.add_parser("synth", help="write a synthetic dataset (common layout)")
    sy.add_argument("--kind", default="he", choices=["pap", "he"])
    sy.add_argument("--n", type=_positive_int, default=10)
    sy.add_argument("--size", type=_positive_int, default=256)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--typed", action="store_true", help="nucleus types too (classes/NAME.png, classes.json)")
    sy.add_argument("--out", required=True)
    return p


# ============================================================================ commands
def _device(name: str) -> str | None:
    return None if name in ("", "auto") else name


def _width_kwargs(arch: str, width: int | None) -> dict[str, Any]:
    if width is None:
        return {}
    from ml_worker.models import MODELS

    params = inspect.signature(MODELS[arch].__init__).parameters
    for key in ("width", "base_channels"):
        if key in params:
            return {key: width}
    raise CLIError(f"--width is not supported by {arch!r}; use --model-kw")


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ml_worker.data import DataError, load_folder, split_by_image
    from ml_worker.models import MODELS
    from ml_worker.training import TrainConfig, train

    if args.arch not in MODELS:
        raise CLIError(f"unknown architecture {args.arch!r}; available: {', '.join(sorted(MODELS))}")
    data = Path(args.data)
    if not data.exists():
        raise DataError(f"dataset folder not found: {data}")
    out = Path(args.out)
    resume = None
    if args.resume is not None:
        resume = args.resume or str(out / "last.pt")
        if not Path(resume).is_file():
            raise CLIError(f"nothing to resume: {resume} not found")
    from ml_worker.data import dataset_class_names

    from ml_worker.presets import apply_preset

    model_kwargs = {**_width_kwargs(args.arch, args.width), **dict(args.model_kw)}
    if args.instance_head:
        model_kwargs["instance_head"] = args.instance_head
    classes = None if args.binary else dataset_class_names(data)
    # What the command line sets explicitly overrides the preset; the rest comes from it.
    given = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "optimizer": args.optimizer, "loss": args.loss, "tile_size": args.tile_size,
        "steps_per_epoch": args.steps_per_epoch, "stain_norm": args.stain_norm, "augment": args.augment,
        "early_stopping_patience": args.patience, "progressive": False if args.no_progressive else None,
        "epochs_per_stage": args.epochs_per_stage, "encoder_weights": args.encoder_weights,
        "lr_schedule": args.lr_schedule, "warmup_epochs": args.warmup_epochs, "ema_decay": args.ema_decay,
    }
    try:
        kwargs = apply_preset(args.arch, args.preset, model_kwargs=model_kwargs,
                              **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    config = TrainConfig(
        **kwargs, val_fraction=args.val_fraction, seed=args.seed, device=args.device, num_threads=args.threads,
        num_workers=args.workers, resume=resume, out_dir=str(out), classes=classes,
    )
    samples = load_folder(data)
    train_s, val_s = split_by_image(samples, config.val_fraction, seed=config.split_seed)

    stop = {"flag": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True
        print("\ninterrupt: stopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    bar: Any = None

    def progress(ev: dict[str, Any]) -> None:
        nonlocal bar
        kind = ev["event"]
        if kind == "start":
            total = ev["epochs"] * ev["steps_per_epoch"]
            print(f"training {args.arch}, {args.preset} preset ({ev['parameters'] / 1e6:.2f}M parameters) on {ev['n_train']} images, "
                  f"validating on {ev['n_val']}, {ev['epochs']} epochs x {ev['steps_per_epoch']} steps, "
                  f"device {ev['device']}", file=sys.stderr)
            bar = tqdm(total=total, initial=ev["start_epoch"] * ev["steps_per_epoch"], unit="step",
                       file=sys.stderr, disable=args.quiet, dynamic_ncols=True, desc=args.arch)
        elif kind == "step" and bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=f"{ev['epoch']}/{ev['epochs']}", loss=f"{ev['loss']:.4f}", refresh=False)
        elif kind == "epoch":
            val = ev.get("val") or {}
            msg = f"epoch {ev['epoch']}/{ev['epochs']} loss {ev['train_loss']:.4f}"
            if ev.get("stage"):
                msg += f" stage {ev['stage']} ({ev['input_size']}px)"
            if val:
                msg += (f" val dice {val['dice']:.4f} aji {val['aji']:.4f} pq {val['pq']:.4f}"
                        f" mAP {val['dsb_map']:.4f}")
            if ev.get("improved"):
                msg += " *best"
            (bar.write if bar is not None else print)(msg, file=sys.stderr)

    try:
        result = train(config, train_s, val_s, progress=progress, should_stop=lambda: stop["flag"])
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
    best = f"best epoch {result.best_epoch}"
    if result.best_score is not None:
        best += f" (val dice {result.best_score:.4f})"
    print(f"{result.status}: {result.epochs_completed} epochs, {best}; wrote {out / 'best.pt'} and "
          f"{out / 'last.pt'}", file=sys.stderr)
    if result.status == "cancelled":
        print(f"resume with: python -m ml_worker train ... --out {out} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _load(checkpoint: str) -> tuple[Any, Any, dict[str, Any]]:
    from ml_worker.training import load_for_inference

    return load_for_inference(checkpoint)


def _image_files(folder: Path) -> list[Path]:
    from ml_worker.data import IMAGE_EXTS, DataError

    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    if (folder / "images").is_dir():
        folder = folder / "images"
    files = [f for f in sorted(folder.iterdir())
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    stems = [f.stem for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise DataError(f"two images with the same name in {folder}: {', '.join(dup[:3])}")
    return files


def _tile_size(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    if args.tile_size:
        return int(args.tile_size)
    return int((meta.get("config") or {}).get("tile_size") or 256)


def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ml_worker.data import read_image, write_mask
    from ml_worker.inference import predict_instances

    if args.threads:
        torch.set_num_threads(args.threads)
    files = _image_files(Path(args.images))
    model, normalizer, meta = _load(args.checkpoint)
    tile = _tile_size(args, meta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in tqdm(files, unit="image", file=sys.stderr, disable=args.quiet, desc="predict"):
        image = read_image(f)
        overlap = max(0, tile // 8) if args.overlap is None else args.overlap
        if not 0 <= overlap < tile:
            raise CLIError(f"--overlap must be in [0, {tile}) for {tile}-px tiles, got {overlap}")
        inst, probs = predict_instances(model, image, tile_size=tile, overlap=overlap,
                                        batch_size=args.batch_size, device=_device(args.device), normalizer=normalizer)
        if inst.max(initial=0) > 65535:
            raise CLIError(f"{f.name}: {int(inst.max())} instances do not fit a 16-bit mask")
        write_mask(out / f"{f.stem}.png", inst)
        if meta.get("classes"):  # typed model: per-pixel class ids beside the masks, as the common layout
            from PIL import Image as PILImage

            from ml_worker.instances import class_map, instance_classes

            classes, _ = instance_classes(inst, model.class_probabilities(probs))
            (out / "classes").mkdir(exist_ok=True)
            PILImage.fromarray(class_map(inst, classes)).save(out / "classes" / f"{f.stem}.png")
    print(f"wrote {len(files)} masks to {out}", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ml_worker.data import load_folder
    from ml_worker.training import evaluate_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    samples = load_folder(args.data)
    model, normalizer, meta = _load(args.checkpoint)
    tile = _tile_size(args, meta)
    per_image = []
    for s in tqdm(samples, unit="image", file=sys.stderr, disable=args.quiet, desc="evaluate"):
        _, rows = evaluate_samples(model, [s], tile_size=tile, batch_size=args.batch_size,
                                   device=_device(args.device), normalizer=normalizer)
        per_image.extend(rows)
    keys = sorted({k for r in per_image for k in r if k != "name"})
    mean = {}
    for k in keys:  # nan = a class absent from an image: left out, as PanNuke does
        vals = [r[k] for r in per_image if k in r and math.isfinite(r[k])]
        mean[k] = float(sum(vals) / len(vals)) if vals else float("nan")
    result = {
        "checkpoint": str(args.checkpoint),
        "arch": meta.get("arch"),
        "data": str(args.data),
        "n_images": len(per_image),
        "tile_size": tile,
        "mean": {k: v for k, v in mean.items() if not k.startswith("pq_class")},
        "per_image": per_image,
    }
    if "mpq" in mean:
        names = list(meta.get("classes") or [])
        result["mpq"], result["bpq"] = mean["mpq"], mean["bpq"]
        result["per_class"] = {
            (names[int(k[8:]) - 1] if int(k[8:]) <= len(names) else k[3:]): v
            for k, v in mean.items() if k.startswith("pq_class")
        }
    print(json.dumps(_finite_or_null(result), allow_nan=False, default=_json_default))
    return 0


def _finite_or_null(o: Any) -> Any:
    """nan / inf -> null (a class absent from an image has no PQ), recursively."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_null(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite_or_null(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cmd_synth(args: argparse.Namespace) -> int:
    from ml_worker.synth import write_dataset

    names = write_dataset(args.out, args.n, kind=args.kind, size=args.size, seed=args.seed, typed=args.typed)
    print(f"wrote {len(names)} {args.kind} images to {args.out}", file=sys.stderr)
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "synth": cmd_synth}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so `--help` stays fast and so their errors are caught below.
    from ml_worker.checkpoint import CheckpointError
    from ml_worker.data import DataError

    try:
        return COMMANDS[args.command](args)
    except CheckpointError as e:
        # torch's unpickling errors are paragraphs; the first part says what is wrong.
        return _fail(_one_line(e, limit=160))
    except (CLIError, DataError, FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        return _fail(msg)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 1
