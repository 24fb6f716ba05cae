"""The editor shows the tile with its context margin (issue 12): the margin dimmed, the
neighbours' nuclei outlined on the picture, and a nucleus drawn across the tile's border with the
mouse is stored whole (margin part included) in the version of the tile that holds its centroid."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image as PILImage

from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Tile
from backend.images.services import create_annotation
from tests.browser import editor
from tests.browser.conftest import SCREENSHOTS
from tests.browser.scenario import PASSWORD, make_users, ui_project

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_editor_shows_the_margin_dimmed_and_stores_a_nucleus_drawn_across_the_border_whole(make_user, open_session):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, _, truths = ui_project(name="Margin (browser)", creator=staff, kind="he", images=1, size=256,
                                    tile_size=128, seed=5)
    make_users(make_user, project)
    assert project.context_margin == 64
    left = Tile.objects.get(image__project=project, x=0, y=0)
    create_annotation(tile=left, instances=truths[left.pk], author=None, source=AnnotationSource.IMPORTED,
                      status=AnnotationStatus.REVIEWED)  # the neighbour's nuclei: outlined on the picture
    tile = Tile.objects.get(image__project=project, x=128, y=0)

    s = open_session("annotator", PASSWORD)
    s.goto(f"/projects/{project.pk}/tiles/{tile.pk}/?source=empty")
    editor.wait_ready(s.page)
    s.page.select_option("[data-testid=source-select]", "empty")
    editor.wait_ready(s.page)
    # Tile (128, 0) of a 256-px image: 64 px of margin on the left and below, the image border elsewhere.
    assert s.page.get_attribute("[data-testid=editor]", "data-frame") == "192x192"
    natural = s.page.evaluate("(() => { const i = document.querySelector('[data-testid=editor] img');"
                              " return [i.naturalWidth, i.naturalHeight]; })()")
    assert natural == [192, 192]
    s.shot("issue12-editor-margin-page", full_page=False)
    path = SCREENSHOTS / "issue12-editor-margin.png"
    s.page.locator("[data-testid=editor] img").first.screenshot(path=str(path))
    shot = np.asarray(PILImage.open(path).convert("L"), dtype=np.float64)
    h, w = shot.shape
    margin, inside = shot[: int(h * 0.6), : int(w * 0.3)], shot[: int(h * 0.6), int(w * 0.4):]
    assert margin.mean() < 0.75 * inside.mean(), "the margin is not dimmed"
    cyan = np.all(np.abs(np.asarray(PILImage.open(path).convert("RGB")).astype(int) - [0, 229, 255]) <= 50, axis=-1)
    assert cyan[:, : int(w * 0.33)].sum() > 20, "the neighbour's nuclei are not outlined in the margin"

    # Draw a nucleus across the tile's left border (image x 116..148, y 40..64; centroid x 132: this tile's).
    box = editor.tile_box(s.page)
    to_screen = lambda x, y: (box["x"] + (x - 64) / 192 * box["width"], box["y"] + y / 192 * box["height"])  # noqa: E731
    s.page.keyboard.press("1")
    time.sleep(0.3)
    corners = [(116, 40), (148, 40), (148, 64), (116, 64)]
    for x, y in corners + corners[:1]:
        s.page.mouse.click(*to_screen(x, y))
        time.sleep(0.25)
    s.page.wait_for_function("window.karyoEditor.regionCount() >= 1")
    s.shot("issue12-editor-margin-drawn", full_page=False)
    s.page.click("[data-testid=submit]")
    s.page.wait_for_selector("[data-testid=recent-item]")

    version = Annotation.objects.filter(tile=tile).order_by("-version").first()
    assert version is not None and version.context_mask
    assert (version.context_x, version.context_y) == (-64, 0)  # the margin is clipped at the image's top
    whole = read_label_map(version.context_mask.name)
    label = int(whole[52, 132 - 64])
    assert label and whole[52, 120 - 64] == label, "the part in the margin (x < 128) was not stored"
    assert (read_label_map(version.mask.name)[52, 0:16] == label).all()
    assert version.nucleus_count == 1
