"""The annotator's hot paths under concurrency: the queue lease, submitting, and the events they
publish (issue 13's load benchmark, ``tests/load``). Query budgets are what was measured when the
paths were made lean (``python -m tests.load.profile_paths``); a change that adds a query per
request shows here."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext

from backend.images.models import Tile
from backend.ml.models import QueueEntry
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from tests.backend.conftest import client_for
from tests.backend.factories import finish_ingest, label_png, rgb_png

# Token lookup, project, membership: what every project request costs before its own work.
AUTH_QUERIES = 3
# The lease itself: own lease, candidates, one conditional UPDATE, the answer's row (SQLite);
# own lease, candidate, UPDATE, answer inside one transaction (Postgres, SKIP LOCKED).
LEASE_QUERIES = 4


def _project_with_tiles(make_user, annotators: int, tiles_wide: int = 4):
    owner = make_user("owner", is_staff=True)
    project = create_project(name="Hot paths", created_by=owner, tile_size=64, auto_retrain_threshold=0)
    client_for(owner).post(f"/api/projects/{project.pk}/images/",
                           {"file": SimpleUploadedFile("i.png", rgb_png(64 * tiles_wide, 128))}, format="multipart")
    finish_ingest()
    from backend.ml.services import replace_queue

    tiles = list(Tile.objects.filter(project=project).order_by("y", "x").values_list("pk", flat=True))
    replace_queue(project=project, ordered=[(pk, 1.0 - i / 100) for i, pk in enumerate(tiles)], strategy="entropy",
                  model_version=None)
    users = []
    for i in range(annotators):
        user = make_user(f"ann{i}")
        Membership.objects.create(user=user, project=project, role=Role.ANNOTATOR)
        users.append(user)
    return project, tiles, users


@pytest.mark.django_db(transaction=True)
def test_concurrent_leases_give_each_annotator_one_tile_of_its_own(make_user):
    from backend.ml.services import next_tile

    project, tiles, users = _project_with_tiles(make_user, annotators=6)
    got: dict[tuple[str, int], int | None] = {}
    barrier = threading.Barrier(2 * len(users))

    def ask(user, attempt: int) -> None:
        barrier.wait()
        try:
            entry = next_tile(project=project, user=user)
            got[user.username, attempt] = entry.tile_id if entry else None
        finally:
            connection.close()

    # Every annotator asks twice at the same moment (two tabs): the same tile both times.
    threads = [threading.Thread(target=ask, args=(u, a)) for u in users for a in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    per_user = {u.username: {got[u.username, 0], got[u.username, 1]} for u in users}
    assert all(len(v) == 1 and None not in v for v in per_user.values()), per_user
    leased = [next(iter(v)) for v in per_user.values()]
    assert len(set(leased)) == len(users)
    assert set(leased) == set(tiles[: len(users)])  # the top-ranked ones
    held = QueueEntry.objects.filter(project=project, leased_by__isnull=False)
    assert held.count() == len(users)
    assert sorted(held.values_list("leased_by__username", flat=True)) == sorted(u.username for u in users)


@pytest.mark.django_db(transaction=True)
def test_a_lease_costs_at_most_its_query_budget_and_holds_no_sqlite_transaction(make_user):
    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    client = client_for(users[0])
    with CaptureQueriesContext(connection) as queries:
        response = client.post(f"/api/projects/{project.pk}/queue/next/")
    assert response.status_code == 200 and response.json()["tile"] == tiles[0]
    statements = [q["sql"] for q in queries.captured_queries if not q["sql"].startswith(("BEGIN", "SAVEPOINT",
                                                                                         "RELEASE"))]
    assert len(statements) <= AUTH_QUERIES + LEASE_QUERIES, statements
    if connection.vendor == "sqlite":
        # The one database write lock is taken by the conditional UPDATE alone, not by a
        # transaction around the reads.
        assert not any(q["sql"].startswith("BEGIN") for q in queries.captured_queries)
    # Asking again returns the same lease.
    assert client.post(f"/api/projects/{project.pk}/queue/next/").json()["tile"] == tiles[0]


@pytest.mark.django_db(transaction=True)
def test_a_submitted_tile_leaves_the_queue_and_a_lease_skips_it(make_user):
    from backend.ml.services import next_tile

    project, tiles, users = _project_with_tiles(make_user, annotators=2)
    first = next_tile(project=project, user=users[0])
    labels = np.zeros((64, 64), np.uint16)
    labels[10:20, 10:20] = 1
    response = client_for(users[0]).post(f"/api/tiles/{first.tile_id}/annotations/",
                                         {"mask": SimpleUploadedFile("m.png", label_png(labels))}, format="multipart")
    assert response.status_code == 201, response.content
    assert not QueueEntry.objects.filter(tile_id=first.tile_id).exists()
    assert next_tile(project=project, user=users[0]).tile_id == tiles[1]
    assert next_tile(project=project, user=users[1]).tile_id == tiles[2]


def test_publishing_to_a_group_without_members_writes_nothing(tmp_path):
    from backend.common.sqlite_layer import SQLiteChannelLayer

    layer = SQLiteChannelLayer(str(tmp_path / "channels.sqlite3"))
    layer.group_send_blocking("project.1", {"type": "karyo.event", "event": {}})  # first call expires old groups
    conn = layer._conn()
    before = conn.total_changes
    for _ in range(5):
        layer.group_send_blocking("project.1", {"type": "karyo.event", "event": {}})
    assert conn.total_changes == before


def test_a_blocking_group_send_reaches_the_members(tmp_path):
    import asyncio

    from backend.common.sqlite_layer import SQLiteChannelLayer

    layer = SQLiteChannelLayer(str(tmp_path / "channels.sqlite3"))

    async def scenario():
        channel = await layer.new_channel()
        await layer.group_add("project.7", channel)
        await asyncio.to_thread(layer.group_send_blocking, "project.7", {"type": "karyo.event", "event": {"n": 1}})
        return await asyncio.wait_for(layer.receive(channel), 5)

    assert asyncio.run(scenario()) == {"type": "karyo.event", "event": {"n": 1}}
