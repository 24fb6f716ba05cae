"""Schema-driven fuzzing of every API operation against a live server (issue 13).

Schemathesis reads the live OpenAPI schema (``/api/schema/``) and, for every operation, sends
generated requests as a project admin and as an annotator: valid data ("positive") and invalid
data ("negative"), with the path ids of real objects so that the requests reach the views.
A 5xx or a response that does not match the documented schema fails the test; the failures of
all operations are reported together. Bounded and seeded: a few examples per operation and role
(``KARYO_FUZZ_EXAMPLES``), no shrinking, derandomised, so it runs in a minute or two.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings

from backend.images.models import Tile
from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from tests.backend.conftest import client_for
from tests.backend.factories import disc_labels, finish_ingest, label_png, rgb_png

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
EXAMPLES = int(os.environ.get("KARYO_FUZZ_EXAMPLES", "2"))
# Destructive operations run last, so that earlier operations still find the objects.
LAST = ("DELETE", "/archive/", "/rollback/", "/cancel/")


@pytest.fixture
def world(make_user):
    """A project with an image, tiles, an annotation and one user per fuzzed role; real ids for paths."""
    admin, annotator = make_user("fuzz-admin"), make_user("fuzz-annotator")
    project = create_project(name="Fuzz", created_by=admin, tile_size=64, auto_retrain_threshold=0)
    Membership.objects.update_or_create(user=admin, project=project, defaults={"role": Role.ADMIN})
    member = Membership.objects.create(user=annotator, project=project, role=Role.ANNOTATOR)
    response = client_for(admin).post(f"/api/projects/{project.pk}/images/",
                                      {"file": SimpleUploadedFile("a.png", rgb_png(128, 128, 1))}, format="multipart")
    assert response.status_code == 201, response.content
    finish_ingest()
    image_id = response.json()["images"][0]["id"]
    tile = Tile.objects.filter(image_id=image_id).order_by("pk").first()
    annotation = client_for(annotator).post(f"/api/tiles/{tile.pk}/annotations/",
                                            {"mask": SimpleUploadedFile("m.png", label_png(disc_labels(tile.h, tile.w)))},
                                            format="multipart")
    assert annotation.status_code == 201, annotation.content
    ids = {"project_id": project.pk, "image_id": image_id, "tile_id": tile.pk,
           "annotation_id": annotation.json()["id"], "membership_id": member.pk, "run_id": 999_999,
           "model_version_id": 999_999, "export_id": 999_999, "upload_id": str(uuid.uuid4()),
           "level": 0, "col": 0, "row": 0, "n": 0}
    from rest_framework.authtoken.models import Token

    tokens = {"admin": Token.objects.get_or_create(user=admin)[0].key,
              "annotator": Token.objects.get_or_create(user=annotator)[0].key}
    return {"ids": ids, "tokens": tokens}


def test_fuzzing_every_operation_as_admin_and_annotator_finds_no_5xx_and_no_schema_violation(world, production_server):
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    base = production_server.url
    schema = schemathesis.openapi.from_url(f"{base}/api/schema/")
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: any(marker in f"{op.method.upper()} {op.path}" for marker in LAST))
    failures: list[str] = []
    sent = {"requests": 0}
    started = time.monotonic()
    for role in ("admin", "annotator"):
        headers = {"Authorization": f"Token {world['tokens'][role]}"}
        for operation in operations:
            label = f"{operation.method.upper()} {operation.path}"
            names = {p.name for p in operation.path_parameters}
            path_parameters = {k: v for k, v in world["ids"].items() if k in names}
            # Negative data needs something to make invalid besides the (fixed) path ids.
            negatable = len(operation.query) > 0 or len(operation.body) > 0
            modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,)
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters or None)

                @hsettings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                           phases=[Phase.explicit, Phase.generate],
                           suppress_health_check=list(HealthCheck))
                @given(case=strategy)
                def exercise(case):
                    sent["requests"] += 1
                    response = case.call(base_url=base, headers=headers, timeout=60)
                    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

                try:
                    exercise()
                except Unsatisfiable:
                    continue  # nothing invalid can be generated for this operation
                except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide the others'
                    failures.append(f"[{role} {mode.value}] {label}: {str(exc)[:1500]}")
    print(f"\nfuzzed {len(operations)} operations x 2 roles: {sent['requests']} requests in "
          f"{time.monotonic() - started:.0f}s; {len(failures)} failing")
    assert not failures, "\n\n".join(failures)
