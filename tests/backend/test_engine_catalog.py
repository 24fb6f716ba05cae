"""The backend reads the engine's vocabulary from ml_worker.catalog: its choice lists agree with
the catalog, project fields and run configs are validated against it (a 400 naming the valid
values), GET /api/catalog/ serves it, and the queue stores the score each strategy ranks by."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.images.models import Image, Tile
from backend.ml.models import ModelStatus, ModelVersion, Prediction, ProjectEvent, QueueEntry, TrainingRun
from backend.projects.models import Project
from backend.projects.services import create_project
from ml_worker import catalog, synth

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parents[2]


def make_tiles(project: Project, n: int, size: int = 64) -> list[Tile]:
    """Image and tile rows only: ranking reads predictions, never pixels."""
    tiles = []
    for i in range(n):
        image = Image.objects.create(project=project, name=f"img{i}.png", file=f"images/{project.pk}-{i}.png",
                                     sha256=f"{project.pk:032d}{i:032d}", format="png", width=size, height=size)
        tiles.append(Tile.objects.create(image=image, project=project, x=0, y=0, w=size, h=size))
    return tiles


def error_of(response) -> dict:
    assert response.status_code == 400, response.content
    return response.json()["error"]


# --- the endpoint ------------------------------------------------------------------------------------

def test_any_signed_in_user_reads_the_catalog(api):
    response = api("viewer").get("/api/catalog/")
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(catalog.as_dict()))
    assert api(None).get("/api/catalog/").status_code == 401


# --- every backend choice list is the catalog's --------------------------------------------------------

def test_every_backend_choice_list_agrees_with_the_catalog(api, team):
    from backend.ml.api import RankSerializer, TrainingRunCreateSerializer
    from backend.projects.models import StainNormalization
    from backend.web.services import TRAIN_DEFAULTS

    project = team["project"]
    form = api("viewer").get(f"/api/projects/{project.pk}/summary/").json()
    assert form["training_form"]["architectures"] == catalog.architecture_names()
    assert form["training_form"]["losses"] == catalog.training_loss_names()
    assert form["training_form"]["stain_norms"] == catalog.stain_normalizer_names()
    assert form["training_form"]["augment"] == catalog.augment_preset_names()
    assert form["strategies"] == catalog.strategy_names()
    assert TRAIN_DEFAULTS == {o.name: o.default for o in (*catalog.TRAINING_OPTIONS, catalog.WIDTH_OPTION)}
    assert list(StainNormalization.values) == catalog.stain_normalizer_names()
    assert Project._meta.get_field("default_architecture").default == catalog.DEFAULT_ARCHITECTURE
    assert Project._meta.get_field("al_strategy").default == catalog.DEFAULT_STRATEGY
    # every name the catalog has is accepted where the backend takes one, and nothing else is
    for name in catalog.architecture_names():
        assert TrainingRunCreateSerializer(data={"architecture": name}).is_valid()
        assert api("admin").patch(f"/api/projects/{project.pk}/", {"default_architecture": name},
                                  format="json").status_code == 200
    for name in catalog.strategy_names():
        assert RankSerializer(data={"strategy": name}).is_valid()
        assert api("admin").patch(f"/api/projects/{project.pk}/", {"al_strategy": name}, format="json").status_code == 200
    for name in catalog.stain_normalizer_names():
        assert api("admin").patch(f"/api/projects/{project.pk}/", {"stain_normalization": name},
                                  format="json").status_code == 200
    assert not TrainingRunCreateSerializer(data={"architecture": "bogus"}).is_valid()
    assert not RankSerializer(data={"strategy": "bogus"}).is_valid()


def test_no_backend_module_keeps_its_own_copy_of_an_engine_list():
    """A literal list of two or more engine names in backend code is a copy that will drift."""
    vocabularies = {
        "architectures": set(catalog.architecture_names()),
        "losses": set(catalog.loss_names()),
        "strategies": set(catalog.strategy_names()),
        "optimizers": set(catalog.optimizer_names()),
        "stain normalisers": set(catalog.stain_normalizer_names()) - {"none"},
    }
    copies = []
    for path in sorted((ROOT / "backend").rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elements = node.elts
            elif isinstance(node, ast.Dict):
                elements = [k for k in node.keys if k is not None]
            else:
                continue
            strings = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            copies += [f"{path.relative_to(ROOT)}:{node.lineno} {what} {sorted(strings & names)}"
                       for what, names in vocabularies.items() if len(strings & names) >= 2]
    assert not copies, "read these from ml_worker.catalog instead:\n" + "\n".join(copies)


# --- issue 10, bug 2: bogus settings are refused when given, not inside a worker later -----------------

@pytest.mark.parametrize("field,valid", [
    ("default_architecture", "valid: unet, pgunet_plus, unet_sharp, dssnet, hspnet, multihead_unet"),
    ("al_strategy", "valid: random, entropy, margin, boundary, mc_dropout, tta, hybrid, hybrid_boundary, hybrid_rep"),
    ("stain_normalization", "valid: none, macenko, reinhard"),
])
def test_a_project_refuses_an_unknown_engine_name_naming_the_valid_ones(api, team, field, valid):
    project = team["project"]
    error = error_of(api("admin").patch(f"/api/projects/{project.pk}/", {field: "bogus"}, format="json"))
    assert error["code"] == "validation_error"
    assert error["message"].startswith(f"{field}: ") and valid in error["message"] and "bogus" in error["message"]
    project.refresh_from_db()
    assert getattr(project, field) != "bogus"
    created = api("staff").post("/api/projects/", {"name": "New", "tile_size": 64, field: "bogus"}, format="json")
    assert valid in error_of(created)["message"]
    assert not Project.objects.filter(name="New").exists()


@pytest.mark.parametrize("defaults,field,says", [
    ({"width": 1e9}, "width", "width must be an integer from 1 to 512"),
    ({"epochs": 1e30}, "epochs", "epochs must be an integer from 1 to 10000"),
    ({"loss": "bogus"}, "loss", "loss must be one of: ce, bce, dice, ce_dice, bce_dice, focal_tversky, border_ce"),
    ({"early_stopping_patience": -1}, "early_stopping_patience",
     "early_stopping_patience must be an integer from 0 to 10000"),
    ({"no_such_option": 1}, "no_such_option", "unknown training option 'no_such_option'; valid: epochs, batch_size"),
])
def test_bad_training_options_are_refused_for_a_project_and_for_a_run(api, team, defaults, field, says):
    project = team["project"]
    error = error_of(api("admin").patch(f"/api/projects/{project.pk}/", {"training_defaults": defaults}, format="json"))
    assert error["message"].startswith("training_defaults: ") and says in error["message"]
    project.refresh_from_db()
    assert project.training_defaults == {}

    response = api("admin").post(f"/api/projects/{project.pk}/training-runs/",
                                 {"architecture": "unet", "config": defaults}, format="json")
    error = error_of(response)
    assert error["code"] == "invalid_config" and says in error["message"]
    assert error["details"]["field"] == field
    assert not TrainingRun.objects.filter(project=project).exists()


def test_training_defaults_are_stored_converted_and_checked_against_the_architecture(api, team):
    project = team["project"]
    url = f"/api/projects/{project.pk}/"
    response = api("admin").patch(url, {"training_defaults": {"epochs": "3", "width": 8.0, "loss": "", "tile_size": 48},
                                        "default_architecture": "unet"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["training_defaults"] == {"epochs": 3, "width": 8, "loss": None, "tile_size": 48}
    # U-Net# needs tiles in multiples of 32: switching the architecture alone is refused
    error = error_of(api("admin").patch(url, {"default_architecture": "unet_sharp"}, format="json"))
    assert "tile_size must be a multiple of 32 for unet_sharp" in error["message"]
    error = error_of(api("admin").post(f"/api/projects/{project.pk}/training-runs/",
                                       {"architecture": "multihead_unet", "config": {"loss": "border_ce"}}, format="json"))
    assert "loss 'border_ce' does not fit multihead_unet" in error["message"]
    error = error_of(api("admin").post(f"/api/projects/{project.pk}/training-runs/", {"architecture": "bogus"},
                                       format="json"))
    assert "valid: unet, pgunet_plus" in error["message"]


def test_the_model_refuses_bogus_engine_settings_too(make_user):
    """create_project, the Django admin and management commands go through Project.clean."""
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as info:
        create_project(name="Admin-made", created_by=make_user("alice"), al_strategy="bogus",
                       training_defaults={"epochs": 0})
    assert "valid: random, entropy" in info.value.message_dict["al_strategy"][0]
    assert "epochs must be an integer from 1 to 10000" in info.value.message_dict["training_defaults"][0]
    assert not Project.objects.filter(name="Admin-made").exists()


def test_a_project_saved_with_bogus_settings_does_not_fail_the_annotation_that_crosses_the_threshold(make_user):
    """Rows written before the catalog checked them (or straight into the database)."""
    from backend.images.services import create_annotation
    from backend.ml.services import maybe_auto_retrain

    admin = make_user("alice", is_staff=True)
    project = create_project(name="Old", created_by=admin, tile_size=64, auto_retrain_threshold=0)
    for tile in make_tiles(project, 2):
        create_annotation(tile=tile, instances=np.zeros((64, 64), np.int32), author=admin)
    Project.objects.filter(pk=project.pk).update(default_architecture="bogus", auto_retrain_threshold=2)
    project.refresh_from_db()
    assert maybe_auto_retrain(project=project) is None
    assert not TrainingRun.objects.filter(project=project).exists()
    refused = ProjectEvent.objects.get(project=project, kind="run.refused")
    assert "unknown architecture 'bogus'; valid: unet" in refused.message


# --- issue 10, bug 1: the queue stores the score the strategy ranked by --------------------------------

@pytest.mark.parametrize("strategy", ["hybrid", "hybrid_boundary", "hybrid_rep", "margin"])
def test_the_queue_stores_the_score_each_strategy_ranks_by(make_user, strategy):
    from ml_worker.active_learning import analyze_tiles
    from ml_worker.models import create_model

    from backend.ml.workflows import run_ranking

    torch.manual_seed(0)
    model = create_model("unet", width=4, depth=2).eval()
    images = [synth.generate("he", size=64, seed=70 + i)[0] for i in range(6)]
    analyses = analyze_tiles(model, images, tile_size=64, device="cpu")
    project = create_project(name=f"Rank {strategy}", created_by=make_user("alice"), tile_size=64,
                             al_strategy=strategy, auto_retrain_threshold=0)
    tiles = make_tiles(project, len(images))
    version = ModelVersion.objects.create(project=project, version=1, architecture="unet", weights="models/v1.pt",
                                          status=ModelStatus.ACTIVE)
    for tile, analysis in zip(tiles, analyses, strict=True):
        Prediction.objects.create(
            tile=tile, model_version=version, mask=f"predictions/{tile.pk}.png", nucleus_count=analysis.nucleus_count,
            uncertainty={k: float(v) for k, v in analysis.scores.items()},
            embedding=[float(x) for x in np.asarray(analysis.embedding).ravel()],
        )

    assert run_ranking(project_id=project.pk, batch_size=3) == len(tiles)

    key = catalog.score_key(strategy)
    expected = {tile.pk: analysis.scores[key] for tile, analysis in zip(tiles, analyses, strict=True)}
    entries = list(QueueEntry.objects.filter(project=project).order_by("rank"))
    # No labelled tile yet: the batch of 3 is typical tiles (warm-up, issue 16), the rest the strategy's order.
    assert [e.strategy for e in entries] == ["typical"] * 3 + [strategy] * (len(tiles) - 3)
    assert [e.score for e in entries] == pytest.approx([expected[e.tile_id] for e in entries])
    assert min(e.score for e in entries) > 0.0  # an untrained model is uncertain everywhere


def test_a_run_may_choose_a_preset_and_an_instance_head_that_fit_its_architecture(api, team):
    project = team["project"]
    url = f"/api/projects/{project.pk}/training-runs/"
    error = error_of(api("admin").post(url, {"architecture": "unet", "config": {"preset": "paper"}}, format="json"))
    assert error["details"]["field"] == "preset" and "unet has no 'paper' preset" in error["message"]
    error = error_of(api("admin").post(url, {"architecture": "multihead_unet", "config": {"instance_head": "hv"}},
                                       format="json"))
    assert error["details"]["field"] == "instance_head"
    error = error_of(api("admin").post(url, {"architecture": "unet", "config": {"instance_head": "stardust"}},
                                       format="json"))
    assert "instance_head must be one of: hv" in error["message"]
    assert not TrainingRun.objects.filter(project=project).exists()
    from backend.ml.services import validate_run_config

    config = {"preset": "paper", "instance_head": "hv", "epochs": "1"}
    assert validate_run_config(config=config, architecture="dssnet") == {"preset": "paper", "instance_head": "hv",
                                                                          "epochs": 1}
    # Accepted by the API's validation (this project has nothing to train on yet: a conflict, not a 400).
    response = api("admin").post(url, {"architecture": "dssnet", "config": config}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"


def test_a_runs_preset_and_head_reach_the_engine_under_its_own_options():
    from ml_worker.presets import apply_preset
    from ml_worker.training import TrainConfig

    kwargs = apply_preset("dssnet", "paper", model_kwargs={"instance_head": "hv"}, epochs=1)
    config = TrainConfig(**kwargs)
    assert config.epochs == 1  # the run's option wins over the preset's
    assert config.model_kwargs["instance_head"] == "hv"
    assert config.model_kwargs.get("decoder") == "paper"
