"""Celery shims: they take ids and call the service."""
from __future__ import annotations

from celery import shared_task

from .services import run_export


@shared_task(name="karyo.cpu.export_dataset")
def export_dataset(export_id: int) -> str | None:
    export = run_export(export_id=export_id)
    return export.status if export is not None else None
