"""The periodic reconcile against the real Label Studio server (fixtures of test_labelstudio):
it reads only the tasks that changed since its watermark, the watermark advances, and it never
asks Label Studio for a page past the last one (which Label Studio logs as an "Invalid page"
traceback)."""
from __future__ import annotations

import pytest

from backend.images.models import Annotation
from backend.labelstudio import services
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.ingest import reconcile
from backend.labelstudio.models import LabelStudioLink
from tests.backend.conftest import start_worker  # noqa: F401  (fixture)
from tests.backend.test_labelstudio import configured, label_studio, ls_task, make_project, worker  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_the_reconcile_reads_only_changed_tasks_and_its_watermark_advances(configured):  # noqa: F811  (fixture)
    data = make_project("Watermark", sizes=[64, 64, 64], nuclei=[3, 3, 3], uncertainty=[0.5, 0.4, 0.3])
    project, tiles = data["project"], data["tiles"]
    assert services.sync_project(project=project).ok
    link = LabelStudioLink.objects.get(project=project)
    client = LabelStudioClient()
    # Karyo is connected as the ML backend, and the webhook Label Studio adds for it (every
    # action, no secret: a 401 on each save) is gone; Karyo's own, with the secret, remains.
    assert link.ml_backend_id and link.webhook_id
    hooks = client.sdk.webhooks.list(project=str(link.ls_project_id))
    assert [(h.id, "X-Karyo-Webhook-Secret" in (h.headers or {})) for h in hooks] == [(link.webhook_id, True)]
    log_before = configured.log.read_text(errors="replace").count("Invalid page")
    # Label Studio applies the updated_at filter (nothing is updated tomorrow).
    import datetime as dt

    tomorrow = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    assert list(client.list_tasks(link.ls_project_id, updated_after=tomorrow)) == []

    first = reconcile(link=link, client=client)
    link.refresh_from_db()
    watermark = link.reconciled_until
    second = reconcile(link=link, client=client)
    link.refresh_from_db()
    print(f"reconcile after sync: {first}; again, nothing changed: {second}")
    assert second["tasks_changed"] == 0, "an unchanged project is read again"
    assert watermark is not None and link.reconciled_until >= watermark

    # A correction in Label Studio (its webhook not delivered: no worker here): one task read.
    (prediction,) = client.list_predictions(task_id=ls_task(link, tiles[1]))
    client.sdk.annotations.create(id=ls_task(link, tiles[1]), result=prediction.result[:-1],
                                  parent_prediction=prediction.id)
    third = reconcile(link=link, client=client)
    print(f"after one correction: {third}")
    assert third["tasks_changed"] == 1 and third["stored"] == 1
    assert Annotation.objects.filter(tile=tiles[1]).count() == 1
    link.refresh_from_db()
    assert link.reconciled_until > watermark
    assert reconcile(link=link, client=client)["tasks_changed"] == 0

    # A whole sync (push + reconcile) of an unchanged project reads nothing either.
    report = services.sync_project(project=project)
    assert report.ok
    assert reconcile(link=link, client=client)["tasks_changed"] == 0
    assert configured.log.read_text(errors="replace").count("Invalid page") == log_before


