"""Celery tasks of the images app: thin shims that take ids; the work is in ``ingest``."""
from __future__ import annotations

from celery import shared_task

from . import ingest, truth


@shared_task(name="karyo.cpu.ingest_image", acks_late=True)
def ingest_image(image_id: int) -> str:
    return ingest.run_ingest(image_id=image_id)


@shared_task(name="karyo.cpu.stitch_image", acks_late=True)
def stitch_image(image_id: int) -> str:
    return truth.run_stitch(image_id=image_id)
