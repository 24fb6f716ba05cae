"""The browser's live channel: ``/ws/projects/<id>/`` streams what any app publishes with
``backend.common.events.publish`` to the project's members. In web, the layer the browser talks to."""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from backend.common.events import group_name
from backend.projects.models import Project, Role
from backend.projects.selectors import has_role


@database_sync_to_async
def _may_watch(user, project_id: int) -> bool:
    project = Project.objects.filter(pk=project_id).first()
    return project is not None and has_role(user=user, project=project, minimum=Role.VIEWER)


class ProjectEventsConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/projects/<id>/``: training epochs, prediction/ranking progress, queue changes. Members only."""

    group: str | None = None

    async def connect(self):
        project_id = int(self.scope["url_route"]["kwargs"]["project_id"])
        if not await _may_watch(self.scope.get("user"), project_id):
            await self.close(code=4403)
            return
        self.group = group_name(project_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"kind": "hello", "project": project_id})

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if content.get("kind") == "ping":
            await self.send_json({"kind": "pong"})

    async def karyo_event(self, message):
        await self.send_json(message["event"])
