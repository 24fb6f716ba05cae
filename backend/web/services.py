"""Read models and actions behind the browser UI's own endpoints (backend.web.api)."""
from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.core.cache import cache
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Count, OuterRef, Subquery
from PIL import Image as PILImage

from backend.common.errors import Conflict, InvalidUpload
from backend.common.storage import read_bytes, read_label_map
from backend.images import margins
from backend.images import services as image_services
from backend.images.models import Annotation, AnnotationSource, AnnotationStatus, Image, Tile
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry, RunStatus, TrainingRun
from .activity import member_activity
from backend.projects.models import Project, Role
from ml_worker import catalog

from . import editing

# What the training form starts from: the engine catalog's defaults (torch-free, like the web server).
TRAIN_DEFAULTS = {option.name: option.default for option in (*catalog.TRAINING_OPTIONS, catalog.WIDTH_OPTION)}


# --- what the editor opens ---------------------------------------------------------------------

@dataclass
class EditorSource:
    kind: str  # "prediction" | "annotation" | "empty"
    instances: np.ndarray  # a label map of ``frame`` (the tile with its context margin, issue 12)
    classes: dict
    prediction: Prediction | None = None
    annotation: Annotation | None = None
    frame: margins.Frame | None = None


def active_prediction(tile: Tile) -> Prediction | None:
    """The tile's prediction by the project's active model (else by the newest model)."""
    predictions = Prediction.objects.filter(tile=tile).select_related("model_version")
    return (predictions.filter(model_version__status=ModelStatus.ACTIVE).first()
            or predictions.order_by("-model_version__version").first())


def editor_source(tile: Tile, *, source: str = "auto", annotation_id: int | None = None) -> EditorSource:
    """What the correction workspace starts from: by default the active model's prediction,
    unless someone annotated the tile after it was predicted (then their latest version);
    ``source`` forces ``prediction``, ``annotation`` (``annotation_id`` or the latest) or ``empty``."""
    if source not in ("auto", "prediction", "annotation", "empty"):
        raise InvalidUpload("source is auto, prediction, annotation or empty", code="invalid_parameter")
    # The editor shows the tile with its context margin: a version's nuclei whole (those made in
    # the frame) or its tile box (older ones), placed in that frame.
    frame = margins.context_frame(tile=tile)
    empty = EditorSource("empty", np.zeros((frame.h, frame.w), np.int32), {}, frame=frame)
    if source == "empty":
        return empty
    annotations = tile.annotations.select_related("author").order_by("-version")
    if annotation_id is not None:
        annotation = annotations.filter(pk=annotation_id).first()
        if annotation is None:
            raise InvalidUpload("annotation must be a version of this tile", code="invalid_parameter")
    else:
        annotation = annotations.first()
    prediction = active_prediction(tile) if source in ("auto", "prediction") else None
    if source == "prediction" and prediction is None:
        raise Conflict("this tile has no prediction yet: no model has been trained and promoted", code="no_prediction")
    if source == "annotation" and annotation is None:
        raise Conflict("this tile has no annotation yet", code="no_annotation")
    use_annotation = annotation is not None and (
        source == "annotation" or annotation_id is not None
        or (source == "auto" and (prediction is None or annotation.created_at > prediction.created_at))
    )
    if use_annotation:
        return EditorSource("annotation", margins.version_in_frame(annotation, frame=frame),
                            dict(annotation.classes or {}), annotation=annotation, frame=frame)
    if prediction is not None:
        return EditorSource("prediction", margins.version_in_frame(prediction, frame=frame), prediction.class_ids(),
                            prediction=prediction, frame=frame)
    return empty


