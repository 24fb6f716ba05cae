"""The permission matrix: every API URL pattern x every HTTP method x every kind of caller.

A new endpoint (or a new method on one) without an entry in MATRIX fails
``test_every_api_endpoint_has_a_matrix_entry``, so nobody can add an unchecked endpoint.
"""
from __future__ import annotations

import os

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import URLPattern, URLResolver, get_resolver

from backend.images.models import Tile
from backend.images.services import create_annotation
from backend.projects.models import Membership, Role
from tests.backend.conftest import client_for
from tests.backend.factories import disc_labels, finish_ingest, label_png, rgb_png

pytestmark = pytest.mark.django_db

CALLERS = ["anonymous", "outsider", "viewer", "annotator", "reviewer", "admin"]
RANK = {"viewer": 0, "annotator": 1, "reviewer": 2, "admin": 3}
_counter = itertools.count()


@dataclass
class Rule:
    """``minimum``: the lowest project role that succeeds (None: any authenticated user,
    "public": anyone, "staff": platform staff only, "secret": Label Studio proving the shared
    secret, never a user). ``make(ctx)`` -> (url kwargs, body)."""

    minimum: str | None
    success: int
    make: Callable[[dict], tuple[dict, dict | None]]
    scoped: bool = True  # project-scoped: outsiders get 404


def project_kwargs(ctx):
    return {"project_id": ctx["project"].pk}, None


def tile_kwargs(ctx):
    return {"tile_id": ctx["tile"].pk}, None


def annotation_kwargs(ctx):
    return {"annotation_id": ctx["annotation"].pk}, None


def new_upload(ctx):
    return {"project_id": ctx["project"].pk}, {"file": SimpleUploadedFile("x.png", rgb_png(64, 64, seed=1000 + next(_counter)))}


def new_member(ctx):
    user = get_user_model().objects.create_user(username=f"new{next(_counter)}", password="pw-for-tests-123")
    return {"project_id": ctx["project"].pk}, {"username": user.username, "role": "viewer"}


def fresh_membership(body):
    def make(ctx):
        user = get_user_model().objects.create_user(username=f"m{next(_counter)}", password="pw-for-tests-123")
        membership = Membership.objects.create(user=user, project=ctx["project"], role=Role.VIEWER)
        return {"project_id": ctx["project"].pk, "membership_id": membership.pk}, body

    return make


def new_mask(ctx):
    return {"tile_id": ctx["tile"].pk}, {"mask": SimpleUploadedFile("m.png", label_png(disc_labels()))}


def fresh_submitted_annotation(ctx):
    annotation, _ = create_annotation(tile=ctx["tile"], instances=disc_labels().astype(np.int32), author=None)
    return {"annotation_id": annotation.pk}, {"decision": "accept", "comment": "ok"}


def new_model_version(ctx, status: str):
    from backend.ml.models import ModelVersion

    version = ModelVersion.objects.filter(project=ctx["project"]).count() + 1
    return ModelVersion.objects.create(project=ctx["project"], version=version, architecture="unet",
                                       weights=f"models/fake-v{version}.pt", status=status)


def finished_run(ctx):
    from backend.ml.models import TrainingRun

    return TrainingRun.objects.create(project=ctx["project"], architecture="unet", status="succeeded")


def live_run(ctx):
    from backend.ml.models import TrainingRun

    if "live_run" not in ctx:
        ctx["live_run"] = TrainingRun.objects.create(project=ctx["project"], architecture="unet", status="running")
    return ctx["live_run"]


def ssl_project(ctx):
    ctx["project"].ssl_pretrain = True
    ctx["project"].save(update_fields=["ssl_pretrain"])
    return {"project_id": ctx["project"].pk}, {"config": {"steps": 5}}


def live_pretraining(ctx):
    from backend.ml.models import EncoderPretraining

    if "live_pretraining" not in ctx:
        ctx["live_pretraining"] = EncoderPretraining.objects.create(project=ctx["project"], architecture="unet",
                                                                    status="running")
    return {"pretraining_id": ctx["live_pretraining"].pk}, None


