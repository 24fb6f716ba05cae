"""Celery shims: they take ids and call the service."""
from __future__ import annotations

from backend.karyo.celery import app


@app.task(name="karyo.cpu.export_dataset")
def export_dataset(export_id: int) -> str | None:
    from .services import run_export

    export = run_export(export_id=export_id)
    return export.status if export is not None else None
