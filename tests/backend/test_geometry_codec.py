"""The geometry codec (backend.common.geometry) on random label maps: pieces, holes, nuclei inside
holes, pinches and touching nuclei. Every encoding it offers must come back exactly (Label Studio:
exactly up to the holes it cannot express), whichever caller uses it: the sync, the editor, the
export formats. Small maps and ~50 examples per property keep this to seconds; examples are
derandomised so CI sees the same maps every run (run with ``--hypothesis-seed=N`` to explore)."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from backend.common import archives, geometry
from backend.common.errors import InvalidUpload
from backend.exports.formats import ClassDef, coco, geojson, labelstudio
from backend.labelstudio import conversions
from backend.web import editing

# pycocotools 2.0.11 on numpy 2 warns about np.array(copy=False) on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLASSES = [{"id": 1, "name": "nucleus", "color": "#e6194b"}, {"id": 2, "name": "lymphocyte", "color": "#3cb44b"}]
CLASS_DEFS = [ClassDef(c["id"], c["name"], c["color"]) for c in CLASSES]
SQUARE = np.ones((3, 3), bool)


@st.composite
def label_maps(draw, max_side: int = 14) -> np.ndarray:
    """Noise (pinches, pieces, touching everywhere) or painted boxes and rings (holes, nuclei in
    holes, one id reused for pieces far apart)."""
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    if draw(st.booleans()):
        top = draw(st.integers(1, 5))
        return draw(arrays(np.int32, (h, w), elements=st.integers(0, top)))
    inst = np.zeros((h, w), np.int32)
    for _ in range(draw(st.integers(1, 6))):
        label = draw(st.integers(1, 5))
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
        inst[y0:y1, x0:x1] = label
        if y1 - y0 >= 3 and x1 - x0 >= 3 and draw(st.booleans()):
            hy0, hx0 = draw(st.integers(y0 + 1, y1 - 2)), draw(st.integers(x0 + 1, x1 - 2))
            hy1, hx1 = draw(st.integers(hy0 + 1, y1 - 1)), draw(st.integers(hx0 + 1, x1 - 1))
            inst[hy0:hy1, hx0:hx1] = draw(st.integers(0, 5))  # a hole: background or another nucleus
    return inst


def sequential(inst: np.ndarray) -> np.ndarray:
    """Ids 1..N (what the export formats are given)."""
    return relabel_sequential(inst)[0].astype(np.int32)


def holes_filled(inst: np.ndarray) -> np.ndarray:
    """What a map can be in Label Studio (polygons without holes), computed without the codec:
    every 4-connected piece with its holes filled, larger pieces painted first (a piece that lies
    in another's hole is smaller, so it ends up on top)."""
    pieces = []
    for label in np.unique(inst[inst > 0]):
        parts, count = ndi.label(ndi.binary_fill_holes(inst == label, structure=SQUARE))
        pieces += [(int(label), parts == k) for k in range(1, count + 1)]
    out = np.zeros_like(inst)
    for label, mask in sorted(pieces, key=lambda p: -int(p[1].sum())):
        out[mask] = label
    return out


def painted(results: list[dict], height: int, width: int) -> np.ndarray:
    """Label Studio results painted in order by the one rule, each with the id its region names."""
    return geometry.rasterize(
        [(geometry.label_from_region_id(r["id"]), geometry.from_percent(r["value"]["points"], width, height))
         for r in results],
        height, width,
    )


# --- polygons with holes (pixel corners) ---------------------------------------------------------

@PROPERTY
@given(inst=label_maps(), offset=st.tuples(st.integers(-5, 3000), st.integers(-5, 3000)))
def test_polygons_with_holes_rasterise_back_to_the_exact_map_at_any_offset(inst, offset):
    h, w = inst.shape
    parts = geometry.label_parts(inst, offset=offset)
    assert set(parts) == {int(v) for v in np.unique(inst) if v}
    assert np.array_equal(geometry.parts_to_instances(parts, h, w, offset=offset), inst)
    for label, pieces in parts.items():
        _, count = ndi.label(inst == label)
        assert len(pieces) == count  # one Part per 4-connected piece
        for part in pieces:
            assert geometry.shoelace(part.outer) < 0 and all(geometry.shoelace(hole) > 0 for hole in part.holes)
            for ring in part.rings:  # pixel corners inside the window, only the corners kept
                assert ring.dtype.kind == "i" and len(ring) >= 4
                assert (ring >= offset).all() and (ring <= np.array(offset) + [w, h]).all()
                steps = np.diff(np.vstack([ring, ring[:1]]), axis=0)
                assert ((steps[:, 0] == 0) ^ (steps[:, 1] == 0)).all()
                turns = steps[:, 0] * np.roll(steps, -1, axis=0)[:, 1] - steps[:, 1] * np.roll(steps, -1, axis=0)[:, 0]
                assert (turns != 0).all()


@PROPERTY
@given(inst=label_maps())
def test_pixel_corner_outlines_without_holes_are_exact_for_pycocotools_too(inst):
    h, w = inst.shape
    for label, pieces in geometry.label_parts(inst).items():
        if any(p.holes for p in pieces):
            continue
        polys = [p.outer.astype(float).ravel().tolist() for p in pieces]
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
        assert np.array_equal(decoded, inst == label)
        assert np.array_equal(geometry.rasterize_parts([p.rings for p in pieces], h, w, rule="coco"), inst == label)


# --- Label Studio regions ------------------------------------------------------------------------

@PROPERTY
@given(inst=label_maps())
def test_label_studio_regions_come_back_exactly_up_to_filled_holes(inst):
    h, w = inst.shape
    expected = holes_filled(inst)
    results = conversions.prediction_result(inst, classes=None, nucleus_classes=CLASSES)
    assert np.array_equal(painted(results, h, w), expected)
    back = conversions.annotation_to_instances(results, height=h, width=w, nucleus_classes=CLASSES)
    assert np.array_equal(back.instances, expected)  # the sync reads them back with their ids
    regions = geometry.mask_to_regions(inst)
    for label in np.unique(inst[inst > 0]):  # each region alone is one filled piece of its nucleus
        parts, count = ndi.label(ndi.binary_fill_holes(inst == label, structure=SQUARE))
        drawn = [geometry.rasterize_polygon(geometry.from_percent(r.percent, w, h), h, w)
                 for r in regions if r.label == label]
        assert sorted(m.tobytes() for m in drawn) == sorted((parts == k).tobytes() for k in range(1, count + 1))
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids)) and all(geometry.label_from_region_id(i) is not None for i in ids)


