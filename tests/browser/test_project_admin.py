"""An admin runs Karyo from the browser (issue 14): creates a project with two nucleus classes,
invites an annotator by e-mail, the annotator chooses a password through the one-time link and
sees the project; a viewer sees no admin pages and the API refuses them; styled 404/403 pages."""
from __future__ import annotations

import re

import pytest

from backend.projects.models import Membership, Project, Role
from tests.browser.conftest import Session
from tests.browser.scenario import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_admin_creates_a_project_invites_an_annotator_who_signs_in_with_the_link(make_user, open_session, browser,
                                                                                        server):
    make_user("boss", is_staff=True, password=PASSWORD)
    s = open_session("boss", PASSWORD)
    s.page.click("[data-testid=new-project]")
    s.page.wait_for_selector("[data-testid=project-form]")
    s.page.fill("[data-testid=field-name]", "Cervix screening 2026")
    s.page.fill("[data-testid=field-description]", "Pap smears from the spring campaign.")
    s.page.fill("[data-testid=class-row] >> nth=0 >> [data-testid=class-name]", "epithelial")
    s.page.click("[data-testid=add-class]")
    s.page.fill("[data-testid=class-row] >> nth=1 >> [data-testid=class-name]", "lymphocyte")
    s.page.fill("[data-testid=field-tile_size]", "128")
    s.page.select_option("[data-testid=field-architecture]", "unet")
    # The catalog's one-line explanation follows the choice.
    assert "encoder-decoder" in s.page.inner_text("[data-testid=field-architecture-help]")
    s.page.select_option("[data-testid=field-strategy]", "entropy")
    assert s.page.inner_text("[data-testid=field-strategy-help]").strip()
    s.page.fill("[data-testid=field-licence]", "CC-BY-4.0")
    s.shot("20-new-project")
    with s.page.expect_navigation():
        s.page.click("[data-testid=save-project]")
    s.page.wait_for_selector("[data-testid=created-note]")
    project = Project.objects.get(name="Cervix screening 2026")
    assert [(c["id"], c["name"]) for c in project.nucleus_classes] == [(1, "epithelial"), (2, "lymphocyte")]
    assert (project.tile_size, project.default_architecture, project.al_strategy, project.licence) == (
        128, "unet", "entropy", "CC-BY-4.0")
    assert Membership.objects.get(project=project, user__username="boss").role == Role.ADMIN

    # Invite by e-mail: no SMTP server here, so the page shows the one-time link.
    s.page.fill("[data-testid=invite-who]", "ana.perez@example.org")
    s.page.select_option("[data-testid=invite-role]", "annotator")
    s.page.click("[data-testid=invite]")
    link = s.page.locator("[data-testid=set-password-link]")
    link.wait_for()
    url = link.input_value()
    assert re.search(r"/set-password/[^/]+/[^/]+/$", url)
    s.page.wait_for_selector("[data-testid=member][data-username='ana.perez']")
    s.shot("21-settings-members-invited")

    # The annotator opens the link in their own browser, chooses a password, is signed in.
    ana = Session(browser, server)
    try:
        ana.page.goto(server + re.sub(r"^https?://[^/]+", "", url))
        ana.page.wait_for_selector("[data-testid=set-password-form]")
        ana.shot("22-set-password")
        ana.page.fill("input[name=new_password1]", "ana-chooses-this-1")
        ana.page.fill("input[name=new_password2]", "ana-chooses-this-1")
        with ana.page.expect_navigation():
            ana.page.click("button[type=submit]")
        ana.page.wait_for_selector("[data-testid=project-card]")
        assert "Cervix screening 2026" in ana.page.inner_text("[data-testid=project-card]")
        assert ana.page.text_content("[data-testid=project-card] .role") == "annotator"
        ana.shot("23-annotator-sees-the-project")
        # Annotators get no settings tab, and the page itself says why.
        ana.goto(f"/projects/{project.pk}/")
        ana.page.wait_for_selector("nav.sections")
        assert ana.page.locator("nav.sections >> text=Settings").count() == 0
        # The link worked once.
        ana.context.clear_cookies()
        ana.page.goto(server + re.sub(r"^https?://[^/]+", "", url))
        ana.page.wait_for_selector("[data-testid=set-password-invalid]")
        assert not ana.errors, ana.errors
    finally:
        ana.close()
    ana_user = Membership.objects.get(project=project, user__username="ana.perez").user
    assert ana_user.check_password("ana-chooses-this-1") and ana_user.email == "ana.perez@example.org"

    # Change a role, remove a member, archive and restore.
    s.page.select_option("[data-testid=member][data-username='ana.perez'] [data-testid=member-role]", "reviewer")
    s.page.wait_for_function("() => [...document.querySelectorAll('.toast')].some(t => t.textContent.includes('is now reviewer'))")
    assert Membership.objects.get(project=project, user=ana_user).role == Role.REVIEWER
    s.page.click("[data-testid=archive]")
    s.page.wait_for_selector("[data-testid=archived-banner]")
    assert Project.objects.get(pk=project.pk).archived_at is not None
    assert s.page.locator("[data-testid=save-project]").is_disabled()
    s.shot("24-settings-archived")
    s.page.click("[data-testid=restore]")
    s.page.wait_for_selector("[data-testid=archive]")
    assert Project.objects.get(pk=project.pk).archived_at is None
    assert not s.page.locator("[data-testid=save-project]").is_disabled()
    s.page.click("[data-testid=member][data-username='ana.perez'] [data-testid=remove-member]")
    s.page.wait_for_selector("[data-testid=member][data-username='ana.perez']", state="detached")
    assert not Membership.objects.filter(project=project, user=ana_user).exists()

    # The dashboard shows each member's activity to admins.
    s.goto(f"/projects/{project.pk}/")
    s.page.wait_for_selector("[data-testid=activity-table]")
    assert "boss" in s.page.inner_text("[data-testid=activity-table]")
    s.shot("25-dashboard-member-activity")


