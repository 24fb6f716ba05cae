"""Predictions carry whole nuclei (issue 12): a tile's prediction holds the nuclei it owns (centroid
inside it), each whole with its parts outside the tile, and none of its neighbours'; the editor
opens them whole. The network is a fixed one (dark pixels are nuclei) so that the platform code
runs for real on the CPU: the image reads, the tiled inference, the analysis, the storage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from scipy import ndimage as ndi

from backend.common.storage import read_label_map
from backend.images.models import Image, Tile
from backend.ml import context_prediction, workflows
from backend.ml.models import ModelVersion, Prediction
from tests.backend.factories import encode, finish_ingest

pytestmark = pytest.mark.django_db

# (centre x, centre y, radius) in image pixels of a 192 x 192 image cut into 64-px tiles.
ACROSS_X = (60, 96, 9)  # crosses x = 64; centroid in tile (0, 64)
ACROSS_Y = (100, 124, 9)  # crosses y = 128; centroid in tile (64, 64)
INSIDE = (160, 30, 7)  # inside tile (128, 0)


class DarkIsNucleus(torch.nn.Module):
    """Two channels (background, nucleus): nucleus where the normalised pixel is dark."""

    out_channels = 2
    size_divisor = 1

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(8.0), requires_grad=False)

    def forward(self, x):
        dark = -x.mean(dim=1, keepdim=True) * self.gain
        return torch.cat([-dark, dark], dim=1)

    def activation(self, logits):
        return torch.softmax(logits, dim=1)

    def embed(self, x):
        return x.mean(dim=(2, 3))

    def to_instances(self, probs):
        labels, _ = ndi.label(np.asarray(probs)[1] > 0.5)
        return labels.astype(np.int32)


def picture() -> np.ndarray:
    yy, xx = np.mgrid[0:192, 0:192]
    rgb = np.full((192, 192, 3), 225, np.uint8)
    for cx, cy, r in (ACROSS_X, ACROSS_Y, INSIDE):
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (60, 40, 90)
    return rgb


@pytest.fixture
def predicted(team, api, monkeypatch, request):
    project = team["project"]
    project.context_margin = 32
    project.save(update_fields=["context_margin"])
    response = api("admin").post(f"/api/projects/{project.pk}/images/",
                                 {"file": SimpleUploadedFile("dots.png", encode(picture(), "PNG"))}, format="multipart")
    assert response.status_code == 201, response.content
    finish_ingest()
    if request.param == "frame":  # as for a slide: each tile's context frame is predicted on its own
        monkeypatch.setattr(context_prediction, "WHOLE_IMAGE_PIXELS", 0)
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/x.pt",
                                          status="active")
    model = DarkIsNucleus()
    monkeypatch.setattr(workflows, "load_model", lambda mv: (model, None, {"config": {"tile_size": 64}}))
    assert workflows.run_prediction(project_id=project.pk, model_version_id=version.pk) == 9
    tiles = {(t.x, t.y): t for t in Tile.objects.filter(image=Image.objects.get(project=project))}
    return {"project": project, "tiles": tiles, "predictions": {p.tile_id: p for p in Prediction.objects.all()}}


def in_image(prediction: Prediction) -> np.ndarray:
    """The prediction's whole nuclei painted on the 192 x 192 image."""
    whole = read_label_map(prediction.context_mask.name)
    out = np.zeros((192, 192), np.int32)
    x, y = prediction.tile.x + prediction.context_x, prediction.tile.y + prediction.context_y
    out[y : y + whole.shape[0], x : x + whole.shape[1]] = whole
    return out


def disc(cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[0:192, 0:192]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


@pytest.mark.parametrize("predicted", ["image", "frame"], indirect=True)
def test_a_tiles_prediction_includes_the_margin_parts_of_the_border_nuclei_it_owns(predicted):
    tiles, predictions = predicted["tiles"], predicted["predictions"]
    left, right, below_right = tiles[(0, 64)], tiles[(64, 64)], tiles[(64, 128)]
    owner_x = predictions[left.pk]
    assert owner_x.context_mask and owner_x.nucleus_count == 1
    # Whole: the part right of the border (x >= 64) is in the left tile's prediction.
    assert np.array_equal(in_image(owner_x) > 0, disc(*ACROSS_X))
    assert read_label_map(owner_x.mask.name).shape == (64, 64)

    owner_y = predictions[right.pk]
    assert np.array_equal(in_image(owner_y) > 0, disc(*ACROSS_Y))
    # The neighbours hold no piece of them: each nucleus is predicted once, in the tile owning it.
    assert not read_label_map(predictions[below_right.pk].mask.name).any()
    counts = sorted(p.nucleus_count for p in predictions.values())
    assert counts == [0] * 6 + [1] * 3
    painted = sum((in_image(p) > 0).astype(int) for p in predictions.values())
    assert painted.max() == 1 and np.array_equal(painted > 0, disc(*ACROSS_X) | disc(*ACROSS_Y) | disc(*INSIDE))
    # The tile analysis (scores, embedding) is there as before.
    assert {"entropy", "expected_fixes"} <= set(owner_x.uncertainty) and len(owner_x.embedding) == 3


@pytest.mark.parametrize("predicted", ["image"], indirect=True)
def test_the_editor_opens_the_prediction_with_the_owned_border_nucleus_whole(predicted, api):
    from backend.common import geometry

    left = predicted["tiles"][(0, 64)]
    opened = api("annotator").get(f"/api/tiles/{left.pk}/regions/?source=prediction").json()
    frame = opened["frame"]
    assert opened["source"] == "prediction" and opened["nuclei"] == 1
    points = np.array(geometry.from_percent(opened["result"][0]["value"]["points"], frame["w"], frame["h"]))
    assert points[:, 0].max() + frame["x"] > 66  # beyond the tile's right border (x = 64)
    # Submitting it untouched keeps it whole in the tile's first version.
    body = {"base": {"kind": "prediction", "id": opened["prediction"]["id"]},
            "frame": {k: frame[k] for k in ("x", "y", "w", "h")}}
    saved = api("annotator").post(f"/api/tiles/{left.pk}/regions/", body, format="json")
    assert saved.status_code == 201, saved.content
    from backend.images.models import Annotation

    version = Annotation.objects.get(pk=saved.json()["id"])
    whole = read_label_map(version.context_mask.name)
    x, y = left.x + version.context_x, left.y + version.context_y
    painted = np.zeros((192, 192), bool)
    painted[y : y + whole.shape[0], x : x + whole.shape[1]] = whole > 0
    assert np.array_equal(painted, disc(*ACROSS_X))
