"""Live project events: published by workers and services, streamed to browsers over Channels.

Best effort by design: the database is the source of truth, so a lost event costs a stale
progress bar until the next one, never data.
"""
from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

log = logging.getLogger(__name__)


def group_name(project_id: int) -> str:
    return f"project.{project_id}"


def publish(project_id: int, kind: str, **data: Any) -> dict:
    event = {"kind": kind, "project": project_id, "at": timezone.now().isoformat(), **data}
    layer = get_channel_layer()
    if layer is None:
        return event
    try:
        async_to_sync(layer.group_send)(group_name(project_id), {"type": "karyo.event", "event": event})
    except Exception:
        log.warning("could not publish %s event for project %s", kind, project_id, exc_info=True)
    return event


def record(project_id: int, kind: str, message: str, *, actor=None, **data: Any) -> None:
    """An activity-feed entry (kept) that is also pushed live."""
    from .models import ProjectEvent

    ProjectEvent.objects.create(project_id=project_id, kind=kind, message=message, data=data, actor=actor)
    publish(project_id, kind, message=message, **data)
