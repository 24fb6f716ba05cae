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


def on_members_changed(sender, *, project, **_kwargs) -> None:
    """projects.signals.members_changed: new editing members get their Label Studio user now
    (cpu queue) rather than at the next periodic sync."""
    from backend.common.jobs import enqueue_on_commit

    from .client import is_configured

    if is_configured():
        enqueue_on_commit("karyo.cpu.labelstudio_members", project.pk)
