"""The worker's on-disk model cache never hands out another database's model with the same id."""
from __future__ import annotations

import pytest
import torch
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from backend.ml import workflows
from backend.ml.models import ModelStatus, ModelVersion
from backend.projects.services import create_project
from ml_worker.checkpoint import save_checkpoint
from ml_worker.models import create_model

pytestmark = pytest.mark.django_db


def _stored_weights(name: str, width: int, folder) -> str:
    torch.manual_seed(0)
    path = save_checkpoint(folder / f"{name.replace('/', '-')}", create_model("unet", width=width, depth=2),
                           config={"tile_size": 64})
    return default_storage.save(name, ContentFile(path.read_bytes()))


def test_a_version_reusing_an_earlier_databases_id_loads_its_own_weights(make_user, settings, tmp_path):
    settings.VAR_DIR = tmp_path  # one runs/cache folder outliving the database, as a kept var folder does
    admin = make_user("admin")
    project = create_project(name="Cache", created_by=admin, tile_size=64)
    old = ModelVersion.objects.create(project=project, version=1, architecture="unet", status=ModelStatus.ACTIVE,
                                      weights=_stored_weights("models/old.pt", width=4, folder=tmp_path))
    assert workflows.load_model(old)[0].init_kwargs["width"] == 4
    pk = old.pk
    old.delete()  # a new database (or a rolled-back test): the same id comes back for another model
    new = ModelVersion.objects.create(pk=pk, project=project, version=1, architecture="unet",
                                      status=ModelStatus.ACTIVE, weights=_stored_weights("models/new.pt", width=6, folder=tmp_path))
    assert workflows.load_model(new)[0].init_kwargs["width"] == 6