@PROPERTY
@given(inst=label_maps())
def test_a_map_without_holes_survives_the_sync_pixel_for_pixel(inst):
    solid = holes_filled(inst)  # a map Label Studio can hold exactly
    h, w = solid.shape
    results = conversions.prediction_result(solid, classes=None, nucleus_classes=CLASSES)
    back = conversions.annotation_to_instances(results, height=h, width=w, nucleus_classes=CLASSES)
    assert np.array_equal(back.instances, solid)


@PROPERTY
@given(inst=label_maps().map(sequential))
def test_label_studio_export_files_read_back_like_the_sync(inst):
    h, w = inst.shape
    classes = {int(i): 1 + int(i) % 2 for i in np.unique(inst) if i}
    results = labelstudio.instances_to_results(inst, classes, {c.id: c.name for c in CLASS_DEFS})
    for r in results:  # pixel corners, unrounded
        pixels = geometry.from_percent(r["value"]["points"], w, h)
        assert np.allclose(pixels, np.round(pixels), atol=1e-9)
    labels = labelstudio.results_to_labels(results, h, w, "t")
    assert np.array_equal(labels.instances, holes_filled(inst))
    assert labels.classes == {i: CLASS_DEFS[c - 1].name for i, c in classes.items()}


@PROPERTY
@given(inst=label_maps())
def test_editor_outlines_stay_near_the_exact_ones_and_an_unedited_tile_keeps_every_pixel(inst):
    h, w = inst.shape
    shown = editing.editor_regions(inst, classes=None, nucleus_classes=CLASSES)
    exact = geometry.polygon_results(inst, class_of=lambda _: "nucleus")
    assert sorted(r["id"] for r in shown) == sorted(r["id"] for r in exact)
    drawn: dict[int, np.ndarray] = {}
    for r in shown:  # vertices on pixel-edge midpoints, as the exact outline's
        points = geometry.from_percent(r["value"]["points"], w, h)
        frac = np.abs(points - np.floor(points) - 0.5)
        assert len(points) >= 3 and ((frac < 1e-3) | (frac > 0.5 - 1e-3)).all()
        label = geometry.label_from_region_id(r["id"])
        drawn[label] = drawn.get(label, np.zeros((h, w), bool)) | geometry.rasterize_polygon(points, h, w)
    for label, mask in drawn.items():  # only pixels next to the outline can differ
        filled = ndi.binary_fill_holes(inst == label, structure=SQUARE)
        near = ndi.binary_dilation(filled, SQUARE) & ~ndi.binary_erosion(filled, SQUARE)
        assert not ((mask ^ filled) & ~near).any()
    kept = editing.apply_edits(inst, None, regions=[], deleted=[], merges=[], nucleus_classes=CLASSES)
    assert np.array_equal(kept.instances, inst)