def no_kwargs(ctx):
    return {}, None


LABEL_STUDIO_SECRET = "matrix-label-studio-secret"


MATRIX: dict[str, dict[str, Rule]] = {
    "schema": {"get": Rule("public", 200, lambda ctx: ({}, None), scoped=False)},
    "docs": {"get": Rule("public", 200, lambda ctx: ({}, None), scoped=False)},
    "auth-token": {"post": Rule("public", 400, lambda ctx: ({}, {"username": "nobody", "password": "wrong"}), scoped=False)},
    "me": {"get": Rule(None, 200, lambda ctx: ({}, None), scoped=False)},
    "project-list": {
        "get": Rule(None, 200, lambda ctx: ({}, None), scoped=False),
        "post": Rule("staff", 201, lambda ctx: ({}, {"name": f"P{next(_counter)}", "tile_size": 128}), scoped=False),
    },
    "project-detail": {
        "get": Rule("viewer", 200, project_kwargs),
        "patch": Rule("admin", 200, lambda ctx: ({"project_id": ctx["project"].pk}, {"description": "updated"})),
    },
    "project-archive": {
        # Archiving is idempotent and restoring too: every admin call of the matrix succeeds.
        "post": Rule("admin", 200, project_kwargs),
        "delete": Rule("admin", 200, project_kwargs),
    },
    "membership-list": {"get": Rule("viewer", 200, project_kwargs), "post": Rule("admin", 201, new_member)},
    "membership-detail": {
        "patch": Rule("admin", 200, fresh_membership({"role": "annotator"})),
        "delete": Rule("admin", 204, fresh_membership(None)),
    },
    "image-list": {"get": Rule("viewer", 200, project_kwargs), "post": Rule("admin", 201, new_upload)},
    "image-detail": {"get": Rule("viewer", 200, lambda ctx: ({"image_id": ctx["tile"].image_id}, None))},
    "tile-list": {"get": Rule("viewer", 200, project_kwargs)},
    "tile-detail": {"get": Rule("viewer", 200, tile_kwargs)},
    "tile-image": {"get": Rule("viewer", 200, tile_kwargs)},
    "tile-overlay": {"get": Rule("viewer", 200, tile_kwargs)},
    "annotation-list": {"get": Rule("viewer", 200, tile_kwargs), "post": Rule("annotator", 201, new_mask)},
    "annotation-detail": {"get": Rule("viewer", 200, annotation_kwargs)},
    "annotation-mask": {"get": Rule("viewer", 200, annotation_kwargs)},
    "annotation-review": {"post": Rule("reviewer", 200, fresh_submitted_annotation)},
    "model-version-list": {"get": Rule("viewer", 200, project_kwargs)},
    "model-version-promote": {"post": Rule("admin", 200, lambda ctx: ({"model_version_id": new_model_version(ctx, "candidate").pk}, None))},
    "model-version-rollback": {"post": Rule("admin", 200, lambda ctx: (new_model_version(ctx, "retired") and project_kwargs(ctx)[0], None))},
    "training-run-list": {
        "get": Rule("viewer", 200, project_kwargs),
        "post": Rule("admin", 202, lambda ctx: ({"project_id": ctx["project"].pk}, {"architecture": "unet", "config": {"epochs": 1}})),
    },
    "training-run-detail": {"get": Rule("viewer", 200, lambda ctx: ({"run_id": finished_run(ctx).pk}, None))},
    "training-run-cancel": {"post": Rule("admin", 200, lambda ctx: ({"run_id": live_run(ctx).pk}, None))},
    "pretraining-list": {"get": Rule("viewer", 200, project_kwargs), "post": Rule("admin", 202, ssl_project)},
    "pretraining-cancel": {"post": Rule("admin", 200, live_pretraining)},
    "queue": {"get": Rule("viewer", 200, project_kwargs)},
    "queue-next": {"post": Rule("annotator", 204, project_kwargs)},
    "queue-release": {"post": Rule("annotator", 204, project_kwargs)},
    "queue-rank": {"post": Rule("admin", 202, lambda ctx: ({"project_id": ctx["project"].pk}, {"strategy": "entropy"}))},
    "event-list": {"get": Rule("viewer", 200, project_kwargs)},
    "catalog": {"get": Rule(None, 200, no_kwargs, scoped=False)},  # the engine's vocabulary: any signed-in user
}


