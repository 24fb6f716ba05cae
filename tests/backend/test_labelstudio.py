"""The Label Studio integration against a real Label Studio 1.23.2 server.

The session starts its own Label Studio (infra/labelstudio/start.sh) on a free loopback port
with a temporary data folder; Karyo runs as pytest-django's live server, so Label Studio's
webhooks and ML-backend calls reach it, and a real Celery worker (a thread consuming the
``cpu`` queue from the configured broker) processes the webhook deliveries.

Label Studio not installed: a failure in CI (``CI``, ``KARYO_REQUIRE_LABEL_STUDIO=1`` or the
services run), a skip elsewhere (`make labelstudio-install` installs it).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from backend.common.storage import encode_png, read_label_map
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Tile
from backend.images.services import create_annotation, ingest_images
from backend.images.validation import decode_upload
from backend.common import geometry
from backend.labelstudio import services
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.embedded import label_studio_home
from backend.labelstudio.models import AnnotationSync, LabelStudioLink, TaskLink
from backend.ml.models import ModelStatus, ModelVersion, Prediction, TrainingRun
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from tests.backend.conftest import _free_port, client_for
from tests.backend.factories import rgb_png
from tests.conftest import SERVICES

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = SERVICES or bool(os.environ.get("CI")) or os.environ.get("KARYO_REQUIRE_LABEL_STUDIO") == "1"
USER = "pathologist@karyo.test"
TOKEN = "karyo-test-token-0123456789abcdef0123456789"
SECRET = "karyo-test-webhook-secret"
TIMINGS = {}

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]



def wait_for(condition, *, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class LabelStudioServer:
    def __init__(self, data_dir: Path, port: int, log: Path):
        self.data_dir, self.port, self.log = data_dir, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, timeout: float = 240.0) -> float:
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KARYO_", "LABEL_STUDIO_", "DATABASE_URL"))}
        env.update(LABEL_STUDIO_PORT=str(self.port), LABEL_STUDIO_DATA_DIR=str(self.data_dir), LABEL_STUDIO_USERNAME=USER,
                   LABEL_STUDIO_PASSWORD="karyo-test-password", LABEL_STUDIO_USER_TOKEN=TOKEN,
                   KARYO_LABEL_STUDIO_HOME=str(label_studio_home()))
        self.process = subprocess.Popen(["bash", str(ROOT / "infra/labelstudio/start.sh")], env=env,
                                        stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Label Studio exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            if self.healthy():
                return time.monotonic() - started
            time.sleep(0.25)
        self.stop()
        pytest.fail(f"Label Studio did not answer within {timeout:.0f}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        wait_for(lambda: not self.healthy(), timeout=10, what="Label Studio to stop")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    if not (label_studio_home() / "venv" / "bin" / "label-studio").exists():
        message = f"Label Studio is not installed in {label_studio_home()}: run `make labelstudio-install`"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("label-studio")
    server = LabelStudioServer(folder / "data", _free_port(), folder / "label-studio.log")
    TIMINGS["label_studio_start_s"] = round(server.start(), 1)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def configured(settings, label_studio, live_server):
    settings.LABEL_STUDIO_URL = label_studio.url
    settings.LABEL_STUDIO_TOKEN = TOKEN
    settings.LABEL_STUDIO_WEBHOOK_SECRET = SECRET
    settings.KARYO_PUBLIC_URL = live_server.url
    return label_studio


@pytest.fixture
def worker():
    """A real worker (a thread of this process, so that it sees the test's storage) consuming
    the cpu queue of the configured broker."""
    from celery.contrib.testing.worker import start_worker

    from backend.karyo.celery import app

    with app.connection_for_write() as connection:  # nothing left over from earlier runs
        try:
            connection.default_channel.queue_purge("cpu")
        except Exception:  # noqa: BLE001 - an undeclared queue has nothing to purge
            pass
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["cpu"], shutdown_timeout=30,
                      loglevel="WARNING") as w:
        yield w


def nuclei_mask(size: int, count: int, seed: int) -> np.ndarray:
    """``count`` non-overlapping elliptic nuclei of 4-9 px radius."""
    rng = np.random.default_rng(seed)
    instances = np.zeros((size, size), np.int32)
    label = 0
    while label < count:
        cy, cx = rng.integers(10, size - 10, 2)
        ry, rx = rng.uniform(3.5, 8.5, 2)
        yy, xx = np.mgrid[cy - 10 : cy + 11, cx - 10 : cx + 11]
        disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        window = instances[cy - 10 : cy + 11, cx - 10 : cx + 11]
        if window[np.pad(disc[1:-1, 1:-1], 1, constant_values=True) | disc].any():
            continue
        label += 1
        window[disc] = label
    return instances


def make_project(name: str, sizes: list[int], nuclei: list[int], uncertainty: list[float], *, weights: str = "") -> dict:
    staff = get_user_model().objects.create_user(username=f"staff-{name}", password="pw-for-tests-123", is_staff=True)
    project = create_project(name=name, created_by=staff, tile_size=max(sizes))
    pathologist = get_user_model().objects.filter(email=USER).first() or get_user_model().objects.create_user(
        username=f"pathologist-{name}", email=USER, password="pw-for-tests-123")
    Membership.objects.create(user=pathologist, project=project, role=Role.ANNOTATOR)
    model = ModelVersion.objects.create(project=project, version=1, architecture="unet", status=ModelStatus.ACTIVE,
                                        weights=weights)
    tiles, masks = [], {}
    for i, (size, count, u) in enumerate(zip(sizes, nuclei, uncertainty, strict=True)):
        (result,) = ingest_images(project=project, images=decode_upload(f"img{i}.png", rgb_png(size, size, seed=100 + i)),
                                  uploaded_by=staff)
        tile = Tile.objects.get(image=result.image)
        mask = nuclei_mask(size, count, seed=i)
        stored = default_storage.save(f"predictions/{tile.pk}-v1.png", ContentFile(encode_png(mask)))
        Prediction.objects.create(tile=tile, model_version=model, mask=stored, nucleus_count=count,
                                  uncertainty={"hybrid": u})
        tiles.append(tile)
        masks[tile.pk] = mask
    return {"project": project, "tiles": tiles, "masks": masks, "model": model, "pathologist": pathologist, "staff": staff}


def paint(result: list[dict], height: int, width: int) -> np.ndarray:
    """What a pathologist drew, rasterised by the one rule: ids 1..n in drawing order."""
    polygons = [r for r in result if r["type"] == "polygonlabels"]
    return geometry.rasterize(
        [(i, geometry.from_percent(r["value"]["points"], width, height)) for i, r in enumerate(polygons, start=1)],
        height, width,
    )


def assert_same_instances(stored: np.ndarray, expected: np.ndarray) -> None:
    """Every drawn nucleus is one stored nucleus with IoU 1.0, and nothing else is stored."""
    assert (stored > 0).sum() == (expected > 0).sum()
    for label in np.unique(expected)[1:]:
        region = expected == label
        owners = np.unique(stored[region])
        assert len(owners) == 1 and owners[0] > 0, f"nucleus {label} split or lost"
        iou = (region & (stored == owners[0])).sum() / (region | (stored == owners[0])).sum()
        assert iou == 1.0, f"nucleus {label}: IoU {iou}"


def ls_task(link: LabelStudioLink, tile: Tile) -> int:
    return TaskLink.objects.get(link=link, tile=tile).ls_task_id


# --- out ---------------------------------------------------------------------------------------

def test_predictions_go_out_as_one_polygon_per_nucleus_in_karyos_queue_order(configured):
    data = make_project("Out", sizes=[512, 128, 128], nuclei=[300, 12, 12], uncertainty=[0.2, 0.9, 0.5])
    project, tiles = data["project"], data["tiles"]

    report = services.sync_project(project=project)
    assert report.ok, report.error
    assert (report.tasks_created, report.predictions_pushed) == (3, 3)
    link = LabelStudioLink.objects.get(project=project)
    assert link.webhook_id and link.ml_backend_id and link.model_version == "karyo-v1"
    client = LabelStudioClient()

    # Listed back from Label Studio: one polygon per nucleus, rasterising to the mask exactly.
    for tile in tiles:
        (prediction,) = client.list_predictions(task_id=ls_task(link, tile))
        assert prediction.model_version == "karyo-v1"
        assert len(prediction.result) == len(np.unique(data["masks"][tile.pk])) - 1
        assert np.array_equal(paint(prediction.result, tile.h, tile.w) > 0, data["masks"][tile.pk] > 0)
        assert np.array_equal(
            services.conversions.annotation_to_instances(prediction.result, height=tile.h, width=tile.w,
                                                         nucleus_classes=project.nucleus_classes).instances,
            data["masks"][tile.pk],
        )
    # Lower score = more uncertain: Label Studio's labeling stream opens the most uncertain tile.
    scores = {t.pk: client.list_predictions(task_id=ls_task(link, t))[0].score for t in tiles}
    assert sorted(scores, key=scores.get) == [tiles[1].pk, tiles[2].pk, tiles[0].pk]
    assert client.next_task_id(link.ls_project_id) == ls_task(link, tiles[1])

    # The task's image: a signed Karyo URL the browser loads cross-origin (a forged one fails),
    # or with S3 storage a presigned URL on the S3 endpoint.
    task = next(t for t in client.list_tasks(link.ls_project_id) if t.data["karyo_tile_id"] == tiles[1].pk)
    with urllib.request.urlopen(task.data["image"], timeout=10) as response:
        assert response.read()[:4] == b"\x89PNG"
        on_s3 = "X-Amz-Signature" in task.data["image"]
        assert on_s3 or response.headers["Access-Control-Allow-Origin"] == "*"
    if not on_s3:
        with pytest.raises(urllib.error.HTTPError) as forged:
            urllib.request.urlopen(task.data["image"].replace(".png", "x.png"), timeout=10)
        assert forged.value.code == 404

    # Re-ranking moves scores only; a new model version replaces the stale prediction.
    Prediction.objects.filter(tile=tiles[0]).update(uncertainty={"hybrid": 0.99})
    assert services.push_predictions(project=project) == 0
    scores = {t.pk: client.list_predictions(task_id=ls_task(link, t))[0].score for t in tiles}
    assert sorted(scores, key=scores.get) == [tiles[0].pk, tiles[1].pk, tiles[2].pk]  # (/next keeps its lock)
    ModelVersion.objects.filter(pk=data["model"].pk).update(status=ModelStatus.RETIRED)
    model2 = ModelVersion.objects.create(project=project, version=2, architecture="unet", status=ModelStatus.ACTIVE)
    mask2 = nuclei_mask(512, 300, seed=42)
    Prediction.objects.create(tile=tiles[0], model_version=model2, nucleus_count=300, uncertainty={"hybrid": 0.7},
                              mask=default_storage.save("predictions/v2.png", ContentFile(encode_png(mask2))))
    started = time.perf_counter()
    assert services.push_predictions(project=project, tiles=[tiles[0]]) == 1
    TIMINGS["push_300_nuclei_tile_s"] = round(time.perf_counter() - started, 3)
    (prediction,) = client.list_predictions(task_id=ls_task(link, tiles[0]))
    assert prediction.model_version == "karyo-v2" and len(prediction.result) == 300
    assert LabelStudioLink.objects.get(project=project).model_version == "karyo-v2"


# --- back --------------------------------------------------------------------------------------

def test_a_correction_comes_back_through_the_webhook_as_exactly_one_new_version(configured, worker):
    data = make_project("Back", sizes=[512], nuclei=[300], uncertainty=[0.5])
    project, (tile,) = data["project"], data["tiles"]
    assert services.sync_project(project=project).ok
    link = LabelStudioLink.objects.get(project=project)
    client = LabelStudioClient()
    (prediction,) = client.list_predictions(task_id=ls_task(link, tile))

    # The pathologist moves one nucleus, deletes another and draws a new one.
    result = copy.deepcopy(prediction.result)
    for point in result[0]["value"]["points"]:
        point[0] += 1.0
    del result[1]
    result.append({"id": "drawn1abcd", "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
                   "original_width": 512, "original_height": 512, "image_rotation": 0,
                   "value": {"points": [[1.0, 1.0], [3.5, 1.2], [3.3, 3.6], [0.9, 3.1]], "closed": True,
                             "polygonlabels": ["nucleus"]}})
    started = time.perf_counter()
    created = client.sdk.annotations.create(id=ls_task(link, tile), result=result, parent_prediction=prediction.id)
    version = wait_for(lambda: Annotation.objects.filter(tile=tile).first(), timeout=60, what="the correction")
    TIMINGS["correction_300_nuclei_back_s"] = round(time.perf_counter() - started, 3)

    assert version.version == 1 and version.status == AnnotationStatus.SUBMITTED
    assert version.source == AnnotationSource.CORRECTED_PREDICTION
    assert version.prediction.model_version_id == data["model"].pk
    assert version.author == data["pathologist"]  # Label Studio user -> Karyo user by e-mail
    assert version.nucleus_count == 300
    assert_same_instances(read_label_map(version.mask.name), paint(result, 512, 512))

    # The same delivery again (a retry) stores nothing.
    payload = {"action": "ANNOTATION_CREATED", "annotation": {"id": created.id, "task": ls_task(link, tile)},
               "project": {"id": link.ls_project_id}}
    anonymous = client_for(None)
    response = anonymous.post("/api/labelstudio/webhook", payload, format="json", HTTP_X_KARYO_WEBHOOK_SECRET=SECRET)
    assert response.status_code == 200 and response.json()["status"] == "queued"
    from celery.result import AsyncResult

    assert AsyncResult(response.json()["task"]).get(timeout=30) == {"stored": 0, "deleted": 0}
    assert Annotation.objects.filter(tile=tile).count() == 1

    # A further edit in Label Studio is the next version, on top of the first.
    result[2]["value"]["points"] = [[x - 0.5, y] for x, y in result[2]["value"]["points"]]
    client.sdk.annotations.update(id=created.id, result=result)
    second = wait_for(lambda: Annotation.objects.filter(tile=tile, version=2).first(), timeout=60, what="the edit")
    assert second.parent_id == version.pk
    assert_same_instances(read_label_map(second.mask.name), paint(result, 512, 512))
    assert AnnotationSync.objects.get(link=link, ls_annotation_id=created.id).annotation_id == second.pk


def test_nothing_is_lost_when_the_webhook_is_missed_or_label_studio_is_down(configured, worker):
    data = make_project("Down", sizes=[128, 128], nuclei=[10, 10], uncertainty=[0.5, 0.4])
    project, tiles = data["project"], data["tiles"]
    assert services.sync_project(project=project).ok
    link = LabelStudioLink.objects.get(project=project)
    client = LabelStudioClient()

    # A correction made while Karyo's webhook is not delivered.
    client.set_webhook_active(link.webhook_id, False)
    (prediction,) = client.list_predictions(task_id=ls_task(link, tiles[0]))
    drawn = prediction.result[:-1]
    missed = client.sdk.annotations.create(id=ls_task(link, tiles[0]), result=drawn, parent_prediction=prediction.id)
    time.sleep(1.0)
    assert not Annotation.objects.filter(tile__project=project).exists()

    # Label Studio goes down: the sync fails, visibly, and loses nothing.
    configured.stop()
    report = services.sync_project(project=project)
    assert not report.ok and "unreachable" in report.error
    viewer = client_for(data["pathologist"])
    status = viewer.get(f"/api/projects/{project.pk}/labelstudio/").json()
    assert status["linked"] and "unreachable" in status["last_error"] and status["errors"]

    # Back up: the reconcile pulls the missed correction and re-arms the webhook.
    TIMINGS["label_studio_restart_s"] = round(configured.start(), 1)
    report = services.sync_project(project=project)
    assert report.ok and report.annotations_stored == 1
    version = Annotation.objects.get(tile=tiles[0])
    assert version.source == AnnotationSource.CORRECTED_PREDICTION and version.nucleus_count == 9
    assert_same_instances(read_label_map(version.mask.name), paint(drawn, 128, 128))
    status = viewer.get(f"/api/projects/{project.pk}/labelstudio/").json()
    assert status["errors"] == [] and status["last_error"] == "" and status["synced_annotations"] == 1
    assert services.sync_project(project=project).annotations_stored == 0  # idempotent

    # Deleting the correction in Label Studio withdraws it (versions are never deleted).
    client.sdk.annotations.delete(id=missed.id)
    wait_for(lambda: Annotation.objects.get(pk=version.pk).status == AnnotationStatus.REJECTED, timeout=60,
             what="the deletion")


def test_a_webhook_without_the_right_secret_is_refused_and_stores_nothing(settings):
    settings.LABEL_STUDIO_WEBHOOK_SECRET = SECRET
    staff = get_user_model().objects.create_user(username="s", password="pw-for-tests-123", is_staff=True)
    project = create_project(name="Secret", created_by=staff)
    LabelStudioLink.objects.create(project=project, ls_project_id=4242)
    payload = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "task": 1}, "project": {"id": 4242}}
    anonymous = client_for(None)
    for headers in ({}, {"HTTP_X_KARYO_WEBHOOK_SECRET": "wrong"},
                    {"HTTP_AUTHORIZATION": "Basic a2FyeW86d3Jvbmc="}):  # karyo:wrong
        response = anonymous.post("/api/labelstudio/webhook", payload, format="json", **headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["message"]
    assert client_for(staff).post("/api/labelstudio/webhook", payload, format="json").status_code == 401
    assert not AnnotationSync.objects.exists() and not Annotation.objects.exists()


def test_label_studio_uses_karyo_as_its_ml_backend(configured, monkeypatch):
    from backend.ml import tasks as ml_tasks

    queued = {"train": [], "predict": []}
    monkeypatch.setattr(ml_tasks.train, "delay", lambda *a: queued["train"].append(a))
    monkeypatch.setattr(ml_tasks.predict, "delay", lambda *a: queued["predict"].append(a))
    data = make_project("Model", sizes=[128, 128], nuclei=[15, 8], uncertainty=[0.5, 0.6], weights="models/w.pt")
    project, tiles = data["project"], data["tiles"]
    Prediction.objects.filter(tile=tiles[1]).delete()  # computed on demand
    link = services.get_link(project=project)
    client = LabelStudioClient()
    services.ensure_ls_project(link=link, client=client)  # connects Karyo as the "Model"
    services.sync_tasks(link=link, client=client)  # tasks, but nothing pushed
    backend = client.sdk.ml.get(id=link.ml_backend_id)
    assert backend.state == "CO", backend.error_message  # Label Studio called /health and /setup

    # Label Studio asks Karyo for predictions: answered from the stored one.
    select = lambda tile: {"all": False, "included": [ls_task(link, tile)]}  # noqa: E731
    client.sdk.actions.create(id="retrieve_tasks_predictions", project=link.ls_project_id, selected_items=select(tiles[0]))
    (prediction,) = client.list_predictions(task_id=ls_task(link, tiles[0]))
    assert prediction.model_version == "karyo-v1" and len(prediction.result) == 15
    # None stored yet: nothing is answered, and the prediction is queued on the gpu queue.
    client.sdk.actions.create(id="retrieve_tasks_predictions", project=link.ls_project_id, selected_items=select(tiles[1]))
    assert client.list_predictions(task_id=ls_task(link, tiles[1])) == []
    assert queued["predict"] == [(project.pk, data["model"].pk, [tiles[1].pk], False)]

    # Start Training (Label Studio itself answers 200 whatever happens and shows nothing):
    # refused while nothing is annotated, with the reason on Karyo's sync status ...
    client.train(link.ml_backend_id)
    assert not TrainingRun.objects.filter(project=project).exists()
    reason = client_for(data["pathologist"]).get(f"/api/projects/{project.pk}/labelstudio/").json()["last_error"]
    assert "Start Training from Label Studio was refused" in reason and "no accepted annotations" in reason
    # ... and a Karyo training run once there is something to learn from.
    create_annotation(tile=tiles[0], instances=data["masks"][tiles[0].pk], author=data["pathologist"])
    client.train(link.ml_backend_id)
    run = TrainingRun.objects.get(project=project)
    assert run.trigger == "label_studio" and run.status == "queued"
    assert queued["train"] == [(run.pk,)]
    assert client_for(data["pathologist"]).get(f"/api/projects/{project.pk}/labelstudio/").json()["errors"] == []


def test_a_typed_prediction_goes_out_with_each_nucleus_class_and_its_confidence(configured):
    data = make_project("Typed", sizes=[128], nuclei=[6], uncertainty=[0.5])
    project, (tile,) = data["project"], data["tiles"]
    project.nucleus_classes = [{"id": 4, "name": "epithelial", "color": "#e6194b"},
                               {"id": 9, "name": "lymphocyte", "color": "#3cb44b"}]
    project.save(update_fields=["nucleus_classes"])
    # What a typed model stores (ml.workflows.nucleus_classes): instance id -> [class id, confidence].
    typed = {str(i): [4 if i % 2 else 9, round(0.5 + i / 20, 4)] for i in range(1, 7)}
    Prediction.objects.filter(tile=tile).update(classes=typed)

    report = services.sync_project(project=project)
    assert report.ok, report.error
    link = LabelStudioLink.objects.get(project=project)
    (prediction,) = LabelStudioClient().list_predictions(task_id=ls_task(link, tile))
    names = {4: "epithelial", 9: "lymphocyte"}
    assert len(prediction.result) == 6
    for region in prediction.result:
        label = str(geometry.label_from_region_id(region["id"]))
        assert region["value"]["polygonlabels"] == [names[typed[label][0]]]
        assert region["score"] == pytest.approx(typed[label][1])
    # Read back (a pathologist accepting it unchanged): the classes come home with the nuclei.
    back = services.conversions.annotation_to_instances(prediction.result, height=tile.h, width=tile.w,
                                                        nucleus_classes=project.nucleus_classes)
    assert back.classes == {k: v[0] for k, v in typed.items()}


@pytest.fixture(scope="module", autouse=True)
def report_timings():
    yield
    if TIMINGS:
        line = json.dumps(TIMINGS)
        print(f"\nlabel studio timings: {line}")
        from django.conf import settings

        Path(settings.VAR_DIR).mkdir(parents=True, exist_ok=True)
        (Path(settings.VAR_DIR) / "labelstudio-timings.json").write_text(line + "\n")
