"""The project activity feed: ``ProjectEvent`` rows (kept) that are also pushed live.

The live publisher itself is ``backend.common.events.publish`` (any app may use it).
"""
from __future__ import annotations

from typing import Any

from backend.common.events import publish


def record(project_id: int, kind: str, message: str, *, actor=None, **data: Any) -> None:
    """An activity-feed entry (kept) that is also pushed live."""
    from .models import ProjectEvent

    ProjectEvent.objects.create(project_id=project_id, kind=kind, message=message, data=data, actor=actor)
    publish(project_id, kind, message=message, **data)
