"""In: Label Studio annotations become annotation versions of their tiles (webhook deliveries and
the periodic reconcile); a correction deleted there is withdrawn here.

Idempotent through unique constraints (the external id of a version, the sync row of an
annotation), so a webhook retried or followed by a reconcile stores one version.
"""
from __future__ import annotations

import datetime as dt

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from backend.images.models import Annotation, AnnotationSource, AnnotationStatus
from backend.images.services import create_annotation

from . import conversions
from .client import LabelStudioClient, LabelStudioError, LSAnnotation
from .links import record_error
from .members import karyo_user_for
from .models import AnnotationSync, LabelStudioLink, PushedPrediction, TaskLink

RECONCILE_OVERLAP = dt.timedelta(seconds=5)


def _karyo_user(client: LabelStudioClient, ls_user_id: int | None, cache: dict):
    """The Karyo member Karyo created this Label Studio user for, else the Karyo user with the
    Label Studio user's e-mail (None when there is none)."""
    if not ls_user_id:
        return None
    if ls_user_id not in cache and (member := karyo_user_for(ls_user_id)) is not None:
        cache[ls_user_id] = member
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
    """Pull the annotations of tasks changed since the last reconcile (a missed webhook, or
    Label Studio was unreachable): store new states, withdraw deleted ones.

    Incremental twice over: Label Studio lists only tasks updated after the project's watermark
    (minus a small overlap for clock skew), and of those only the ones whose ``updated_at``
    differs from what this reconcile saw last time (``TaskLink.ls_updated_at``) have their
    annotations read. Without the second check every task inside the overlap window was read
    again on every pass, and the watermark never moved past them."""
    since = link.reconciled_until - RECONCILE_OVERLAP if link.reconciled_until else None
    newest = link.reconciled_until
    tasks = {t.ls_task_id: t for t in TaskLink.objects.filter(link=link)}
    stored = deleted = seen = listed = 0
    users: dict = {}
    for ls_task in client.list_tasks(link.ls_project_id, updated_after=since):
        listed += 1
        if ls_task.updated_at and (newest is None or ls_task.updated_at > newest):
            newest = ls_task.updated_at
        task = tasks.get(ls_task.id)
        if task is None or (ls_task.updated_at is not None and task.ls_updated_at == ls_task.updated_at):
            continue
        seen += 1
        present = client.list_annotations(ls_task.id)
        for annotation in present:
            _, created = ingest_annotation(link=link, client=client, annotation=annotation, users=users)
            stored += created
        gone = AnnotationSync.objects.filter(link=link, task=task, deleted=False).exclude(
            ls_annotation_id__in=[a.id for a in present]
        ).values_list("ls_annotation_id", flat=True)
        deleted += mark_deleted(link=link, ls_annotation_ids=list(gone))
        TaskLink.objects.filter(pk=task.pk).update(ls_updated_at=ls_task.updated_at)
    if newest != link.reconciled_until:
        link.reconciled_until = newest
        link.save(update_fields=["reconciled_until"])
    return {"tasks_changed": seen, "tasks_listed": listed, "stored": stored, "deleted": deleted}

