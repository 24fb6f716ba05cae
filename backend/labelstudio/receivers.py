"""labelstudio's subscriptions to what lower apps announce; connected in ``LabelStudioConfig.ready()``."""
from __future__ import annotations

from .push import schedule_push


def on_queue_ranked(sender, *, project, model_version, **_kwargs) -> None:
    """ml.signals.queue_ranked: Label Studio shows the same order (its prediction scores). Only a
    queue ranked by a model has predictions to push; a no-op when Label Studio is not configured."""
    if model_version is not None:
        schedule_push(project=project)


def on_annotation_saved(sender, *, annotation, **_kwargs) -> None:
    """images.signals.annotation_saved: a version made in Karyo appears in Label Studio as an
    annotation of its author (versions that came from Label Studio are not sent back)."""
    from .members import schedule_annotation_push

    schedule_annotation_push(annotation=annotation)
