"""Typed nuclei in the platform: a project's nucleus classes become the model's classes, each
predicted nucleus carries a project class id and a class confidence, the workspace opens a
prediction with those classes (and a correction saved from it keeps them), and a model version's
metrics show mPQ / bPQ / per-class PQ. A one-class project stays binary.

The training and prediction workflows run in the test process (the worker's code, on the real
Postgres and storage), with a tiny U-Net on 64-px tiles."""
from __future__ import annotations

import json

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from backend.common.storage import read_label_map
from backend.images.models import Annotation, Tile
from backend.images.services import create_annotation
from backend.ml import workflows
from backend.ml.models import ModelStatus, Prediction, RunStatus, TrainingRun
from backend.ml.services import start_training_run
from backend.projects.services import create_project
from ml_worker import synth
from tests.backend.conftest import client_for
from tests.backend.factories import encode, finish_ingest
from tests.backend.test_exports import export_zip, items_of, unzip

# transaction=True: the run's heartbeat thread writes through its own connection.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
# No BatchNorm recalibration: it is not what these tests are about and was half of each tiny run.
TINY = {"epochs": 2, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 3, "bn_recalibrate": False}
# Project class ids on purpose not 1..K: the model's contiguous classes must map back to them.
CLASSES = [{"id": 3, "name": "epithelial", "color": "#e6194b"}, {"id": 7, "name": "lymphocyte", "color": "#3cb44b"},
           {"id": 12, "name": "stromal", "color": "#4363d8"}]


