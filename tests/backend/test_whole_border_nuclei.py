"""Border nuclei are edited whole in the workspace (issue 12): the editor opens the tile with its
context margin, a submit keeps the nuclei the tile owns (centroid inside it) whole, margin parts
included, and drops the neighbours'; the stitched truth pastes those versions as they are."""
from __future__ import annotations

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.common import geometry
from backend.common.storage import read_label_map
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Image, Tile
from backend.images.services import create_annotation
from backend.images.stitching import TileLabels, stitch
from backend.images.truth import stitched_nuclei
from tests.backend.factories import finish_ingest, rgb_png

pytestmark = pytest.mark.django_db


@pytest.fixture
def grid(team, api):
    """A 192 x 192 image cut into nine 64-px tiles, 32 px of context margin."""
    project = team["project"]
    project.context_margin = 32
    project.save(update_fields=["context_margin"])
    response = api("admin").post(f"/api/projects/{project.pk}/images/",
                                 {"file": SimpleUploadedFile("g.png", rgb_png(192, 192))}, format="multipart")
    assert response.status_code == 201, response.content
    finish_ingest()
    image = Image.objects.get(project=project)
    tiles = {(t.x, t.y): t for t in Tile.objects.filter(image=image)}
    assert len(tiles) == 9 and all((t.w, t.h) == (64, 64) for t in tiles.values())
    return {"project": project, "image": image, "tiles": tiles}


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def region(region_id: str, xy_in_image, frame: dict) -> dict:
    """A polygon given in image pixels, as the editor sends it: percentages of the frame."""
    local = np.array(xy_in_image, float) - [frame["x"], frame["y"]]
    return {"id": region_id, "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
            "value": {"points": geometry.to_percent(local, frame["w"], frame["h"]), "polygonlabels": ["nucleus"]}}


def submit(api, tile: Tile, regions: list[dict], frame: dict, base=None):
    body = {"base": base or {"kind": "empty"}, "regions": regions,
            "frame": {k: frame[k] for k in ("x", "y", "w", "h")}}
    response = api("annotator").post(f"/api/tiles/{tile.pk}/regions/", body, format="json")
    assert response.status_code == 201, response.content
    return Annotation.objects.get(pk=response.json()["id"])


def opened(api, tile: Tile) -> dict:
    return api("annotator").get(f"/api/tiles/{tile.pk}/regions/").json()


def test_the_editor_opens_the_tile_with_its_margin_clipped_at_the_image_border(grid, api):
    middle, corner = grid["tiles"][(64, 64)], grid["tiles"][(0, 0)]
    frame = opened(api, middle)["frame"]
    assert frame == {"x": 32, "y": 32, "w": 128, "h": 128, "margin": 32, "tile": {"x": 32, "y": 32, "w": 64, "h": 64}}
    frame = opened(api, corner)["frame"]
    assert frame == {"x": 0, "y": 0, "w": 96, "h": 96, "margin": 32, "tile": {"x": 0, "y": 0, "w": 64, "h": 64}}
    picture = api("annotator").get(f"/api/tiles/{corner.pk}/context.png?editor=1")
    assert picture.status_code == 200
    from PIL import Image as PILImage
    import io

    assert PILImage.open(io.BytesIO(picture.content)).size == (96, 96)


