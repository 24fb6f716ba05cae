"""Enqueue a Celery task by its registered name.

A service never imports its own app's ``tasks`` module: the tasks are thin shims that import the
services, so the reverse import would close a circle (it did: ml services <-> tasks, exports
services <-> tasks). The task name (``karyo.<queue>.<what>``) is the contract instead; the queue
routes and the beat schedule already address tasks by it. Each app's ``AppConfig.ready()``
imports its ``tasks`` module, so every name is registered in the web process as in the worker.
"""
from __future__ import annotations

from typing import Any

from celery import current_app
from celery.app.task import Task
from django.db import transaction


def task(name: str) -> Task:
    """The registered task ``name`` (Celery's Django fix-up makes Karyo's app the default app,
    so this is the same object in every thread)."""
    try:
        return current_app.tasks[name]
    except KeyError:
        raise LookupError(
            f"no Celery task named {name!r} is registered; its app's AppConfig.ready() imports its tasks module"
        ) from None


def enqueue_on_commit(name: str, *args: Any) -> None:
    """Send ``name(*args)`` once the current transaction commits (at once outside a transaction),
    so the worker never reads rows that are not there yet."""
    transaction.on_commit(lambda: task(name).delay(*args))
