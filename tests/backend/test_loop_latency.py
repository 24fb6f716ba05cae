"""The loop-latency benchmark's core (tests/load/loop_latency.py) on a tiny project with a real
Celery worker: the phases it times happen in order, and the queue is re-ranked by the model only
after that model was promoted. Behaviour, not time: the figures are the benchmark's business."""
from __future__ import annotations

import pytest

from backend.ml.models import ModelStatus, ModelVersion, QueueEntry, TrainingRun
from ml_worker import catalog
from tests.load.loop_latency import build_project, measure

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
TINY = {"epochs": 1, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 4}
# "submitted" is the whole submission call, which goes on after it queued the run (events, the other
# subscribers): a fast worker may start the run before the call returns. So the order starts at
# "queued", and the run must be queued within the submission.
ORDER = ["queued", "started", "finished", "promoted", "predicted", "ranked"]


def assert_in_order(times: dict[str, float]) -> None:
    ordered = [times[k] for k in ORDER if k in times]
    assert ordered == sorted(ordered) and ordered[0] >= 0, times
    assert times["queued"] <= times["submitted"], times


def test_the_benchmark_times_each_phase_in_order_and_the_queue_follows_the_promoted_model(start_worker):
    worker = start_worker()
    loop = build_project(tiles=8, tile_size=64, architecture="unet", training=TINY, threshold=2)
    project = loop.project
    # Queued before any model: every tile, ranked by no model version.
    assert project.tiles.count() == 8 and QueueEntry.objects.filter(project=project, model_version=None).count() == 8

    cycles = measure(loop, cycles=2, timeout=600, alive=lambda: worker.process.poll() is None)

    assert [c.number for c in cycles] == [1, 2], [(c.number, c.outcome, c.reason) for c in cycles]
    first, second = cycles
    # Cycle 1: the 2nd submission starts the first run, whose model is promoted (nothing to beat),
    # then every tile is predicted and the queue is ranked by the project's strategy with it.
    assert first.submissions == 2 and first.outcome == "promoted", (first.outcome, first.reason, worker.output()[-3000:])
    assert set(ORDER) <= set(first.times), first.times
    assert_in_order(first.times)
    assert first.tiles_predicted == 8 and first.queue_strategy in catalog.strategy_names()
    # Cycle 2 retrains from the active model; the gate decides, and the queue says which way.
    assert second.submissions == 2 and second.outcome in ("promoted", "refused"), (second.outcome, second.reason)
    run = TrainingRun.objects.get(pk=second.run_id)
    assert run.warm_start is not None and run.warm_start.version == first.model_version
    active = ModelVersion.objects.get(project=project, status=ModelStatus.ACTIVE)
    queue_versions = set(QueueEntry.objects.filter(project=project).values_list("model_version__version", flat=True))
    if second.outcome == "promoted":
        assert set(ORDER) <= set(second.times), second.times
        assert_in_order(second.times)
        assert active.version == second.model_version and queue_versions == {second.model_version}
        assert QueueEntry.objects.filter(project=project, created_at__lt=active.promoted_at).count() == 0
    else:
        # Refused: the candidate never ranks the queue; the first model still does.
        assert "promoted" not in second.times and "ranked" not in second.times
        assert active.version == first.model_version and queue_versions == {first.model_version}
    # Only unlabelled tiles are queued: 8 tiles, 4 submitted.
    assert QueueEntry.objects.filter(project=project).count() == 4