MATRIX.update({
    "labelstudio-status": {
        "get": Rule("viewer", 200, project_kwargs),
        # Label Studio is not configured here: an admin gets past the role check to the 409 saying so.
        "post": Rule("admin", 409, project_kwargs),
    },
    "labelstudio-webhook": {"post": Rule("secret", 200, lambda ctx: ({}, {"action": "PROJECT_UPDATED"}), scoped=False)},
    "labelstudio-ml-health": {"get": Rule("secret", 200, no_kwargs, scoped=False)},
    "labelstudio-ml-setup": {"post": Rule("secret", 200, lambda ctx: ({}, {"project": "999999.1"}), scoped=False)},
    "labelstudio-ml-versions": {"get": Rule("secret", 200, no_kwargs, scoped=False)},
    "labelstudio-ml-predict": {"post": Rule("secret", 200, lambda ctx: ({}, {"project": "999999.1", "tasks": []}), scoped=False)},
    "labelstudio-ml-webhook": {"post": Rule("secret", 200, lambda ctx: ({}, {"action": "PING"}), scoped=False)},
})


def finished_export(ctx):
    """One export of the ctx project, run to completion (cached: the callers share it)."""
    from backend.exports.services import create_export, run_export

    if "export" not in ctx:
        export = create_export(project=ctx["project"], format="png", filters={"status": "submitted"})
        ctx["export"] = run_export(export_id=export.pk)
    return ctx["export"]


def new_dataset_zip(ctx):
    import io
    import zipfile

    n = next(_counter)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"images/i{n}.png", rgb_png(64, 64, seed=5000 + n))
        archive.writestr(f"masks/i{n}.png", label_png(disc_labels()))
    return {"project_id": ctx["project"].pk}, {"file": SimpleUploadedFile("dataset.zip", buffer.getvalue())}


# Exports hold a project's whole curated data set: reviewers and admins read and download them,
# only admins start them or import archives.
MATRIX.update({
    "export-list": {
        "get": Rule("reviewer", 200, project_kwargs),
        "post": Rule("admin", 202, lambda ctx: ({"project_id": ctx["project"].pk}, {"format": "png", "filters": {"status": "submitted"}})),
    },
    "export-detail": {"get": Rule("reviewer", 200, lambda ctx: ({"export_id": finished_export(ctx).pk}, None))},
    "export-download": {"get": Rule("reviewer", 200, lambda ctx: ({"export_id": finished_export(ctx).pk}, None))},
    "dataset-import": {"post": Rule("admin", 201, new_dataset_zip)},
})


# The browser UI's endpoints (backend/web/api.py).
def tile_with_heat_map(ctx):
    from backend.common.storage import StagedWrites, encode_png
    from backend.ml.models import Prediction
    from backend.ml.workflows import uncertainty_name

    version = new_model_version(ctx, "candidate")
    with StagedWrites() as staged:
        name = staged.save(f"predictions/{version.pk}/{ctx['tile'].pk}.png", encode_png(disc_labels().astype(np.int32)))
        staged.save(uncertainty_name(name), encode_png(np.zeros((64, 64, 3), np.uint8)))
    Prediction.objects.create(tile=ctx["tile"], model_version=version, mask=name, nucleus_count=2)
    return tile_kwargs(ctx)


