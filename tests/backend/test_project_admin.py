"""Project administration through the API: classes get ids from Karyo, invitations create
accounts with a one-time set-password link, archiving makes a project read-only, the dashboard
summary carries per-member activity, and the pages answer with styled 404/403."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from PIL import Image as PILImage

from backend.images.models import Tile
from backend.images.services import create_annotation
from backend.projects.models import Membership, Project
from tests.backend.factories import disc_labels, rgb_png

pytestmark = pytest.mark.django_db

TWO_CLASSES = [{"name": "epithelial", "color": "#E6194B"}, {"name": "lymphocyte", "color": "#3cb44b", "id": 77}]


def test_karyo_assigns_class_ids_and_ignores_the_callers(api):
    response = api("staff").post("/api/projects/", {"name": "New", "nucleus_classes": TWO_CLASSES, "tile_size": 128,
                                                    "context_margin": 32, "working_mpp": 0.25}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["nucleus_classes"] == [
        {"id": 1, "name": "epithelial", "color": "#e6194b"}, {"id": 2, "name": "lymphocyte", "color": "#3cb44b"}]
    project = Project.objects.get(name="New")
    assert (project.context_margin, project.working_mpp) == (32, 0.25)
    assert Membership.objects.get(project=project).role == "admin"


def test_an_edit_keeps_class_ids_and_numbers_new_classes_after_the_highest(api, team):
    project = team["project"]
    admin = api("admin")
    classes = admin.get(f"/api/projects/{project.pk}/").json()["nucleus_classes"]
    edited = [{**classes[0], "name": "tumour"}, {"name": "stroma", "color": "#4363d8"}]
    response = admin.patch(f"/api/projects/{project.pk}/", {"nucleus_classes": edited}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["nucleus_classes"] == [
        {"id": classes[0]["id"], "name": "tumour", "color": classes[0]["color"]}, {"id": 2, "name": "stroma", "color": "#4363d8"}]


def test_it_refuses_to_remove_a_class_that_annotations_use(api, team):
    project = team["project"]
    admin = api("admin")
    _one_tile(project)
    project.nucleus_classes = [{"id": 1, "name": "a", "color": "#111111"}, {"id": 2, "name": "b", "color": "#222222"}]
    project.save()
    create_annotation(tile=Tile.objects.get(), instances=disc_labels().astype(np.int32), author=None, classes={"1": 2})
    response = admin.patch(f"/api/projects/{project.pk}/", {"nucleus_classes": [{"id": 1, "name": "a", "color": "#111111"}]},
                           format="json")
    assert response.status_code == 400
    assert "annotations use b" in response.json()["error"]["message"]
    assert len(Project.objects.get(pk=project.pk).nucleus_classes) == 2


def test_bad_settings_get_clear_errors(api):
    staff = api("staff")
    for body, field in [({"nucleus_classes": []}, "nucleus_classes"),
                        ({"nucleus_classes": [{"name": "x", "color": "red"}]}, "nucleus_classes"),
                        ({"nucleus_classes": [{"name": "x", "color": "#000000"}, {"name": "x", "color": "#111111"}]}, "nucleus_classes"),
                        ({"working_mpp": 0}, "working_mpp"), ({"context_margin": 5000}, "context_margin")]:
        response = staff.post("/api/projects/", {"name": f"Bad {field}", **body}, format="json")
        assert response.status_code == 400, body
        assert response.json()["error"]["message"].startswith(field)
    assert not Project.objects.filter(name__startswith="Bad").exists()


def test_inviting_an_unknown_email_creates_an_account_with_a_one_time_link(api, team, client):
    project = team["project"]
    response = api("admin").post(f"/api/projects/{project.pk}/members/",
                                 {"email": "ana.lopez@example.org", "role": "annotator"}, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["username"] == "ana.lopez" and body["account_created"] and not body["emailed"]
    user = get_user_model().objects.get(username="ana.lopez")
    assert not user.has_usable_password()
    path = re.sub(r"^https?://[^/]+", "", body["set_password_url"])
    page = client.get(path, follow=True)
    assert page.status_code == 200 and b"set-password-form" in page.content
    done = client.post(page.redirect_chain[-1][0] if page.redirect_chain else path,
                       {"new_password1": "a-long-pass-123", "new_password2": "a-long-pass-123"})
    assert done.status_code == 302
    user.refresh_from_db()
    assert user.check_password("a-long-pass-123")
    # The link works once.
    again = client.get(path, follow=True)
    assert b"set-password-invalid" in again.content


def test_with_smtp_configured_the_link_is_mailed_not_returned(api, team, settings):
    settings.KARYO_EMAIL_CONFIGURED = True
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    response = api("admin").post(f"/api/projects/{team['project'].pk}/members/",
                                 {"email": "bo@example.org", "username": "bo", "role": "viewer"}, format="json")
    assert response.status_code == 201
    assert response.json()["emailed"] and response.json()["set_password_url"] is None
    [message] = mail.outbox
    assert message.to == ["bo@example.org"] and "/set-password/" in message.body and "Cervix" in message.subject


def test_inviting_an_existing_user_by_email_adds_them_without_a_link(api, team, make_user):
    make_user("carla")
    response = api("admin").post(f"/api/projects/{team['project'].pk}/members/",
                                 {"email": "CARLA@example.org", "role": "reviewer"}, format="json")
    assert response.status_code == 201
    assert response.json()["username"] == "carla" and response.json()["set_password_url"] is None
    again = api("admin").post(f"/api/projects/{team['project'].pk}/members/", {"username": "carla", "role": "viewer"},
                              format="json")
    assert again.status_code == 409


def test_an_invitation_needs_a_username_or_email(api, team):
    response = api("admin").post(f"/api/projects/{team['project'].pk}/members/", {"role": "viewer"}, format="json")
    assert response.status_code == 400 and "username or an e-mail" in response.json()["error"]["message"]
    response = api("admin").post(f"/api/projects/{team['project'].pk}/members/", {"email": "nope", "role": "viewer"},
                                 format="json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_email"


def test_an_archived_project_is_read_only_until_restored(api, team):
    project = team["project"]
    admin = api("admin")
    assert admin.post(f"/api/projects/{project.pk}/archive/").json()["archived_at"]
    refused = admin.patch(f"/api/projects/{project.pk}/", {"description": "x"}, format="json")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "project_archived"
    assert api("annotator").post(f"/api/projects/{project.pk}/queue/next/").status_code == 409
    assert admin.delete(f"/api/projects/{project.pk}/archive/").json()["archived_at"] is None
    assert admin.patch(f"/api/projects/{project.pk}/", {"description": "x"}, format="json").status_code == 200


def test_the_summary_reports_each_members_activity_to_reviewers_only(api, team, django_capture_on_commit_callbacks):
    project = team["project"]
    admin = api("admin")
    tile = _one_tile(project)
    annotator = api("annotator")
    with django_capture_on_commit_callbacks(execute=True):
        saved = annotator.post(f"/api/tiles/{tile.pk}/regions/",
                               {"base": {"kind": "empty"}, "regions": [], "seconds_spent": 42}, format="json")
    assert saved.status_code == 201, saved.json()
    api("reviewer").post(f"/api/annotations/{saved.json()['id']}/review/", {"decision": "accept"}, format="json")
    rows = {r["username"]: r for r in admin.get(f"/api/projects/{project.pk}/summary/").json()["activity"]}
    assert rows["annotator"] == {**rows["annotator"], "tiles_submitted": 1, "accepted": 1, "rejected": 0, "seconds_spent": 42}
    assert rows["viewer"]["tiles_submitted"] == 0
    assert api("viewer").get(f"/api/projects/{project.pk}/summary/").json()["activity"] is None


def test_pages_answer_with_styled_404_and_403(team, client):
    client.force_login(team["users"]["viewer"])
    missing = client.get("/projects/999999/")
    assert missing.status_code == 404 and b'data-testid="error-page"' in missing.content and b"Page not found" in missing.content
    denied = client.get(f"/projects/{team['project'].pk}/settings/")
    assert denied.status_code == 403 and b"Only the project&#x27;s admins" in denied.content
    assert client.get("/projects/new/").status_code == 403
    assert client.get("/no/such/page/").status_code == 404
    client.force_login(team["users"]["admin"])
    assert client.get(f"/projects/{team['project'].pk}/settings/").status_code == 200


def _one_tile(project) -> Tile:
    from backend.images.services import ingest_images
    from tests.browser.scenario import decoded

    pixels = np.asarray(PILImage.open(io.BytesIO(rgb_png(64, 64))).convert("RGB"))
    ingest_images(project=project, images=[decoded("t.png", pixels)], uploaded_by=None)
    return Tile.objects.get(project=project)


def test_the_demo_seed_gives_every_image_its_own_name(make_user, settings):
    from django.core.management import call_command

    from backend.images.models import Image

    make_user("root").__class__.objects.filter(username="root").update(is_superuser=True, is_staff=True)
    settings.CELERY_TASK_ALWAYS_EAGER = False
    call_command("seed_demo", size=128)
    for project in Project.objects.filter(name__startswith="Demo"):
        names = list(Image.objects.filter(project=project).values_list("name", flat=True))
        assert len(names) >= 6 and len(set(names)) == len(names), names


def test_member_changes_are_announced_after_commit(api, team, django_capture_on_commit_callbacks):
    from backend.projects.signals import members_changed

    seen = []

    def receiver(sender, *, project, **_kwargs):
        seen.append(project.pk)

    members_changed.connect(receiver, dispatch_uid="test.members_changed")
    try:
        admin, pk = api("admin"), team["project"].pk
        with django_capture_on_commit_callbacks(execute=True):
            created = admin.post(f"/api/projects/{pk}/members/", {"username": "newbie", "role": "annotator"}, format="json")
        assert created.status_code == 201 and seen == [pk]
        membership_id = created.json()["id"]
        with django_capture_on_commit_callbacks(execute=True):
            admin.patch(f"/api/projects/{pk}/members/{membership_id}/", {"role": "reviewer"}, format="json")
            admin.delete(f"/api/projects/{pk}/members/{membership_id}/")
        assert seen == [pk, pk, pk]
    finally:
        members_changed.disconnect(dispatch_uid="test.members_changed")
