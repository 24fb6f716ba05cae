from __future__ import annotations

import socket
import uuid

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backend.projects.models import Membership, Role
from backend.projects.services import create_project
from tests.conftest import SERVICES

ROLES = ["viewer", "annotator", "reviewer", "admin"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on loopback (moto server mode), for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield {"endpoint": f"http://127.0.0.1:{port}", "access_key": "karyo-test", "secret_key": "karyo-test-secret"}
    server.stop()


def make_bucket(s3: dict) -> str:
    from minio import Minio

    bucket = f"karyo-{uuid.uuid4().hex[:12]}"
    client = Minio(s3["endpoint"].removeprefix("http://"), access_key=s3["access_key"], secret_key=s3["secret_key"], secure=False)
    client.make_bucket(bucket)
    return bucket


@pytest.fixture
def s3_storage(settings, s3_server):
    """Point the default storage at a fresh bucket on the S3 server."""
    from backend.karyo.settings import s3_storage_options

    bucket = make_bucket(s3_server)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": s3_storage_options(s3_server["endpoint"], bucket, s3_server["access_key"], s3_server["secret_key"], "us-east-1"),
    }
    return bucket


@pytest.fixture(autouse=True)
def isolated_storage(request, settings, tmp_path):
    """Every test gets empty storage: a temp folder, or (services mode) a fresh S3 bucket."""
    if SERVICES or "s3_storage" in request.fixturenames:
        request.getfixturevalue("s3_storage")
    else:
        settings.STORAGES = {
            **settings.STORAGES,
            "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(tmp_path / "media")}},
        }


@pytest.fixture
def make_user(db):
    def make(username: str, *, is_staff: bool = False, password: str = "pw-for-tests-123") -> object:
        return get_user_model().objects.create_user(
            username=username, email=f"{username}@example.org", password=password, is_staff=is_staff
        )

    return make


@pytest.fixture
def team(make_user):
    """One project with one user per role, an outsider, and platform staff."""
    staff = make_user("staff", is_staff=True)
    project = create_project(name="Cervix", created_by=staff, tile_size=64)
    users = {"staff": staff, "outsider": make_user("outsider")}
    for role in ROLES:
        user = make_user(role)
        Membership.objects.create(user=user, project=project, role=Role(role))
        users[role] = user
    return {"project": project, "users": users}


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def api(team):
    """``api("annotator")`` -> an APIClient authenticated with that user's token; ``api(None)`` is anonymous."""
    return lambda who: client_for(team["users"][who] if who else None)
