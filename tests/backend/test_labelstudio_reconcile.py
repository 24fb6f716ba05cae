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
from tests.backend.test_labelstudio import configured, label_studio, ls_task, make_project  # noqa: F401  (fixtures)

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