def test_a_viewer_sees_no_admin_pages_and_the_api_refuses_them(make_user, open_session):
    staff = make_user("owner", is_staff=True, password=PASSWORD)
    viewer = make_user("vera", password=PASSWORD)
    from backend.projects.services import create_project

    project = create_project(name="Read only", created_by=staff, tile_size=64)
    Membership.objects.create(user=viewer, project=project, role=Role.VIEWER)
    v = open_session("vera", PASSWORD)
    v.page.wait_for_selector("[data-testid=project-card]")
    assert v.page.locator("[data-testid=new-project]").count() == 0
    v.goto(f"/projects/{project.pk}/")
    v.page.wait_for_selector("nav.sections")
    assert v.page.locator("nav.sections >> text=Settings").count() == 0
    assert v.page.locator("[data-testid=activity-table]").count() == 0

    response = v.page.goto(v.base + f"/projects/{project.pk}/settings/")
    assert response.status == 403
    assert "Only the project's admins" in v.page.inner_text("[data-testid=error-page]")
    v.shot("26-viewer-settings-403")
    response = v.page.goto(v.base + "/projects/new/")
    assert response.status == 403
    response = v.page.goto(v.base + "/projects/999999/")
    assert response.status == 404 and v.page.locator("[data-testid=error-page][data-status='404']").count() == 1
    v.shot("27-not-found-404")

    v.goto("/")
    refused = [
        v.api("PATCH", f"/api/projects/{project.pk}/", {"description": "mine now"}),
        v.api("POST", f"/api/projects/{project.pk}/members/", {"email": "x@example.org", "role": "admin"}),
        v.api("POST", f"/api/projects/{project.pk}/archive/"),
        v.api("POST", "/api/projects/", {"name": "Sneaky", "nucleus_classes": [{"name": "a", "color": "#000000"}]}),
    ]
    assert [r["status"] for r in refused] == [403, 403, 403, 403]
    assert all(r["data"]["error"]["message"] for r in refused)
    project.refresh_from_db()
    assert project.description == "" and project.archived_at is None
    assert not Project.objects.filter(name="Sneaky").exists()
    assert Membership.objects.filter(project=project).count() == 2


