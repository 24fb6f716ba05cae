from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from backend.karyo.runner import web_command
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
def fast_password_hashing(settings):
    """PBKDF2 costs ~1 s per user on this CPU; the tests create many users and test no hashing."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _clear_cache() -> None:
    from django.core.cache import cache

    if cache.__class__.__name__ == "RedisCache":
        # Services mode shares one Redis database with the broker and the channel layer: delete only
        # the cache's own (prefixed) keys, never FLUSHDB.
        client = cache._cache.get_client(None, write=True)
        keys = list(client.scan_iter(match=f"{cache.key_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    else:
        cache.clear()


@pytest.fixture(autouse=True)
def empty_cache():
    """Throttle counters (failed logins) and cached tile PNGs live in the shared cache: every test starts without any."""
    _clear_cache()
    yield
    _clear_cache()


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


def test_database_url() -> str:
    """The URL of the database the tests are using, for worker/server subprocesses."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def subprocess_env() -> dict[str, str]:
    """Environment that points a worker/server subprocess at the test's database and storage."""
    from django.conf import settings

    env = {"DATABASE_URL": test_database_url()}
    storage = settings.STORAGES["default"]
    options = storage.get("OPTIONS", {})
    if storage["BACKEND"].endswith("S3Storage"):
        env.update(KARYO_S3_ENDPOINT=options["endpoint_url"], KARYO_S3_BUCKET=options["bucket_name"],
                   KARYO_S3_ACCESS_KEY=options["access_key"], KARYO_S3_SECRET_KEY=options["secret_key"])
    else:
        env["KARYO_MEDIA_ROOT"] = str(options["location"])
    return env


class WorkerProcess:
    """A real `celery worker` subprocess on the configured broker, sharing the test database."""

    def __init__(self, log_path, queues: str = "cpu,gpu", env: dict | None = None):
        import os
        import subprocess
        import sys
        from pathlib import Path

        self.log_path = log_path
        self.log = open(log_path, "w+")
        root = Path(__file__).resolve().parents[2]
        full_env = {**os.environ, **subprocess_env(), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "backend.karyo", "worker", "-Q", queues, "--pool", "solo",
             "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h", "-l", "INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=root, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()

    def wait_ready(self, timeout: float = 90) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.output():
                return
            if self.process.poll() is not None:
                pytest.fail(f"worker exited: {self.output()}")
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"worker never became ready: {self.output()}")

    def kill(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except Exception:
                self.kill()
        self.log.close()


@pytest.fixture
def start_worker(tmp_path):
    """``start_worker()`` -> a ready WorkerProcess; every worker is stopped after the test.
    The broker is purged first so no message left by another test is consumed."""
    from backend.karyo.celery import app

    workers: list[WorkerProcess] = []
    app.control.purge()

    def start(queues: str = "cpu,gpu", env: dict | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path / f"worker-{len(workers)}.log", queues=queues, env=env)
        workers.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()
    app.control.purge()  # chained tasks a test did not wait for must not reach the next test's worker


ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, url: str, process: subprocess.Popen) -> None:
        self.url, self.process = url, process


@pytest.fixture
def production_server(tmp_path):
    """The production web server (gunicorn + uvicorn workers, as in docker-compose and `make run`),
    two processes, on the test database: ``.url``, ``.process`` (gunicorn's master)."""
    port = _free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            web_command(bind=f"127.0.0.1:{port}", processes=2),
            cwd=ROOT, env={**os.environ, **subprocess_env()}, stdout=log, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=2)
            break
        except OSError:
            time.sleep(0.3)
    yield Server(base, server)
    server.terminate()
    server.wait(timeout=30)
    print((tmp_path / "server.log").read_text()[-3000:])
