"""The active-learning loop's rules in backend/ml/services.py, tested directly (no worker, no
training): gated promotion, rollback, the frozen validation split and auto-retrain."""
from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from backend.common.errors import Conflict
from backend.images.models import Image, Split, Tile
from backend.images.services import create_annotation
from backend.ml.models import ModelStatus, ModelVersion, RunStatus, TrainingRun
from backend.ml.services import freeze_validation_split, gate, maybe_auto_retrain, rollback
from backend.projects.models import Project
from backend.projects.services import create_project

pytestmark = pytest.mark.django_db


@pytest.fixture
def project(make_user):
    # auto-retrain off while the tests add annotations; the tests that need it switch it on
    return create_project(name="Loop", created_by=make_user("alice", is_staff=True), tile_size=64,
                          default_architecture="unet", auto_retrain_threshold=0)


def add_image(project: Project, *, annotated: bool, status: str = "submitted") -> Image:
    n = Image.objects.filter(project=project).count()
    image = Image.objects.create(project=project, name=f"img{n}.png", file=f"images/{n}.png", sha256=f"{n:064d}",
                                 format="png", width=64, height=64)
    tile = Tile.objects.create(image=image, project=project, x=0, y=0, w=64, h=64)
    if annotated:
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=None, status=status)
    return image


def splits(project: Project) -> dict[int, str]:
    return dict(Image.objects.filter(project=project).values_list("pk", "split"))


# --- gate ---------------------------------------------------------------------------------------------

def test_the_first_model_of_a_project_is_promoted():
    assert gate(candidate={"dice": 0.1, "aji": 0.1}, active=None) == (True, "first model of the project")


def test_a_better_model_is_promoted():
    ok, reason = gate(candidate={"dice": 0.80, "aji": 0.60}, active={"dice": 0.75, "aji": 0.55})
    assert ok
    assert "dice 0.8000 >= 0.7500" in reason and "aji 0.6000 >= 0.5500" in reason


def test_a_model_worse_on_dice_or_on_aji_stays_a_candidate():
    ok, reason = gate(candidate={"dice": 0.70, "aji": 0.60}, active={"dice": 0.75, "aji": 0.55})
    assert not ok and reason == "kept as candidate: validation dice 0.7000 < 0.7500 of the active model"
    ok, reason = gate(candidate={"dice": 0.80, "aji": 0.50}, active={"dice": 0.75, "aji": 0.55})
    assert not ok and reason == "kept as candidate: validation aji 0.5000 < 0.5500 of the active model"


def test_a_tie_promotes_the_newer_model():
    ok, _ = gate(candidate={"dice": 0.75, "aji": 0.55}, active={"dice": 0.75, "aji": 0.55})
    assert ok


def test_a_missing_metric_counts_as_zero():
    ok, reason = gate(candidate={"dice": 0.9}, active={"dice": 0.5, "aji": 0.4})
    assert not ok and "aji 0.0000 < 0.4000" in reason
    ok, _ = gate(candidate={"dice": 0.9, "aji": 0.1}, active={})
    assert ok


# --- rollback -----------------------------------------------------------------------------------------

def version(project: Project, number: int, status: str, promoted_minutes_ago: int | None) -> ModelVersion:
    promoted = timezone.now() - timedelta(minutes=promoted_minutes_ago) if promoted_minutes_ago is not None else None
    return ModelVersion.objects.create(project=project, version=number, architecture="unet",
                                       weights=f"models/v{number}.pt", status=status, promoted_at=promoted)


def test_rollback_reactivates_the_version_active_before_the_current_one(project):
    v1 = version(project, 1, ModelStatus.RETIRED, 30)
    v2 = version(project, 2, ModelStatus.RETIRED, 20)
    v3 = version(project, 3, ModelStatus.ACTIVE, 10)
    candidate = version(project, 4, ModelStatus.CANDIDATE, None)

    restored = rollback(project=project)

    assert restored.pk == v2.pk
    statuses = dict(ModelVersion.objects.filter(project=project).values_list("pk", "status"))
    assert statuses == {v1.pk: "retired", v2.pk: "active", v3.pk: "retired", candidate.pk: "candidate"}
    assert restored.status_reason == "rolled back by system"
    # rolling back again goes back to the version just replaced: the last one retired
    assert rollback(project=project).pk == v3.pk
    assert ModelVersion.objects.get(project=project, status=ModelStatus.ACTIVE).pk == v3.pk