def editor_payload(tile: Tile, *, source: str = "auto", annotation_id: int | None = None) -> dict:
    started = time.perf_counter()
    chosen = editor_source(tile, source=source, annotation_id=annotation_id)
    classes = tile.project.nucleus_classes
    version = chosen.annotation or chosen.prediction
    mask_name = ((version.context_mask.name or version.mask.name) if version is not None else "")
    frame = chosen.frame
    key = (f"karyo-web:regions:v2:{mask_name}:{frame.x},{frame.y},{frame.w},{frame.h}:"
           f"{hash(str(sorted((chosen.classes or {}).items())))}:{hash(str(classes))}")
    result = cache.get(key) if mask_name else None
    if result is None:
        result = editing.editor_regions(chosen.instances, classes=chosen.classes, nucleus_classes=classes)
        if mask_name:
            cache.set(key, result, 3600)
    prediction, annotation = chosen.prediction, chosen.annotation
    if prediction is not None and chosen.kind == "prediction" and prediction.classes:
        result = editing.with_scores(result, prediction.class_confidences())
    return {
        "tile": {"id": tile.pk, "image": tile.image_id, "image_name": tile.image.name, "x": tile.x, "y": tile.y,
                 "w": tile.w, "h": tile.h, "image_url": f"/api/tiles/{tile.pk}/context.png?editor=1"},
        # The editor's picture and its regions' percentages are of this frame (the tile with its
        # context margin); a submit sends it back (``submit_edits``).
        "frame": {**frame.as_dict(), "margin": int(tile.project.context_margin)},
        "source": chosen.kind,
        "prediction": None if prediction is None else {
            "id": prediction.pk, "model_version": prediction.model_version_id,
            "version": prediction.model_version.version, "architecture": prediction.model_version.architecture,
            "nucleus_count": prediction.nucleus_count, "created_at": prediction.created_at,
            "typed": bool(prediction.classes),
        },
        "annotation": None if annotation is None else {
            "id": annotation.pk, "version": annotation.version, "status": annotation.status,
            "author": annotation.author.username if annotation.author else None, "nucleus_count": annotation.nucleus_count,
        },
        "nucleus_classes": classes,
        "config": editing.editor_config(classes),
        "result": result,
        "nuclei": int(len(np.unique(chosen.instances)) - (1 if (chosen.instances == 0).any() else 0)),
        "label_studio": label_studio_links(project=tile.project, tile=tile),
        "server_ms": round((time.perf_counter() - started) * 1000, 1),
    }


def submit_edits(*, tile: Tile, user, data: dict) -> tuple[Annotation, editing.EditResult, float]:
    """Apply the workspace's edits to the version it was opened from; store a new version."""
    started = time.perf_counter()
    base = data.get("base") or {}
    kind = base.get("kind", "empty")
    if kind in ("prediction", "annotation") and (isinstance(base.get("id"), bool) or not isinstance(base.get("id"), int)):
        raise InvalidUpload(f"base.id: the {kind} id must be an integer", code="invalid_base")
    frame = _submitted_frame(tile, data.get("frame"))

    def in_frame(version) -> np.ndarray:
        return margins.version_in_frame(version, frame=frame) if frame is not None else read_label_map(version.mask.name)

    prediction = annotation = None
    if kind == "prediction":
        prediction = Prediction.objects.filter(pk=base.get("id"), tile=tile).select_related("model_version").first()
        if prediction is None:
            raise InvalidUpload("base: that prediction does not belong to this tile", code="invalid_base")
        instances, classes = in_frame(prediction), prediction.class_ids()
    elif kind == "annotation":
        annotation = Annotation.objects.filter(pk=base.get("id"), tile=tile).first()
        if annotation is None:
            raise InvalidUpload("base: that annotation is not a version of this tile", code="invalid_base")
        instances, classes = in_frame(annotation), dict(annotation.classes or {})
    elif kind == "empty":
        instances, classes = np.zeros((frame.h, frame.w) if frame is not None else (tile.h, tile.w), np.int32), {}
    else:
        raise InvalidUpload("base.kind is prediction, annotation or empty", code="invalid_base")
    status = data.get("status", AnnotationStatus.SUBMITTED)
    if status not in (AnnotationStatus.SUBMITTED, AnnotationStatus.DRAFT):
        raise InvalidUpload("status is submitted or draft", code="invalid_status")
    try:
        result = editing.apply_edits(
            instances, classes, regions=data.get("regions") or [], deleted=data.get("deleted") or [],
            merges=data.get("merges") or [], nucleus_classes=tile.project.nucleus_classes,
        )
    except editing.EditError as exc:
        raise InvalidUpload(str(exc), code="invalid_edit") from None
    if result.instances.max(initial=0) > 65535:
        raise InvalidUpload("too many nuclei for a 16-bit label map", code="invalid_edit")
    if prediction is None and annotation is not None and annotation.prediction_id:
        prediction = annotation.prediction  # a correction of a correction still descends from the prediction
    source = AnnotationSource.CORRECTED_PREDICTION if kind == "prediction" else AnnotationSource.MANUAL
    if frame is not None:  # the nuclei the tile owns, whole; the neighbours' are theirs (ownership rule)
        stored, _ = image_services.create_frame_annotation(
            tile=tile, frame=frame, instances=result.instances, author=user, source=source, status=status,
            parent=annotation, prediction=prediction, classes=result.classes,
        )
    else:  # a client that edits the tile box only (percentages of the tile)
        stored, _ = image_services.create_annotation(
            tile=tile, instances=result.instances, author=user, source=source, status=status,
            parent=annotation, prediction=prediction, classes=result.classes,
        )
    if status == AnnotationStatus.SUBMITTED:
        _record_submission(tile=tile, user=user, annotation=stored, seconds=data.get("seconds_spent"))
    return stored, result, (time.perf_counter() - started) * 1000


