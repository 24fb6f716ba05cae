"""Label Studio sync: projects, tasks and predictions out; corrections back as annotation versions.

Network calls to Label Studio never run inside a database transaction (SQLite takes its write
lock at the start of one). A per-link lease keeps two syncs of one project apart; everything
else is idempotent through unique constraints, so a repeated or interrupted sync converges.

Entry points: :func:`sync_project` (the periodic reconcile and the "sync now" button),
:func:`push_predictions` (after Karyo ranks its queue), :func:`ingest_annotations` (webhook
deliveries), and the ML-backend protocol (:func:`ml_setup`, :func:`ml_predict`,
:func:`ml_webhook`, :func:`ml_versions`).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from backend.common.errors import Conflict, KaryoError
from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Tile
from backend.images.services import create_annotation
from backend.ml.models import ModelStatus, ModelVersion, Prediction
from backend.projects.models import Project

from . import conversions
from .client import LabelStudioClient, LabelStudioError, LSAnnotation, is_configured
from .models import AnnotationSync, LabelStudioLink, PushedPrediction, SyncError, TaskLink
from .signing import URL_MAX_AGE, tile_image_url

log = logging.getLogger(__name__)

WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
SECRET_HEADER = "X-Karyo-Webhook-Secret"
RECONCILE_OVERLAP = dt.timedelta(seconds=5)
IMPORT_BATCH = 500
LEASE = dt.timedelta(minutes=10)


# --- small helpers ---------------------------------------------------------------------------

def model_version_tag(model_version: ModelVersion) -> str:
    return f"karyo-v{model_version.version}"


def karyo_url(name: str) -> str:
    return settings.KARYO_PUBLIC_URL.rstrip("/") + reverse(name)


def ml_backend_url() -> str:
    """The ML-backend root Label Studio appends ``health``, ``setup``, ``predict``... to."""
    return karyo_url("labelstudio-ml-health").removesuffix("health")


def link_for_ls_project(ls_project) -> LabelStudioLink | None:
    """``ls_project``: an id, or the ML-backend protocol's ``"<id>.<created timestamp>"``."""
    try:
        ls_id = int(str(ls_project).split(".")[0])
    except (TypeError, ValueError):
        return None
    return LabelStudioLink.objects.select_related("project").filter(ls_project_id=ls_id).first()


def current_model_version(project: Project) -> ModelVersion | None:
    """The active model, else the newest version that has predictions."""
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    if active is not None:
        return active
    return ModelVersion.objects.filter(project=project, predictions__isnull=False).order_by("-version").first()


def record_error(*, link: LabelStudioLink, operation: str, error: Exception | str, details: dict | None = None) -> SyncError:
    message = str(error)
    log.warning("label studio %s for project %s: %s", operation, link.project_id, message)
    now = timezone.now()
    LabelStudioLink.objects.filter(pk=link.pk).update(last_error=message, last_error_at=now)
    link.last_error, link.last_error_at = message, now
    return SyncError.objects.create(link=link, operation=operation, message=message, details=details or {})


def resolve_errors(*, link: LabelStudioLink, operations: tuple[str, ...]) -> None:
    now = timezone.now()
    SyncError.objects.filter(link=link, operation__in=operations, resolved_at__isnull=True).update(resolved_at=now)
    if not SyncError.objects.filter(link=link, resolved_at__isnull=True).exists():
        LabelStudioLink.objects.filter(pk=link.pk).update(last_error="")
        link.last_error = ""


@contextlib.contextmanager
def lease(link: LabelStudioLink, *, wait: float = 120.0):
    """One sync of a project at a time, across processes (a row-level compare-and-set)."""
    deadline = time.monotonic() + wait
    while True:
        now = timezone.now()
        won = LabelStudioLink.objects.filter(pk=link.pk).filter(
            Q(sync_lock_until__isnull=True) | Q(sync_lock_until__lt=now)
        ).update(sync_lock_until=now + LEASE)
        if won:
            break
        if time.monotonic() > deadline:
            raise Conflict(f"another Label Studio sync of project {link.project_id} is running")
        time.sleep(0.2)
    try:
        yield
    finally:
        LabelStudioLink.objects.filter(pk=link.pk).update(sync_lock_until=None)


