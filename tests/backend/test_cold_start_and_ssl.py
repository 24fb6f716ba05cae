"""Issue 16 in the product: the first queue is ranked by typicality (no model yet), the
default strategy hands over to uncertainty as labels grow, and a project may pretrain its
encoder self-supervised (SimSiam) on its own tiles — whose checkpoint then embeds the tiles for
the cold start and starts the first training run. Worker code runs in the test process with
tiny models on 64-px tiles; planted tiles: three kinds of near-duplicates and three outliers."""
from __future__ import annotations

import hashlib
from datetime import timedelta

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from backend.common.errors import Conflict, KaryoError
from backend.common.storage import read_bytes
from backend.images.models import Tile
from backend.images.services import create_annotation
from backend.ml import ssl, workflows
from backend.ml.models import (
    EncoderPretraining,
    ModelStatus,
    ModelVersion,
    Prediction,
    ProjectEvent,
    QueueEntry,
    RunStatus,
    TrainingRun,
)
from backend.ml.services import (
    cancel_pretraining,
    fail_stale_pretrainings,
    start_pretraining,
    start_training_run,
)
from backend.projects.services import create_project
from tests.backend.conftest import client_for
from tests.backend.factories import encode, finish_ingest
from tests.ml_worker.test_active_learning_warmup import planted_tiles

TINY = {"epochs": 2, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 3, "bn_recalibrate": False}
SSL_TINY = {"steps": 3, "batch_size": 4, "crop": 32}


