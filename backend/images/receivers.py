"""images' answers to what lower apps ask; connected in ``ImagesConfig.ready()``."""
from __future__ import annotations


def classes_used_by_annotations(sender, *, project, class_ids: set[int], **_kwargs) -> set[int]:
    """projects.signals.class_usage: the classes among ``class_ids`` that an annotation version
    of the project assigns to a nucleus (versions are append-only, so old ones count too)."""
    from .models import Annotation

    used: set[int] = set()
    for mapping in Annotation.objects.filter(tile__project=project).exclude(classes={}).values_list("classes", flat=True):
        used.update(int(v) for v in mapping.values() if int(v) in class_ids)
        if used == class_ids:
            break
    return used


def on_annotation_saved(sender, *, annotation, **_kwargs) -> None:
    """images.signals.annotation_saved: an accepted version changes its image's stitched nuclei
    (``truth.py``); rebuild them on the cpu queue."""
    from backend.common.jobs import enqueue_on_commit

    from .services import accepted_statuses

    if annotation.status in accepted_statuses(annotation.tile.project):
        enqueue_on_commit("karyo.cpu.stitch_image", annotation.tile.image_id)  # images.tasks.stitch_image
