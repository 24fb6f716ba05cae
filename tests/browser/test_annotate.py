"""Pathologists in the browser: the queue, correcting a tile in the embedded Label Studio
editor, the new version in the tile's history; a reviewer accepting it; a 300-nucleus tile."""
from __future__ import annotations

import time

import numpy as np
import pytest

from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus
from backend.ml.models import QueueEntry
from tests.browser import editor
from tests.browser.conftest import record_timings
from tests.browser.scenario import PASSWORD, make_users, ui_project

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def project(make_user):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, version, truths = ui_project(name="Cervix (browser)", creator=staff, kind="pap", images=2, size=256,
                                          tile_size=128, seed=11)
    users = make_users(make_user, project)
    return {"project": project, "version": version, "truths": truths, "users": users}


def test_an_annotator_corrects_a_tile_from_the_queue_and_sees_the_new_version(project, open_session):
    p = project["project"]
    s = open_session("annotator", PASSWORD)
    s.shot("01-projects")
    assert s.page.locator("[data-testid=project-card]").count() == 1

    s.goto(f"/projects/{p.pk}/")
    s.page.wait_for_selector("[data-testid=stat-annotated]")
    s.page.wait_for_selector("#version-chart .plot[data-ready='1'] canvas")
    assert "0 / 8" in s.page.inner_text("[data-testid=stat-annotated]")
    s.shot("02-dashboard")

    s.goto(f"/projects/{p.pk}/queue/")
    s.page.wait_for_selector("[data-testid=queue-tile]")
    assert s.page.locator("[data-testid=queue-tile]").count() == 8
    assert s.page.inner_text("[data-testid=strategy]") == "hybrid"
    s.page.click("[data-testid=heat-toggle]")
    s.page.wait_for_function("[...document.querySelectorAll('img.heat')].every(i => i.complete && i.naturalWidth > 0)")
    s.shot("03-queue-heatmap")

    top = QueueEntry.objects.filter(project=p).order_by("rank").first().tile_id
    with s.page.expect_navigation():
        s.page.click("[data-testid=start-annotating]")
    assert f"/tiles/{top}/" in s.page.url
    editor.wait_ready(s.page)
    assert QueueEntry.objects.get(project=p, tile_id=top).leased_by.username == "annotator"
    assert "prediction of model v1" in s.page.inner_text("[data-testid=source]")
    s.shot("04-workspace", full_page=False)

    # Reshape the largest nucleus: drag one of its points outwards, with the mouse.
    result = editor.regions(s.page, top)
    target = editor.largest(result)
    before = editor.editor_points(s.page, target["id"])
    editor.drag_first_point(s.page, target, 14, 16)
    after = editor.editor_points(s.page, target["id"])
    assert after != before, "the drag did not move the point"

    s.page.click("[data-testid=submit]")
    s.page.wait_for_selector("[data-testid=recent-item]")
    editor.wait_ready(s.page)  # the next tile opened in place
    next_tile = int(s.page.inner_text("[data-testid=tile-id]"))
    assert next_tile != top and f"/tiles/{next_tile}/" in s.page.url
    s.shot("05-workspace-next-tile", full_page=False)

    # Merging fragments: Ctrl+click two outlines, G, save a draft of the next tile.
    two = [r for r in editor.regions(s.page, next_tile) if r["id"].endswith("p1")][:2]  # k<id>p1: a nucleus's first piece
    editor.select_region(s.page, two[0])
    editor.select_region(s.page, two[1], modifiers=["Control"])
    assert sorted(s.page.evaluate("window.karyoEditor.selectedRegionIds()")) == sorted(r["id"] for r in two)
    s.page.keyboard.press("g")
    s.page.wait_for_selector(".merge-list li")
    s.page.keyboard.press("Control+s")
    s.page.wait_for_function("document.querySelectorAll('[data-testid=recent-item]').length === 2")
    draft = Annotation.objects.get(tile_id=next_tile)
    assert draft.status == AnnotationStatus.DRAFT
    predicted_next = read_label_map(draft.prediction.mask.name)
    merged = read_label_map(draft.mask.name)
    first, second = (int(r["id"][1:].split("p")[0]) for r in two)
    assert not (merged == second).any() and np.array_equal(merged == first, (predicted_next == first) | (predicted_next == second))

    saved = Annotation.objects.get(tile_id=top)
    assert saved.version == 1 and saved.source == AnnotationSource.CORRECTED_PREDICTION
    assert saved.status == AnnotationStatus.SUBMITTED and saved.author.username == "annotator"
    assert saved.prediction.model_version_id == project["version"].pk
    stored, predicted = read_label_map(saved.mask.name), read_label_map(saved.prediction.mask.name)
    reshaped = int(target["id"][1:].split("p")[0])
    assert not np.array_equal(stored == reshaped, predicted == reshaped)
    others = (predicted != reshaped) & (stored != reshaped)
    assert np.array_equal(stored[others], predicted[others]), "nuclei nobody touched must keep their pixels"
    assert not QueueEntry.objects.filter(project=p, tile_id=top).exists()

    # The corrected tile's history lists the new version.
    s.goto(f"/projects/{p.pk}/tiles/{top}/")
    editor.wait_ready(s.page)
    s.page.wait_for_selector("[data-testid=history-version][data-version='1']")
    assert "awaiting review" in s.page.inner_text("[data-testid=history]")
    assert "annotation v1" in s.page.inner_text("[data-testid=source]")  # it reopens from the correction
    s.shot("06-tile-history", full_page=False)


