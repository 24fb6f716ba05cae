"""Browser tests: Debian's Chromium (installed with apt when missing, never a downloaded
browser) driven by Playwright against a real Daphne server that serves the built frontend,
sharing the test database and media folder; a real Celery worker where a test needs one.

Screenshots of every page go to test-artifacts/screenshots/ (git-ignored), timings to
test-artifacts/browser-timings.json.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.backend.conftest import make_user, s3_server, s3_storage, start_worker  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed with apt on first use (CI runs as root)."""
    path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path:
        return path
    if os.geteuid() != 0:
        pytest.fail("Chromium is missing: install Debian's package (apt-get install -y chromium) or run the tests as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    path = shutil.which("chromium")
    assert path, "apt-get installed chromium but it is not on PATH"
    return path


@pytest.fixture(scope="session")
def built_frontend() -> Path:
    """frontend/dist, built with `make frontend` when missing or older than the sources."""
    if subprocess.run(["make", "-q", "frontend"], cwd=ROOT).returncode != 0:
        done = subprocess.run(["make", "frontend"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"make frontend failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifest = ROOT / "frontend" / "dist" / "manifest.json"
    assert manifest.exists()
    return manifest.parent


@pytest.fixture(scope="session", autouse=True)
def orm_beside_playwright():
    """Playwright's sync API keeps an event loop in this thread for the rest of the session;
    the ORM calls of the browser tests (and pytest-django's flush after each) are still plain
    synchronous calls: the servers under test are separate processes."""
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture(autouse=True)
def events_beside_playwright(monkeypatch):
    """Live events published by this process (services called by a test) cannot use
    async_to_sync next to Playwright's loop: send them from a thread with its own loop."""
    import asyncio
    import threading

    from backend.common import events

    def in_a_thread(function):
        def call(*args, **kwargs):
            outcome: dict = {}

            def run() -> None:
                try:
                    outcome["value"] = asyncio.run(function(*args, **kwargs))
                except BaseException as exc:  # re-raised in the caller's thread
                    outcome["error"] = exc

            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
            if "error" in outcome:
                raise outcome["error"]
            return outcome.get("value")

        return call

    monkeypatch.setattr(events, "async_to_sync", in_a_thread)


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("browser-media")


@pytest.fixture(autouse=True)
def isolated_storage(settings, media_root):
    """One media folder for the session (the server process outlives single tests)."""
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": str(media_root)}},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(django_db_setup, django_db_blocker, built_frontend, media_root, tmp_path_factory) -> str:
    """Daphne (HTTP + WebSockets) on the test database, serving the built frontend."""
    from django.conf import settings

    from tests.backend.conftest import test_database_url

    with django_db_blocker.unblock():
        database_url = test_database_url()
    log_path = tmp_path_factory.mktemp("daphne") / "daphne.log"
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(DATABASE_URL=database_url, KARYO_MEDIA_ROOT=str(media_root))
    # Small upload chunks, so a test slide of ~1 MB goes up in several parts (tests/browser/test_slides.py).
    env.setdefault("KARYO_UPLOAD_CHUNK_BYTES", str(256 * 1024))
    # WhiteNoise serves what is collected when the server starts.
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    assert (Path(settings.STATIC_ROOT) / "manifest.json").exists()
    port = _free_port()
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "backend.karyo.asgi:application"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None:
            pytest.fail(f"daphne exited:\n{log_path.read_text()}")
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"daphne did not listen on {port}:\n{log_path.read_text()}")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Session:
    """One signed-in browser context: pages, JavaScript errors seen, screenshots."""

    def __init__(self, browser, base: str):
        self.base = base
        self.context = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(f"{error}"))
        # Failed resource loads (an optional heat map) are console errors too; those are not bugs.
        self.page.on("console", lambda message: self.errors.append(f"console.error: {message.text}")
                     if message.type == "error" and not message.text.startswith("Failed to load resource") else None)

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def login(self, username: str, password: str) -> None:
        self.goto("/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        assert "/login/" not in self.page.url, f"sign-in as {username} failed"

    def shot(self, name: str, full_page: bool = True) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if full_page:
            self.page.evaluate("window.scrollTo(0, 0)")  # the sticky top bar stays on top
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def api(self, method: str, path: str, body=None) -> dict:
        """A fetch from the page, with the session cookie and CSRF token, as the UI makes it."""
        return self.page.evaluate(
            """async ([method, path, body]) => {
                const token = (document.cookie.match(/csrftoken=([^;]+)/) || [])[1];
                const r = await fetch(path, {method, credentials: 'same-origin',
                    headers: {'Content-Type': 'application/json', 'X-CSRFToken': token || ''},
                    body: body === null ? undefined : JSON.stringify(body)});
                let data = null; try { data = await r.json(); } catch (e) {}
                return {status: r.status, data};
            }""",
            [method, path, body],
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_session(browser, server):
    """``open_session(username, password)`` -> a signed-in Session; closed after the test, which
    fails if any page threw a JavaScript error."""
    sessions: list[Session] = []

    def open_(username: str, password: str) -> Session:
        session = Session(browser, server)
        session.login(username, password)
        sessions.append(session)
        return session

    yield open_
    errors = [e for s in sessions for e in s.errors]
    for session in sessions:
        session.close()
    assert not errors, "JavaScript errors in the pages:\n" + "\n".join(errors[:20])


def record_timings(name: str, values: dict) -> None:
    """Keep measured timings next to the screenshots (test-artifacts/browser-timings.json)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "browser-timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2) + "\n")