def edit_of_the_annotation(ctx):
    return tile_kwargs(ctx)[0], {"base": {"kind": "annotation", "id": ctx["annotation"].pk}, "deleted": [1]}


MATRIX.update({
    "tile-regions": {"get": Rule("viewer", 200, tile_kwargs), "post": Rule("annotator", 201, edit_of_the_annotation)},
    "tile-prediction-overlay": {"get": Rule("viewer", 200, tile_kwargs)},
    "tile-context": {"get": Rule("viewer", 200, tile_kwargs)},
    "tile-uncertainty": {"get": Rule("viewer", 200, tile_with_heat_map)},
    "annotation-diff": {"get": Rule("viewer", 200, annotation_kwargs)},
    "annotation-diff-image": {"get": Rule("viewer", 200, annotation_kwargs)},
    "project-summary": {"get": Rule("viewer", 200, project_kwargs)},
    "project-image-tiles": {"get": Rule("viewer", 200, project_kwargs)},
    "review-list": {"get": Rule("viewer", 200, project_kwargs)},
    "system-status": {"get": Rule(None, 200, no_kwargs, scoped=False)},
})


# Slides (issue 11): chunked uploads are for project admins; slide pixels and the viewer's data for members.
def image_kwargs(ctx):
    return {"image_id": ctx["tile"].image_id}, None


def fresh_upload(ctx, *, size: int = 10, parts: bytes | None = None):
    from backend.images import uploads

    upload = uploads.create_upload(project=ctx["project"], filename=f"u{next(_counter)}.png", size=size,
                                   user=ctx["users"]["admin"])
    if parts is not None:
        import io

        uploads.receive_part(upload=upload, n=0, stream=io.BytesIO(parts), content_length=len(parts))
    return upload


def upload_part_request(ctx):
    from rest_framework.renderers import JSONRenderer

    body = {"bytes": "0123456789"}  # the test client sends it JSON-encoded: that is the part
    upload = fresh_upload(ctx, size=len(JSONRenderer().render(body)))
    return {"upload_id": upload.pk, "n": 0}, body


def completable_upload(ctx):
    upload = fresh_upload(ctx, size=len(png := rgb_png(64, 64, seed=7000 + next(_counter))), parts=png)
    return {"upload_id": upload.pk}, {}


def incomplete_upload(ctx):
    return {"upload_id": fresh_upload(ctx).pk}, {}


# Uploads go to Karyo in parts with local storage and to presigned S3 URLs with S3 (services
# mode): an admin gets past the role check either way, to the answer of that mode (a 409 names the
# other mode; completing an S3 upload whose parts never arrived is a 400 listing them).
_S3 = os.environ.get("KARYO_TEST_SERVICES") == "1"
MATRIX.update({
    "upload-create": {"post": Rule("admin", 201, lambda ctx: (project_kwargs(ctx)[0], {"filename": "s.svs", "size": 10}))},
    "upload-detail": {"get": Rule("admin", 200, lambda ctx: ({"upload_id": fresh_upload(ctx).pk}, None))},
    "upload-chunk": {"put": Rule("admin", 409 if _S3 else 204, upload_part_request)},
    "upload-parts": {"post": Rule("admin", 200 if _S3 else 409,
                                  lambda ctx: ({"upload_id": fresh_upload(ctx).pk}, {"parts": [0]}))},
    "upload-complete": {"post": Rule("admin", 400, incomplete_upload) if _S3 else Rule("admin", 201, completable_upload)},
    "slide-dzi": {"get": Rule("viewer", 200, image_kwargs)},
    "slide-tile": {"get": Rule("viewer", 200, lambda ctx: ({**image_kwargs(ctx)[0], "level": 6, "col": 0, "row": 0}, None))},
    "image-thumbnail": {"get": Rule("viewer", 200, image_kwargs)},
    "slide-tiles": {"get": Rule("viewer", 200, image_kwargs)},
    "slide-nuclei": {"get": Rule("viewer", 200, image_kwargs)},
})