def test_rollback_without_an_earlier_version_is_a_conflict(project):
    version(project, 1, ModelStatus.ACTIVE, 5)
    version(project, 2, ModelStatus.CANDIDATE, None)
    with pytest.raises(Conflict, match="no earlier model version"):
        rollback(project=project)
    assert ModelVersion.objects.get(project=project, status=ModelStatus.ACTIVE).version == 1


# --- freeze_validation_split --------------------------------------------------------------------------

def test_the_validation_split_is_frozen_once_and_later_images_join_training(project):
    annotated = [add_image(project, annotated=True) for _ in range(10)]
    unannotated = add_image(project, annotated=False)

    freeze_validation_split(project=project, seed=0)

    project.refresh_from_db()
    frozen_at = project.validation_frozen_at
    assert frozen_at is not None
    first = splits(project)
    val = {pk for pk, split in first.items() if split == Split.VAL}
    assert len(val) == 2  # 20 % of the 10 annotated images
    assert val <= {image.pk for image in annotated}
    assert first[unannotated.pk] == Split.TRAIN
    assert all(first[image.pk] in (Split.TRAIN, Split.VAL) for image in annotated)

    later = [add_image(project, annotated=True) for _ in range(5)]
    assert all(splits(project)[image.pk] == Split.UNASSIGNED for image in later)
    freeze_validation_split(project=project, seed=123)  # another seed changes nothing once frozen

    project.refresh_from_db()
    assert project.validation_frozen_at == frozen_at
    second = splits(project)
    assert {pk for pk, split in second.items() if split == Split.VAL} == val
    assert all(second[image.pk] == Split.TRAIN for image in later)


def test_one_annotated_image_is_not_enough_for_a_validation_split(project):
    only = add_image(project, annotated=True)
    add_image(project, annotated=True, status="draft")  # a draft is not an accepted annotation
    freeze_validation_split(project=project)
    assert set(splits(project).values()) == {Split.TRAIN}
    assert splits(project)[only.pk] == Split.TRAIN


# --- maybe_auto_retrain -------------------------------------------------------------------------------

def switch_on(project: Project, threshold: int) -> Project:
    Project.objects.filter(pk=project.pk).update(auto_retrain_threshold=threshold)
    project.refresh_from_db()
    return project


def test_crossing_the_threshold_starts_exactly_one_run(project):
    for _ in range(2):
        add_image(project, annotated=True)
    switch_on(project, 3)
    assert maybe_auto_retrain(project=project) is None  # 2 < 3

    add_image(project, annotated=True)
    run = maybe_auto_retrain(project=project)
    assert run is not None and run.trigger == "auto" and run.status == RunStatus.QUEUED
    assert run.architecture == "unet"
    # the next submissions while that run is queued (or running) start nothing more
    add_image(project, annotated=True)
    assert maybe_auto_retrain(project=project) is None
    assert TrainingRun.objects.filter(project=project).count() == 1


def test_after_a_run_only_annotations_newer_than_it_count(project):
    for _ in range(3):
        add_image(project, annotated=True)
    switch_on(project, 3)
    first = maybe_auto_retrain(project=project)
    TrainingRun.objects.filter(pk=first.pk).update(status=RunStatus.SUCCEEDED, finished_at=timezone.now())

    assert maybe_auto_retrain(project=project) is None  # the 3 old annotations were used by the first run
    for _ in range(2):
        add_image(project, annotated=True)
    assert maybe_auto_retrain(project=project) is None
    add_image(project, annotated=True)
    second = maybe_auto_retrain(project=project)
    assert second is not None and second.pk != first.pk
    assert TrainingRun.objects.filter(project=project).count() == 2


def test_a_threshold_of_zero_never_starts_a_run(project):
    for _ in range(5):
        add_image(project, annotated=True)
    assert project.auto_retrain_threshold == 0
    assert maybe_auto_retrain(project=project) is None
    assert not TrainingRun.objects.filter(project=project).exists()


def test_drafts_do_not_count_towards_the_threshold(project):
    for _ in range(3):
        add_image(project, annotated=True, status="draft")
    switch_on(project, 2)
    assert maybe_auto_retrain(project=project) is None
    assert not TrainingRun.objects.filter(project=project).exists()
