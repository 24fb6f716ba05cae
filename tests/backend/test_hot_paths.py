"""The annotator's hot paths under concurrency: the queue lease, submitting, and the events they
publish (issue 13's load benchmark, ``tests/load``). Query budgets are what was measured when the
paths were made lean (``python -m tests.load.profile_paths``); a change that adds a query per
request shows here."""
from __future__ import annotations

import re
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

pytestmark = pytest.mark.django_db(transaction=True)

# Token lookup, project, membership: what every project request costs before its own work.
AUTH_QUERIES = 3
# The lease itself. SQLite: the caller's own lease (a read), else one UPDATE that takes the first
# free entry and a read of it with its tile, each on an index; Postgres, in one transaction: the caller's user row locked (one lease at a time per user),
# own lease, candidate (SKIP LOCKED), UPDATE, the answer's row.
LEASE_QUERIES = {"sqlite": 3, "postgresql": 5}


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


def test_a_lease_costs_at_most_its_query_budget_and_holds_no_sqlite_transaction(make_user):
    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    client = client_for(users[0])
    with CaptureQueriesContext(connection) as queries:
        response = client.post(f"/api/projects/{project.pk}/queue/next/")
    assert response.status_code == 200 and response.json()["tile"] == tiles[0]
    statements = [q["sql"] for q in queries.captured_queries
                  if not q["sql"].startswith(("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"))]
    assert len(statements) <= AUTH_QUERIES + LEASE_QUERIES[connection.vendor], "\n".join(s[:100] for s in statements)
    if connection.vendor == "sqlite":
        # The one database write lock is taken by the conditional UPDATE alone, not by a
        # transaction around the reads.
        assert not any(q["sql"].startswith("BEGIN") for q in queries.captured_queries)
    # Asking again returns the same lease.
    assert client.post(f"/api/projects/{project.pk}/queue/next/").json()["tile"] == tiles[0]


def test_a_lease_reads_the_queue_through_its_indexes_without_sorting_or_scanning_it(make_user):
    """The lease must not cost more as the queue grows: each statement walks an index and stops at
    its first rows (SQLite: what EXPLAIN QUERY PLAN says of the statements the lease ran)."""
    from backend.ml.services import next_tile

    if connection.vendor != "sqlite":
        pytest.skip("Postgres plans from statistics; the SQLite plan is the one that is fixed")
    project, tiles, users = _project_with_tiles(make_user, annotators=2)
    next_tile(project=project, user=users[0])  # someone else holds the top tile
    for user in users[1:]:
        for _ in range(2):  # a new lease, then the caller's own lease
            with CaptureQueriesContext(connection) as queries:
                next_tile(project=project, user=user)
            statements = [q["sql"] for q in queries.captured_queries if q["sql"].startswith(("SELECT", "UPDATE"))]
            assert statements
            for sql in statements:
                with connection.cursor() as cursor:
                    cursor.execute("EXPLAIN QUERY PLAN " + sql)
                    plan = " / ".join(row[-1] for row in cursor.fetchall())
                assert "TEMP B-TREE" not in plan and "SCAN " not in plan, plan
                assert re.search(r"USING INDEX queue_(project_rank|leased_by_project)", plan), plan


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


def _storage_class():
    """The class of the configured storage (local or S3), to wrap its ``save``."""
    from django.core.files.storage import default_storage

    default_storage.exists("probe")  # the lazy storage sets itself up
    return type(default_storage._wrapped)


def _submit(user, tile_id: int):
    labels = np.zeros((64, 64), np.uint16)
    labels[10:20, 10:20] = 1
    return client_for(user).post(f"/api/tiles/{tile_id}/annotations/",
                                 {"mask": SimpleUploadedFile("m.png", label_png(labels))}, format="multipart")


