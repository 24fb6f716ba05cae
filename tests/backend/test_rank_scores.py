"""Ranking by a score that only an extra analysis pass computes (mc_dropout, tta) is refused at the
API with a 400 naming the missing score and the strategies the stored predictions do support,
instead of a ranking task that fails in the worker."""
from __future__ import annotations

import pytest

from backend.images.models import Image, Tile
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry

pytestmark = pytest.mark.django_db

CHEAP = {"entropy": 0.4, "margin": 0.3, "boundary": 0.2, "expected_fixes": 1.5}


def predicted_project(project, scores: list[dict]) -> ModelVersion:
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/v1.pt",
                                          status=ModelStatus.ACTIVE)
    for i, uncertainty in enumerate(scores):
        image = Image.objects.create(project=project, name=f"img{i}.png", file=f"images/{project.pk}-{i}.png",
                                     sha256=f"{project.pk:032d}{i:032d}", format="png", width=64, height=64)
        tile = Tile.objects.create(image=image, project=project, x=0, y=0, w=64, h=64)
        Prediction.objects.create(tile=tile, model_version=version, mask=f"predictions/{tile.pk}.png",
                                  nucleus_count=3, uncertainty=uncertainty, embedding=[0.1 * i, 1.0])
    return version


def test_ranking_by_mc_dropout_without_its_scores_is_a_400_naming_the_score(api, team):
    project = team["project"]
    predicted_project(project, [dict(CHEAP) for _ in range(3)])
    url = f"/api/projects/{project.pk}/rank/"

    response = api("admin").post(url, {"strategy": "mc_dropout"}, format="json")

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "missing_scores"
    assert error["details"]["field"] == "strategy" and error["details"]["score"] == "mc_dropout"
    assert error["details"]["lacking"] == 3 and error["details"]["predictions"] == 3
    assert "mc_dropout" not in error["details"]["valid"] and "tta" not in error["details"]["valid"]
    assert {"entropy", "margin", "hybrid", "fixes"} <= set(error["details"]["valid"])
    assert "3 of the 3 predictions of model v1 lack" in error["message"]
    # The cheap scores are there: ranking by them is accepted.
    assert api("admin").post(url, {"strategy": "entropy"}, format="json").status_code == 202
    assert not QueueEntry.objects.filter(project=project).exists()


def test_the_projects_own_tta_strategy_is_checked_too_and_passes_once_every_prediction_has_it(api, team):
    project = team["project"]
    project.al_strategy = "tta"
    project.save(update_fields=["al_strategy"])
    predicted_project(project, [dict(CHEAP, tta=0.1, instance_flips=0.5), dict(CHEAP)])
    url = f"/api/projects/{project.pk}/rank/"

    response = api("admin").post(url, {}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"]["lacking"] == 1

    Prediction.objects.filter(tile__project=project).update(uncertainty=dict(CHEAP, tta=0.1, instance_flips=0.5))
    response = api("admin").post(url, {}, format="json")
    assert response.status_code == 202 and response.json()["strategy"] == "tta"


def test_the_worker_would_have_failed_on_the_same_predictions(team):
    """What the 400 prevents: the engine refuses to rank by a score the predictions lack."""
    from backend.ml.workflows import run_ranking

    project = team["project"]
    predicted_project(project, [dict(CHEAP) for _ in range(3)])
    with pytest.raises(ValueError, match="mc_dropout"):
        run_ranking(project_id=project.pk, strategy="mc_dropout")


def test_a_project_without_a_model_is_not_refused_whatever_the_strategy(api, team):
    """Before the first model the queue is ordered without model scores: nothing to lack."""
    project = team["project"]
    response = api("admin").post(f"/api/projects/{project.pk}/rank/", {"strategy": "mc_dropout"}, format="json")
    assert response.status_code == 202