def test_a_reviewer_sees_the_diff_against_the_prediction_and_accepts(project, open_session):
    p, users = project["project"], project["users"]
    a = open_session("annotator", PASSWORD)
    tile = QueueEntry.objects.filter(project=p).order_by("rank").first().tile_id
    opened = a.api("GET", f"/api/tiles/{tile}/regions/", None)["data"]
    first = opened["result"][0]["id"]
    response = a.api("POST", f"/api/tiles/{tile}/regions/", {
        "base": {"kind": "prediction", "id": opened["prediction"]["id"]}, "deleted": [int(first[1:].split("p")[0])]})
    assert response["status"] == 201, response

    r = open_session("reviewer", PASSWORD)
    r.goto(f"/projects/{p.pk}/review/")
    r.page.wait_for_selector("[data-testid=review-item]")
    r.page.wait_for_selector("[data-testid=diff-stats]")
    r.page.wait_for_function("document.querySelector('[data-testid=diff-image]').complete")
    stats = r.page.inner_text("[data-testid=diff-stats]")
    assert "prediction of model v1" in stats
    r.shot("07-review")
    r.page.click("[data-testid=reject]")  # without a comment: refused in the page
    r.page.wait_for_selector(".toast-error")
    r.page.fill("[data-testid=review-comment]", "Looks right.")
    r.page.click("[data-testid=accept]")
    r.page.wait_for_selector("[data-testid=empty-state]")
    annotation = Annotation.objects.get(tile_id=tile)
    assert annotation.status == AnnotationStatus.REVIEWED and annotation.review_comment == "Looks right."
    assert annotation.reviewed_by == users["reviewer"]


def test_a_300_nucleus_tile_opens_and_submits_in_the_editor(make_user, open_session):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, _version, truths = ui_project(name="Dense (browser)", creator=staff, kind="he", images=1, size=512,
                                           tile_size=512, nuclei=300, radius=(5, 9), seed=3)
    make_users(make_user, project, roles=("annotator",))
    [(tile, truth)] = truths.items()
    s = open_session("annotator", PASSWORD)
    s.goto(f"/projects/{project.pk}/queue/")  # warm: the page shell and Label Studio's script in the cache
    s.page.wait_for_selector("[data-testid=queue-tile]")

    opens = []
    for attempt in range(2):
        started = time.perf_counter()
        s.goto(f"/projects/{project.pk}/tiles/{tile}/")
        editor.wait_ready(s.page)
        wall = (time.perf_counter() - started) * 1000
        perf = s.page.evaluate("window.__karyoPerf.filter(p => p.kind === 'open').pop()")
        opens.append({**perf, "navigation_to_ready_ms": round(wall)})
    nuclei = s.page.evaluate("window.karyoEditor.regionCount()")
    assert opens[-1]["nuclei"] >= 290 and nuclei >= opens[-1]["nuclei"]
    # More of the space goes to the tile (it was 590 px wide in a 1000 px panel of a 900 px high
    # window) and all of it is on screen. Label Studio 1.4 caps the image's height itself, so it
    # does not reach the full height budget (see docs/frontend.md).
    box, panel = editor.tile_box(s.page), s.page.locator(".editor-wrap").bounding_box()
    window_height = s.page.viewport_size["height"]
    print(f"tile shown at {box['width']:.0f} px in a {panel['width']:.0f} px panel, window {window_height} px high")
    assert box["width"] >= 640 and box["y"] >= 0 and box["y"] + box["height"] <= window_height
    s.shot("08-workspace-300-nuclei", full_page=False)

    # Delete one nucleus and reshape another (nuclei drawn as a single outline), then submit.
    result = editor.regions(s.page, tile)
    parts = {}
    for region in result:
        parts.setdefault(region["id"].split("p")[0], []).append(region)
    result = [r[0] for r in parts.values() if len(r) == 1]
    editor.select_region(s.page, result[0])
    s.page.keyboard.press("Backspace")
    s.page.wait_for_function(f"window.karyoEditor.regionCount() === {nuclei - 1}")
    # The panel's count follows the deletion (it used to keep counting the deleted nucleus).
    s.page.wait_for_function(
        f"document.querySelector('[data-testid=region-count]').textContent.startsWith('{nuclei - 1} outlines')", timeout=5_000)
    editor.drag_first_point(s.page, result[1], 10, 10)
    started = time.perf_counter()
    s.page.keyboard.press("Control+Enter")
    s.page.wait_for_selector("[data-testid=recent-item]")
    submit_wall = (time.perf_counter() - started) * 1000
    submit = s.page.evaluate("window.__karyoPerf.filter(p => p.kind === 'submit').pop()")
    s.page.wait_for_selector("[data-testid=editor][data-ready=done]")  # the queue is empty: one tile only
    saved = Annotation.objects.get(tile_id=tile)
    assert saved.nucleus_count == opens[-1]["nuclei"] - 1 and submit["sent_regions"] == 1 and submit["deleted"] == 1 and submit["reshaped"] == 1
    timings = {"open": opens, "submit": {**submit, "keypress_to_saved_ms": round(submit_wall)}}
    record_timings("300_nucleus_tile", timings)
    print("300-nucleus tile:", timings)
    # Generous bounds: this runs on a shared 2-CPU machine. The numbers are in the timings file.
    assert opens[-1]["open_ms"] < 30_000 and submit["submit_ms"] < 10_000
