"""Admins in the browser: launch a short training run and watch epochs arrive live over the
WebSocket (a real Celery worker trains), the model registry, an export; viewers get no launch
button and the API refuses them; empty states."""
from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from backend.images.models import Tile
from backend.images.services import create_annotation
from backend.ml.models import ModelStatus, ModelVersion, RunStatus, TrainingRun
from backend.projects.services import create_project
from tests.browser.conftest import record_timings
from tests.browser.scenario import PASSWORD, decoded, make_users
from backend.images import services as image_services
from ml_worker import synth

pytestmark = pytest.mark.django_db(transaction=True)
TINY = {"epochs": 3, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 3, "early_stopping_patience": 0}


@pytest.fixture
def trainable(make_user):
    """Synthetic tiles with exact masks on three images (so the frozen split has a validation image)."""
    # Training checkpoints live in VAR_DIR/runs/run-<id>: a run 1 of an earlier test session
    # (same var dir, new database) would make this run 1 "resume" a finished run.
    shutil.rmtree(Path(settings.VAR_DIR) / "runs", ignore_errors=True)
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project = create_project(name="Demo (browser)", created_by=staff, tile_size=64, default_architecture="unet",
                             auto_retrain_threshold=0, training_defaults=TINY)
    users = make_users(make_user, project)
    for i in range(3):
        pixels, instances = synth.generate("he", size=128, seed=50 + i, nucleus_radius=(5, 8))
        [result] = image_services.ingest_images(project=project, images=[decoded(f"he-{i}.png", pixels)], uploaded_by=staff)
        for tile in Tile.objects.filter(image=result.image).order_by("y", "x")[:2]:
            create_annotation(tile=tile, instances=instances[tile.y:tile.y + tile.h, tile.x:tile.x + tile.w].astype("int32"),
                              author=users["annotator"])
    return {"project": project, "users": users}


def test_a_viewer_has_no_launch_button_and_the_api_refuses(trainable, open_session):
    project = trainable["project"]
    v = open_session("viewer", PASSWORD)
    v.goto(f"/projects/{project.pk}/training/")
    v.page.wait_for_selector("[data-testid=launch-denied]")
    assert v.page.locator("[data-testid=launch]").count() == 0
    assert v.page.locator("[data-testid=launch-form]").count() == 0
    refused = v.api("POST", f"/api/projects/{project.pk}/training-runs/", {"architecture": "unet", "config": {"epochs": 1}})
    assert refused["status"] == 403 and "admin" in refused["data"]["error"]["message"]
    assert not TrainingRun.objects.filter(project=project).exists()
    v.shot("13-viewer-training")

    # No model yet, no ranked queue, no worker: the pages say so.
    v.goto(f"/projects/{project.pk}/queue/")
    v.page.wait_for_selector("[data-testid=empty-state]")
    v.page.wait_for_selector("[data-testid=worker-offline]")
    assert "No model" in v.page.inner_text("[data-testid=empty-state]")
    assert v.page.locator("[data-testid=start-annotating]").is_disabled()
    v.shot("14-queue-empty-worker-offline")
    v.goto(f"/projects/{project.pk}/models/")
    v.page.wait_for_selector("[data-testid=empty-state]")
    assert v.page.locator("[data-testid=promote], [data-testid=rollback]").count() == 0
    v.goto(f"/projects/{project.pk}/exports/")
    v.page.wait_for_selector("[data-testid=empty-state]")
    assert "reviewers and admins" in v.page.inner_text("[data-testid=empty-state]")


def test_an_admin_launches_training_and_watches_live_epochs(trainable, open_session, start_worker):
    project = trainable["project"]
    worker = start_worker()
    s = open_session("admin", PASSWORD)
    s.goto(f"/projects/{project.pk}/training/")
    form = s.page.locator("[data-testid=launch-form]")
    form.wait_for()
    # The form starts from the project's training defaults.
    assert form.locator("input[name=epochs]").input_value() == "3"
    assert form.locator("input[name=tile_size]").input_value() == "64"
    assert form.locator("select[name=architecture]").input_value() == "unet"
    s.page.wait_for_selector("#worker-pill.pill-ok")
    s.page.evaluate("window.__noReload = true")

    started = time.perf_counter()
    s.page.click("[data-testid=launch]")
    s.page.wait_for_selector("[data-testid=run-panel] .badge-queued, [data-testid=run-panel] .badge-running")
    # At least two epochs pushed over the WebSocket, without reloading the page.
    try:
        s.page.wait_for_function(
            "Number(document.querySelector('[data-testid=live-epochs]')?.dataset.count || 0) >= 2", timeout=240_000)
    except Exception:
        runs = list(TrainingRun.objects.filter(project=project).values("id", "status", "epoch_metrics", "error"))
        pytest.fail(f"no live epochs; runs {runs}; live pill {s.page.get_attribute('#live-pill', 'data-status')}\n"
                    f"worker:\n{worker.output()[-4000:]}")
    two_epochs = time.perf_counter() - started
    assert s.page.evaluate("window.__noReload === true"), "the page reloaded"
    assert int(s.page.get_attribute("[data-testid=val-chart]", "data-points")) >= 2
    s.shot("09-training-live")

    run = TrainingRun.objects.get(project=project)
    deadline = time.monotonic() + 240
    while TrainingRun.objects.filter(pk=run.pk, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists():
        assert time.monotonic() < deadline and worker.process.poll() is None, worker.output()[-3000:]
        time.sleep(0.5)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    s.page.wait_for_selector("[data-testid=run-outcome]", timeout=30_000)
    s.page.wait_for_selector("[data-testid=run-panel] .badge-succeeded")
    assert s.page.inner_text("[data-testid=epoch-counter]").strip() == "3 of 3 epochs"
    assert s.page.evaluate("window.__noReload === true")
    s.shot("10-training-done")
    record_timings("training_run", {"launch_to_two_live_epochs_s": round(two_epochs, 1),
                                    "epochs_received_live": int(s.page.get_attribute("[data-testid=live-epochs]", "data-count"))})

    # The registry: the first model is active; an admin sees promote/rollback controls.
    version = ModelVersion.objects.get(project=project)
    assert version.status == ModelStatus.ACTIVE
    s.goto(f"/projects/{project.pk}/models/")
    s.page.wait_for_selector("[data-testid=version-row][data-status=active]")
    assert s.page.locator("[data-testid=rollback]").is_disabled()  # nothing to roll back to yet
    s.shot("11-models")

    # An export of the submitted annotations, watched to the end and downloaded.
    s.goto(f"/projects/{project.pk}/exports/")
    s.page.wait_for_selector("[data-testid=export-form]")
    s.page.select_option("select[name=status]", "submitted")
    s.page.click("[data-testid=start-export]")
    s.page.wait_for_selector("[data-testid=export-row]")
    s.page.wait_for_selector("[data-testid=download]", timeout=120_000)
    s.shot("12-exports")
    href = s.page.get_attribute("[data-testid=download]", "href")
    download = s.context.request.get(s.base + href)
    assert download.status == 200
    assert "manifest.json" in zipfile.ZipFile(io.BytesIO(download.body())).namelist()
