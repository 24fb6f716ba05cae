"""A real Celery worker process consumes from the configured broker (embedded filesystem
broker by default, Redis with KARYO_TEST_SERVICES=1): no task_always_eager anywhere."""
from __future__ import annotations

import time

from backend.karyo.celery import app, ping
from tests.conftest import SERVICES


def test_the_app_is_not_eager_and_uses_the_expected_broker():
    assert not app.conf.task_always_eager
    assert app.conf.broker_url.startswith("redis://" if SERVICES else "filesystem://")


def test_a_worker_process_runs_a_task_and_returns_its_result(start_worker):
    start_worker()
    started = time.monotonic()
    assert ping.delay().get(timeout=30, interval=0.02) == "pong"
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        assert ping.delay().get(timeout=30, interval=0.02) == "pong"
        latencies.append(time.monotonic() - t0)
    # Printed for the record, not asserted: tests check behaviour, not time.
    print(f"first task {time.monotonic() - started:.2f}s, then {sum(latencies) / len(latencies) * 1000:.0f} ms per round trip")