def planted_project(admin, *, name: str, ssl_pretrain: bool = False, per_kind: int = 11):
    """A project whose one image is a grid of planted 64-px tiles; returns (project, kind per tile id)."""
    tiles, kinds = planted_tiles(per_kind=per_kind)
    cols = 6
    rows = -(-len(tiles) // cols)
    assert rows * cols == len(tiles)
    image = np.zeros((rows * 64, cols * 64, 3), np.uint8)
    for i, tile in enumerate(tiles):
        image[(i // cols) * 64 : (i // cols + 1) * 64, (i % cols) * 64 : (i % cols + 1) * 64] = tile
    project = create_project(name=name, created_by=admin, tile_size=64, auto_retrain_threshold=0, default_architecture="unet",
                             min_tissue_fraction=0.0, training_defaults=TINY, ssl_pretrain=ssl_pretrain)
    response = client_for(admin).post(f"/api/projects/{project.pk}/images/",
                                      {"file": SimpleUploadedFile("grid.png", encode(image, "PNG"))}, format="multipart")
    assert response.status_code == 201, response.content
    finish_ingest()
    kind_of = {t.pk: kinds[(t.y // 64) * cols + t.x // 64] for t in Tile.objects.filter(project=project)}
    assert len(kind_of) == len(tiles)
    return project, kind_of


def queue(project) -> list[QueueEntry]:
    return list(QueueEntry.objects.filter(project=project).order_by("rank"))


@pytest.mark.django_db
def test_a_fresh_projects_first_queue_covers_each_kind_of_tile_before_the_outliers(make_user):
    project, kind_of = planted_project(make_user("alice"), name="Cold")
    assert project.al_strategy == "hybrid"  # the default

    assert workflows.run_ranking(project_id=project.pk, batch_size=3) == len(kind_of)

    entries = queue(project)
    assert sorted(kind_of[e.tile_id] for e in entries[:3]) == [0, 1, 2]
    assert [kind_of[e.tile_id] for e in entries[-3:]] == [-1, -1, -1]
    assert {e.strategy for e in entries} == {"typical"} and all(e.model_version is None for e in entries)
    assert entries[0].score <= 1.0 and max(e.score for e in entries) == pytest.approx(1.0)
    event = ProjectEvent.objects.filter(project=project, kind="queue.ranked").latest("created_at")
    assert event.data["features"] == "random_encoder" and event.data["seed"] == 0
    # No SSL: nothing was started.
    assert not EncoderPretraining.objects.filter(project=project).exists()

    # Deterministic for a seed; the product's batch of 8 also starts with one tile of each kind.
    workflows.run_ranking(project_id=project.pk, batch_size=3)
    assert [e.tile_id for e in queue(project)] == [e.tile_id for e in entries]
    workflows.run_ranking(project_id=project.pk)
    assert sorted(kind_of[e.tile_id] for e in queue(project)[:3]) == [0, 1, 2]


@pytest.mark.django_db
def test_the_random_baseline_stays_random_before_the_first_model(make_user):
    project, kind_of = planted_project(make_user("alice"), name="Random", per_kind=5)
    project.al_strategy = "random"
    project.save(update_fields=["al_strategy"])
    workflows.run_ranking(project_id=project.pk, seed=4)
    entries = queue(project)
    rng = np.random.default_rng(4)
    ids = sorted(kind_of)
    assert [e.tile_id for e in entries] == [ids[i] for i in rng.permutation(len(ids))]
    assert {e.strategy for e in entries} == {"random"}


def _model_project(admin, *, labelled: int, candidates: int = 12):
    """A project with an active tiny (untrained) model, its predictions on every tile and
    ``labelled`` tiles with an accepted annotation. Ranking reads predictions, never pixels."""
    import torch

    from ml_worker import synth
    from ml_worker.active_learning import analyze_tiles
    from ml_worker.models import create_model
    from tests.backend.test_engine_catalog import make_tiles

    torch.manual_seed(0)
    model = create_model("unet", width=4, depth=2).eval()
    images = [synth.generate("he", size=64, seed=90 + i)[0] for i in range(candidates)]
    analyses = analyze_tiles(model, images, tile_size=64, device="cpu")
    project = create_project(name=f"Warm {labelled}", created_by=admin, tile_size=64, auto_retrain_threshold=0)
    tiles = make_tiles(project, candidates + labelled)
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/v1.pt",
                                          status=ModelStatus.ACTIVE)
    for i, tile in enumerate(tiles):
        analysis = analyses[i % candidates]
        Prediction.objects.create(
            tile=tile, model_version=version, mask=f"predictions/{tile.pk}.png", nucleus_count=analysis.nucleus_count,
            uncertainty={k: float(v) for k, v in analysis.scores.items()},
            embedding=[float(x) + 0.01 * i for x in np.asarray(analysis.embedding).ravel()],
        )
    for tile in tiles[candidates:]:
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=admin)
    return project, tiles[:candidates]


@pytest.mark.django_db
@pytest.mark.parametrize("labelled, typical_in_batch", [(0, 8), (16, 4), (24, 0)])
def test_the_default_strategy_switches_from_typical_to_uncertainty_as_labels_grow(make_user, labelled,
                                                                                   typical_in_batch):
    from ml_worker.active_learning import rank

    project, candidates = _model_project(make_user("alice"), labelled=labelled)
    workflows.run_ranking(project_id=project.pk)
    entries = queue(project)
    assert len(entries) == len(candidates)
    assert [e.strategy for e in entries[:8]].count("typical") == typical_in_batch
    assert {e.strategy for e in entries[8:]} == {"hybrid"}
    assert all(e.score > 0.0 for e in entries)  # every entry shows the strategy's score (entropy)
    if typical_in_batch == 0:
        # From 24 labelled tiles the queue is exactly hybrid's.
        active = ModelVersion.objects.get(project=project, status=ModelStatus.ACTIVE)
        preds = {p.tile_id: p for p in Prediction.objects.filter(model_version=active)}
        ids = [t.pk for t in candidates]
        lab = np.array([preds[t].embedding for t in sorted(preds) if t not in ids], np.float32)
        order = rank("hybrid", [preds[t].uncertainty for t in ids],
                     embeddings=np.array([preds[t].embedding for t in ids], np.float32),
                     costs=np.array([preds[t].nucleus_count for t in ids], np.float32), k=8, labelled_embeddings=lab)
        assert [e.tile_id for e in entries] == [ids[i] for i in order]


# --- self-supervised pretraining ----------------------------------------------------------------

# transaction=True: the heartbeat threads write through their own connections.
@pytest.mark.django_db(transaction=True)
def test_with_ssl_on_the_encoder_ranks_the_first_queue_and_starts_the_first_training_run(make_user):
    from ml_worker.active_learning.warmup import cold_start_rank
    from ml_worker.checkpoint import load_checkpoint
    from ml_worker.ssl import ssl_embeddings

    admin = make_user("alice")
    project, kind_of = planted_project(admin, name="SSL", ssl_pretrain=True, per_kind=5)
    pretraining = start_pretraining(project=project, config=SSL_TINY, started_by=admin)
    assert pretraining.status == RunStatus.QUEUED and pretraining.config["steps"] == 3
    # Before it has run the queue is ranked on the fixed features (and no second pretraining starts).
    workflows.run_ranking(project_id=project.pk)
    assert ProjectEvent.objects.filter(kind="queue.ranked", project=project).latest("created_at").data[
        "features"] == "random_encoder"
    assert EncoderPretraining.objects.filter(project=project).count() == 1

    assert ssl.run_pretraining(pretraining_id=pretraining.pk, task_id="t1") == "succeeded"
    pretraining.refresh_from_db()
    assert pretraining.status == RunStatus.SUCCEEDED and pretraining.progress == 1.0
    data = read_bytes(pretraining.checkpoint.name)
    assert hashlib.sha256(data).hexdigest() == pretraining.checkpoint_sha256
    model, meta = load_checkpoint(ssl.local_checkpoint(pretraining))
    assert meta["arch"] == "unet" and meta["ssl"]["steps"] == 3 and model.init_kwargs["width"] == 4
    assert pretraining.info["tiles"] == len(kind_of) and pretraining.info["input_norm"] == "image"
    assert ProjectEvent.objects.filter(project=project, kind="ssl.succeeded").exists()

    # The cold-start embeddings now come from the encoder: the queue is its typicality order.
    workflows.run_ranking(project_id=project.pk)
    event = ProjectEvent.objects.filter(kind="queue.ranked", project=project).latest("created_at")
    assert event.data["features"] == "ssl" and event.data["sha256"] == pretraining.checkpoint_sha256
    ids = sorted(kind_of)
    from backend.images.pixels import read_tile_rgb

    pixels = [read_tile_rgb(Tile.objects.select_related("image", "project").get(pk=t)) for t in ids]
    expected = cold_start_rank(ssl_embeddings(ssl.local_checkpoint(pretraining), pixels, tile_size=64), k=8).order
    assert [e.tile_id for e in queue(project)] == [ids[i] for i in expected]

    # The first training run starts from the encoder's weights, and says so.
    for tile in Tile.objects.filter(project=project).order_by("id")[:4]:
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=admin)
    run = start_training_run(project=project, architecture="unet")
    assert workflows.run_training(run_id=run.pk) in ("promoted", "candidate"), TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    assert run.init_weights == {"source": "ssl", "id": pretraining.pk, "sha256": pretraining.checkpoint_sha256,
                                "checkpoint": pretraining.checkpoint.name}


@pytest.mark.django_db(transaction=True)
def test_with_ssl_off_nothing_is_pretrained_and_the_first_run_starts_fresh(make_user):
    admin = make_user("alice")
    project, _ = planted_project(admin, name="No SSL", per_kind=5)
    with pytest.raises(Conflict, match="pretraining is off"):
        start_pretraining(project=project)
    workflows.run_ranking(project_id=project.pk)
    assert not EncoderPretraining.objects.filter(project=project).exists()
    # A finished pretraining of an earlier "on" period is not used once the setting is off.
    EncoderPretraining.objects.create(project=project, architecture="unet", status=RunStatus.SUCCEEDED,
                                      checkpoint="encoders/x.pt", checkpoint_sha256="0" * 64,
                                      info={"model_kwargs": {"width": 4}}, finished_at=timezone.now())
    for tile in Tile.objects.filter(project=project).order_by("id")[:4]:
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=admin)
    run = start_training_run(project=project, architecture="unet")
    assert workflows.run_training(run_id=run.pk) in ("promoted", "candidate"), TrainingRun.objects.get(pk=run.pk).error
    run.refresh_from_db()
    assert run.init_weights == {}
    workflows.run_ranking(project_id=project.pk)  # a model now: no cold-start features, no pretraining
    assert EncoderPretraining.objects.filter(project=project).count() == 1


@pytest.mark.django_db(transaction=True)
def test_ranking_without_a_model_starts_the_projects_pretraining_once(make_user):
    admin = make_user("alice")
    project, _ = planted_project(admin, name="Auto SSL", ssl_pretrain=True, per_kind=5)
    workflows.run_ranking(project_id=project.pk)
    workflows.run_ranking(project_id=project.pk)
    started = EncoderPretraining.objects.get(project=project)
    assert started.trigger == "auto" and started.status == RunStatus.QUEUED
    assert started.config == {"steps": 200, "batch_size": 16, "crop": 64, "lr": 0.05, "max_tiles": 512}


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_or_abandoned_pretraining_leaves_nothing_stuck_or_half_written(make_user):
    admin = make_user("alice")
    project, _ = planted_project(admin, name="Cancel SSL", ssl_pretrain=True, per_kind=5)
    with pytest.raises(KaryoError, match="steps must be an integer from 1") as err:
        start_pretraining(project=project, config={"steps": 0})
    assert err.value.code == "invalid_config"

    # Queued, then cancelled: it never runs.
    queued = start_pretraining(project=project, config=SSL_TINY)
    assert cancel_pretraining(pretraining=queued).status == RunStatus.CANCELLED
    assert ssl.run_pretraining(pretraining_id=queued.pk, task_id="a") == "skipped"

    # Running, then cancelled: it stops at its next step and stores nothing.
    running = start_pretraining(project=project, config={**SSL_TINY, "steps": 500})
    with pytest.raises(Conflict, match="already in progress"):
        start_pretraining(project=project, config=SSL_TINY)
    EncoderPretraining.objects.filter(pk=running.pk).update(status=RunStatus.RUNNING, celery_task_id="b",
                                                            started_at=timezone.now())
    cancel_pretraining(pretraining=running)
    assert ssl.run_pretraining(pretraining_id=running.pk, task_id="b") == "cancelled"
    running.refresh_from_db()
    assert running.status == RunStatus.CANCELLED and not running.checkpoint and not running.checkpoint_sha256
    assert not list((ssl._cache_dir()).glob(f"ssl-run-{running.pk}-*"))

    # A worker that died mid-pretraining: failed by the periodic check, and a new one can start.
    dead = start_pretraining(project=project, config=SSL_TINY)
    EncoderPretraining.objects.filter(pk=dead.pk).update(status=RunStatus.RUNNING,
                                                         heartbeat_at=timezone.now() - timedelta(hours=1))
    assert fail_stale_pretrainings(project=project) == 1
    dead.refresh_from_db()
    assert dead.status == RunStatus.FAILED and "stopped responding" in dead.error
    assert start_pretraining(project=project, config=SSL_TINY).status == RunStatus.QUEUED


@pytest.mark.django_db
def test_admins_start_and_cancel_a_pretraining_through_the_api_and_bad_options_are_named(api, team):
    from tests.backend.factories import rgb_png

    project = team["project"]
    url = f"/api/projects/{project.pk}/pretrainings/"
    response = api("admin").post(url, {"config": {"steps": 5}}, format="json")
    assert response.status_code == 409 and "ssl_pretrain" in response.json()["error"]["message"]
    assert api("admin").patch(f"/api/projects/{project.pk}/", {"ssl_pretrain": True},
                              format="json").json()["ssl_pretrain"] is True
    response = api("admin").post(url, {"config": {"steps": 5}}, format="json")
    assert response.status_code == 409 and "no tiles" in response.json()["error"]["message"]
    assert api("admin").post(f"/api/projects/{project.pk}/images/", {"file": SimpleUploadedFile(
        "t.png", rgb_png(64, 64))}, format="multipart").status_code == 201
    finish_ingest()
    response = api("admin").post(url, {"config": {"crop": 4}}, format="json")
    assert response.status_code == 400 and response.json()["error"]["details"]["field"] == "crop"
    response = api("admin").post(url, {"config": {"steps": 5}}, format="json")
    assert response.status_code == 202, response.content
    pretraining = response.json()
    assert pretraining["status"] == "queued" and pretraining["config"]["steps"] == 5
    listed = api("viewer").get(url).json()
    listed = listed["results"] if isinstance(listed, dict) else listed
    assert [p["id"] for p in listed] == [pretraining["id"]]
    cancelled = api("admin").post(f"/api/pretrainings/{pretraining['id']}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api("admin").post(f"/api/pretrainings/{pretraining['id']}/cancel/").status_code == 409


# --- the real worker: the task, its progress, its follow-up ranking, cancel ---------------------

@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_celery_worker_pretrains_reports_progress_and_ranks_the_queue_on_the_new_encoder(make_user, start_worker):
    from tests.backend.test_active_learning_loop import wait_until

    admin = make_user("alice")
    project, kind_of = planted_project(admin, name="Worker SSL", ssl_pretrain=True, per_kind=5)
    worker = start_worker("gpu")
    pretraining = start_pretraining(project=project, config={**SSL_TINY, "steps": 20}, started_by=admin)
    done = wait_until(lambda: EncoderPretraining.objects.filter(pk=pretraining.pk, status__in=[
        "succeeded", "failed", "cancelled"]).first(), 240, "the pretraining", worker=worker)
    assert done.status == RunStatus.SUCCEEDED, done.error
    assert done.checkpoint and len(done.checkpoint_sha256) == 64 and done.progress == 1.0
    assert {"ssl.queued", "ssl.started", "ssl.succeeded"} <= set(
        ProjectEvent.objects.filter(project=project).values_list("kind", flat=True))
    # No model yet: the worker ranked the queue again, on the encoder's features.
    ranked = wait_until(lambda: ProjectEvent.objects.filter(project=project, kind="queue.ranked").first(), 120,
                        "the ranking after the pretraining", worker=worker)
    assert ranked.data["features"] == "ssl" and ranked.data["sha256"] == done.checkpoint_sha256
    assert QueueEntry.objects.filter(project=project, strategy="typical").count() == len(kind_of)

    # A long one, cancelled while it runs: stopped at its next step, nothing stored.
    long = start_pretraining(project=project, config={**SSL_TINY, "steps": 100000}, started_by=admin)
    wait_until(lambda: EncoderPretraining.objects.filter(pk=long.pk, status="running", progress__gt=0).exists(), 120,
               "the long pretraining to make progress", worker=worker)
    cancel_pretraining(pretraining=long, by=admin)
    stopped = wait_until(lambda: EncoderPretraining.objects.filter(pk=long.pk, status="cancelled").first(), 60,
                         "the cancel", worker=worker)
    assert not stopped.checkpoint and not stopped.checkpoint_sha256
