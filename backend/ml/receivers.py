"""ml's subscriptions to what lower apps announce; connected in ``MlConfig.ready()``."""
from __future__ import annotations

from . import services


def on_annotation_saved(sender, *, annotation, **_kwargs) -> None:
    """images.signals.annotation_saved: release the tile from the queue, enqueue the correction
    effort (cpu task), maybe start an auto-retrain run."""
    services.on_annotation_saved(annotation=annotation)
