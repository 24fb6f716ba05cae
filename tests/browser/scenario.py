"""Projects for the browser tests: synthetic tiles, a model version whose predictions are the
synthetic truth slightly eroded (so there is something to correct), uncertainty maps next to
the predictions (as the worker stores them) and a ranked queue. No worker needed."""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage

from backend.common.storage import StagedWrites, encode_png
from backend.images import services as image_services
from backend.images.models import Tile
from backend.images.validation import DecodedImage
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry
from backend.ml.workflows import uncertainty_name
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from ml_worker import synth

PASSWORD = "browser-test-pw-123"


def decoded(name: str, pixels: np.ndarray) -> DecodedImage:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    return DecodedImage(name=name, data=data, sha256=hashlib.sha256(data).hexdigest(), format="png", pixels=pixels)


def exactly(instances: np.ndarray, n: int) -> np.ndarray:
    """Keep the first ``n`` nuclei (relabelled 1..n)."""
    labels = [v for v in np.unique(instances) if v]
    lut = np.zeros(int(instances.max()) + 1, np.int32)
    for i, v in enumerate(labels[:n], start=1):
        lut[v] = i
    return lut[instances]


def predicted(truth: np.ndarray) -> np.ndarray:
    """A plausible model output: each nucleus eroded by one pixel."""
    out = np.zeros_like(truth, dtype=np.int32)
    for index, box in enumerate(ndimage.find_objects(truth.astype(np.int64)), start=1):
        if box is None:
            continue
        shrunk = ndimage.binary_erosion(truth[box] == index)
        out[box][shrunk] = index
    return out


def uncertainty(instances: np.ndarray) -> bytes:
    """An 8-bit 'entropy' map: high on nucleus borders, as a real model's would be."""
    from skimage.segmentation import find_boundaries

    edges = ndimage.gaussian_filter(find_boundaries(instances).astype(np.float32), 1.5)
    buffer = io.BytesIO()
    PILImage.fromarray(np.clip(edges / max(edges.max(), 1e-6) * 255, 0, 255).astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def make_users(make_user, project, roles=("admin", "reviewer", "annotator", "viewer"), prefix=""):
    users = {}
    for role in roles:
        user = make_user(f"{prefix}{role}", password=PASSWORD)
        Membership.objects.update_or_create(user=user, project=project, defaults={"role": Role(role)})
        users[role] = user
    return users


def ui_project(*, name: str, creator, kind: str = "he", images: int = 2, size: int = 256, tile_size: int = 128,
               nuclei: int | None = None, radius=(5, 9), seed: int = 7, queue: bool = True, **fields):
    """A project with ``images`` synthetic images cut into tiles, an active model version with a
    prediction (and uncertainty map) for every tile, and every tile ranked in the queue."""
    project = create_project(name=name, created_by=creator, tile_size=tile_size, **fields)
    truths = {}
    for i in range(images):
        pixels, instances = synth.generate(kind, size=size, seed=seed + i, n_nuclei=nuclei and nuclei + 60,
                                           nucleus_radius=radius)
        if nuclei:
            instances = exactly(instances.astype(np.int32), nuclei)
        [result] = image_services.ingest_images(project=project, images=[decoded(f"{kind}-{i}.png", pixels)],
                                                uploaded_by=creator)
        for tile in Tile.objects.filter(image=result.image):
            truths[tile.pk] = instances[tile.y: tile.y + tile.h, tile.x: tile.x + tile.w].astype(np.int32)
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/fake.pt",
                                          status=ModelStatus.ACTIVE, metrics={"dice": 0.81, "aji": 0.66, "pq": 0.61},
                                          status_reason="first model of the project")
    ordered = []
    for tile_id, truth in sorted(truths.items()):
        prediction = predicted(truth)
        with StagedWrites() as staged:
            name = staged.save(f"predictions/{version.pk}/{tile_id}.png", encode_png(prediction))
            staged.save(uncertainty_name(name), uncertainty(prediction))
        count = len(np.unique(prediction)) - 1
        Prediction.objects.create(tile_id=tile_id, model_version=version, mask=name, nucleus_count=count,
                                  uncertainty={"entropy": 0.1 + 0.01 * count})
        ordered.append((tile_id, 0.1 + 0.01 * count))
    if queue:
        ordered.sort(key=lambda item: -item[1])
        QueueEntry.objects.bulk_create([
            QueueEntry(project=project, tile_id=t, rank=i, score=s, strategy="hybrid", model_version=version)
            for i, (t, s) in enumerate(ordered)
        ])
    return project, version, truths