def test_a_submission_writes_its_files_first_and_holds_its_transaction_for_one_read_and_one_insert(
        make_user, monkeypatch):
    from django.core.files.storage import default_storage

    from backend.images.models import Annotation

    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    assert _submit(users[0], tiles[0]).status_code == 201  # version 1: the next one has a parent
    saved_inside_transaction = []
    storage_class = _storage_class()
    original_save = storage_class.save

    def save(self, name, content, *args, **kwargs):
        saved_inside_transaction.append(connection.in_atomic_block)
        return original_save(self, name, content, *args, **kwargs)

    monkeypatch.setattr(storage_class, "save", save)
    # Each statement with the outermost atomic block it ran in (the object itself, so a later
    # block is never mistaken for it): Postgres shows no BEGIN statement, SQLite's layer does.
    statements: list[tuple[str, object]] = []

    def record(execute, sql, params, many, context):
        statements.append((sql, connection.atomic_blocks[0] if connection.atomic_blocks else None))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        response = _submit(users[0], tiles[0])
    assert response.status_code == 201 and response.json()["version"] == 2, response.content
    assert saved_inside_transaction == [False]
    insert = next(i for i, (sql, _) in enumerate(statements) if sql.startswith('INSERT INTO "images_annotation"'))
    block = statements[insert][1]
    assert block is not None
    first = insert
    while first > 0 and statements[first - 1][1] is block:
        first -= 1
    inside = [sql for sql, _ in statements[first:insert + 1] if not sql.startswith(("BEGIN", "SAVEPOINT"))]
    assert len(inside) == 2 and inside[0].startswith("SELECT") and '"images_annotation"' in inside[0], inside
    after = statements[insert + 1:]
    assert not after or after[0][1] is not block, after[:2]
    second = Annotation.objects.get(tile_id=tiles[0], version=2)
    assert second.parent_id == Annotation.objects.get(tile_id=tiles[0], version=1).pk
    assert default_storage.exists(second.mask.name)


def test_a_submission_enqueues_the_stitching_and_does_not_run_it(make_user, monkeypatch):
    from celery import current_app

    from backend.images import truth

    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    ran, sent = [], []
    monkeypatch.setattr(truth, "run_stitch", lambda **kwargs: ran.append(kwargs))
    monkeypatch.setattr(current_app.tasks["karyo.cpu.stitch_image"], "delay", lambda *args: sent.append(args))
    assert _submit(users[0], tiles[0]).status_code == 201
    assert sent == [(Tile.objects.get(pk=tiles[0]).image_id,)] and ran == []


def test_a_submission_that_keeps_conflicting_leaves_no_file_behind(make_user, monkeypatch):
    from django.core.files.storage import default_storage
    from django.db import IntegrityError

    from backend.common.errors import Conflict
    from backend.images import services
    from backend.images.models import Annotation

    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    saved: list[str] = []
    storage_class = _storage_class()
    original_save = storage_class.save

    def save(self, name, content, *args, **kwargs):
        saved.append(original_save(self, name, content, *args, **kwargs))
        return saved[-1]

    def version_always_taken(**kwargs):
        raise IntegrityError("UNIQUE constraint failed: images_annotation.tile_id, images_annotation.version")

    monkeypatch.setattr(storage_class, "save", save)
    monkeypatch.setattr(Annotation.objects, "create", version_always_taken)
    with pytest.raises(Conflict):
        services.create_annotation(tile=Tile.objects.get(pk=tiles[0]), instances=np.zeros((64, 64), np.uint16),
                                   author=users[0])
    assert len(saved) == 1 and not default_storage.exists(saved[0])


def test_a_submission_enqueues_the_correction_effort_and_the_task_records_it(make_user, monkeypatch):
    from celery import current_app

    from backend.common.storage import StagedWrites, encode_png
    from backend.images.models import Annotation
    from backend.ml import services, tasks
    from backend.ml.models import CorrectionEffort, ModelStatus, ModelVersion, Prediction

    project, tiles, users = _project_with_tiles(make_user, annotators=1)
    model = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/v1.pt",
                                        status=ModelStatus.ACTIVE)
    predicted = np.zeros((64, 64), np.uint16)
    predicted[10:20, 10:20], predicted[40:50, 40:50] = 1, 2  # the author keeps one nucleus, deletes one
    with StagedWrites() as staged:
        Prediction.objects.create(tile_id=tiles[0], model_version=model, nucleus_count=2,
                                  mask=staged.save(f"predictions/{tiles[0]}.png", encode_png(predicted)))
    computed, sent = [], []
    original = services.record_correction_effort
    monkeypatch.setattr(services, "record_correction_effort", lambda **kwargs: computed.append(kwargs))
    monkeypatch.setattr(current_app.tasks["karyo.cpu.correction_effort"], "delay", lambda *args: sent.append(args))
    assert _submit(users[0], tiles[0]).status_code == 201
    annotation = Annotation.objects.get(tile_id=tiles[0])
    assert sent == [(annotation.pk,)] and computed == []  # not in the submitting request
    monkeypatch.setattr(tasks, "record_correction_effort", original)
    assert tasks.correction_effort(annotation.pk) is True  # what the cpu worker runs
    effort = CorrectionEffort.objects.get(annotation=annotation)
    assert (effort.n_pred, effort.n_true, effort.n_deleted, effort.model_version_id) == (2, 1, 1, model.pk)
    assert tasks.correction_effort(annotation.pk) is False  # a second delivery records nothing more
    assert CorrectionEffort.objects.filter(annotation=annotation).count() == 1
