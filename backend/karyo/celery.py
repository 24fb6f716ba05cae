"""The Celery application. Tasks are thin shims in each app's ``tasks.py`` that take ids."""
from __future__ import annotations

import logging
import os
import sys

from celery import Celery
from celery.signals import worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "backend.karyo.settings")

app = Celery("karyo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="karyo.cpu.ping")
def ping() -> str:
    """Round trip used by health checks and tests to prove a worker is consuming."""
    return "pong"


@worker_shutdown.connect
def _exit_without_interpreter_teardown(sender=None, **_kwargs) -> None:
    """With ``KARYO_WORKER_FAST_EXIT=1`` (set by ``make run`` for its workers): once a warm
    shutdown is done (running tasks finished and acknowledged, the pool joined), leave at once.
    What would follow is only the interpreter's own teardown, which on this stack (Django,
    NumPy, PyTorch) spends seconds collecting a large heap and does nothing Karyo needs; it
    made an idle worker take 7-8 s to stop. Not for a worker embedded in another process."""
    if os.environ.get("KARYO_WORKER_FAST_EXIT") != "1":
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(getattr(sender, "exitcode", None) or 0)
