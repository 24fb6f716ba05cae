"""Exports and imports of an image whose level-0 resolution is not the working one (issue 12):
the files are in the source image's level-0 pixels (what QuPath and COCO tools read on the
original image), and an image-coordinate import scales them back to working pixels; export ->
import -> export gives the same nuclei. Generated data: a 256-px image at 0.25 um/px in a
project that works at 0.5 um/px (2 level-0 pixels per working pixel)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from backend.exports.formats.geojson import features_to_labels
from backend.exports.image_annotations import import_image_annotations
from backend.exports.services import upsample_labels
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Tile
from backend.images.services import create_annotation, ingest_images
from backend.images.validation import decode_image
from backend.projects.models import Project
from ml_worker import synth
from tests.backend.factories import encode
from tests.backend.test_exports import export_zip, items_of, unzip
from tests.backend.test_image_truth import nuclei_in, same_up_to_relabelling

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
]
CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}]


def fine_image(name: str, pixels: np.ndarray):
    """A project working at 0.5 um/px, tiled 64/16, holding ``pixels`` scanned at 0.25 um/px."""
    project = Project.objects.create(name=name, nucleus_classes=CLASSES, tile_size=64, tile_overlap=16, working_mpp=0.5)
    [result] = ingest_images(project=project, images=[decode_image("fine.png", encode(pixels, "PNG"))],
                             uploaded_by=None, microns_per_pixel=0.25)
    return project, result.image


@pytest.fixture
def annotated():
    """The image annotated tile by tile with a generated 128-px working mask (whole nuclei once
    stitched); returns (project, image, level-0 pixels, working mask)."""
    pixels, _ = synth.generate("he", size=256, seed=11)
    _, mask = synth.generate("he", size=128, seed=12)
    mask = mask.astype(np.int32)
    project, image = fine_image("fine", pixels)
    tiles = list(Tile.objects.filter(image=image))
    assert len(tiles) == 9 and {(t.w, t.h) for t in tiles} == {(64, 64)} and max(t.x for t in tiles) == 128
    for tile in tiles:
        x, y = tile.x // 2, tile.y // 2
        create_annotation(tile=tile, instances=mask[y : y + 64, x : x + 64], author=None,
                          source=AnnotationSource.IMPORTED, status=AnnotationStatus.REVIEWED)
    return project, image, pixels, mask


def test_a_label_map_upsampled_to_level0_is_blocks_of_the_working_pixels():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    up = upsample_labels(labels, width=8, height=6, scale=2.0)
    assert np.array_equal(up, np.kron(labels, np.ones((2, 2), np.int32)))
    assert upsample_labels(labels, width=9, height=7, scale=2.0).shape == (7, 9)  # odd level-0 size: last row/column repeat


def test_an_image_at_twice_the_working_resolution_exports_geojson_in_level0_pixels(annotated, tmp_path):
    project, image, pixels, mask = annotated
    export, path = export_zip(project, "geojson", tmp_path, layout="image")
    folder = unzip(path)
    features = json.loads((folder / "geojson" / "fine.geojson").read_text())["features"]
    assert len(features) == nuclei_in(mask) == export.manifest["counts"]["nuclei"]
    level0 = upsample_labels(mask, width=256, height=256, scale=2.0)
    assert same_up_to_relabelling(features_to_labels(features, 256, 256, "fine").instances, level0)
    vertices = np.array([p for f in features for ring in f["geometry"]["coordinates"] for p in ring])
    assert vertices.max() > 128 and (vertices % 2 == 0).all()  # level-0 pixels: every working corner times 2
    # The image file is the source image at level 0, so the GeoJSON sits on it.
    assert np.array_equal(np.asarray(PILImage.open(folder / "images" / "fine.png").convert("RGB")), pixels)
    entry = json.loads((folder / "manifest.json").read_text())["images"][0]
    assert entry["pixels"] == {"width": 256, "height": 256, "level0_per_pixel": 1.0,
                               "working": {"width": 128, "height": 128, "level0_per_pixel": 2.0}}
    assert {(r["x"], r["y"], r["w"], r["h"]) for r in entry["annotated_regions"]} == {
        (x, y, 128, 128) for x in (0, 96, 128) for y in (0, 96, 128)}  # the tiles' level-0 rectangles


@pytest.mark.parametrize("fmt", ["png", "coco", "labelstudio", "pannuke"])
def test_every_format_but_pannuke_writes_such_an_image_at_its_level0_size(annotated, tmp_path, fmt):
    project, _, pixels, mask = annotated
    _, path = export_zip(project, fmt, tmp_path, layout="image")
    items = items_of(path)
    assert sorted(items) == ["fine"]
    if fmt == "pannuke":  # patches of the stitched map in working pixels: one 128-px patch here
        assert same_up_to_relabelling(items["fine"][1], mask)
    elif fmt == "labelstudio":  # holes are filled: compare the size and the count
        assert items["fine"][1].shape == (256, 256) and nuclei_in(items["fine"][1]) == nuclei_in(mask)
    else:
        assert same_up_to_relabelling(items["fine"][1], upsample_labels(mask, width=256, height=256, scale=2.0))
    if fmt == "coco":
        coco = json.loads((unzip(path) / "annotations" / "instances.json").read_text())
        assert [(i["width"], i["height"]) for i in coco["images"]] == [(256, 256)]


@pytest.mark.parametrize("fmt", ["geojson", "coco"])
def test_export_import_export_of_such_an_image_gives_the_same_nuclei(annotated, tmp_path, fmt):
    project, _, pixels, mask = annotated
    _, zip1 = export_zip(project, fmt, tmp_path, layout="image")
    copy, _ = fine_image("copy", pixels)
    summary = import_image_annotations(project=copy, path=zip1)
    assert summary.images == 1 and summary.nuclei == nuclei_in(mask) and summary.tiles == 9
    # Back in working pixels: the copy's stitched nuclei are the source mask.
    from backend.images.stitching import label_window
    from backend.images.truth import stitched_nuclei
    from backend.images.models import Image

    nuclei = stitched_nuclei(image=Image.objects.get(project=copy))
    assert same_up_to_relabelling(label_window(nuclei, x=0, y=0, w=128, h=128), mask)
    _, zip2 = export_zip(copy, fmt, tmp_path, layout="image")
    a, b = items_of(zip1), items_of(zip2)
    assert a["fine"][0] == b["fine"][0] and same_up_to_relabelling(a["fine"][1], b["fine"][1])


def test_a_qupath_geojson_in_level0_pixels_without_a_manifest_lands_on_the_working_tiles(annotated, tmp_path):
    project, _, pixels, mask = annotated
    _, path = export_zip(project, "geojson", tmp_path, layout="image")
    qupath = tmp_path / "qupath"
    qupath.mkdir()
    (qupath / "fine.geojson").write_bytes((unzip(path) / "geojson" / "fine.geojson").read_bytes())
    copy, image = fine_image("qupath", pixels)
    summary = import_image_annotations(project=copy, path=qupath)
    assert summary.nuclei == nuclei_in(mask) and summary.tiles >= 1
    from backend.images.stitching import label_window
    from backend.images.truth import stitched_nuclei

    assert same_up_to_relabelling(label_window(stitched_nuclei(image=image), x=0, y=0, w=128, h=128), mask)

    # Level-0 bounds: a vertex past 256 px is outside this image, whatever its working size.
    bad = tmp_path / "bad"
    bad.mkdir()
    ring = [[250, 250], [260, 250], [260, 255], [250, 255], [250, 250]]
    (bad / "fine.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    from backend.common.errors import InvalidUpload

    with pytest.raises(InvalidUpload) as caught:
        import_image_annotations(project=copy, path=bad)
    assert "outside the 256x256 image" in str(caught.value.detail)
    before = Annotation.objects.filter(tile__project=copy).count()
    ring = [[200, 200], [240, 200], [240, 220], [200, 220], [200, 200]]  # inside at level 0, outside at working
    (bad / "fine.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    assert import_image_annotations(project=copy, path=bad).nuclei == 1
    assert Annotation.objects.filter(tile__project=copy).count() > before


def test_over_the_limit_at_level0_coco_stays_in_working_pixels_and_geojson_is_traced_at_level0(
        annotated, tmp_path, monkeypatch):
    """256 x 256 level-0 pixels over a (lowered) limit, 128 x 128 working pixels under it: COCO is
    written in working pixels and says so in the manifest, which the import follows; GeoJSON is
    traced nucleus by nucleus in level-0 pixels without an image file. Both import back whole."""
    from backend.exports import services

    project, _, pixels, mask = annotated
    monkeypatch.setattr(services, "IMAGE_LAYOUT_MAX_PIXELS", 200 * 200)
    _, coco_zip = export_zip(project, "coco", tmp_path, layout="image")
    folder = unzip(coco_zip)
    coco = json.loads((folder / "annotations" / "instances.json").read_text())
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(128, 128)]
    entry = json.loads((folder / "manifest.json").read_text())["images"][0]
    assert entry["pixels"]["level0_per_pixel"] == 2.0 and entry["pixels"]["width"] == 128
    assert same_up_to_relabelling(items_of(coco_zip)["fine"][1], mask)

    _, geo_zip = export_zip(project, "geojson", tmp_path, layout="image")
    folder = unzip(geo_zip)
    assert not (folder / "images").exists()
    features = json.loads((folder / "geojson" / "fine.geojson").read_text())["features"]
    level0 = upsample_labels(mask, width=256, height=256, scale=2.0)
    assert same_up_to_relabelling(features_to_labels(features, 256, 256, "fine").instances, level0)

    from backend.images.stitching import label_window
    from backend.images.truth import stitched_nuclei

    for number, archive in enumerate((coco_zip, geo_zip)):
        copy, image = fine_image(f"copy{number}", pixels)
        assert import_image_annotations(project=copy, path=archive).nuclei == nuclei_in(mask)
        assert same_up_to_relabelling(label_window(stitched_nuclei(image=image), x=0, y=0, w=128, h=128), mask)
