"""A live WebSocket is dropped when its user loses access (issue 13): membership removed, user
deactivated, token revoked (told at once through the channel layer), or access lost without any
signal (a raw update: noticed at the next event delivery, at most ACCESS_RECHECK_SECONDS later)."""
from __future__ import annotations

import json
import time

import pytest
from rest_framework.authtoken.models import Token

import backend.web.consumers  # noqa: F401 - connects the access-change receivers in this process too
from backend.common.events import publish
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from tests.backend.test_active_learning_loop import asgi_server  # noqa: F401 - the live server fixture

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def member(make_user):
    admin, viewer = make_user("ws-admin"), make_user("ws-viewer")
    project = create_project(name="WS", created_by=admin, tile_size=64)
    membership = Membership.objects.create(user=viewer, project=project, role=Role.VIEWER)
    return {"project": project, "user": viewer, "membership": membership, "token": Token.objects.create(user=viewer)}


def open_socket(server: str, project_id: int, token: str):
    from websockets.sync.client import connect

    ws = connect(f"ws://{server}/ws/projects/{project_id}/?token={token}", origin=f"http://{server}", open_timeout=20)
    assert json.loads(ws.recv(timeout=20))["kind"] == "hello"
    return ws


def next_event(ws, timeout: float = 20) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def assert_dropped(ws, project_id: int, *, publish_first: bool) -> None:
    from websockets.exceptions import ConnectionClosed

    if publish_first:
        publish(project_id, "after.revocation", secret=True)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            event = next_event(ws)
            assert event.get("kind") != "after.revocation", "an event reached a socket whose access was revoked"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403


REVOCATIONS = {
    "membership removed": lambda m: m["membership"].delete(),
    "user deactivated": lambda m: (setattr(m["user"], "is_active", False), m["user"].save()),
    "token revoked": lambda m: m["token"].delete(),
}


@pytest.mark.parametrize("how", sorted(REVOCATIONS))
def test_a_socket_is_dropped_at_once_when_its_user_loses_access(member, asgi_server, how):  # noqa: F811
    project_id = member["project"].pk
    ws = open_socket(asgi_server, project_id, member["token"].key)
    try:
        publish(project_id, "before.revocation")
        assert next_event(ws)["kind"] == "before.revocation"
        started = time.monotonic()
        REVOCATIONS[how](member)
        assert_dropped(ws, project_id, publish_first=False)
        assert time.monotonic() - started < 10
    finally:
        ws.close()


def test_access_lost_without_a_signal_is_noticed_before_the_next_event_is_delivered(member, asgi_server):  # noqa: F811
    project_id = member["project"].pk
    ws = open_socket(asgi_server, project_id, member["token"].key)
    try:
        Membership.objects.filter(pk=member["membership"].pk).delete()  # a queryset delete still signals...
        ws.close()
        Membership.objects.create(user=member["user"], project=member["project"], role=Role.VIEWER)
        ws = open_socket(asgi_server, project_id, member["token"].key)
        # ...a raw SQL update does not: the socket finds out when it next re-checks.
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM projects_membership WHERE user_id = %s", [member["user"].pk])
        time.sleep(3.5)  # past ACCESS_RECHECK_SECONDS
        assert_dropped(ws, project_id, publish_first=True)
    finally:
        ws.close()


def test_a_member_whose_role_changes_but_stays_a_member_keeps_the_socket(member, asgi_server):  # noqa: F811
    project_id = member["project"].pk
    ws = open_socket(asgi_server, project_id, member["token"].key)
    try:
        Membership.objects.filter(pk=member["membership"].pk).update(role=Role.ANNOTATOR)
        member["membership"].refresh_from_db()
        member["membership"].save()  # signals: the socket re-checks and stays
        time.sleep(3.5)
        publish(project_id, "still.here")
        assert next_event(ws)["kind"] == "still.here"
    finally:
        ws.close()