def get_link(*, project: Project) -> LabelStudioLink:
    link, _ = LabelStudioLink.objects.get_or_create(project=project)
    return link


# --- out: project, tasks, predictions ---------------------------------------------------------

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
            read_label_map(prediction.mask.name), classes=None, nucleus_classes=project.nucleus_classes
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
    from . import tasks

    tile_ids = None if tiles is None else [getattr(t, "pk", t) for t in tiles]
    transaction.on_commit(lambda: tasks.push_predictions.delay(project.pk, tile_ids))


# --- in: annotations --------------------------------------------------------------------------

def _karyo_user(client: LabelStudioClient, ls_user_id: int | None, cache: dict):
    """The Karyo user with the Label Studio user's e-mail (None when there is none)."""
    if not ls_user_id:
        return None
    if ls_user_id not in cache:
        email = client.user_email(ls_user_id)
        cache[ls_user_id] = (
            get_user_model().objects.filter(email__iexact=email).order_by("pk").first() if email else None
        )
    return cache[ls_user_id]


def _external_id(annotation: LSAnnotation, digest: str) -> str:
    stamp = int(annotation.updated_at.timestamp() * 1_000_000) if annotation.updated_at else 0
    return f"ls:{annotation.id}:{stamp}:{digest[:16]}"


def ingest_annotation(
    *, link: LabelStudioLink, client: LabelStudioClient, annotation: LSAnnotation, users: dict | None = None
) -> tuple[Annotation | None, bool]:
    """Store a Label Studio annotation as a new annotation version of its tile.

    Returns ``(version, created)``. The same annotation state delivered twice (webhook retry,
    webhook plus reconcile) stores one version; a changed one stores the next version."""
    if annotation.was_cancelled:
        return None, False
    task = TaskLink.objects.filter(link=link, ls_task_id=annotation.task).select_related("tile").first()
    if task is None:
        record_error(link=link, operation="ingest", error=f"annotation {annotation.id} is on task {annotation.task}, "
                     "which Karyo did not create; it was not stored", details={"annotation": annotation.id})
        return None, False
    digest = conversions.result_digest(annotation.result)
    sync = AnnotationSync.objects.filter(link=link, ls_annotation_id=annotation.id).first()
    if sync is not None and sync.digest == digest and not sync.deleted and sync.annotation_id:
        return sync.annotation, False
    tile = task.tile
    converted = conversions.annotation_to_instances(
        annotation.result, height=tile.h, width=tile.w, nucleus_classes=link.project.nucleus_classes
    )
    prediction = None
    if annotation.parent_prediction:
        pushed = PushedPrediction.objects.filter(task=task, ls_prediction_id=annotation.parent_prediction).first()
        prediction = pushed.prediction if pushed is not None else None
    author = _karyo_user(client, annotation.completed_by, users if users is not None else {})
    version, created = create_annotation(
        tile=tile, instances=converted.instances, author=author,
        source=AnnotationSource.CORRECTED_PREDICTION if annotation.parent_prediction else AnnotationSource.MANUAL,
        status=AnnotationStatus.SUBMITTED, prediction=prediction, external_id=_external_id(annotation, digest),
        classes=converted.classes or None,
    )
    AnnotationSync.objects.update_or_create(
        link=link, ls_annotation_id=annotation.id,
        defaults={"task": task, "digest": digest, "ls_updated_at": annotation.updated_at, "annotation": version,
                  "deleted": False},
    )
    return version, created