def api_endpoints() -> list[tuple[str, str, list[str]]]:
    """(name, route, methods) for every named URL pattern under /api/."""
    found = []

    def walk(patterns, prefix: str) -> None:
        for entry in patterns:
            if isinstance(entry, URLResolver):
                walk(entry.url_patterns, prefix + str(entry.pattern))
            elif isinstance(entry, URLPattern):
                route = prefix + str(entry.pattern)
                if not route.startswith("api/"):
                    continue
                view = getattr(entry.callback, "view_class", None) or getattr(entry.callback, "cls", None)
                if view is not None:
                    allowed = [m for m in view.http_method_names if m not in ("head", "options") and hasattr(view, m)]
                else:  # function views decorated with @api_view
                    allowed = [m.lower() for m in getattr(entry.callback, "actions", {}) or ["post"]]
                found.append((entry.name, route, allowed))

    walk(get_resolver().url_patterns, "")
    return found


def test_every_api_endpoint_has_a_matrix_entry():
    missing = [
        f"{method.upper()} /{route} ({name})"
        for name, route, methods in api_endpoints()
        for method in methods
        if method not in MATRIX.get(name, {})
    ]
    assert not missing, "add these to the permission MATRIX: " + ", ".join(missing)
    assert len(api_endpoints()) >= 20


def expected_status(rule: Rule, caller: str) -> int:
    if caller == "secret":
        return rule.success
    if rule.minimum == "secret":
        return 401  # a user's token or session is not Label Studio's secret
    if rule.minimum == "public":
        return rule.success
    if caller == "anonymous":
        return 401
    if rule.minimum is None:
        return rule.success
    if rule.minimum == "staff":
        return 403
    if caller == "outsider":
        return 404 if rule.scoped else 403
    return rule.success if RANK[caller] >= RANK[rule.minimum] else 403


@pytest.fixture
def ctx(team, api, settings):
    settings.LABEL_STUDIO_URL, settings.LABEL_STUDIO_WEBHOOK_SECRET = None, LABEL_STUDIO_SECRET
    response = api("admin").post(
        f"/api/projects/{team['project'].pk}/images/", {"file": SimpleUploadedFile("t.png", rgb_png(64, 64))}, format="multipart"
    )
    assert response.status_code == 201
    finish_ingest()
    tile = Tile.objects.get()
    annotation, _ = create_annotation(tile=tile, instances=disc_labels().astype(np.int32), author=team["users"]["annotator"])
    return {"project": team["project"], "tile": tile, "annotation": annotation, "users": team["users"]}


@pytest.mark.parametrize("name,method", [(n, m) for n, rules in MATRIX.items() for m in rules])
def test_the_permission_matrix(ctx, name, method):
    from django.urls import reverse

    rule = MATRIX[name][method]
    failures = []
    for caller in CALLERS + ([rule.minimum] if rule.minimum in ("staff", "secret") else []):
        kwargs, body = rule.make(ctx)
        url = reverse(name, kwargs=kwargs)
        user = None if caller in ("anonymous", "secret") else ctx["users"][caller]
        client = client_for(user)
        if caller == "secret":
            client.credentials(HTTP_X_KARYO_WEBHOOK_SECRET=LABEL_STUDIO_SECRET)
        multipart = body is not None and any(isinstance(v, SimpleUploadedFile) for v in body.values())
        response = getattr(client, method)(url, body, format="multipart" if multipart else "json")
        want = 201 if caller == "staff" else expected_status(rule, caller)
        if response.status_code != want:
            failures.append(f"{caller}: {method.upper()} {url} -> {response.status_code}, expected {want}")
        elif response.status_code >= 400 and response["Content-Type"].startswith("application/json"):
            assert "error" in response.json() and response.json()["error"]["message"]
    assert not failures, "\n".join(failures)


def test_an_unknown_api_url_is_a_json_404(client):
    response = client.get("/api/no-such-thing/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