def test_members_get_label_studio_users_and_karyo_annotations_appear_there(configured):  # noqa: F811  (fixture)
    from backend.images.services import create_annotation
    from backend.labelstudio.models import LabelStudioAccount
    from backend.projects.models import Membership, Role
    from django.contrib.auth import get_user_model

    data = make_project("Members", sizes=[64, 64], nuclei=[4, 4], uncertainty=[0.5, 0.4])
    project, tiles = data["project"], data["tiles"]
    ana = get_user_model().objects.create_user(username="ana-ls", password="pw-for-tests-123")  # no e-mail
    vic = get_user_model().objects.create_user(username="vic-ls", password="pw-for-tests-123")
    Membership.objects.create(user=ana, project=project, role=Role.ANNOTATOR)
    Membership.objects.create(user=vic, project=project, role=Role.VIEWER)
    made_in_karyo, _ = create_annotation(tile=tiles[0], instances=data["masks"][tiles[0].pk].astype("int32"),
                                         author=data["pathologist"])
    report = services.sync_project(project=project)
    assert report.ok, report.error
    accounts = {a.user.username: a.ls_user_id for a in LabelStudioAccount.objects.select_related("user")}
    assert {"ana-ls", data["pathologist"].username} <= set(accounts) and "vic-ls" not in accounts  # viewers: none
    client = LabelStudioClient()
    ls_users = {u.username: u.id for u in client.sdk.users.list()}
    assert ls_users["ana-ls"] == accounts["ana-ls"]

    # Karyo's annotation is an annotation in Label Studio, by its author, and is not stored back.
    link = LabelStudioLink.objects.get(project=project)
    (shown,) = client.list_annotations(ls_task(link, tiles[0]))
    assert shown.completed_by == accounts[data["pathologist"].username] and len(shown.result) == 4
    assert reconcile(link=link, client=client)["stored"] == 0
    assert Annotation.objects.filter(tile=tiles[0]).count() == 1

    # What ana saves in Label Studio is hers in Karyo.
    (prediction,) = client.list_predictions(task_id=ls_task(link, tiles[1]))
    client.create_annotation(task_id=ls_task(link, tiles[1]), result=prediction.result[:-1], completed_by=accounts["ana-ls"])
    assert reconcile(link=link, client=client)["stored"] == 1
    version = Annotation.objects.get(tile=tiles[1])
    assert version.author == ana and version.nucleus_count == 3
    assert made_in_karyo.external_id == ""


def test_a_correction_saved_in_label_studio_reaches_karyo_fast_while_a_model_trains(configured, worker, start_worker):  # noqa: F811
    """The latency the issue measured at 8-52 s: a correction saved in Label Studio, delivered by
    its webhook, fetched and stored by the cpu worker, while a gpu worker trains. Printed (target
    < 3 s)."""
    import statistics
    import time

    from backend.images.services import create_annotation
    from backend.ml.models import RunStatus, TrainingRun
    from backend.ml.services import cancel_run, start_training_run
    from tests.backend.test_labelstudio import TIMINGS, wait_for

    data = make_project("Latency", sizes=[64, 64, 64, 64], nuclei=[4, 4, 4, 4], uncertainty=[0.5, 0.4, 0.3, 0.2])
    project, tiles = data["project"], data["tiles"]
    for tile in tiles[:2]:
        create_annotation(tile=tile, instances=data["masks"][tile.pk].astype("int32"), author=data["pathologist"])
    assert services.sync_project(project=project).ok
    link = LabelStudioLink.objects.get(project=project)
    client = LabelStudioClient()

    start_worker("gpu")
    run = start_training_run(project=project, architecture="unet", config={
        "epochs": 400, "width": 4, "tile_size": 64, "batch_size": 2, "steps_per_epoch": 4, "early_stopping_patience": 0})
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == RunStatus.RUNNING, timeout=120, what="training to start")
    wait_for(lambda: len(TrainingRun.objects.get(pk=run.pk).epoch_metrics) >= 1, timeout=120, what="a first epoch")

    latencies = []
    for tile in tiles[2:]:
        (prediction,) = client.list_predictions(task_id=ls_task(link, tile))
        started = time.monotonic()
        client.sdk.annotations.create(id=ls_task(link, tile), result=prediction.result[:-1], parent_prediction=prediction.id)
        wait_for(lambda t=tile: Annotation.objects.filter(tile=t).exists(), timeout=60, interval=0.01,
                 what="the correction in Karyo")
        latencies.append(round(time.monotonic() - started, 2))
    assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.RUNNING, "the run was not going during the test"
    cancel_run(run=TrainingRun.objects.get(pk=run.pk))
    TIMINGS["ls_correction_to_karyo_during_training_s"] = latencies
    print(f"Label Studio correction -> Karyo while a model trains: {latencies} s "
          f"(median {statistics.median(latencies):.2f} s; target < 3 s; issue measured 8-52 s)")
    assert max(latencies) < 3.0, f"target < 3 s not reached: {latencies}"