def mark_deleted(*, link: LabelStudioLink, ls_annotation_ids) -> int:
    """A correction deleted in Label Studio is withdrawn: its versions (append-only, never
    removed) are marked rejected unless a Karyo reviewer already accepted them."""
    count = 0
    syncs = AnnotationSync.objects.filter(link=link, ls_annotation_id__in=list(ls_annotation_ids), deleted=False)
    for sync in syncs.select_related("task"):
        with transaction.atomic():
            versions = Annotation.objects.filter(
                tile_id=sync.task.tile_id, external_id__startswith=f"ls:{sync.ls_annotation_id}:",
                status__in=[AnnotationStatus.DRAFT, AnnotationStatus.SUBMITTED],
            )
            for version in versions:
                version.status = AnnotationStatus.REJECTED
                version.reviewed_at = timezone.now()
                version.review_comment = f"deleted in Label Studio (annotation {sync.ls_annotation_id})"
                version.save(update_fields=["status", "reviewed_at", "review_comment"])
            AnnotationSync.objects.filter(pk=sync.pk).update(deleted=True)
        count += 1
    return count


def ingest_annotations(*, link: LabelStudioLink, annotation_ids=(), deleted_ids=()) -> dict:
    """What a webhook delivery asks for: re-fetch each annotation through the SDK and store it."""
    client = LabelStudioClient()
    stored, users = 0, {}
    gone = list(deleted_ids)
    try:
        for annotation_id in annotation_ids:
            fetched = client.get_annotation(int(annotation_id))
            if fetched is None:
                gone.append(int(annotation_id))
                continue
            _, created = ingest_annotation(link=link, client=client, annotation=fetched, users=users)
            stored += created
    except LabelStudioError as exc:
        record_error(link=link, operation="ingest", error=exc, details={"annotations": list(annotation_ids)})
        raise
    return {"stored": stored, "deleted": mark_deleted(link=link, ls_annotation_ids=gone)}


def reconcile(*, link: LabelStudioLink, client: LabelStudioClient) -> dict:
    """Pull every annotation of tasks changed since the last reconcile (a missed webhook, or
    Label Studio was unreachable): store new states, withdraw deleted ones."""
    since = link.reconciled_until - RECONCILE_OVERLAP if link.reconciled_until else None
    newest = link.reconciled_until
    tasks = {t.ls_task_id: t for t in TaskLink.objects.filter(link=link)}
    stored = deleted = seen = 0
    users: dict = {}
    for ls_task in client.list_tasks(link.ls_project_id, updated_after=since):
        seen += 1
        if ls_task.updated_at and (newest is None or ls_task.updated_at > newest):
            newest = ls_task.updated_at
        task = tasks.get(ls_task.id)
        if task is None:
            continue
        present = client.list_annotations(ls_task.id)
        for annotation in present:
            _, created = ingest_annotation(link=link, client=client, annotation=annotation, users=users)
            stored += created
        gone = AnnotationSync.objects.filter(link=link, task=task, deleted=False).exclude(
            ls_annotation_id__in=[a.id for a in present]
        ).values_list("ls_annotation_id", flat=True)
        deleted += mark_deleted(link=link, ls_annotation_ids=list(gone))
    if newest != link.reconciled_until:
        link.reconciled_until = newest
        link.save(update_fields=["reconciled_until"])
    return {"tasks_changed": seen, "stored": stored, "deleted": deleted}


