"""Training samples from the image-level truth (issue 12): a run learns from the stitched nuclei
of each image's annotated regions, not from tiles; pixels outside annotated tiles are in no
sample (never read as background); the frozen validation split still decides what validates.

Generated data; the training run uses a tiny U-Net on 64-px patches."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image as PILImage

from backend.exports.importing import import_path
from backend.images.models import AnnotationStatus, Image, Split, Tile
from backend.images.services import create_annotation
from backend.ml import workflows
from backend.ml.training_data import disjoint_rectangles, split_rectangle
from backend.projects.models import Project
from ml_worker import synth

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]
CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}]


def covered(rects, shape=(300, 300)) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for x, y, w, h in rects:
        out[y : y + h, x : x + w] += 1
    return out


@pytest.mark.parametrize("rects", [
    [(x, y, 64, 64) for x in (0, 48, 96) for y in (0, 48, 96)],  # a full grid with overlap: one rectangle
    [(0, 0, 64, 64), (64, 0, 64, 64), (0, 64, 64, 64)],  # an L
    [(0, 0, 64, 64), (48, 48, 64, 64), (200, 10, 30, 90)],  # diagonal overlap and an island
])
def test_annotated_tiles_become_disjoint_rectangles_covering_exactly_their_union(rects):
    parts = disjoint_rectangles(rects)
    assert np.array_equal(covered(parts), np.minimum(covered(rects), 1))  # the union, each pixel once
    if len(rects) == 9:
        assert parts == [(0, 0, 160, 160)]
    if len(rects) == 3 and rects[1] == (64, 0, 64, 64):
        assert parts == [(0, 0, 128, 64), (0, 64, 64, 64)]


def test_a_long_region_is_split_into_parts_no_longer_than_the_limit():
    parts = split_rectangle((10, 20, 5000, 300), 2048)
    assert len(parts) == 3 and all(w <= 2048 and h == 300 for _, _, w, h in parts)
    assert np.array_equal(covered(parts, (400, 5100))[20:320, 10:5010], np.ones((300, 5000)))


# --- the training set of a project -----------------------------------------------------------------

def bare_project(tmp_path, *, size, tile_size=64, overlap=0, seed=2, name="train-truth"):
    """A generated image imported without annotations, tiled ``tile_size``; returns the project,
    the image row and its pixels."""
    (stem,) = synth.write_dataset(tmp_path / name, 1, kind="he", size=size, seed=seed)
    (tmp_path / name / "masks").rename(tmp_path / f"{name}-masks")
    project = Project.objects.create(name=name, nucleus_classes=CLASSES, tile_size=tile_size, tile_overlap=overlap,
                                     require_review=False)
    import_path(path=tmp_path / name, project=project)
    image = Image.objects.get(project=project)
    pixels = np.asarray(PILImage.open(next((tmp_path / name / "images").iterdir())).convert("RGB"))
    return project, image, pixels


def annotate(tile: Tile, boxes: list[tuple[int, int, int, int]]) -> None:
    """A submitted manual version on ``tile``: one nucleus per box (image pixels x0, y0, x1, y1),
    clipped to the tile as the workspace would store it."""
    mask = np.zeros((tile.h, tile.w), np.int32)
    for k, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        mask[max(0, y0 - tile.y) : max(0, y1 - tile.y), max(0, x0 - tile.x) : max(0, x1 - tile.x)] = k
    create_annotation(tile=tile, instances=mask, author=None, status=AnnotationStatus.SUBMITTED)


@pytest.mark.django_db
def test_a_nucleus_cut_by_a_tile_border_is_one_whole_nucleus_in_a_training_sample(tmp_path):
    project, image, pixels = bare_project(tmp_path, size=(64, 128))
    left, right = Tile.objects.filter(image=image).order_by("x")
    assert (left.x, right.x) == (0, 64)
    annotate(left, [(50, 20, 64, 30), (5, 5, 15, 12)])  # the left part of a nucleus across x = 64, and another
    annotate(right, [(64, 20, 72, 30)])  # its right part
    train, val = workflows.load_samples(project=project)
    assert val == [] and len(train) == 1
    sample = train[0]
    assert sample.instances.shape == (64, 128) and np.array_equal(sample.image, pixels)
    across = sample.instances[25, 60]
    assert across and across == sample.instances[25, 68]  # one id on both sides of the border
    assert int((sample.instances == across).sum()) == 22 * 10  # whole: 14 px + 8 px wide, 10 high
    assert len(np.unique(sample.instances)) == 3  # background + 2 nuclei, not 3 pieces


@pytest.mark.django_db
def test_pixels_outside_the_annotated_tiles_are_in_no_training_sample(tmp_path):
    project, image, pixels = bare_project(tmp_path, size=128)
    tiles = {(t.x, t.y): t for t in Tile.objects.filter(image=image)}
    assert sorted(tiles) == [(0, 0), (0, 64), (64, 0), (64, 64)]
    annotate(tiles[(0, 0)], [(10, 10, 20, 20)])
    annotate(tiles[(64, 0)], [(70, 40, 80, 50)])
    annotate(tiles[(0, 64)], [(30, 100, 40, 110)])
    # The bottom-right tile has nuclei in the image but no accepted version: it is not background.
    train, _ = workflows.load_samples(project=project)
    seen = np.zeros((128, 128), np.int32)
    for sample in train:
        _, _, x, y, size = sample.name.rsplit("-", 4)[-5:]
        x, y = int(x[1:]), int(y[1:])
        h, w = sample.instances.shape
        assert size == f"{w}x{h}"
        assert np.array_equal(sample.image, pixels[y : y + h, x : x + w])
        seen[y : y + h, x : x + w] += 1
    expected = np.ones((128, 128), np.int32)
    expected[64:, 64:] = 0
    assert np.array_equal(seen, expected)  # the three annotated tiles, each pixel once, nothing else
    assert sorted(int(s.instances.max()) for s in train) == [1, 2]  # the L: a 128x64 band and a 64x64 square

    # Accepting a version on the last tile brings it in; the whole image is then one sample.
    annotate(tiles[(64, 64)], [])
    train, _ = workflows.load_samples(project=project)
    assert [s.instances.shape for s in train] == [(128, 128)]
    assert np.array_equal(train[0].image, pixels)


@pytest.mark.django_db
def test_a_validation_image_gives_validation_samples_only(tmp_path):
    project, image, _ = bare_project(tmp_path, size=(64, 128))
    for tile in Tile.objects.filter(image=image):
        annotate(tile, [(tile.x + 5, 5, tile.x + 15, 15)])
    Image.objects.filter(pk=image.pk).update(split=Split.VAL)
    train, val = workflows.load_samples(project=project)
    assert train == [] and [s.instances.shape for s in val] == [(64, 128)] and int(val[0].instances.max()) == 2


@pytest.mark.django_db
def test_a_slide_scanned_at_twice_the_working_resolution_trains_on_working_pixels(tmp_path):
    from backend.images.pixels import read_tile_rgb
    from backend.images.services import ingest_images
    from backend.images.validation import decode_image
    from tests.backend.factories import encode

    project = Project.objects.create(name="fine", nucleus_classes=CLASSES, tile_size=64, tile_overlap=0,
                                     require_review=False, working_mpp=0.5)
    rgb, _ = synth.generate("he", size=256, seed=4)
    [result] = ingest_images(project=project, images=[decode_image("fine.png", encode(rgb, "PNG"))], uploaded_by=None,
                             microns_per_pixel=0.25)
    tiles = list(Tile.objects.filter(image=result.image).order_by("y", "x"))
    assert len(tiles) == 4 and {(t.w, t.h) for t in tiles} == {(64, 64)} and tiles[1].x == 128  # level-0 origin
    annotate_at = tiles[0]
    mask = np.zeros((64, 64), np.int32)
    mask[10:20, 50:64] = 1
    create_annotation(tile=annotate_at, instances=mask, author=None)
    mask = np.zeros((64, 64), np.int32)
    mask[10:20, 0:6] = 1
    create_annotation(tile=tiles[1], instances=mask, author=None)
    train, _ = workflows.load_samples(project=project)
    assert [s.instances.shape for s in train] == [(64, 128)]  # working pixels: two 64-px tiles side by side
    assert np.array_equal(train[0].image[:, :64], read_tile_rgb(tiles[0]))
    assert np.array_equal(train[0].image[:, 64:], read_tile_rgb(tiles[1]))
    assert int((train[0].instances == 1).sum()) == 20 * 10 and train[0].instances.max() == 1


TINY = {"epochs": 1, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 2, "bn_recalibrate": False}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_run_trains_on_the_stitched_regions_and_is_gated_on_the_frozen_split(tmp_path):
    from backend.ml.models import ModelStatus, RunStatus, TrainingRun
    from backend.ml.services import start_training_run

    synth.write_dataset(tmp_path / "ds", 3, kind="he", size=128, seed=7)
    project = Project.objects.create(name="gated", nucleus_classes=CLASSES, tile_size=64, tile_overlap=16,
                                     auto_retrain_threshold=0, training_defaults=TINY)
    import_path(path=tmp_path / "ds", project=project)  # every tile annotated (reviewed, imported)
    assert Tile.objects.filter(project=project).count() == 3 * 9  # 128 px in 64-px tiles, overlap 16: 3 x 3

    versions = []
    for attempt in range(2):
        run = start_training_run(project=project, architecture="unet")  # the first one freezes the split
        if attempt == 0:
            (val_image,) = Image.objects.filter(project=project, split=Split.VAL)
            train, val = workflows.load_samples(project=project)
            # One sample per image (its nine overlapping tiles are one region): the image's source mask.
            assert [s.instances.shape for s in train + val] == [(128, 128)] * 3 and len(val) == 1
            assert val[0].name.startswith(f"image-{val_image.pk}-x0-y0-")
            truth = np.asarray(PILImage.open(tmp_path / "ds" / "masks" / val_image.name)).astype(np.int32)
            assert len(np.unique(val[0].instances)) == len(np.unique(truth))
        outcome = workflows.run_training(run_id=run.pk)
        run = TrainingRun.objects.get(pk=run.pk)
        assert run.status == RunStatus.SUCCEEDED, run.error
        versions.append((outcome, run.model_version))
    (first_outcome, first), (second_outcome, second) = versions
    assert first_outcome == "promoted" and first.metrics["validation_note"] == ""
    assert first.metrics["active_at_gating"] is None
    # The second run is gated against the active model re-measured on the same validation sample.
    assert second_outcome in ("promoted", "candidate") and second.metrics["active_at_gating"]["dice"] is not None
    first.refresh_from_db()
    assert (first.status == ModelStatus.ACTIVE) == (second_outcome == "candidate")
