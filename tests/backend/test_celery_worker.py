"""A real Celery worker process consumes from the configured broker (embedded filesystem
broker by default, Redis with KARYO_TEST_SERVICES=1): no task_always_eager anywhere."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.karyo.celery import app, ping
from tests.conftest import SERVICES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker(tmp_path):
    log = open(tmp_path / "worker.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "backend.karyo", "worker", "-Q", "cpu,gpu", "--pool", "solo",
         "--hostname", f"test-{os.getpid()}@%h", "-l", "INFO", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log.seek(0)
        if "ready." in log.read():
            break
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"worker exited: {log.read()}")
        time.sleep(0.2)
    else:
        process.kill()
        log.seek(0)
        pytest.fail(f"worker never became ready: {log.read()}")
    yield process
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_the_app_is_not_eager_and_uses_the_expected_broker():
    assert not app.conf.task_always_eager
    assert app.conf.broker_url.startswith("redis://" if SERVICES else "filesystem://")


def test_a_worker_process_runs_a_task_and_returns_its_result(worker):
    started = time.monotonic()
    result = ping.delay()
    assert result.get(timeout=30, interval=0.02) == "pong"
    # Round trips after the first are quick once polling is tuned; printed, not asserted.
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        assert ping.delay().get(timeout=30, interval=0.02) == "pong"
        latencies.append(time.monotonic() - t0)
    print(f"first task {time.monotonic() - started:.2f}s, then {sum(latencies) / len(latencies) * 1000:.0f} ms per round trip")
