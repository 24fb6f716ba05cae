"""The browser's live channel: ``/ws/projects/<id>/`` streams what any app publishes with
``backend.common.events.publish`` to the project's members. In web, the layer the browser talks to."""
from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from backend.common.events import group_name
from backend.projects.models import Membership, Project, Role
from backend.projects.selectors import has_role

log = logging.getLogger(__name__)
# A socket re-checks its user's access at most this often when events arrive; a membership,
# token or account change also tells the project's sockets at once (notify_access_changed).
ACCESS_RECHECK_SECONDS = 3.0
REVOKED = 4403


@database_sync_to_async
def _may_watch(user, project_id: int) -> bool:
    project = Project.objects.filter(pk=project_id).first()
    return project is not None and has_role(user=user, project=project, minimum=Role.VIEWER)


@database_sync_to_async
def _still_allowed(user_id: int | None, project_id: int, token_key: str | None) -> bool:
    """Fresh from the database: the account is active, still a member (viewer or above), and the
    token it connected with (if any) still exists."""
    if user_id is None:
        return False
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return False
    if token_key is not None:
        from rest_framework.authtoken.models import Token

        if not Token.objects.filter(key=token_key, user_id=user_id).exists():
            return False
    project = Project.objects.filter(pk=project_id).first()
    return project is not None and has_role(user=user, project=project, minimum=Role.VIEWER)


def notify_access_changed(*, user_id: int, project_ids: list[int] | None = None) -> None:
    """Tell the sockets of ``user_id`` (in these projects, or all the user's) to re-check access now."""
    layer = get_channel_layer()
    if layer is None:
        return
    if project_ids is None:
        project_ids = list(Membership.objects.filter(user_id=user_id).values_list("project_id", flat=True))
    for project_id in project_ids:
        try:
            async_to_sync(layer.group_send)(group_name(project_id), {"type": "karyo.access", "user": user_id})
        except Exception:
            log.warning("could not notify sockets of project %s about user %s", project_id, user_id, exc_info=True)


@receiver(post_save, sender=Membership, dispatch_uid="ws-access-membership-saved")
@receiver(post_delete, sender=Membership, dispatch_uid="ws-access-membership-deleted")
def _membership_changed(sender, instance: Membership, **kwargs) -> None:
    notify_access_changed(user_id=instance.user_id, project_ids=[instance.project_id])


@receiver(post_save, sender=get_user_model(), dispatch_uid="ws-access-user-saved")
def _user_changed(sender, instance, created: bool = False, **kwargs) -> None:
    if not created and not instance.is_active:
        notify_access_changed(user_id=instance.pk)


def _token_deleted(sender, instance, **kwargs) -> None:
    notify_access_changed(user_id=instance.user_id)


def _connect_token_signal() -> None:
    from rest_framework.authtoken.models import Token

    post_delete.connect(_token_deleted, sender=Token, dispatch_uid="ws-access-token-deleted")


_connect_token_signal()


class ProjectEventsConsumer(AsyncJsonWebsocketConsumer):
    """``/ws/projects/<id>/``: training epochs, prediction/ranking progress, queue changes. Members only."""

    group: str | None = None
    project_id: int | None = None
    user_id: int | None = None
    token_key: str | None = None
    checked_at: float = 0.0

    async def connect(self):
        project_id = int(self.scope["url_route"]["kwargs"]["project_id"])
        user = self.scope.get("user")
        if not await _may_watch(user, project_id):
            await self.close(code=REVOKED)
            return
        # Remembered to re-check later: who, and the token it came with (a revoked token drops the socket).
        self.project_id, self.user_id = project_id, getattr(user, "pk", None)
        self.token_key = parse_qs(self.scope.get("query_string", b"").decode()).get("token", [None])[0]
        self.checked_at = time.monotonic()
        self.group = group_name(project_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"kind": "hello", "project": project_id})

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def _allowed(self, *, now: bool = False) -> bool:
        if not now and time.monotonic() - self.checked_at < ACCESS_RECHECK_SECONDS:
            return True
        allowed = await _still_allowed(self.user_id, self.project_id, self.token_key)
        self.checked_at = time.monotonic()
        if not allowed:
            await self.close(code=REVOKED)
        return allowed

    async def receive_json(self, content, **kwargs):
        if content.get("kind") == "ping" and await self._allowed():
            await self.send_json({"kind": "pong"})

    async def karyo_event(self, message):
        if await self._allowed():
            await self.send_json(message["event"])

    async def karyo_access(self, message):
        if message.get("user") == self.user_id:
            await self._allowed(now=True)
