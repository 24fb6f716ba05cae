"""Issue 15 in the browser: the workspace lists each nucleus of a typed prediction with the class
the model gave it and its confidence; the training page's launch form offers the catalog's
presets and instance head, starts from the project's own settings, and shows the server's 400
next to the field it names."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.common.storage import read_label_map
from backend.images import services as image_services
from backend.images.models import Tile
from backend.images.services import create_annotation
from backend.ml.models import Prediction, TrainingRun
from backend.projects.services import create_project
from ml_worker import catalog, synth
from tests.browser import editor
from tests.browser.scenario import PASSWORD, decoded, make_users, ui_project

pytestmark = pytest.mark.django_db(transaction=True)

# Project class ids on purpose not 1..K.
CLASSES = [{"id": 3, "name": "epithelial", "color": "#e6194b"}, {"id": 7, "name": "lymphocyte", "color": "#3cb44b"},
           {"id": 12, "name": "stromal", "color": "#4363d8"}]
TINY = {"epochs": 3, "width": 4, "tile_size": 64, "batch_size": 4, "steps_per_epoch": 3, "early_stopping_patience": 0}


def test_the_workspace_lists_each_predicted_nucleus_with_its_class_and_confidence(make_user, open_session):
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project, version, _ = ui_project(name="Typed (browser)", creator=staff, images=1, size=128, tile_size=128,
                                     nuclei=5, seed=11, nucleus_classes=CLASSES, queue=False)
    make_users(make_user, project)
    version.classes = [{"id": c["id"], "name": c["name"]} for c in CLASSES]
    version.save(update_fields=["classes"])
    prediction = Prediction.objects.get(model_version=version)
    ids = [int(v) for v in np.unique(read_label_map(prediction.mask.name)) if v]
    assert len(ids) >= 4, ids
    # As the worker stores it: instance id -> [project class id, confidence in that class].
    given = [(3, 0.93), (7, 0.42), (12, 0.71), (7, 0.58)]
    typed = {str(i): [cls, conf] for i, (cls, conf) in zip(ids, given + [(3, 0.88)] * len(ids), strict=False)}
    prediction.classes = typed
    prediction.save(update_fields=["classes"])
    names = {c["id"]: c["name"] for c in CLASSES}

    s = open_session("annotator", PASSWORD)
    s.goto(f"/projects/{project.pk}/tiles/{prediction.tile_id}/")
    editor.wait_ready(s.page)
    note = s.page.locator("[data-testid=typed-prediction]")
    note.wait_for()
    low = sum(1 for _, conf in typed.values() if conf < 0.6)
    assert int(note.get_attribute("data-low")) == low == 2
    assert "2 nuclei below 60 % confidence" in note.inner_text()
    s.page.click("[data-testid=typed-nuclei] summary")
    rows = s.page.locator("[data-testid=typed-nucleus]")
    assert rows.count() == len(typed)
    shown = {rows.nth(i).get_attribute("data-id"): (rows.nth(i).get_attribute("data-label"),
                                                      float(rows.nth(i).get_attribute("data-score")),
                                                      rows.nth(i).inner_text()) for i in range(rows.count())}
    for instance, (cls, conf) in typed.items():
        label, score, text = shown[instance]
        assert (label, score) == (names[cls], pytest.approx(conf))
        assert text == f"nucleus {instance}: {names[cls]} · {round(100 * conf)} %"
    # The least sure first, and those below 60 % marked.
    scores = [float(rows.nth(i).get_attribute("data-score")) for i in range(rows.count())]
    assert scores == sorted(scores)
    assert s.page.locator("[data-testid=typed-nucleus].typed-low").count() == low
    # The editor's regions carry the same classes (each region's label is its nucleus' class).
    for region in editor.regions(s.page, prediction.tile_id):
        instance = region["id"][1:].split("p")[0]
        assert region["value"]["polygonlabels"] == [names[typed[instance][0]]]
        assert region["score"] == pytest.approx(typed[instance][1])
    s.shot("issue15-workspace-typed-prediction")


@pytest.fixture
def launchable(make_user):
    """A project with an accepted annotation, DSSNet by default, Macenko as its stain setting."""
    staff = make_user("staff", is_staff=True, password=PASSWORD)
    project = create_project(name="Launch (browser)", created_by=staff, tile_size=64, default_architecture="dssnet",
                             stain_normalization="macenko", auto_retrain_threshold=0, training_defaults=TINY)
    users = make_users(make_user, project)
    pixels, instances = synth.generate("he", size=64, seed=21, nucleus_radius=(5, 8))
    [result] = image_services.ingest_images(project=project, images=[decoded("he.png", pixels)], uploaded_by=staff)
    tile = Tile.objects.get(image=result.image)
    create_annotation(tile=tile, instances=instances.astype("int32"), author=users["annotator"])
    return project


def test_an_admin_launches_a_paper_preset_run_with_the_hv_head_and_sees_a_400_by_its_field(launchable, open_session):
    project = launchable
    s = open_session("admin", PASSWORD)

    # A page holding an older catalog (the server was updated since it loaded) offers U-Net a
    # paper preset; the server refuses it with a 400 naming the field.
    def stale_catalog(route):
        response = route.fetch()
        data = response.json()
        unet = next(a for a in data["architectures"] if a["name"] == "unet")
        unet["presets"].append({"name": "paper", "label": "paper", "help": "Ronneberger 2015 (stale)"})
        route.fulfill(response=response, body=json.dumps(data), headers={**response.headers, "content-type": "application/json"})

    s.page.route("**/api/catalog/", stale_catalog)
    s.goto(f"/projects/{project.pk}/training/")
    form = s.page.locator("[data-testid=launch-form]")
    form.wait_for()
    # The form starts from the project's own settings: architecture, training defaults, stain setting.
    assert form.locator("select[name=architecture]").input_value() == "dssnet"
    assert form.locator("input[name=epochs]").input_value() == "3"
    assert form.locator("input[name=tile_size]").input_value() == "64"
    assert form.locator("select[name=stain_norm]").input_value() == "macenko"
    # Bounds and explanations come from the catalog.
    epochs = next(o for o in catalog.as_dict()["training_options"] if o["name"] == "epochs")
    assert form.locator("input[name=epochs]").get_attribute("max") == str(epochs["maximum"])
    assert "a whole number from 1 to 10000" in form.locator("[data-testid=help-epochs]").inner_text()

    form.locator("select[name=architecture]").select_option("unet")
    form.locator("select[name=preset]").select_option("paper")
    s.page.click("[data-testid=launch]")
    error = form.locator("[data-testid=error-preset]")
    error.wait_for(state="visible")
    s.page.wait_for_function("document.querySelector('[data-testid=error-preset]').textContent.length > 0")
    assert "unet has no 'paper' preset" in error.inner_text()
    assert form.locator("[data-field=preset].invalid").count() == 1
    assert not TrainingRun.objects.filter(project=project).exists()
    s.shot("issue15-launch-form-server-error")

    # A value the catalog's bounds refuse is caught before any request, next to its field.
    form.locator("select[name=architecture]").select_option("dssnet")
    form.locator("input[name=epochs]").fill("0")
    s.page.click("[data-testid=launch]")
    assert form.locator("[data-testid=error-epochs]").inner_text() == "a whole number from 1 to 10000"
    assert form.locator("[data-testid=error-preset]").inner_text() == ""

    # DSSNet with the paper preset and the HoVer-style head.
    form.locator("input[name=epochs]").fill("3")
    form.locator("select[name=preset]").select_option("paper")
    assert "reference decoder" in form.locator("[data-testid=help-preset]").inner_text()
    assert form.locator("[data-field=instance_head]").is_visible()
    form.locator("select[name=instance_head]").select_option("hv")
    with s.page.expect_request(lambda r: r.url.endswith(f"/api/projects/{project.pk}/training-runs/")
                               and r.method == "POST") as request:
        s.page.click("[data-testid=launch]")
    # Only what differs from the project's defaults, or was edited, is sent: the preset sets the rest.
    assert request.value.post_data_json == {"architecture": "dssnet", "config": {
        "epochs": 3, "stain_norm": "macenko", "preset": "paper", "instance_head": "hv"}}
    s.page.wait_for_selector("[data-testid=run-panel] .badge-queued, [data-testid=run-panel] .badge-running")
    run = TrainingRun.objects.get(project=project)
    assert run.architecture == "dssnet"
    assert run.config == {**TINY, "stain_norm": "macenko", "preset": "paper", "instance_head": "hv"}
    assert form.locator("[data-testid=error-epochs]").inner_text() == ""
    s.shot("issue15-launch-form-paper-hv")

    # Multi-head U-Net has its own instance outputs: no instance-head field.
    form.locator("select[name=architecture]").select_option("multihead_unet")
    assert not form.locator("[data-field=instance_head]").is_visible()
