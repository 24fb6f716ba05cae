"""Label Studio's ML-backend protocol, answered by Karyo: setup, versions, predict (from stored
predictions; missing ones are queued on the gpu queue) and the Start Training button."""
from __future__ import annotations

from backend.common import jobs
from backend.common.errors import KaryoError
from backend.common.storage import read_label_map
from backend.images.models import Tile
from backend.ml.models import ModelVersion, Prediction, RunStatus, TrainingRun
from backend.ml.services import start_training_run

from . import conversions
from .links import (
    current_model_version,
    link_for_ls_project,
    model_version_tag,
    payload_ls_project,
    record_error,
    resolve_errors,
)
from .models import TaskLink
from .push import prediction_scores


def ml_setup(*, ls_project) -> dict:
    link = link_for_ls_project(ls_project)
    model_version = current_model_version(link.project) if link else None
    return {"model_version": model_version_tag(model_version) if model_version else "karyo-untrained"}


def ml_versions(*, ls_project) -> dict:
    link = link_for_ls_project(ls_project)
    if link is None:
        return {"versions": []}
    versions = ModelVersion.objects.filter(project=link.project).order_by("-version")
    return {"versions": [model_version_tag(m) for m in versions]}


def ml_predict(*, ls_project, tasks: list[dict]) -> dict:
    """Answer from stored predictions (no GPU work in the request). When a task has none yet,
    prediction is queued on the ``gpu`` queue and nothing is answered for this request, so that
    Label Studio asks again (Karyo also pushes the predictions itself once they exist)."""
    link = link_for_ls_project(ls_project)
    if link is None or not tasks:
        return {"results": []}
    project = link.project
    model_version = current_model_version(project)
    linked = TaskLink.objects.filter(link=link, ls_task_id__in=[t.get("id") for t in tasks])
    by_task = {t.ls_task_id: t.tile_id for t in linked}
    results, missing = [], []
    scores = prediction_scores(project=project, model_version=model_version) if model_version else {}
    for task in tasks:
        tile_id = by_task.get(task.get("id"))
        if tile_id is None:
            data_tile = (task.get("data") or {}).get("karyo_tile_id")
            tile_id = data_tile if Tile.objects.filter(pk=data_tile, project=project).exists() else None
        if tile_id is None:
            return {"results": []}  # not a Karyo tile: nothing to say
        prediction = None
        if model_version is not None:
            prediction = Prediction.objects.filter(tile_id=tile_id, model_version=model_version).first()
        if prediction is None:
            missing.append(tile_id)
            continue
        results.append({
            "result": conversions.prediction_result(read_label_map(prediction.mask.name), classes=prediction.class_ids(),
                                                    nucleus_classes=project.nucleus_classes,
                                                    scores=prediction.class_confidences()),
            "score": scores.get(tile_id, 1.0),
            "model_version": model_version_tag(model_version),
        })
    if missing:
        if model_version is not None and model_version.weights:
            jobs.task("karyo.gpu.predict").delay(project.pk, model_version.pk, missing, False)  # ml.tasks.predict
        return {"results": []}
    return {"results": results}


def ml_webhook(*, payload: dict) -> dict:
    """``START_TRAINING`` from Label Studio's Start Training button starts a Karyo training run
    (visible in Karyo's training runs and in Label Studio as the backend's Training state)."""
    action = payload.get("action")
    if action != "START_TRAINING":
        return {"status": "ignored", "reason": f"action {action!r} needs nothing from Karyo"}
    link = link_for_ls_project(payload_ls_project(payload))
    if link is None:
        raise KaryoError("this Label Studio project is not linked to a Karyo project", code="unknown_project",
                         status_code=404)
    try:
        run = start_training_run(project=link.project, trigger="label_studio")
    except KaryoError as exc:
        live = TrainingRun.objects.filter(project=link.project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).first()
        if live is None:
            # Label Studio shows the backend in error; the reason is on the project's sync status.
            record_error(link=link, operation="training",
                         error=f"Start Training from Label Studio was refused: {exc.detail}")
            raise
        run = live
    resolve_errors(link=link, operations=("training",))
    return {"job": str(run.pk), "status": run.status, "project": link.project_id}