def _submitted_frame(tile: Tile, sent) -> margins.Frame | None:
    """The context frame the editor was opened in (its regions are percentages of it); None for a
    client that sends percentages of the tile box. A frame that is no longer the tile's (the
    project's context margin changed meanwhile) is refused rather than misread."""
    if sent in (None, {}):
        return None
    frame = margins.context_frame(tile=tile)
    try:
        same = all(int(sent[k]) == getattr(frame, k) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        raise InvalidUpload("frame: {x, y, w, h} of the context frame the editor was opened in",
                            code="invalid_frame") from None
    if not same:
        raise Conflict("the tile's context frame changed since the editor opened (context margin); reopen the tile",
                       code="frame_changed")
    return frame


def _record_submission(*, tile: Tile, user, annotation: Annotation, seconds: int | None) -> None:
    """The activity feed entry; its ``seconds`` add up to the member's time spent on the dashboard."""
    from backend.ml import events
    from .activity import SUBMITTED_EVENT

    project_id, name = tile.project_id, getattr(user, "username", "someone")
    transaction.on_commit(lambda: events.record(
        project_id, SUBMITTED_EVENT, f"{name} submitted tile {tile.pk} (version {annotation.version})", actor=user,
        tile=tile.pk, annotation=annotation.pk, seconds=seconds,
    ))


# --- overlays -----------------------------------------------------------------------------------

def png_of(array: np.ndarray, *, size: int | None = None) -> bytes:
    image = PILImage.fromarray(array)
    if size and max(image.size) > size:
        image.thumbnail((size, size), PILImage.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def uncertainty_map(prediction: Prediction) -> np.ndarray | None:
    """(H, W) float uncertainty in [0, 1] stored next to the prediction's mask, if any."""
    from backend.ml.workflows import uncertainty_name

    name = uncertainty_name(prediction.mask.name)
    if not default_storage.exists(name):
        return None
    return np.asarray(PILImage.open(io.BytesIO(read_bytes(name))).convert("L"), dtype=np.float32) / 255.0


# --- review -------------------------------------------------------------------------------------

def review_queryset(*, project: Project, status: str = "submitted"):
    """The newest version of every tile, filtered by its status (default: awaiting review)."""
    if status not in ("submitted", "reviewed", "rejected", "draft", "any"):
        raise InvalidUpload("status is submitted, reviewed, rejected, draft or any", code="invalid_parameter")
    newest = Annotation.objects.filter(tile=OuterRef("tile")).order_by("-version").values("id")[:1]
    queryset = (Annotation.objects.filter(tile__project=project).filter(id=Subquery(newest))
                .select_related("author", "reviewed_by", "tile", "tile__image"))
    queryset = queryset.exclude(source=AnnotationSource.IMPORTED) if status == "submitted" else queryset
    if status != "any":
        queryset = queryset.filter(status=status)
    return queryset.order_by("created_at" if status == "submitted" else "-created_at")


def diff_reference(annotation: Annotation) -> tuple[str, Any, np.ndarray] | None:
    """What an annotation is compared with: the prediction it corrected, else the tile's
    prediction by the active model, else the version it was made from."""
    prediction = annotation.prediction or active_prediction(annotation.tile)
    if prediction is not None:
        return "prediction", prediction, read_label_map(prediction.mask.name)
    if annotation.parent_id:
        return "annotation", annotation.parent, read_label_map(annotation.parent.mask.name)
    return None


# --- dashboard ----------------------------------------------------------------------------------

def project_summary(*, project: Project, role: str | None) -> dict:
    from backend.ml.api import ModelVersionSerializer, TrainingRunSerializer

    latest = Annotation.objects.filter(tile=OuterRef("pk")).order_by("-version")
    tiles = Tile.objects.filter(project=project).annotate(status=Subquery(latest.values("status")[:1]))
    by_status = dict(tiles.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    tile_count = sum(by_status.values())
    unlabelled = by_status.pop(None, 0)
    queue = QueueEntry.objects.filter(project=project)
    first = queue.order_by("rank").select_related("model_version").first()
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    live = TrainingRun.objects.filter(project=project, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).first()
    last_run = TrainingRun.objects.filter(project=project).first()
    label_studio = label_studio_links(project=project)
    defaults = {**TRAIN_DEFAULTS, **(project.training_defaults or {})}
    return {
        "project": {
            "id": project.pk, "name": project.name, "description": project.description,
            "nucleus_classes": project.nucleus_classes, "tile_size": project.tile_size,
            "default_architecture": project.default_architecture, "al_strategy": project.al_strategy,
            "require_review": project.require_review, "auto_retrain_threshold": project.auto_retrain_threshold,
            "training_defaults": project.training_defaults, "stain_normalization": project.stain_normalization,
            "my_role": role,
        },
        "counts": {
            "images": Image.objects.filter(project=project).count(),
            "tiles": tile_count,
            "unlabelled": unlabelled,
            "annotated": tile_count - unlabelled,
            "draft": by_status.get(AnnotationStatus.DRAFT, 0),
            "submitted": by_status.get(AnnotationStatus.SUBMITTED, 0),
            "reviewed": by_status.get(AnnotationStatus.REVIEWED, 0),
            "rejected": by_status.get(AnnotationStatus.REJECTED, 0),
            "predicted": Prediction.objects.filter(tile__project=project, model_version=active).count() if active else 0,
        },
        "queue": {
            "size": queue.count(),
            "leased": queue.filter(leased_by__isnull=False).count(),
            "strategy": first.strategy if first else None,
            "model_version": first.model_version.version if first and first.model_version else None,
        },
        "active_model": ModelVersionSerializer(active).data if active else None,
        "live_run": TrainingRunSerializer(live).data if live else None,
        "last_run": TrainingRunSerializer(last_run).data if last_run else None,
        "label_studio": label_studio,
        "training_form": {
            "architectures": catalog.architecture_names(), "losses": catalog.training_loss_names(),
            "stain_norms": catalog.stain_normalizer_names(), "augment": catalog.augment_preset_names(),
            "defaults": defaults,
            "default_architecture": project.default_architecture,
        },
        "strategies": catalog.strategy_names(),
        "activity": member_activity(project=project) if role in (Role.REVIEWER, Role.ADMIN) else None,
    }


def image_tiles(*, project: Project) -> list[dict]:
    """Images with the annotation status of each of their tiles, for the dashboard grid."""
    latest = Annotation.objects.filter(tile=OuterRef("pk")).order_by("-version")
    rows = (Tile.objects.filter(project=project).annotate(status=Subquery(latest.values("status")[:1]),
                                                          version=Subquery(latest.values("version")[:1]))
            .values("id", "image_id", "x", "y", "w", "h", "status", "version").order_by("image_id", "y", "x"))
    images = {i.pk: {"id": i.pk, "name": i.name, "width": i.width, "height": i.height, "tiles": []}
              for i in Image.objects.filter(project=project).order_by("id")}
    for row in rows:
        image = images.get(row.pop("image_id"))
        if image is not None:
            image["tiles"].append(row)
    return list(images.values())


# --- platform status ----------------------------------------------------------------------------

_worker_lock = threading.Lock()
_worker_state: dict[str, Any] = {"checked": 0.0, "value": None}
WORKER_CACHE_SECONDS = 10.0
WORKER_OFFLINE_CACHE_SECONDS = 3.0


def worker_status(*, refresh: bool = False) -> dict:
    """Whether a Celery worker answers a ping (cached a few seconds: a ping waits 1 s when none does)."""
    from celery import current_app as app  # Karyo's app (Celery's Django fix-up makes it the default)

    with _worker_lock:
        # A worker that answered is trusted for a while; "offline" is re-checked sooner.
        ttl = WORKER_CACHE_SECONDS if (_worker_state["value"] or {}).get("online") else WORKER_OFFLINE_CACHE_SECONDS
        fresh = time.monotonic() - _worker_state["checked"] < ttl
        if _worker_state["value"] is not None and fresh and not refresh:
            return _worker_state["value"]
        try:
            replies = app.control.ping(timeout=1.0) or []
            names = sorted(name for reply in replies for name in reply)
            value = {"online": bool(names), "workers": names, "error": None}
        except Exception as exc:  # the broker itself is down
            value = {"online": False, "workers": [], "error": f"{type(exc).__name__}: {exc}"}
        if not value["online"]:
            # A worker with a single-threaded pool cannot answer while it trains; its run's
            # heartbeat says it is alive.
            from datetime import timedelta

            from django.utils import timezone

            recent = timezone.now() - timedelta(seconds=3 * 5)
            if TrainingRun.objects.filter(status=RunStatus.RUNNING, heartbeat_at__gte=recent).exists():
                value = {"online": True, "workers": ["(busy training)"], "error": None}
        _worker_state.update(checked=time.monotonic(), value=value)
        return value


def label_studio_links(*, project: Project, tile: Tile | None = None) -> dict:
    """Whether a Label Studio server is connected, and the project's (and tile's task) page there."""
    from backend.labelstudio.client import is_configured
    from backend.labelstudio.models import LabelStudioLink, TaskLink

    info: dict[str, Any] = {"configured": is_configured(), "url": None, "task_url": None}
    link = LabelStudioLink.objects.filter(project=project).first() if info["configured"] else None
    if link is None or not link.ls_project_id or not settings.LABEL_STUDIO_URL:
        return info
    base = f"{settings.LABEL_STUDIO_URL.rstrip('/')}/projects/{link.ls_project_id}"
    info["url"] = f"{base}/data"
    task = TaskLink.objects.filter(link=link, tile=tile).first() if tile is not None else None
    if task is not None:
        info["task_url"] = f"{base}/data?task={task.ls_task_id}"
    return info
