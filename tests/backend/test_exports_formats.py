"""The format writer/reader pairs on plain arrays: exact polygons, COCO validated with
pycocotools, PanNuke shapes and dtypes, QuPath GeoJSON structure, Label Studio tasks."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from backend.common.storage import encode_png
from backend.exports.archive import ZipSink
from backend.exports.formats import ClassDef, ExportSample, PlanItem, coco, geojson, get_format, labelstudio, pannuke
from backend.common.geometry import instance_parts, label_parts, rasterize_parts
from backend.exports.provenance import prediction_changes
from backend.exports.splits import seeded_split
from ml_worker import synth

# pycocotools 2.0.11 on numpy 2 warns about np.array(copy=False) on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
CLASSES = [ClassDef(1, "epithelial", "#e6194b"), ClassDef(2, "lymphocyte", "#3cb44b")]


def tricky_instances(height: int = 40, width: int = 48) -> np.ndarray:
    """A ring (nucleus with a hole) holding a small nucleus, a nucleus of two diagonal pieces,
    and a blob touching the border."""
    yy, xx = np.mgrid[:height, :width]
    inst = np.zeros((height, width), np.int32)
    r = np.hypot(yy - 15, xx - 15)
    inst[(r <= 9) & (r >= 5)] = 1
    inst[r <= 2] = 2
    inst[30:33, 30:33] = 3
    inst[33:36, 33:36] = 3  # touches the first piece only at a corner
    inst[35:, 0:6] = 4
    return inst


def sample(name: str, instances: np.ndarray, split=None, seed: int = 0) -> ExportSample:
    rgb = synth.generate("he", instances.shape, seed)[0]
    ids = [int(i) for i in np.unique(instances) if i]
    return ExportSample(name=name, image_png=encode_png(rgb), instances=instances.astype(np.int32),
                        classes={i: 1 + (i % 2) for i in ids}, split=split)


def write(tmp_path, fmt: str, samples: list[ExportSample], **options):
    sink = ZipSink(tmp_path / f"{fmt}.zip", tmp_path / f"scratch-{fmt}")
    plan = [PlanItem(s.name, s.split, s.instances.shape[1], s.instances.shape[0]) for s in samples]
    writer = get_format(fmt).Writer(sink, classes=CLASSES, plan=plan, options=options)
    for s in samples:
        writer.add(s)
    writer.close()
    sink.write_json("manifest.json", {"format": fmt, "classes": [c.as_dict() for c in CLASSES]})
    sink.close()
    out = tmp_path / f"unzipped-{fmt}"
    zipfile.ZipFile(sink.path).extractall(out)
    return out, sink


def read_back(root, fmt: str) -> dict:
    dataset = get_format(fmt).read(root, manifest=json.loads((root / "manifest.json").read_text()))
    assert not dataset.problems
    out = {}
    for item in dataset.items:
        labels = item.load_labels(*_size(item))
        out[item.name] = (labels.instances, labels.classes)
    return out


def _size(item):
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(item.load_image()))
    return img.height, img.width


def test_traced_polygons_rasterise_back_exactly_with_holes_diagonals_and_noise():
    rng = np.random.default_rng(0)
    cases = [tricky_instances(), synth.generate("pap", 96, 3)[1].astype(np.int32)]
    cases += [rng.integers(0, 4, (14, 14)).astype(np.int32) for _ in range(40)]  # pinches everywhere
    for inst in cases:
        h, w = inst.shape
        for index, parts in label_parts(inst).items():
            truth = inst == index
            assert np.array_equal(rasterize_parts([[p.outer] + p.holes for p in parts], h, w), truth)
            if not any(p.holes for p in parts):
                polys = [p.outer.astype(float).ravel().tolist() for p in parts]
                coco_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
                assert np.array_equal(coco_mask.astype(bool), truth)


def test_coco_export_is_valid_for_pycocotools_and_its_areas_match_the_masks(tmp_path):
    samples = [sample("tricky", tricky_instances()), sample("synth", synth.generate("he", 64, 1)[1].astype(np.int32), seed=1)]
    root, _ = write(tmp_path, "coco", samples)
    api = COCO(str(root / "annotations" / "instances.json"))
    assert {c["name"] for c in api.loadCats(api.getCatIds())} == {"epithelial", "lymphocyte"}
    by_name = {img["file_name"]: img for img in api.loadImgs(api.getImgIds())}
    for s in samples:
        image = by_name[f"{s.name}.png"]
        assert (image["width"], image["height"]) == (s.instances.shape[1], s.instances.shape[0])
        anns = api.loadAnns(api.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(s.classes)
        for instance, ann in enumerate(sorted(anns, key=lambda a: a["id"]), start=1):
            mask = api.annToMask(ann).astype(bool)
            assert mask.sum() == ann["area"] == (s.instances == instance).sum()
            assert np.array_equal(mask, s.instances == instance)
            assert ann["category_id"] == s.classes[instance] and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            assert mask[y : y + h, x : x + w].sum() == ann["area"]
    tricky = {a["id"]: a for a in api.loadAnns(api.getAnnIds(imgIds=[by_name["tricky.png"]["id"]]))}
    assert isinstance(tricky[1]["segmentation"], dict)  # the ring has a hole: RLE
    assert isinstance(tricky[3]["segmentation"], list) and len(tricky[3]["segmentation"]) == 2  # two pieces
    back = read_back(root, "coco")
    assert np.array_equal(back["tricky"][0], samples[0].instances)
    assert back["tricky"][1] == {i: CLASSES[c - 1].name for i, c in samples[0].classes.items()}


def test_pannuke_arrays_have_the_pannuke_shapes_and_dtypes_and_crop_back(tmp_path):
    big = synth.generate("he", 64, 2)[1].astype(np.int32)
    samples = [sample("a", big, split="train"), sample("b", tricky_instances(), split="train", seed=3),
               sample("c", big[:32, :48].copy(), split="val", seed=4)]
    root, _ = write(tmp_path, "pannuke", samples, tissue="Cervix")
    images, masks = np.load(root / "train" / "images.npy"), np.load(root / "train" / "masks.npy")
    types = np.load(root / "train" / "types.npy")
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (2, 64, 64, len(CLASSES) + 1) and masks.dtype == np.uint16
    assert types.shape == (2,) and list(types) == ["Cervix", "Cervix"]
    # channel c holds the nuclei of class c; ids are unique across channels; last = background
    first = samples[0]
    for c, cls in enumerate(CLASSES):
        ids = set(np.unique(masks[0, ..., c]).tolist()) - {0}
        assert ids == {i for i, k in first.classes.items() if k == cls.id}
    assert np.array_equal(masks[0, ..., -1] == 1, first.instances == 0)
    assert np.array_equal(masks[0, ..., :-1].max(axis=-1), first.instances)
    # the 40x48 tile is padded to 64x64 and cropped back on reading
    assert masks[1, 40:, :, -1].all() and not images[1, 40:].any()
    assert np.load(root / "val" / "images.npy").shape == (1, 32, 48, 3)
    back = read_back(root, "pannuke")
    for s in samples:
        assert np.array_equal(back[s.name][0], s.instances)


def test_original_pannuke_folds_with_float_masks_are_read_with_the_five_pannuke_classes(tmp_path):
    inst = synth.generate("he", 64, 5, n_nuclei=12)[1].astype(np.int32)
    assert inst.max() > 3
    masks = np.zeros((2, 64, 64, 6), np.float64)
    masks[0, ..., 0] = np.where(inst % 2 == 1, inst, 0)
    masks[0, ..., 4] = np.where((inst % 2 == 0) & (inst > 0), inst, 0)
    masks[..., 5] = 1.0 * (masks[..., :5].sum(-1) == 0)
    (tmp_path / "Fold 1" / "images" / "fold1").mkdir(parents=True)
    (tmp_path / "Fold 1" / "masks" / "fold1").mkdir(parents=True)
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "images.npy", np.full((2, 64, 64, 3), 200.0))
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "types.npy", np.array(["Breast", "Colon"]))
    np.save(tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    assert pannuke.detect(tmp_path)
    dataset = pannuke.read(tmp_path)
    assert [c.name for c in dataset.classes] == ["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"]
    assert [i.name for i in dataset.items] == ["fold1_00000", "fold1_00001"]
    labels = dataset.items[0].load_labels(64, 64)
    assert np.array_equal(labels.instances, inst)
    assert {labels.classes[i] for i in np.unique(inst) if i} == {"Neoplastic", "Epithelial"}


def validate_qupath_geojson(data: dict) -> None:
    """The structure QuPath documents for its GeoJSON objects (and RFC 7946 polygons)."""
    assert data["type"] == "FeatureCollection" and isinstance(data["features"], list)
    for feature in data["features"]:
        assert feature["type"] == "Feature" and isinstance(feature["id"], str)
        geometry = feature["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for rings in polygons:
            for k, ring in enumerate(rings):
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)
                x, y = np.array(ring, float).T
                area = 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1])
                assert (area > 0) if k == 0 else (area < 0)  # right-hand rule: exterior counter-clockwise
        props = feature["properties"]
        assert props["objectType"] in ("annotation", "detection")
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])


def test_qupath_geojson_follows_the_documented_structure_and_reads_back_exactly(tmp_path):
    samples = [sample("tricky", tricky_instances())]
    root, _ = write(tmp_path, "geojson", samples, object_type="detection")
    data = json.loads((root / "geojson" / "tricky.geojson").read_text())
    validate_qupath_geojson(data)
    assert len(data["features"]) == 4 and data["features"][0]["properties"]["objectType"] == "detection"
    ring = data["features"][0]["geometry"]
    assert ring["type"] == "Polygon" and len(ring["coordinates"]) == 2  # outer ring + hole
    assert data["features"][2]["geometry"]["type"] == "MultiPolygon"
    assert data["features"][0]["properties"]["classification"] == {"name": "lymphocyte", "color": [60, 180, 75]}
    back = read_back(root, "geojson")
    assert np.array_equal(back["tricky"][0], samples[0].instances)


def test_qupath_cells_and_old_style_colours_are_read():
    square = [[[2, 2], [10, 2], [10, 10], [2, 10], [2, 2]]]
    features = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]]]},
         "properties": {"objectType": "cell", "nucleusGeometry": {"type": "Polygon", "coordinates": square},
                        "classification": {"name": "Tumor", "colorRGB": -3670016}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": {"objectType": "tile"}},
    ]
    labels = geojson.features_to_labels(features, 24, 24, "x.geojson")
    assert labels.instances.max() == 1 and labels.instances.sum() == 64
    assert labels.classes == {1: "Tumor"} and labels.colors == {"Tumor": "#c80000"}


def test_label_studio_tasks_hold_polygons_in_percent_and_fill_holes(tmp_path):
    samples = [sample("tricky", tricky_instances())]
    root, _ = write(tmp_path, "labelstudio", samples, image_url_prefix="/data/local-files/?d=karyo/")
    tasks = json.loads((root / "tasks.json").read_text())
    assert len(tasks) == 1 and tasks[0]["data"]["image"] == "/data/local-files/?d=karyo/images/tricky.png"
    results = tasks[0]["annotations"][0]["result"]
    assert {r["type"] for r in results} == {"polygonlabels"}
    assert [r["id"] for r in results] == ["k1p1", "k2p1", "k3p1", "k3p2", "k4p1"]
    for r in results:
        assert r["from_name"] == "nuclei" and r["to_name"] == "image"
        assert (r["original_width"], r["original_height"]) == (48, 40)
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in r["value"]["points"])
        assert r["value"]["polygonlabels"][0] in ("epithelial", "lymphocyte")
    config = (root / "label_config.xml").read_text()
    assert '<PolygonLabels name="nuclei" toName="image"' in config and 'value="lymphocyte"' in config
    back = read_back(root, "labelstudio")["tricky"][0]
    original = samples[0].instances
    assert np.array_equal(back == 2, original == 2)  # the nucleus in the hole stays on top
    assert np.array_equal(back == 1, (original == 1) | ((original == 0) & (np.hypot(*np.mgrid[:40, :48] - np.array([15, 15])[:, None, None]) < 5)))
    assert np.array_equal(back == 3, original == 3) and np.array_equal(back == 4, original == 4)


def test_label_studio_regions_drawn_by_people_are_one_nucleus_each_and_brushes_are_refused():
    def square(x0):
        return {"type": "polygonlabels", "id": f"abc{x0}", "original_width": 50, "original_height": 50,
                "value": {"points": [[x0, 10], [x0 + 20, 10], [x0 + 20, 30], [x0, 30]], "polygonlabels": ["A"]}}

    labels = labelstudio.results_to_labels([square(0), square(40), {"type": "choices", "value": {}}], 50, 50, "t")
    assert labels.instances.max() == 2 and labels.classes == {1: "A", 2: "A"}
    assert (labels.instances == 1).sum() == 10 * 10
    with pytest.raises(Exception, match="only polygons"):
        labelstudio.results_to_labels([{"type": "brushlabels", "id": "b", "value": {}}], 50, 50, "t")


def test_changes_against_the_prediction_count_pixels_and_added_and_removed_nuclei():
    predicted = np.zeros((20, 20), np.int32)
    predicted[0:5, 0:5] = 1
    predicted[10:15, 10:15] = 2  # removed by the annotator
    annotated = np.zeros((20, 20), np.int32)
    annotated[0:5, 0:6] = 7  # nucleus 1 grown by a column
    annotated[15:20, 0:4] = 8  # added
    changes = prediction_changes(predicted, annotated)
    assert changes == {"pixels_changed": 5 + 25 + 20, "instances_added": 1, "instances_removed": 1, "instances_matched": 1}


def test_the_seeded_split_is_by_image_reproducible_and_follows_the_fractions():
    ids = list(range(1, 41))
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    first = seeded_split(image_ids=ids, fractions=fractions, seed=7)
    assert first == seeded_split(image_ids=list(reversed(ids)), fractions=fractions, seed=7)
    assert first != seeded_split(image_ids=ids, fractions=fractions, seed=8)
    counts = {s: list(first.values()).count(s) for s in fractions}
    assert counts == {"train": 28, "val": 6, "test": 6}
    strata = {i: "rare" if i <= 8 else "common" for i in ids}
    stratified = seeded_split(image_ids=ids, fractions=fractions, seed=7, strata=strata)
    rare = [stratified[i] for i in ids if i <= 8]
    assert rare.count("train") in (5, 6) and rare.count("val") >= 1 and rare.count("test") >= 1


def test_instance_parts_gives_one_outer_ring_per_piece():
    parts = instance_parts(tricky_instances() == 3)
    assert len(parts) == 2 and all(not p.holes for p in parts)
    ring = instance_parts(tricky_instances() == 1)
    assert len(ring) == 1 and len(ring[0].holes) == 1
    assert coco.encode_instances(np.zeros((4, 4), np.int32), {}) == []
