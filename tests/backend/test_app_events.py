"""Events between apps (docs/architecture.md): a lower app announces what happened, a higher app
subscribes in its AppConfig.ready(). Each test checks when the announcement is made and that the
subscriber's effect follows, without the lower app importing the higher one."""
from __future__ import annotations

import numpy as np
import pytest

from backend.common import jobs
from backend.images.models import AnnotationSource, Image, Tile
from backend.images.services import create_annotation
from backend.images.signals import annotation_saved
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry
from backend.ml.signals import queue_ranked
from backend.ml.workflows import run_ranking
from backend.projects.models import Project
from backend.projects.services import create_project

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(make_user):
    return create_project(name="Events", created_by=make_user("alice", is_staff=True), tile_size=64,
                          default_architecture="unet", al_strategy="entropy", auto_retrain_threshold=0)


def add_tile(project: Project) -> Tile:
    n = Image.objects.filter(project=project).count()
    image = Image.objects.create(project=project, name=f"img{n}.png", file=f"images/{n}.png", sha256=f"{n:064d}",
                                 format="png", width=64, height=64)
    return Tile.objects.create(image=image, project=project, x=0, y=0, w=64, h=64)


@pytest.fixture
def heard():
    """Every announcement of both signals, as (signal name, arguments)."""
    calls: list[tuple[str, dict]] = []

    def on_annotation(sender, **kwargs):
        calls.append(("annotation_saved", kwargs))

    def on_queue(sender, **kwargs):
        calls.append(("queue_ranked", kwargs))

    annotation_saved.connect(on_annotation, weak=False, dispatch_uid="test.annotation_saved")
    queue_ranked.connect(on_queue, weak=False, dispatch_uid="test.queue_ranked")
    yield calls
    annotation_saved.disconnect(dispatch_uid="test.annotation_saved")
    queue_ranked.disconnect(dispatch_uid="test.queue_ranked")


def test_a_submitted_annotation_is_announced_after_commit_and_ml_takes_its_tile_off_the_queue(
    project, heard, django_capture_on_commit_callbacks
):
    tile = add_tile(project)
    QueueEntry.objects.create(project=project, tile=tile, rank=0, score=0.5, strategy="entropy")
    with django_capture_on_commit_callbacks() as callbacks:
        annotation, created = create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=None)
    assert created and heard == []  # nothing is announced before the version is committed
    assert QueueEntry.objects.filter(tile=tile).exists()
    for callback in callbacks:
        callback()
    assert heard == [("annotation_saved", {"signal": annotation_saved, "annotation": annotation})]
    assert not QueueEntry.objects.filter(tile=tile).exists()  # ml's subscriber ran


def test_a_draft_is_announced_but_keeps_its_tile_in_the_queue(project, heard, django_capture_on_commit_callbacks):
    tile = add_tile(project)
    QueueEntry.objects.create(project=project, tile=tile, rank=0, score=0.5, strategy="entropy")
    with django_capture_on_commit_callbacks(execute=True):
        draft, _ = create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=None, status="draft")
    assert [name for name, _ in heard] == ["annotation_saved"]
    assert QueueEntry.objects.filter(tile=tile).exists()


def test_a_bulk_import_is_not_announced(project, heard, django_capture_on_commit_callbacks):
    tile = add_tile(project)
    with django_capture_on_commit_callbacks(execute=True):
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=None,
                          source=AnnotationSource.IMPORTED, status="reviewed")
    assert heard == []


def test_ranking_announces_the_queue_and_label_studio_pushes_only_a_model_ranked_queue(
    project, heard, settings, monkeypatch, django_capture_on_commit_callbacks
):
    settings.LABEL_STUDIO_URL, settings.LABEL_STUDIO_TOKEN = "http://127.0.0.1:9", "token"  # configured, never called
    pushed: list[tuple] = []
    monkeypatch.setattr(jobs.task("karyo.cpu.labelstudio_push"), "delay", lambda *args: pushed.append(args))
    tiles = [add_tile(project) for _ in range(3)]

    with django_capture_on_commit_callbacks(execute=True):
        # No model yet (the random baseline: the tiles here have no pixels for a typicality ranking).
        assert run_ranking(project_id=project.pk, strategy="random") == 3
    assert heard == [("queue_ranked", {"signal": queue_ranked, "project": project, "strategy": "random",
                                       "model_version": None})]
    assert pushed == []  # no predictions to show in Label Studio

    model = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/v1.pt",
                                        status=ModelStatus.ACTIVE)
    for i, tile in enumerate(tiles):
        Prediction.objects.create(tile=tile, model_version=model, mask=f"predictions/{tile.pk}.png", nucleus_count=3,
                                  uncertainty={"entropy": 0.1 * (i + 1)}, embedding=[float(i), 1.0])
    heard.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert run_ranking(project_id=project.pk) == 3
    assert [(name, kwargs["strategy"], kwargs["model_version"]) for name, kwargs in heard] == [
        ("queue_ranked", "entropy", model)
    ]
    assert pushed == [(project.pk, None)]  # labelstudio's subscriber scheduled the push of every tile


def test_enqueueing_an_unknown_task_name_says_which():
    with pytest.raises(LookupError, match="karyo.cpu.no_such_task"):
        jobs.task("karyo.cpu.no_such_task")