@dataclass
class SyncReport:
    project: int
    ok: bool = True
    tasks_created: int = 0
    predictions_pushed: int = 0
    annotations_stored: int = 0
    annotations_deleted: int = 0
    error: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def sync_project(*, project: Project) -> SyncReport | None:
    """Bring a project's Label Studio side up to date and pull what changed there. Errors are
    recorded on the project (and reported), never lost: the next run starts where this stopped.
    None when Label Studio is not configured."""
    if not is_configured():
        return None
    started = time.monotonic()
    report = SyncReport(project=project.pk)
    link = get_link(project=project)
    with lease(link):
        link.refresh_from_db()
        try:
            client = LabelStudioClient()
            ensure_ls_project(link=link, client=client)
            report.tasks_created = sync_tasks(link=link, client=client)
            report.predictions_pushed = _push(link=link, client=client)
            pulled = reconcile(link=link, client=client)
        except LabelStudioError as exc:
            record_error(link=link, operation="sync", error=exc)
            report.ok, report.error = False, str(exc)
        else:
            report.annotations_stored, report.annotations_deleted = pulled["stored"], pulled["deleted"]
            link.last_synced_at = timezone.now()
            link.save(update_fields=["last_synced_at"])
            resolve_errors(link=link, operations=("sync", "push", "ingest"))
    report.seconds = round(time.monotonic() - started, 3)
    return report


def reconcile_all() -> list[dict]:
    """The periodic task: every project, one after the other; one failing does not stop the rest."""
    if not is_configured():
        return []
    reports = []
    for project in Project.objects.order_by("pk"):
        try:
            report = sync_project(project=project)
        except KaryoError as exc:  # a sync of this project is already running
            reports.append({"project": project.pk, "ok": False, "error": str(exc)})
            continue
        if report is not None:
            reports.append(report.as_dict())
    return reports


# --- webhook ----------------------------------------------------------------------------------

def _payload_ls_project(payload: dict):
    for key in ("project", "annotation", "task"):
        value = payload.get(key)
        if isinstance(value, dict):
            project = value.get("id") if key == "project" else value.get("project")
            if project is not None:
                return project
    annotations = payload.get("annotations")
    if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
        return annotations[0].get("project")
    return None


def handle_webhook(*, payload: dict) -> dict:
    """Label Studio's webhook: enqueue the re-fetch of the annotations it names (cpu queue)."""
    from . import tasks

    action = payload.get("action")
    if action not in WEBHOOK_ACTIONS:
        return {"status": "ignored", "reason": f"action {action!r} is not synced"}
    link = link_for_ls_project(_payload_ls_project(payload))
    if link is None:
        return {"status": "ignored", "reason": "not a Karyo project"}
    if action == "ANNOTATIONS_DELETED":
        ids = [a["id"] for a in payload.get("annotations") or [] if isinstance(a, dict) and "id" in a]
        created, deleted = [], ids
    else:
        annotation = payload.get("annotation") or {}
        if "id" not in annotation:
            raise KaryoError("the webhook names no annotation", code="invalid_webhook")
        created, deleted = [annotation["id"]], []
    queued: list[str] = []  # outside a transaction on_commit runs at once: the task id is known
    transaction.on_commit(lambda: queued.append(tasks.ingest_annotations.delay(link.pk, created, deleted).id))
    return {"status": "queued", "annotations": created + deleted, "task": queued[0] if queued else None}


# --- the ML-backend protocol --------------------------------------------------------------------

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
            "result": conversions.prediction_result(read_label_map(prediction.mask.name), classes=None,
                                                    nucleus_classes=project.nucleus_classes),
            "score": scores.get(tile_id, 1.0),
            "model_version": model_version_tag(model_version),
        })
    if missing:
        if model_version is not None and model_version.weights:
            from backend.ml import tasks as ml_tasks

            ml_tasks.predict.delay(project.pk, model_version.pk, missing, False)
        return {"results": []}
    return {"results": results}


def ml_webhook(*, payload: dict) -> dict:
    """``START_TRAINING`` from Label Studio's Start Training button starts a Karyo training run
    (visible in Karyo's training runs and in Label Studio as the backend's Training state)."""
    from backend.ml.models import RunStatus, TrainingRun
    from backend.ml.services import start_training_run

    action = payload.get("action")
    if action != "START_TRAINING":
        return {"status": "ignored", "reason": f"action {action!r} needs nothing from Karyo"}
    link = link_for_ls_project(_payload_ls_project(payload))
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