def annotated_project(admin, *, name: str, nucleus_classes: list[dict] | None, architecture: str = "unet"):
    """A synthetic 128-px H&E image (typed nuclei), tiled 64 px, every tile annotated with the
    truth: its instances and, per nucleus, the project class id of its synthetic type (the
    run validates on its training tiles: no validation image)."""
    fields = {"nucleus_classes": nucleus_classes} if nucleus_classes else {}
    project = create_project(name=name, created_by=admin, tile_size=64, default_architecture=architecture,
                             auto_retrain_threshold=0, training_defaults=TINY, **fields)
    ids = [c["id"] for c in project.nucleus_classes]
    image, instances, types = synth.generate_typed("he", size=128, seed=60, nucleus_radius=(5, 8))
    response = client_for(admin).post(
        f"/api/projects/{project.pk}/images/", {"file": SimpleUploadedFile("img.png", encode(image, "PNG"))},
        format="multipart",
    )
    assert response.status_code == 201, response.content
    image_id = response.json()["images"][0]["id"]
    finish_ingest()
    for tile in Tile.objects.filter(image_id=image_id):
        inst = instances[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w].astype(np.int32)
        cls = types[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
        # With two project classes, the synthetic third type (stromal) counts as the first.
        classes = {str(k): ids[(int(np.bincount(cls[inst == k]).argmax()) - 1) % len(ids)]
                   for k in np.unique(inst) if k}
        create_annotation(tile=tile, instances=inst, author=admin, classes=classes)
    return project


def trained(project, architecture: str, *, outcomes=("promoted",)):
    run = start_training_run(project=project, architecture=architecture)
    assert workflows.run_training(run_id=run.pk) in outcomes, TrainingRun.objects.get(pk=run.pk).error
    run = TrainingRun.objects.get(pk=run.pk)
    assert run.status == RunStatus.SUCCEEDED
    return run.model_version


def train_and_predict(project) -> tuple:
    version = trained(project, project.default_architecture)
    assert version.status == ModelStatus.ACTIVE
    assert workflows.run_prediction(project_id=project.pk, model_version_id=version.pk) == Tile.objects.filter(
        project=project).count()
    return version, list(Prediction.objects.filter(model_version=version).order_by("tile_id"))


def test_a_three_class_project_trains_a_typed_model_whose_predictions_carry_project_classes(make_user, tmp_path):
    admin = make_user("alice", is_staff=True)
    project = annotated_project(admin, name="Typed", nucleus_classes=CLASSES)

    train, val = workflows.load_samples(project=project)
    samples = train + val
    assert all(s.classes is not None and s.classes.shape == s.instances.shape for s in samples)
    # Model classes are 1..3 in the project's order; every nucleus pixel has one, background none.
    assert {int(v) for s in samples for v in np.unique(s.classes)} <= {0, 1, 2, 3}
    assert all(np.array_equal(s.classes > 0, s.instances > 0) for s in samples)
    # One sample: the whole image (its four annotated tiles are one region), nuclei stitched.
    assert [s.instances.shape for s in samples] == [(128, 128)]
    stored = Annotation.objects.filter(tile__project=project).order_by("tile__y", "tile__x").first()
    mask = read_label_map(stored.mask.name)
    label, class_id = next(iter(stored.classes.items()))
    tile = stored.tile
    pixels = samples[0].classes[tile.y : tile.y + tile.h, tile.x : tile.x + tile.w][mask == int(label)]
    expected = [c["id"] for c in CLASSES].index(class_id) + 1
    assert set(np.unique(pixels).tolist()) == {expected}

    version, predictions = train_and_predict(project)
    assert version.classes == [{"id": c["id"], "name": c["name"]} for c in CLASSES]
    # The engine validated classes: mPQ, bPQ, per-class PQ by the project's class names (None when a
    # class is absent from the validation tiles).
    for key in ("mpq", "bpq"):
        assert version.metrics[key] is None or 0.0 <= version.metrics[key] <= 1.0
    assert set(version.metrics["per_class_pq"]) <= {c["name"] for c in CLASSES}
    assert version.metrics["per_class_pq"], version.metrics
    assert "dice" in version.metrics and "aji" in version.metrics  # the gate still reads these

    typed = [p for p in predictions if p.nucleus_count]
    assert typed, "the tiny model predicted no nucleus at all"
    for prediction in predictions:
        labels = {int(v) for v in np.unique(read_label_map(prediction.mask.name)) if v}
        assert {int(k) for k in prediction.classes} == labels  # every nucleus has a class, nothing else
        for class_id, confidence in prediction.classes.values():
            assert class_id in {3, 7, 12}
            assert 0.0 <= confidence <= 1.0

    # The workspace opens the prediction with its classes (region labels) and confidences (scores).
    prediction = typed[0]
    body = client_for(admin).get(f"/api/tiles/{prediction.tile_id}/regions/?source=prediction").json()
    assert body["source"] == "prediction" and body["prediction"]["typed"] is True
    names = {c["id"]: c["name"] for c in CLASSES}
    from backend.common import geometry

    for region in body["result"]:
        label = str(geometry.label_from_region_id(region["id"]))
        class_id, confidence = prediction.classes[label]
        assert region["value"]["polygonlabels"] == [names[class_id]]
        assert region["score"] == pytest.approx(confidence)

    # Accepting the draft unchanged keeps the predicted classes on the new annotation, and so in
    # every export (here the PNG one, per tile) and the next training run.
    response = client_for(admin).post(
        f"/api/tiles/{prediction.tile_id}/regions/",
        {"base": {"kind": "prediction", "id": prediction.pk}, "regions": [], "deleted": [], "merges": []},
        format="json",
    )
    assert response.status_code == 201, response.content
    saved = Annotation.objects.get(pk=response.json()["id"])
    assert saved.classes == {k: v[0] for k, v in prediction.classes.items()}
    _, archive = export_zip(project, "png", tmp_path, {"status": "submitted"})
    (entry,) = [t for t in json.loads((unzip(archive) / "manifest.json").read_text())["tiles"]
                if t["annotation"]["id"] == saved.pk]
    raw = read_label_map(saved.mask.name)
    expected = {new: names[saved.classes[str(int(old))]]
                for new, old in enumerate([i for i in np.unique(raw) if i], start=1)}
    assert items_of(archive)[entry["name"]][2] == expected


def test_a_one_class_project_stays_binary(make_user):
    admin = make_user("bob", is_staff=True)
    project = annotated_project(admin, name="Binary", nucleus_classes=None)

    train, val = workflows.load_samples(project=project)
    assert all(s.classes is None for s in train + val)
    version, predictions = train_and_predict(project)
    assert version.classes == []
    assert not {"mpq", "bpq", "per_class_pq"} & set(version.metrics)
    assert all(p.classes == {} for p in predictions)
    tile_id = next(p.tile_id for p in predictions)
    body = client_for(admin).get(f"/api/tiles/{tile_id}/regions/?source=prediction").json()
    assert body["prediction"]["typed"] is False
    assert all("score" not in r and r["value"]["polygonlabels"] == ["nucleus"] for r in body["result"])


def test_an_architecture_without_a_softmax_trains_binary_in_a_typed_project_and_says_so(make_user):
    admin = make_user("carol", is_staff=True)
    project = annotated_project(admin, name="Typed multihead", nucleus_classes=CLASSES[:2])
    assert [c["id"] for c in trained(project, "unet").classes] == [3, 7]

    # The multi-head U-Net's channels are independent sigmoids, not a class distribution. It is
    # gated against the typed active model on the same split, without that model's classes.
    version = trained(project, "multihead_unet", outcomes=("promoted", "candidate"))
    assert version.classes == []
    assert "multihead_unet predicts no nucleus classes" in version.status_reason
    assert "mpq" not in version.metrics and version.metrics["active_at_gating"]["dice"] is not None
