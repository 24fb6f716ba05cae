"""The active-learning loop end to end, with a real Celery worker process and a real ASGI
server (Daphne) streaming events over a WebSocket: no eager tasks, no mocks."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.images.models import Tile
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry, RunStatus, TrainingRun
from backend.ml.services import fail_stale_runs, start_training_run
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from ml_worker import synth
from tests.backend.conftest import _free_port, client_for, subprocess_env
from tests.backend.factories import encode, finish_ingest, label_png

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TINY = {"epochs": 2, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 3}


def wait_until(predicate, timeout: float = 240, what: str = "condition", worker=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.process.poll() is not None:
            pytest.fail(f"worker died while waiting for {what}:\n{worker.output()[-4000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}" + (f"\n{worker.output()[-4000:]}" if worker else ""))


@pytest.fixture
def loop_project(make_user):
    admin = make_user("alice", is_staff=True)
    project = create_project(name="AL", created_by=admin, tile_size=64, default_architecture="unet",
                             auto_retrain_threshold=3, al_strategy="hybrid", training_defaults=TINY)
    annotators = [make_user("ann1"), make_user("ann2")]
    for user in annotators:
        Membership.objects.create(user=user, project=project, role=Role.ANNOTATOR)
    images, truths = [], {}
    for i in range(4):
        image, instances = synth.generate("he", size=128, seed=40 + i, nucleus_radius=(5, 8))
        response = client_for(admin).post(
            f"/api/projects/{project.pk}/images/", {"file": SimpleUploadedFile(f"img{i}.png", encode(image, "PNG"))},
            format="multipart",
        )
        assert response.status_code == 201, response.content
        images.append(response.json()["images"][0]["id"])
        finish_ingest()
        for tile in Tile.objects.filter(image_id=images[-1]):
            truths[tile.pk] = instances[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
    return {"project": project, "admin": admin, "annotators": annotators, "truths": truths}


def submit_truth(user, tile_id: int, truth: np.ndarray):
    response = client_for(user).post(
        f"/api/tiles/{tile_id}/annotations/", {"mask": SimpleUploadedFile("m.png", label_png(truth))}, format="multipart"
    )
    assert response.status_code == 201, response.content



@pytest.fixture
def asgi_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "daphne.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "backend.karyo.asgi:application"],
        cwd=ROOT, env={**os.environ, **subprocess_env()}, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=20)
    log.close()


class EventListener(threading.Thread):
    """A WebSocket client in a thread, collecting every event the server pushes."""

    def __init__(self, url: str, origin: str):
        super().__init__(daemon=True)
        self.url, self.origin = url, origin
        self.events: list[dict] = []
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._stopping = False

    def run(self) -> None:
        import websockets

        async def listen() -> None:
            async with websockets.connect(self.url, origin=self.origin) as ws:
                self.connected.set()
                while not self._stopping:
                    try:
                        message = await asyncio.wait_for(ws.recv(), timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    self.events.append(json.loads(message))

        try:
            asyncio.run(listen())
        except BaseException as exc:  # surfaced by the test
            self.error = exc
            self.connected.set()

    def stop(self) -> None:
        self._stopping = True
        self.join(timeout=5)

    def kinds(self) -> list[str]:
        return [e.get("kind") for e in self.events]


def test_the_loop_trains_predicts_ranks_retrains_and_streams_progress(loop_project, start_worker, asgi_server):
    from rest_framework.authtoken.models import Token

    project, admin, (ann1, ann2), truths = (loop_project[k] for k in ("project", "admin", "annotators", "truths"))
    token = Token.objects.get_or_create(user=admin)[0].key
    listener = EventListener(f"ws://{asgi_server}/ws/projects/{project.pk}/?token={token}", origin=f"http://{asgi_server}")
    listener.start()
    assert listener.connected.wait(20) and listener.error is None, listener.error
    wait_until(lambda: "hello" in listener.kinds(), 10, "the hello event")

    worker = start_worker()
    tiles = sorted(truths)
    # Seed labels on two images, so that the frozen by-image split gets a validation image.
    first_image = [t for t in tiles if Tile.objects.get(pk=t).image_id == Tile.objects.get(pk=tiles[0]).image_id]
    last_image = [t for t in tiles if Tile.objects.get(pk=t).image_id == Tile.objects.get(pk=tiles[-1]).image_id]
    seed_tiles = [first_image[0], last_image[0], first_image[1]]
    for tile_id in seed_tiles[:2]:
        submit_truth(ann1, tile_id, truths[tile_id])
    # Two submissions are under the auto-retrain threshold (3): no run yet.
    assert TrainingRun.objects.count() == 0
    response = client_for(admin).post(f"/api/projects/{project.pk}/training-runs/", {"architecture": "unet"}, format="json")
    assert response.status_code == 202, response.content
    first_run = response.json()["id"]
    again = client_for(admin).post(f"/api/projects/{project.pk}/training-runs/", {}, format="json")
    assert again.status_code == 409 and "already in progress" in again.json()["error"]["message"]

    run = wait_until(lambda: TrainingRun.objects.filter(pk=first_run).exclude(status__in=["queued", "running"]).first(),
                     what="the first run", worker=worker)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert len(run.epoch_metrics) == 2 and "dice" in run.epoch_metrics[-1]["val"]
    v1 = ModelVersion.objects.get(training_run=run)
    assert v1.status == ModelStatus.ACTIVE and "first model" in v1.status_reason
    assert v1.metrics["calibration"]["temperature"] > 0  # fitted on the frozen validation split

    # Promotion chains predict (every tile) and rank (the unlabelled ones).
    wait_until(lambda: Prediction.objects.filter(model_version=v1).count() == len(tiles), what="predictions", worker=worker)
    wait_until(lambda: QueueEntry.objects.filter(project=project, model_version=v1).count() == len(tiles) - 2,
               what="the ranked queue", worker=worker)
    prediction = Prediction.objects.filter(model_version=v1).first()
    assert {"entropy", "margin", "boundary", "expected_fixes"} <= set(prediction.uncertainty)
    assert len(prediction.embedding) > 0

    # Two annotators asking at once get different tiles.
    results: dict[str, int] = {}

    def ask(user):
        response = client_for(user).post(f"/api/projects/{project.pk}/queue/next/")
        results[user.username] = response.json()["tile"]

    threads = [threading.Thread(target=ask, args=(u,)) for u in (ann1, ann2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(results.values())) == 2, results
    top = list(QueueEntry.objects.filter(project=project).order_by("rank").values_list("tile_id", flat=True)[:2])
    assert set(results.values()) == set(top)

    # Their submissions (plus one more) cross the threshold: exactly one automatic run starts.
    submit_truth(ann1, results["ann1"], truths[results["ann1"]])
    submit_truth(ann2, results["ann2"], truths[results["ann2"]])
    submit_truth(ann1, seed_tiles[2], truths[seed_tiles[2]])
    submitted_at = time.monotonic()
    # Each correction of a v1 prediction records what the pathologist had to change (a cpu task).
    def effort_of_v1():
        efforts = client_for(admin).get(f"/api/projects/{project.pk}/model-versions/").json()["results"]
        effort = next(v for v in efforts if v["id"] == v1.pk)["correction_effort"]
        return effort if effort and effort["corrections"] == 3 else None

    effort_v1 = wait_until(effort_of_v1, what="the correction effort of three submissions", worker=worker)
    assert 0.0 <= effort_v1["added_or_redrawn_share"] <= 1.0
    auto = wait_until(lambda: TrainingRun.objects.filter(project=project, trigger="auto").first(), 30, "an automatic run")
    run2 = wait_until(lambda: TrainingRun.objects.filter(pk=auto.pk).exclude(status__in=["queued", "running"]).first(),
                      what="the automatic run", worker=worker)
    assert TrainingRun.objects.filter(project=project, trigger="auto").count() == 1
    assert run2.status == RunStatus.SUCCEEDED, run2.error
    assert run2.warm_start_id == v1.pk  # same architecture: it started from the active model
    v2 = ModelVersion.objects.get(training_run=run2)
    assert v2.metrics["active_at_gating"] is not None  # the active model was re-measured on the frozen split
    if v2.status == ModelStatus.ACTIVE:
        wait_until(lambda: QueueEntry.objects.filter(project=project, model_version=v2).exists(), what="re-rank", worker=worker)
        print(f"submitted annotation -> re-ranked queue by the new model: {time.monotonic() - submitted_at:.1f} s")
    else:
        assert v2.status == ModelStatus.CANDIDATE and "kept as candidate" in v2.status_reason
        # An admin can promote it by hand; that re-predicts and re-ranks too.
        assert client_for(admin).post(f"/api/model-versions/{v2.pk}/promote/").status_code == 200
        wait_until(lambda: QueueEntry.objects.filter(project=project, model_version=v2).exists(), what="re-rank", worker=worker)
    annotated = set(seed_tiles[:3]) | set(results.values())
    assert not QueueEntry.objects.filter(project=project, tile_id__in=annotated).exists()

    wait_until(lambda: listener.kinds().count("run.epoch") >= 4, 30,
               f"epoch events over the WebSocket (got {listener.kinds()}, error {listener.error!r})")
    listener.stop()
    kinds = listener.kinds()
    assert {"run.queued", "run.started", "run.epoch", "run.succeeded", "model.promoted", "predict.progress",
            "queue.ranked"} <= set(kinds), kinds
    epochs = [e for e in listener.events if e["kind"] == "run.epoch" and e["run"] == first_run]
    assert [e["epoch"] for e in epochs] == [1, 2] and all("val" in e for e in epochs)


def test_a_worker_killed_mid_training_leaves_the_run_failed_and_a_new_run_can_start(loop_project, start_worker):
    project, ann1, truths = loop_project["project"], loop_project["annotators"][0], loop_project["truths"]
    for tile_id in sorted(truths)[:2]:
        submit_truth(ann1, tile_id, truths[tile_id])
    worker = start_worker()
    run = start_training_run(project=project, architecture="unet", config={"epochs": 200, "steps_per_epoch": 50})
    wait_until(lambda: TrainingRun.objects.filter(pk=run.pk, status="running", heartbeat_at__isnull=False).exists(), 60,
               "the run to start", worker=worker)
    time.sleep(1.0)
    worker.kill()
    # The heartbeat stops with the worker; the periodic check fails the run instead of leaving it running.
    time.sleep(3.0)
    assert fail_stale_runs(project=project, timeout_seconds=2) == 1
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and "stopped responding" in run.error
    new = start_training_run(project=project, architecture="unet")
    assert new.status == RunStatus.QUEUED


def test_the_websocket_refuses_outsiders(loop_project, asgi_server, make_user):
    import websockets
    from rest_framework.authtoken.models import Token

    outsider = make_user("mallory")
    token = Token.objects.create(user=outsider).key
    url = f"ws://{asgi_server}/ws/projects/{loop_project['project'].pk}/?token={token}"

    async def attempt():
        async with websockets.connect(url, origin=f"http://{asgi_server}") as ws:
            await ws.recv()

    with pytest.raises(Exception) as error:
        asyncio.run(attempt())
    assert "4403" in str(error.value) or "403" in str(error.value)


@pytest.mark.django_db
def test_a_submitted_tile_is_not_served_again_even_before_review(make_user):
    from backend.ml.services import next_tile, replace_queue

    owner = make_user("owner", is_staff=True)
    annotator = make_user("annie")
    project = create_project(name="Review first", created_by=owner, tile_size=64, require_review=True)
    Membership.objects.create(user=annotator, project=project, role=Role.ANNOTATOR)
    image, instances = synth.generate("he", size=(64, 128), seed=3)
    client_for(owner).post(f"/api/projects/{project.pk}/images/",
                           {"file": SimpleUploadedFile("i.png", encode(image, "PNG"))}, format="multipart")
    finish_ingest()
    first, second = Tile.objects.filter(project=project).order_by("x")
    replace_queue(project=project, ordered=[(first.pk, 0.9), (second.pk, 0.1)], strategy="entropy", model_version=None)
    assert next_tile(project=project, user=annotator).tile_id == first.pk
    submit_truth(annotator, first.pk, instances[:, :64])
    # Submitted, not yet reviewed (and so not training data): still done as far as the queue goes.
    assert next_tile(project=project, user=annotator).tile_id == second.pk
