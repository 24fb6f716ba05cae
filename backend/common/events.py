"""Live events to browsers: published by workers and services, streamed over Channels.

Best effort by design: the database is the source of truth, so a lost event costs a stale
progress bar until the next one, never data. Any app may publish (this module knows no app);
the WebSocket consumer that streams a project's group to its members is
``backend.web.consumers.ProjectEventsConsumer``. The kept activity feed (``ProjectEvent`` rows
that are also published) is ``backend.ml.events.record``.

Not to be confused with the in-process announcements between apps (``annotation_saved``,
``queue_ranked``: Django signals in each announcing app's ``signals.py``; docs/architecture.md).
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
        message = {"type": "karyo.event", "event": event}
        blocking = getattr(layer, "group_send_blocking", None)  # the SQLite layer: no event loop per event
        if blocking is not None:
            blocking(group_name(project_id), message)
        else:
            async_to_sync(layer.group_send)(group_name(project_id), message)
    except Exception:
        log.warning("could not publish %s event for project %s", kind, project_id, exc_info=True)
    return event