def test_training_curves_zoom_and_show_values_under_the_cursor(make_user, open_session):
    from backend.ml.models import TrainingRun
    from backend.projects.services import create_project

    staff = make_user("curator", is_staff=True, password=PASSWORD)
    project = create_project(name="Curves", created_by=staff, tile_size=64)
    epochs = [{"epoch": e, "epochs": 8, "train_loss": 1.0 / e, "val": {"dice": 0.5 + e / 20, "aji": 0.3 + e / 25}}
              for e in range(1, 9)]
    TrainingRun.objects.create(project=project, architecture="unet", status="succeeded", progress=1.0,
                               epoch_metrics=epochs, config={"epochs": 8})
    s = open_session("curator", PASSWORD)
    s.goto(f"/projects/{project.pk}/training/")
    chart = "[data-testid=val-chart] .plot[data-ready='1']"
    s.page.wait_for_selector(chart)
    assert s.page.get_attribute("[data-testid=val-chart]", "data-points") == "8"
    box = s.page.locator(f"{chart} .u-over").bounding_box()
    # Hovering shows every series' value at that epoch.
    s.page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    tip = s.page.locator(f"{chart} .plot-tip")
    tip.wait_for(state="visible")
    assert "val Dice" in tip.inner_text() and "val AJI" in tip.inner_text() and "epoch" in tip.inner_text()
    s.shot("28-training-curves-tooltip", full_page=False)
    # Dragging across a part of the x axis zooms into it; a double-click resets.
    before = s.page.evaluate(f"(() => {{ const p = document.querySelector(\"{chart}\").plot; return [p.scales.x.min, p.scales.x.max]; }})()")
    s.page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    s.page.mouse.down()
    s.page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.52, steps=8)
    s.page.mouse.up()
    after = s.page.evaluate(f"(() => {{ const p = document.querySelector(\"{chart}\").plot; return [p.scales.x.min, p.scales.x.max]; }})()")
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    s.page.mouse.dblclick(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    reset = s.page.evaluate(f"(() => {{ const p = document.querySelector(\"{chart}\").plot; return [p.scales.x.min, p.scales.x.max]; }})()")
    assert reset == before


def test_while_the_first_model_trains_the_dashboard_and_queue_show_the_run_and_its_eta(make_user, open_session):
    import datetime as dt

    from django.utils import timezone

    from backend.ml.models import RunStatus, TrainingRun
    from backend.projects.services import create_project

    staff = make_user("trainer", is_staff=True, password=PASSWORD)
    project = create_project(name="First run", created_by=staff, tile_size=64)
    from backend.images.services import ingest_images
    from ml_worker import synth
    from tests.browser.scenario import decoded

    pixels, _ = synth.generate("he", size=128, seed=7, nucleus_radius=(5, 8))
    ingest_images(project=project, images=[decoded("he-7.png", pixels)], uploaded_by=staff)
    # 5 of 6 epochs done and the steps of the 6th finished (progress 1.0): it used to read 100 %.
    epochs = [{"epoch": e, "epochs": 6, "train_loss": 1.0 / e, "val": {"dice": 0.1 * e, "aji": 0.05 * e}} for e in range(1, 6)]
    TrainingRun.objects.create(project=project, architecture="unet", status=RunStatus.RUNNING, progress=0.67,
                               config={"epochs": 6}, epoch_metrics=epochs[:4],
                               started_at=timezone.now() - dt.timedelta(minutes=4), heartbeat_at=timezone.now())
    s = open_session("trainer", PASSWORD)
    s.goto(f"/projects/{project.pk}/")
    s.page.wait_for_selector("#model-card")
    s.page.wait_for_selector("[data-testid=run-eta]")
    model_card = s.page.inner_text("#model-card")
    assert "First model in training" in model_card and "No model yet" not in model_card
    assert "67%" in model_card and "min left" in model_card
    assert "epoch 5 of 6" in s.page.inner_text("main")
    s.shot("29-dashboard-first-run-eta")
    s.goto(f"/projects/{project.pk}/queue/")
    s.page.wait_for_selector("[data-testid=queue-grid] [data-testid=empty-state]")
    text = s.page.inner_text("[data-testid=queue-grid]")
    assert "first model is training" in text and "No model has been trained" not in text

    TrainingRun.objects.filter(project=project).update(progress=1.0, epoch_metrics=epochs, heartbeat_at=timezone.now())
    s.goto(f"/projects/{project.pk}/training/")
    s.page.wait_for_selector("[data-testid=epoch-counter]")
    assert s.page.inner_text("[data-testid=epoch-counter]").strip() == "epoch 6 of 6"
    bar = s.page.inner_text("[data-testid=run-panel] .progress-label")
    assert bar.startswith("99%") and "validating epoch 6" in bar
    s.shot("30-training-last-epoch-validating", full_page=False)
