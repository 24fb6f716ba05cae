"""Out: the Label Studio project (labeling config, webhook, ML backend), one task per tile, and the
current model's predictions, scored so that Label Studio opens tiles in Karyo's queue order.

Network calls never run inside a database transaction (SQLite takes its write lock at the start
of one); the per-link lease keeps two syncs of one project apart.
"""
from __future__ import annotations

from django.apps import apps
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from backend.common.jobs import enqueue_on_commit
from backend.common.storage import read_label_map
from backend.images.models import Tile
from backend.ml.models import ModelVersion, Prediction
from backend.projects.models import Project

from . import conversions
from .client import LabelStudioClient, LabelStudioError, is_configured
from .links import (
    current_model_version,
    get_link,
    karyo_url,
    lease,
    ml_backend_url,
    model_version_tag,
    record_error,
    resolve_errors,
)
from .models import LabelStudioLink, PushedPrediction, TaskLink
from .signing import URL_MAX_AGE, tile_image_url
from .webhook import SECRET_HEADER, WEBHOOK_ACTIONS

IMPORT_BATCH = 500


def _title(project: Project) -> str:
    suffix = f" (Karyo #{project.pk})"
    return project.name[: 50 - len(suffix)] + suffix


def ensure_ls_project(*, link: LabelStudioLink, client: LabelStudioClient) -> LabelStudioLink:
    """Create (or re-create, if it was deleted there) the Label Studio project, keep its labeling
    config in step with the nucleus classes, and register the webhook and the ML backend."""
    project = link.project
    config = conversions.labeling_config(project.nucleus_classes)
    sha = conversions.config_sha(config)
    if link.ls_project_id is None or not client.project_exists(link.ls_project_id):
        ls_id = client.create_project(
            title=_title(project), description=project.description or f"Karyo project {project.name}", label_config=config
        )
        with transaction.atomic():
            TaskLink.objects.filter(link=link).delete()
            link.ls_project_id, link.webhook_id, link.ml_backend_id = ls_id, None, None
            link.label_config_sha, link.model_version, link.reconciled_until = sha, "", None
            link.save(update_fields=["ls_project_id", "webhook_id", "ml_backend_id", "label_config_sha", "model_version",
                                     "reconciled_until"])
    elif link.label_config_sha != sha:
        client.update_project(link.ls_project_id, label_config=config)
        link.label_config_sha = sha
        link.save(update_fields=["label_config_sha"])

    secret = settings.LABEL_STUDIO_WEBHOOK_SECRET
    if not secret:
        record_error(link=link, operation="webhook", error="KARYO_LABEL_STUDIO_WEBHOOK_SECRET is not set: no webhook "
                     "is registered and corrections come back only through the periodic reconcile")
        return link
    link.webhook_id = client.ensure_webhook(
        webhook_id=link.webhook_id, project_id=link.ls_project_id, url=karyo_url("labelstudio-webhook"),
        headers={SECRET_HEADER: secret}, actions=WEBHOOK_ACTIONS,
    )
    try:
        link.ml_backend_id = client.ensure_ml_backend(
            ml_backend_id=link.ml_backend_id, project_id=link.ls_project_id, url=ml_backend_url(), secret=secret
        )
    except LabelStudioError as exc:
        # Label Studio checks the backend by calling it: Karyo must be reachable from there.
        record_error(link=link, operation="ml_backend", error=exc)
    else:
        resolve_errors(link=link, operations=("ml_backend",))
        # Connecting an ML backend makes Label Studio add a project webhook to <backend>/webhook
        # for every action, without Karyo's secret: each save then got a 401 from Karyo. Karyo's
        # own webhook (above) already delivers the annotation events, and the backend's Start
        # Training call comes with its Basic auth, so that extra webhook is removed.
        client.delete_webhooks_to(project_id=link.ls_project_id, url=ml_backend_url().rstrip("/") + "/webhook")
    link.save(update_fields=["webhook_id", "ml_backend_id"])
    resolve_errors(link=link, operations=("webhook",))
    return link


def task_data(tile: Tile) -> dict:
    return {
        "image": tile_image_url(tile),
        "karyo_tile_id": tile.pk,
        "karyo_image": tile.image.name,
        "karyo_region": f"x={tile.x} y={tile.y} {tile.w}x{tile.h}",
    }


def sync_tasks(*, link: LabelStudioLink, client: LabelStudioClient, tiles=None) -> int:
    """Every tile (of ``tiles``, default all) as a task; task image URLs re-signed in time."""
    wanted = Tile.objects.filter(project=link.project).select_related("image").order_by("pk")
    if tiles is not None:
        wanted = wanted.filter(pk__in=[getattr(t, "pk", t) for t in tiles])
    linked = set(TaskLink.objects.filter(link=link).values_list("tile_id", flat=True))
    missing = [tile for tile in wanted if tile.pk not in linked]
    created = 0
    if missing:
        # Tasks imported by a sync that died before recording them are adopted, not duplicated.
        existing = {
            int(task.data["karyo_tile_id"]): task.id
            for task in client.list_tasks(link.ls_project_id)
            if str(task.data.get("karyo_tile_id", "")).isdigit()
        }
        now = timezone.now()
        adopt = [TaskLink(link=link, tile=t, ls_task_id=existing[t.pk], url_signed_at=now - URL_MAX_AGE)
                 for t in missing if t.pk in existing]
        TaskLink.objects.bulk_create(adopt, ignore_conflicts=True)
        to_import = [t for t in missing if t.pk not in existing]
        for start in range(0, len(to_import), IMPORT_BATCH):
            batch = to_import[start : start + IMPORT_BATCH]
            signed_at = timezone.now()
            ids = client.import_tasks(link.ls_project_id, [task_data(t) for t in batch])
            if len(ids) != len(batch):
                raise LabelStudioError(f"Label Studio created {len(ids)} tasks for {len(batch)} tiles")
            TaskLink.objects.bulk_create(
                [TaskLink(link=link, tile=t, ls_task_id=i, url_signed_at=signed_at)
                 for t, i in zip(batch, ids, strict=True)],
                ignore_conflicts=True,
            )
            created += len(batch)
    stale = TaskLink.objects.filter(link=link, url_signed_at__lt=timezone.now() - URL_MAX_AGE / 2)
    stale = stale.select_related("tile__image")
    for task in stale:
        signed_at = timezone.now()
        client.update_task_data(task.ls_task_id, task_data(task.tile))
        TaskLink.objects.filter(pk=task.pk).update(url_signed_at=signed_at)
    return created