# --- COCO and GeoJSON ----------------------------------------------------------------------------

@PROPERTY
@given(inst=label_maps().map(sequential))
def test_coco_polygons_and_rle_come_back_exactly(inst):
    h, w = inst.shape
    classes = {int(i): 1 for i in np.unique(inst) if i}
    annotations = coco.encode_instances(inst, classes)
    for ann, label in zip(annotations, sorted(classes)):
        has_hole = any(p.holes for p in geometry.instance_parts(inst == label))
        assert isinstance(ann["segmentation"], dict) or not has_hole  # holes can only be RLE
        assert ann["area"] == int((inst == label).sum())
    back = coco.decode_annotations(annotations, h, w, {1: "nucleus"}, "t")
    assert np.array_equal(back.instances, inst)


@PROPERTY
@given(inst=label_maps().map(sequential))
def test_geojson_polygons_with_holes_come_back_exactly(inst):
    h, w = inst.shape
    classes = {int(i): 1 for i in np.unique(inst) if i}
    features = geojson.instances_to_features(inst, classes, {c.id: c for c in CLASS_DEFS}, name="t")
    assert np.array_equal(geojson.features_to_labels(features, h, w, "t").instances, inst)


# --- ids, config, framework-free -----------------------------------------------------------------

def test_region_ids_name_the_instance_in_both_the_current_and_the_older_scheme():
    assert geometry.region_id(12, 3) == "k12p3"
    assert [geometry.label_from_region_id(v) for v in ("k12p3", "n12", "n12p1", "aB3x_9kP", "k12", "", None)] == [
        12, 12, 12, None, 12, None, None]


def test_the_three_labelling_configs_come_from_one_function_with_one_opacity():
    sync = ET.fromstring(conversions.labeling_config(CLASSES))
    editor = ET.fromstring(editing.editor_config(CLASSES))
    exported = ET.fromstring(geometry.labeling_config([(c.name, c.color) for c in CLASS_DEFS]))
    for root in (sync, editor, exported):
        polygons = root.find("PolygonLabels")
        assert polygons.get("opacity") == geometry.POLYGON_OPACITY and polygons.get("name") == geometry.POLYGONS
        assert [(label.get("value"), label.get("background")) for label in polygons] == [
            (c["name"], c["color"]) for c in CLASSES]
        assert root.find("Image").get("value") == "$image"
    assert sync.find("BrushLabels") is not None and sync.find("Image").get("crossOrigin") == "anonymous"
    assert editor.find("BrushLabels") is None and exported.find("BrushLabels") is None
    odd = geometry.labeling_config([('odd "name" <x> & y', "#000000")])
    assert ET.fromstring(odd).find("PolygonLabels/Label").get("value") == 'odd "name" <x> & y'


def test_the_codec_imports_no_web_framework():
    code = ("import sys, backend.common.geometry as g; import numpy as np; g.mask_to_regions(np.eye(4, dtype=int)); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'rest_framework', 'celery')); "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


# --- zip safety: one function for uploads and data set imports -----------------------------------

@pytest.mark.parametrize("name,unsafe", [
    ("images/a.png", False), ("a/b/../c.png", True), ("../a.png", True), ("/etc/passwd", True),
    ("C:/x.png", True), ("..\\a.png", True), ("a\\..\\..\\b.png", True), ("..a.png", False),
])
def test_a_member_is_unsafe_when_it_could_land_outside_the_folder(name, unsafe):
    assert archives.is_unsafe_member(zipfile.ZipInfo(name)) is unsafe


def test_a_symlink_member_is_refused_by_the_image_upload_and_the_data_set_import(tmp_path):
    from backend.exports.archive import extract_archive
    from backend.images.validation import read_zip

    link = zipfile.ZipInfo("images/a.png")
    link.external_attr = (0o120777 << 16)
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    for unpack in (lambda: read_zip("bad.zip", path.read_bytes()), lambda: extract_archive(path, tmp_path / "out")):
        with pytest.raises(InvalidUpload) as caught:
            unpack()
        assert caught.value.code == "unsafe_archive" and "images/a.png" in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
