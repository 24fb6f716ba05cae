"""labelstudio's subscriptions to what lower apps announce; connected in ``LabelStudioConfig.ready()``."""
from __future__ import annotations

from .push import schedule_push


def on_queue_ranked(sender, *, project, model_version, **_kwargs) -> None:
    """ml.signals.queue_ranked: Label Studio shows the same order (its prediction scores). Only a
    queue ranked by a model has predictions to push; a no-op when Label Studio is not configured."""
    if model_version is not None:
        schedule_push(project=project)
