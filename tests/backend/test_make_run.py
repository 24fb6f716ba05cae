"""`make run`'s orchestrator, end to end: set-up, serving the demo, Ctrl-C, and a second run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tests.backend.conftest import _free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow



def start(var_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "KARYO_", "CELERY_"))}
    env.update(KARYO_VAR_DIR=str(var_dir), KARYO_PORT=str(port))
    return subprocess.Popen([sys.executable, "-m", "backend.karyo.runner"], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if process.poll() is not None:
            pytest.fail(f"runner exited early:\n{content}")
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"runner never printed {text!r}:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0


def test_make_run_serves_the_demo_and_stops_every_process_on_ctrl_c(tmp_path):
    port = _free_port()
    log = tmp_path / "run.log"
    runner = start(tmp_path / "var", port, log)
    try:
        output = wait_for(log, "ready in", runner)
        password = re.search(r"created admin account: admin / (\S+)", output).group(1)
        assert "seeded 'Demo: synthetic Pap smear'" in output
        base = f"http://127.0.0.1:{port}"
        assert json.load(urllib.request.urlopen(f"{base}/healthz", timeout=10)) == {"status": "ok"}
        token = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{base}/api/auth/token/", data=f"username=admin&password={password}".encode(), method="POST"), timeout=10))["token"]
        request = urllib.request.Request(f"{base}/api/projects/", headers={"Authorization": f"Token {token}"})
        projects = json.load(urllib.request.urlopen(request, timeout=10))["results"]
        names = {p["name"]: p for p in projects}
        assert names["Demo: synthetic Pap smear"]["tile_count"] == 32
        docs = urllib.request.urlopen(f"{base}/api/docs/", timeout=10).read().decode()
        assert "cdn.jsdelivr" not in docs  # the docs page works offline
    finally:
        stop(runner)
    assert f":{port}" not in subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout

    # A second run reuses everything: no new admin, no second demo.
    log2 = tmp_path / "run2.log"
    runner = start(tmp_path / "var", port, log2)
    try:
        output = wait_for(log2, "ready in", runner)
        assert "created admin account" not in output and "demo project 'Demo: synthetic Pap smear' exists" in output
    finally:
        stop(runner)
