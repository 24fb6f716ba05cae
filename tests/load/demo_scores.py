"""Queue-score spread of a freshly seeded demo project (issue 16: "every queued tile shows 0.997").

Not a timed test: a script that prints its figures. It seeds the demo projects as ``make run``
does (``manage.py seed_demo``), then does in this process what the gpu worker would do with the
run the seeding queued: train and gate it (``run_training``), predict every tile and rank the
queue (``run_prediction``, ``run_ranking``). Then it prints, per demo project, the queue's score
(the one the project's strategy ranks by) at the top, the median and the bottom, the top/median
ratio, and the same for every other stored score.

    .venv/bin/python -m tests.load.demo_scores             # the demo as make run seeds it
    .venv/bin/python -m tests.load.demo_scores --size 128 --training '{"epochs": 2, "width": 4}'

Everything lives in a fresh temporary var folder unless ``--var`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def spread(values: list[float]) -> dict[str, float]:
    """Top, median, bottom, top/median ratio and the interquartile range relative to the median."""
    ordered = sorted(values, reverse=True)
    if not ordered:
        return {"n": 0}
    median = statistics.median(ordered)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [median, median, median]
    return {
        "n": len(ordered), "top": ordered[0], "median": median, "bottom": ordered[-1],
        "ratio": ordered[0] / median if median > 0 else float("inf"),
        "iqr_over_median": (q[2] - q[0]) / median if median > 0 else float("inf"),
    }


def true_fixes(*, project, kind: str, size: int, n_unlabelled: int, model_version) -> dict[int, int]:
    """Tile id -> the nuclei an annotator would really fix on the model's prediction (redrawn,
    added, deleted: ``ml_worker.active_learning.effort``), against the held-out masks the seeding
    drew and hid (``synth`` is seeded: drawn again here with the seeding's arguments)."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    from backend.common.storage import read_bytes
    from backend.ml.models import Prediction
    from ml_worker import synth
    from ml_worker.active_learning.effort import correction_effort

    with tempfile.TemporaryDirectory() as tmp:
        synth.write_dataset(tmp, n_unlabelled, kind=kind, size=size, seed=200, prefix=f"{kind}_")
        masks = {p.name: np.asarray(PILImage.open(p)) for p in (Path(tmp) / "masks").glob("*.png")}
    out = {}
    for p in Prediction.objects.filter(model_version=model_version).select_related("tile", "tile__image"):
        truth = masks.get(p.tile.image.name)
        if truth is None:
            continue  # a labelled image: not in the queue
        true_tile = truth[p.tile.y: p.tile.y + p.tile.h, p.tile.x: p.tile.x + p.tile.w]
        predicted = np.asarray(PILImage.open(io.BytesIO(read_bytes(p.mask.name))))
        e = correction_effort(predicted, true_tile)
        out[p.tile_id] = int(e["n_redrawn"] + e["n_added"] + e["n_deleted"])
    return out


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def train_demo(*, size: int, training: dict | None = None, only: list[str] | None = None, stdout=None) -> list[dict]:
    """Seed the demo projects, train, predict and rank each (or those named in ``only``) in this
    process; returns per project its name, strategy, the gate's verdict, the spreads
    (:func:`spread`) of the queue's score and of every stored score, the spread of the nuclei
    really to fix (:func:`true_fixes`) and each score's Spearman correlation with them."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry, TrainingRun
    from backend.ml.workflows import run_prediction, run_ranking, run_training
    from backend.karyo.management.commands.seed_demo import DEMOS
    from backend.projects.models import Project
    from ml_worker import catalog

    seeded = {name: (kind, n_images - n_labelled) for name, kind, _classes, n_images, n_labelled in DEMOS}

    if not get_user_model().objects.filter(is_superuser=True).exists():
        get_user_model().objects.create_superuser("demo-admin", "demo@example.org", None)
    options = {"size": size}
    if training is not None:
        options["training"] = training  # call_command passes keyword options as they are
    call_command("seed_demo", stdout=stdout or sys.stdout, **options)
    out = []
    projects = Project.objects.filter(name__startswith="Demo:").order_by("pk")
    if only is not None:
        projects = projects.filter(name__in=only)
    for project in projects:
        run = TrainingRun.objects.filter(project=project, trigger="demo").order_by("pk").first()
        started = time.monotonic()
        # A var folder used before keeps its trained demo: it is measured again, not retrained.
        verdict = run_training(run_id=run.pk, task_id="demo-scores") if run.status == "queued" else run.status
        seconds = time.monotonic() - started
        active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
        if active is None:
            out.append({"project": project.name, "verdict": verdict, "train_seconds": seconds})
            continue
        run_prediction(project_id=project.pk, model_version_id=active.pk)
        run_ranking(project_id=project.pk)
        kind, n_unlabelled = seeded[project.name]
        fixes = true_fixes(project=project, kind=kind, size=size, n_unlabelled=n_unlabelled, model_version=active)
        project.refresh_from_db()
        entries = list(QueueEntry.objects.filter(project=project).order_by("rank").values_list("tile_id", "score"))
        predictions = {p.tile_id: p.uncertainty for p in Prediction.objects.filter(model_version=active)}
        queued = [predictions[t] for t, _ in entries if t in predictions]
        keys = sorted({k for u in queued for k in u})
        truth = [fixes.get(t) for t, _ in entries if t in predictions]
        known = [i for i, f in enumerate(truth) if f is not None]
        out.append({
            "project": project.name, "verdict": verdict, "train_seconds": seconds,
            "strategy": project.al_strategy, "score_key": catalog.score_key(project.al_strategy),
            "metrics": {k: active.metrics.get(k) for k in ("dice", "aji")},
            "temperature": (active.metrics.get("calibration") or {}).get("temperature"),
            "queue": spread([score for _, score in entries]),
            "by_score": {k: spread([float(u.get(k, 0.0)) for u in queued]) for k in keys},
            "true_fixes": spread([float(truth[i]) for i in known]),
            # How well each score orders the tiles by the nuclei really to fix there.
            "spearman": {k: spearman([float(queued[i].get(k, 0.0)) for i in known], [truth[i] for i in known])
                         for k in keys},
        })
    return out


def report(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['project']}: run {r['verdict']} in {r['train_seconds']:.0f} s")
        if "queue" not in r:
            continue
        print(f"  strategy {r['strategy']} (queue score: {r['score_key']}), validation dice "
              f"{r['metrics']['dice']:.3f} aji {r['metrics']['aji']:.3f}, temperature {r['temperature']}")
        print(f"  {'score':<16} {'tiles':>5} {'top':>8} {'median':>8} {'bottom':>8} {'top/med':>8} {'IQR/med':>8} "
              f"{'rho(true fixes)':>16}")
        rows = [("queue", r["queue"], None), *((k, v, r["spearman"].get(k)) for k, v in sorted(r["by_score"].items())),
                ("true fixes", r["true_fixes"], None)]
        for name, s, rho in rows:
            if not s.get("n"):
                continue
            print(f"  {name:<16} {s['n']:>5} {s['top']:>8.4f} {s['median']:>8.4f} {s['bottom']:>8.4f} "
                  f"{s['ratio']:>8.2f} {s['iqr_over_median']:>8.2f} {'' if rho is None else f'{rho:.2f}':>16}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="synthetic image size (seed_demo's default)")
    parser.add_argument("--training", help="JSON training options in place of the demo's (seed_demo --training)")
    parser.add_argument("--var", help="var folder (default: a fresh temporary one)")
    args = parser.parse_args()
    var = Path(args.var or tempfile.mkdtemp(prefix="karyo-demo-scores-"))
    os.environ.update(KARYO_VAR_DIR=str(var), DJANGO_SETTINGS_MODULE="backend.karyo.settings")
    for key in ("DATABASE_URL", "KARYO_REDIS_URL", "CELERY_BROKER_URL"):
        os.environ.pop(key, None)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)
    results = train_demo(size=args.size, training=json.loads(args.training) if args.training else None)
    report(results)
    print(f"\nload average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}, "
          f"cpus={os.cpu_count()} ({var})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