def test_a_nucleus_drawn_across_a_tile_border_is_stored_once_whole_in_the_owning_tiles_version(grid, api):
    left, right = grid["tiles"][(0, 64)], grid["tiles"][(64, 64)]
    across = box(50, 90, 74, 100)  # x 50..74 across the border x = 64; centroid x = 62: the left tile's
    own_right = box(100, 70, 110, 80)

    frame_left = opened(api, left)["frame"]
    first = submit(api, left, [region("a", across, frame_left)], frame_left)
    assert first.context_mask and (first.context_x, first.context_y) == (0, -32) and first.nucleus_count == 1
    whole = read_label_map(first.context_mask.name)
    ys, xs = np.nonzero(whole)
    # Whole, with its part in the margin (x 64..74), in image pixels.
    assert (xs.min(), xs.max() + 1, ys.min() + 32, ys.max() + 1 + 32) == (50, 74, 90, 100)
    tile_box = read_label_map(first.mask.name)
    assert tile_box.shape == (64, 64) and np.nonzero(tile_box)[1].max() == 63  # the tile's crop ends at its border

    # The right tile's annotator draws the same nucleus in their margin and one of their own:
    # only their own is kept (the other belongs to the left tile).
    frame_right = opened(api, right)["frame"]
    second = submit(api, right, [region("b", across, frame_right), region("c", own_right, frame_right)], frame_right)
    assert second.nucleus_count == 1
    kept = read_label_map(second.context_mask.name)
    ys, xs = np.nonzero(kept)
    assert (xs.min() + frame_right["x"], ys.min() + frame_right["y"]) == (100, 70)

    nuclei = stitched_nuclei(image=grid["image"])
    crossing = [n for n in nuclei if n.bbox[0] < 64 < n.bbox[2]]
    assert len(nuclei) == 2 and len(crossing) == 1
    assert crossing[0].bbox == (50, 90, 74, 100) and crossing[0].tile_id == left.pk

    # Opened again, the left tile's editor shows the nucleus whole (points beyond the tile, in the frame).
    again = opened(api, left)
    assert again["source"] == "annotation" and again["nuclei"] == 1
    points = np.array(geometry.from_percent(again["result"][0]["value"]["points"], frame_left["w"], frame_left["h"]))
    assert points[:, 0].max() > 70
    # ... and the right tile's does not hold it (it is outlined on its picture as the neighbour's).
    assert opened(api, right)["nuclei"] == 1
    # The image viewer outlines it whole too, once.
    shown = api("viewer").get(f"/api/images/{grid['image'].pk}/nuclei/", {"x": 0, "y": 0, "w": 192, "h": 192}).json()
    outlines = [np.array(n["polygon"]) for n in shown["nuclei"]]
    assert len(outlines) == 2
    assert any(p[:, 0].min() < 52 and p[:, 0].max() > 72 for p in outlines)


def test_two_touching_nuclei_on_a_shared_tile_edge_stay_two_in_the_stitched_map(grid, api):
    left, right = grid["tiles"][(0, 64)], grid["tiles"][(64, 64)]
    frame_left, frame_right = opened(api, left)["frame"], opened(api, right)["frame"]
    submit(api, left, [region("p", box(52, 80, 64, 92), frame_left)], frame_left)  # ends on the edge x = 64
    submit(api, right, [region("q", box(64, 80, 76, 92), frame_right)], frame_right)  # starts on it
    nuclei = stitched_nuclei(image=grid["image"])
    assert sorted(n.bbox for n in nuclei) == [(52, 80, 64, 92), (64, 80, 76, 92)]

    # The same pair stored as tile boxes only (older versions) is indistinguishable from one nucleus cut there.
    legacy = [TileLabels(1, 0, 64, read_label_map(Annotation.objects.get(tile=left).mask.name), {}),
              TileLabels(2, 64, 64, read_label_map(Annotation.objects.get(tile=right).mask.name), {})]
    assert len(stitch(legacy, default_class=1)) == 1


def test_an_older_tile_box_version_of_the_neighbour_does_not_duplicate_a_whole_nucleus(grid, api):
    left, right = grid["tiles"][(0, 64)], grid["tiles"][(64, 64)]
    piece = np.zeros((64, 64), np.int32)
    piece[26:36, 0:10] = 5  # the right tile's old view: x 64..74 of the nucleus drawn whole in the left tile
    piece[40:50, 30:40] = 6  # and a nucleus of its own
    create_annotation(tile=right, instances=piece, author=None, status=AnnotationStatus.SUBMITTED,
                      source=AnnotationSource.MANUAL)
    frame_left = opened(api, left)["frame"]
    submit(api, left, [region("a", box(50, 90, 74, 100), frame_left)], frame_left)
    nuclei = stitched_nuclei(image=grid["image"])
    assert sorted(n.bbox for n in nuclei) == [(50, 90, 74, 100), (94, 104, 104, 114)]


