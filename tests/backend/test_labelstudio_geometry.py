"""Polygon <-> instance mask and brush RLE <-> mask: exact, and the same rule both ways."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from backend.common import geometry
from backend.labelstudio import conversions

CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}, {"id": 2, "name": "mitosis & <odd>", "color": "#3cb44b"}]


def touching_nuclei(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """Irregular, touching nuclei (watershed of a smooth random field), holes filled."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((height, width)), 2.5)
    markers, _ = ndimage.label(ndimage.maximum_filter(field, 7) == field)
    instances = watershed(-field, markers, mask=field > np.quantile(field, 0.55)).astype(np.int32)
    for label in np.unique(instances)[1:]:
        instances[ndimage.binary_fill_holes(instances == label) & (instances == 0)] = label
    return instances


def paint(regions: list[dict], height: int, width: int) -> np.ndarray:
    return geometry.rasterize(
        [(int(r["id"][1:].split("p")[0]), geometry.from_percent(r["value"]["points"], width, height)) for r in regions],
        height, width,
    )


def test_an_instance_mask_survives_the_trip_to_polygons_and_back_pixel_for_pixel():
    for seed in range(12):
        instances = touching_nuclei(seed)
        result = conversions.prediction_result(instances, classes=None, nucleus_classes=CLASSES)
        assert len(result) >= len(np.unique(instances)) - 1
        assert np.array_equal(paint(result, *instances.shape), instances), seed
        back = conversions.annotation_to_instances(result, height=96, width=128, nucleus_classes=CLASSES)
        assert np.array_equal(back.instances, instances), seed  # untouched nuclei keep their ids too


def test_polygons_are_simplified_yet_exact():
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 30) ** 2 <= 12**2).astype(np.int32)
    (region,) = geometry.mask_to_regions(disc)
    staircase_vertices = 4 * 2 * 12 * 2  # every pixel corner of the outline
    assert 8 <= len(region.points) < staircase_vertices / 3
    assert np.array_equal(geometry.rasterize_polygon(region.points, 64, 64), disc.astype(bool))


def test_a_nucleus_inside_another_ones_hole_is_painted_after_it():
    ring = np.zeros((40, 40), np.int32)
    ring[5:35, 5:35] = 1
    ring[12:28, 12:28] = 2
    result = conversions.prediction_result(ring, classes=None, nucleus_classes=CLASSES)
    assert [r["id"] for r in result] == ["k1p1", "k2p1"]
    assert np.array_equal(paint(result, 40, 40), ring)


def test_a_pixel_belongs_to_a_polygon_when_its_centre_is_inside():
    # Pixel (0, 0) spans [0, 1) x [0, 1): its centre (0.5, 0.5).
    square = np.array([[0.4, 0.4], [1.6, 0.4], [1.6, 1.6], [0.4, 1.6]])
    assert geometry.rasterize_polygon(square, 3, 3).astype(int).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    sliver = np.array([[0.6, 0.0], [0.9, 0.0], [0.9, 3.0], [0.6, 3.0]])
    assert not geometry.rasterize_polygon(sliver, 3, 3).any()


def test_brush_masks_go_through_the_sdks_own_rle_codec():
    mask = touching_nuclei(3) > 0
    rle = geometry.mask_to_brush_rle(mask)
    assert np.array_equal(geometry.brush_rle_to_mask(rle, 128, 96), mask)


def test_new_polygons_become_new_nuclei_and_brush_strokes_add_or_erase():
    height = width = 40
    pct = lambda pts: [[x / width * 100, y / height * 100] for x, y in pts]  # noqa: E731
    result = [
        {"id": "n7", "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
         "value": {"points": pct([(2, 2), (12, 2), (12, 12), (2, 12)]), "polygonlabels": ["nucleus"]}},
        {"id": "aZ81kq2LmP", "type": "polygonlabels", "from_name": "nuclei", "to_name": "image",
         "value": {"points": pct([(20, 20), (30, 20), (30, 30), (20, 30)]), "polygonlabels": ["mitosis & <odd>"]}},
    ]
    add = np.zeros((height, width), bool)
    add[2:12, 12:15] = True  # touches nucleus 7: grows it
    add[35:38, 35:38] = True  # touches nothing: a new nucleus of the stroke's class
    erase = np.zeros((height, width), bool)
    erase[20:25, 20:30] = True
    for mask, label in ((add, "mitosis & <odd>"), (erase, "background")):
        result.append({"id": f"b{label[:3]}", "type": "brushlabels", "from_name": "touchup", "to_name": "image",
                       "value": {"format": "rle", "rle": geometry.mask_to_brush_rle(mask), "brushlabels": [label]}})
    converted = conversions.annotation_to_instances(result, height=height, width=width, nucleus_classes=CLASSES)
    instances = converted.instances
    assert (instances[2:12, 2:15] == 7).all()
    assert set(np.unique(instances[25:30, 20:30])) == {8} and not instances[20:25, 20:30].any()
    assert (instances[35:38, 35:38] == 9).all()
    assert converted.classes == {"7": 1, "8": 2, "9": 2}


def test_the_labeling_config_has_a_polygon_and_a_brush_label_per_class():
    root = ET.fromstring(conversions.labeling_config(CLASSES))
    polygons, brush = root.find("PolygonLabels"), root.find("BrushLabels")
    assert [label.get("value") for label in polygons] == ["nucleus", "mitosis & <odd>"]
    assert [label.get("value") for label in brush] == ["nucleus", "mitosis & <odd>", "background"]
    assert root.find("Image").get("value") == "$image"


def test_the_most_uncertain_tile_gets_the_lowest_score():
    scores = conversions.scores_from_uncertainty({10: 0.9, 11: 0.1, 12: 0.5})
    assert sorted(scores, key=scores.get) == [10, 12, 11]
    assert scores[10] == 0.0 and scores[11] == 1.0
    ranked = conversions.scores_from_ranks([12, 10, 11])
    assert sorted(ranked, key=ranked.get) == [12, 10, 11]
    # each strategy's own score key (ml_worker.catalog); the mean only when the prediction lacks it
    scores = {"entropy": 0.3, "margin": 0.7, "boundary": 0.5}
    assert conversions.uncertainty_value(scores, "hybrid") == 0.3
    assert conversions.uncertainty_value(scores, "hybrid_rep") == 0.3
    assert conversions.uncertainty_value(scores, "hybrid_boundary") == 0.5
    assert conversions.uncertainty_value(scores, "margin") == 0.7
    assert conversions.uncertainty_value({"entropy": 0.2, "margin": 0.4}, "mc_dropout") == 0.30000000000000004