def prediction_scores(*, project: Project, model_version: ModelVersion) -> dict[int, float]:
    """Tile id -> Label Studio score (lower = opened first). Karyo's ranked queue when there is
    one (tiles off the queue score 1); otherwise 1 - normalised uncertainty of the predictions."""
    try:
        queue = apps.get_model("ml", "QueueEntry")
    except LookupError:
        queue = None
    if queue is not None:
        ranked = list(queue.objects.filter(project=project).order_by("rank").values_list("tile_id", flat=True))
        if ranked:
            return conversions.scores_from_ranks(ranked)
    uncertainty = {
        tile_id: conversions.uncertainty_value(u or {}, project.al_strategy)
        for tile_id, u in Prediction.objects.filter(model_version=model_version, tile__project=project)
        .values_list("tile_id", "uncertainty")
    }
    return conversions.scores_from_uncertainty(uncertainty)


def _push(*, link: LabelStudioLink, client: LabelStudioClient, tiles=None) -> int:
    project = link.project
    model_version = current_model_version(project)
    if model_version is None:
        return 0
    tag = model_version_tag(model_version)
    scores = prediction_scores(project=project, model_version=model_version)
    predictions = Prediction.objects.filter(model_version=model_version, tile__project=project).order_by("tile_id")
    if tiles is not None:
        predictions = predictions.filter(tile__in=[getattr(t, "pk", t) for t in tiles])
    tasks = {t.tile_id: t for t in TaskLink.objects.filter(link=link, tile_id__in=predictions.values("tile_id"))}
    pushed_rows = {p.task_id: p for p in PushedPrediction.objects.filter(task__in=tasks.values())}
    pushed = 0
    for prediction in predictions:
        task = tasks.get(prediction.tile_id)
        if task is None:
            continue
        score = scores.get(prediction.tile_id, 1.0)
        current = pushed_rows.get(task.pk)
        if current is not None and current.prediction_id == prediction.pk and current.model_version == tag:
            if abs(current.score - score) > 1e-9:  # re-ranked: only the score moves
                client.update_prediction_score(current.ls_prediction_id, score)
                PushedPrediction.objects.filter(pk=current.pk).update(score=score)
            continue
        result = conversions.prediction_result(
            read_label_map(prediction.mask.name), classes=prediction.class_ids(),
            nucleus_classes=project.nucleus_classes, scores=prediction.class_confidences(),
        )
        new_id = client.create_prediction(task_id=task.ls_task_id, result=result, score=score, model_version=tag)
        if current is not None:
            client.delete_prediction(current.ls_prediction_id)  # the stale one, after the new one exists
            PushedPrediction.objects.filter(pk=current.pk).update(
                prediction=prediction, ls_prediction_id=new_id, model_version=tag, score=score,
                nucleus_count=len(result), pushed_at=timezone.now(),
            )
        else:
            PushedPrediction.objects.create(
                task=task, prediction=prediction, ls_prediction_id=new_id, model_version=tag, score=score,
                nucleus_count=len(result),
            )
        pushed += 1
    # Label Studio accepts a project model version only once a prediction carries it.
    if link.model_version != tag and PushedPrediction.objects.filter(task__link=link, model_version=tag).exists():
        client.update_project(link.ls_project_id, model_version=tag)
        link.model_version = tag
        link.save(update_fields=["model_version"])
    return pushed


def push_predictions(*, project: Project, tiles=None) -> int:
    """Push the current model's predictions (of ``tiles``, default all) as Label Studio
    predictions, one polygon per nucleus, scored so that Label Studio opens tiles in Karyo's
    queue order. Re-ranking only moves scores; a newer model version replaces the predictions.
    Returns how many predictions were created. A no-op when Label Studio is not configured."""
    if not is_configured():
        return 0
    link = get_link(project=project)
    with lease(link):
        link.refresh_from_db()
        try:
            client = LabelStudioClient()
            if link.ls_project_id is None:  # otherwise the periodic sync keeps project and hooks in shape
                ensure_ls_project(link=link, client=client)
            sync_tasks(link=link, client=client, tiles=tiles)
            pushed = _push(link=link, client=client, tiles=tiles)
        except LabelStudioError as exc:
            record_error(link=link, operation="push", error=exc)
            raise
    resolve_errors(link=link, operations=("push",))
    return pushed


def schedule_push(*, project: Project, tiles=None) -> None:
    """Push predictions from a worker after the current transaction commits (cpu queue)."""
    if not is_configured():
        return
    tile_ids = None if tiles is None else [getattr(t, "pk", t) for t in tiles]
    enqueue_on_commit("karyo.cpu.labelstudio_push", project.pk, tile_ids)  # tasks.push_predictions