def test_the_corner_tile_submits_in_its_clipped_frame(grid, api):
    corner = grid["tiles"][(0, 0)]
    frame = opened(api, corner)["frame"]
    version = submit(api, corner, [region("a", box(56, 2, 70, 12), frame), region("b", box(0, 0, 8, 8), frame),
                                   region("c", box(70, 70, 90, 90), frame)], frame)
    # a: owned (centroid x 63), whole to x 70; b: at the image's corner; c: the diagonal neighbour's.
    assert version.nucleus_count == 2 and (version.context_x, version.context_y) == (0, 0)
    whole = read_label_map(version.context_mask.name)
    assert whole.shape == (96, 96) and not whole[70:90, 70:90].any()
    assert whole[2:12, 56:70].all() and whole[0:8, 0:8].all()
    assert read_label_map(version.mask.name).shape == (64, 64)


def test_a_submit_in_a_frame_that_changed_meanwhile_is_refused(grid, api):
    tile = grid["tiles"][(64, 64)]
    frame = opened(api, tile)["frame"]
    grid["project"].context_margin = 16
    grid["project"].save(update_fields=["context_margin"])
    body = {"base": {"kind": "empty"}, "regions": [region("a", box(70, 70, 80, 80), frame)],
            "frame": {k: frame[k] for k in ("x", "y", "w", "h")}}
    response = api("annotator").post(f"/api/tiles/{tile.pk}/regions/", body, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "frame_changed"
    assert not Annotation.objects.filter(tile=tile).exists()


def test_the_image_export_holds_a_nucleus_drawn_across_a_tile_border_once_and_whole(grid, api, tmp_path):
    from tests.backend.test_exports import export_zip, items_of

    left, right = grid["tiles"][(0, 64)], grid["tiles"][(64, 64)]
    frame_left, frame_right = opened(api, left)["frame"], opened(api, right)["frame"]
    submit(api, left, [region("a", box(50, 90, 74, 100), frame_left)], frame_left)
    submit(api, right, [region("b", box(50, 90, 74, 100), frame_right),  # the neighbour's: dropped
                        region("p", box(64, 110, 76, 120), frame_right)], frame_right)  # touches nothing
    _, path = export_zip(grid["project"], "png", tmp_path, filters={"status": "submitted"}, layout="image")
    [(_, instances, _)] = items_of(path).values()
    ids = [v for v in np.unique(instances) if v]
    assert len(ids) == 2
    crossing = instances == instances[95, 60]
    ys, xs = np.nonzero(crossing)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (50, 74, 90, 100)


def test_a_tile_resubmitted_from_an_imported_version_stays_joined_with_the_neighbours_imported_piece(grid, api):
    left, right = grid["tiles"][(0, 64)], grid["tiles"][(64, 64)]
    image_mask = np.zeros((192, 192), np.int32)
    image_mask[90:100, 56:76] = 7  # across x = 64, centroid x = 66: the right tile's
    image_mask[70:80, 20:30] = 8
    for tile in (left, right):
        create_annotation(tile=tile, instances=image_mask[64:128, tile.x : tile.x + 64], author=None,
                          source=AnnotationSource.IMPORTED, status=AnnotationStatus.REVIEWED)
    assert sorted(n.bbox for n in stitched_nuclei(image=grid["image"])) == [(20, 70, 30, 80), (56, 90, 76, 100)]

    # The left tile is opened from its imported version (its piece of nucleus 7 only) and submitted as it is.
    page = opened(api, left)
    assert page["source"] == "annotation" and page["nuclei"] == 2
    submit(api, left, [], page["frame"], base={"kind": "annotation", "id": page["annotation"]["id"]})
    assert sorted(n.bbox for n in stitched_nuclei(image=grid["image"])) == [(20, 70, 30, 80), (56, 90, 76, 100)]
