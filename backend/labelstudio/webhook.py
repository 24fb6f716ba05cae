"""Label Studio's webhook: the deliveries Karyo registers for, and the handler that enqueues the
re-fetch of the annotations a delivery names (the request itself does no Label Studio call)."""
from __future__ import annotations

from django.db import transaction

from backend.common import jobs
from backend.common.errors import KaryoError

from .links import link_for_ls_project, payload_ls_project

WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
SECRET_HEADER = "X-Karyo-Webhook-Secret"


def handle_webhook(*, payload: dict) -> dict:
    """Label Studio's webhook: enqueue the re-fetch of the annotations it names (cpu queue)."""
    action = payload.get("action")
    if action not in WEBHOOK_ACTIONS:
        return {"status": "ignored", "reason": f"action {action!r} is not synced"}
    link = link_for_ls_project(payload_ls_project(payload))
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
    transaction.on_commit(lambda: queued.append(
        jobs.task("karyo.cpu.labelstudio_ingest").delay(link.pk, created, deleted).id  # tasks.ingest_annotations
    ))
    return {"status": "queued", "annotations": created + deleted, "task": queued[0] if queued else None}

