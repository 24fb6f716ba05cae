"""The correction workspace shows the tile in its image (issue 12): context_margin pixels around
it, dimmed, with the image's accepted nuclei outlined whole (cyan where they cross the border)."""
from __future__ import annotations

import numpy as np
import pytest

from backend.images.models import AnnotationSource, AnnotationStatus, Tile
from backend.images.services import create_annotation
from tests.browser import editor
from tests.browser.conftest import SCREENSHOTS
from tests.browser.scenario import PASSWORD, make_users, ui_project

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_workspace_shows_the_tile_with_its_margin_and_whole_nuclei_across_its_border(make_user, open_session):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, _, truths = ui_project(name="Context (browser)", creator=staff, kind="he", images=1, size=256,
                                    tile_size=128, seed=5)
    make_users(make_user, project)
    assert project.context_margin == 64
    # Every tile of the image has an accepted version (its crop of the image's nuclei).
    for tile_id, crop in truths.items():
        create_annotation(tile=Tile.objects.get(pk=tile_id), instances=crop, author=None,
                          source=AnnotationSource.IMPORTED, status=AnnotationStatus.REVIEWED)
    tile = Tile.objects.get(image__project=project, x=128, y=0)

    s = open_session("annotator", PASSWORD)
    s.goto(f"/projects/{project.pk}/tiles/{tile.pk}/")
    editor.wait_ready(s.page)
    s.page.wait_for_function("(() => { const i = document.querySelector('[data-testid=tile-context]');"
                             " return i && i.complete && i.naturalWidth > 0; })()")
    # Tile (128, 0) of a 256-px image: 64 px of margin on the left and below, the image border elsewhere.
    size = s.page.evaluate("(() => { const i = document.querySelector('[data-testid=tile-context]');"
                           " return [i.naturalWidth, i.naturalHeight]; })()")
    assert size == [192, 192]
    assert "64 px of the image around the tile" in s.page.inner_text("aside")
    s.shot("issue12-workspace-context")
    path = SCREENSHOTS / "issue12-tile-context.png"
    s.page.locator("[data-testid=tile-context]").screenshot(path=str(path))
    from PIL import Image as PILImage

    shot = np.asarray(PILImage.open(path).convert("RGB"))
    cyan = np.all(np.abs(shot.astype(int) - [0, 229, 255]) <= 40, axis=-1)
    assert cyan.sum() > 20, "no nucleus across the tile's border is outlined"
