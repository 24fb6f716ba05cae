"""What the slide viewer draws over a slide: its tile grid (status, queue score) and the nuclei
in the viewport (the latest accepted annotation of each tile, else the active model's
prediction), as outlines in level-0 pixel coordinates.

Here, in the top app, because it reads both images (tiles, annotations) and ml (queue,
predictions).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from django.db.models import OuterRef, Subquery
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from backend.common.errors import InvalidUpload
from backend.common.geometry import mask_to_regions
from backend.common.storage import read_label_map
from backend.images.models import Annotation, Image, Tile
from backend.images.pixels import level0_per_working_pixel
from backend.images.serializers import NucleiSerializer, SlideTileSerializer
from backend.images.services import accepted_statuses
from backend.images.slide_api import image_for
from backend.ml.models import ModelStatus, ModelVersion, Prediction, QueueEntry

MAX_NUCLEI = 50_000
DEFAULT_NUCLEI = 5_000
OUTLINE_TOLERANCE = 0.75  # pixels: display outlines, light to send and draw
MAX_AGE = 30  # seconds: annotations and predictions change while people work
_outlines: OrderedDict[str, list] = OrderedDict()
_outlines_lock = threading.Lock()


def slide_tiles(*, image: Image) -> list[dict]:
    """Every tile of ``image``: level-0 box, status (latest annotation's, else ``queued`` or
    ``unlabelled``) and queue score."""
    latest = Annotation.objects.filter(tile=OuterRef("pk")).order_by("-version")
    queue = QueueEntry.objects.filter(tile=OuterRef("pk"))
    rows = (
        Tile.objects.filter(image=image)
        .annotate(annotation_status=Subquery(latest.values("status")[:1]), score=Subquery(queue.values("score")[:1]))
        .order_by("y", "x")
        .values("id", "x", "y", "w", "h", "annotation_status", "score")
    )
    scale = level0_per_working_pixel(image, working_mpp=image.project.working_mpp)
    out = []
    for row in rows:
        status = row["annotation_status"] or ("queued" if row["score"] is not None else "unlabelled")
        out.append({"id": row["id"], "x": row["x"], "y": row["y"], "w": round(row["w"] * scale),
                    "h": round(row["h"] * scale), "status": status, "score": row["score"]})
    return out


def _outline_regions(mask_name: str) -> list:
    """(instance id, points) per piece of a stored label map; cached (stored masks never change)."""
    with _outlines_lock:
        cached = _outlines.get(mask_name)
        if cached is not None:
            _outlines.move_to_end(mask_name)
            return cached
    regions = [(r.label, r.points) for r in mask_to_regions(read_label_map(mask_name), simplify=OUTLINE_TOLERANCE)]
    with _outlines_lock:
        _outlines[mask_name] = regions
        while len(_outlines) > 2048:
            _outlines.popitem(last=False)
    return regions


def viewport_nuclei(*, image: Image, x: int, y: int, w: int, h: int, limit: int) -> dict:
    """Nuclei of the tiles that intersect the level-0 box (x, y, w, h), at most ``limit``."""
    project = image.project
    scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
    extent = int(np.ceil(project.tile_size * scale))
    tiles = list(
        Tile.objects.filter(image=image, x__lt=x + w, y__lt=y + h, x__gt=x - extent, y__gt=y - extent).order_by("y", "x")
    )
    tiles = [t for t in tiles if t.x + t.w * scale > x and t.y + t.h * scale > y]
    tile_ids = [t.pk for t in tiles]
    annotations: dict[int, Annotation] = {}
    for annotation in Annotation.objects.filter(tile_id__in=tile_ids, status__in=accepted_statuses(project)).order_by(
        "tile_id", "-version"
    ):
        annotations.setdefault(annotation.tile_id, annotation)
    active = ModelVersion.objects.filter(project=project, status=ModelStatus.ACTIVE).first()
    predictions = {}
    if active is not None:
        predictions = {p.tile_id: p for p in Prediction.objects.filter(model_version=active, tile_id__in=tile_ids)}
    default_class = project.nucleus_classes[0]["id"]
    nuclei, sources, truncated = [], set(), False
    for tile in tiles:
        annotation = annotations.get(tile.pk)
        stored = annotation if annotation is not None else predictions.get(tile.pk)
        if stored is None:
            continue
        classes, source = (annotation.classes or {}, "annotation") if annotation is not None else ({}, "prediction")
        # The nuclei the tile owns, whole (issue 12: context_mask, offset from the tile's origin), else its box.
        mask_name, offset = ((stored.context_mask.name, (stored.context_x, stored.context_y)) if stored.context_mask
                             else (stored.mask.name, (0, 0)))
        sources.add(source)
        for label, points in _outline_regions(mask_name):
            if len(nuclei) >= limit:
                truncated = True
                break
            polygon = np.round((points + offset) * scale + (tile.x, tile.y), 1).tolist()
            nuclei.append({"id": tile.pk * 65536 + int(label), "tile_id": tile.pk,
                           "class_id": int(classes.get(str(label), default_class)), "source": source,
                           "polygon": polygon})
        if truncated:
            break
    source = None if not sources else (sources.pop() if len(sources) == 1 else "mixed")
    return {"source": source, "nuclei": nuclei, "truncated": truncated}


def _int_param(request, name: str, *, default: int | None = None, minimum: int = 0, maximum: int = 10**9) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise InvalidUpload(f"{name} is required", code="invalid_parameter")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidUpload(f"{name} must be an integer", code="invalid_parameter") from None
    if not minimum <= value <= maximum:
        raise InvalidUpload(f"{name} must be between {minimum} and {maximum}", code="invalid_parameter")
    return value


def _private(response: Response, max_age: int = MAX_AGE) -> Response:
    response["Cache-Control"] = f"private, max-age={max_age}"
    return response


class SlideTilesView(APIView):
    @extend_schema(responses=SlideTileSerializer(many=True))
    def get(self, request, image_id: int):
        """The slide's tile grid (level-0 boxes) with each tile's status and queue score."""
        image = image_for(request, image_id)
        return _private(Response(slide_tiles(image=image)))


class SlideNucleiView(APIView):
    @extend_schema(
        parameters=[OpenApiParameter(n, int, description=d) for n, d in (
            ("x", "viewport left, level-0 px"), ("y", "viewport top, level-0 px"), ("w", "viewport width, level-0 px"),
            ("h", "viewport height, level-0 px"), ("limit", f"most nuclei returned (default {DEFAULT_NUCLEI})"))],
        responses=NucleiSerializer,
    )
    def get(self, request, image_id: int):
        """Nucleus outlines (level-0 px) of the tiles in the viewport: the latest accepted
        annotation of each tile, else the active model's prediction."""
        image = image_for(request, image_id)
        x = _int_param(request, "x", default=0)
        y = _int_param(request, "y", default=0)
        w = _int_param(request, "w", default=image.width, minimum=1)
        h = _int_param(request, "h", default=image.height, minimum=1)
        limit = _int_param(request, "limit", default=DEFAULT_NUCLEI, minimum=1, maximum=MAX_NUCLEI)
        return _private(Response(viewport_nuclei(image=image, x=x, y=y, w=w, h=h, limit=limit)))

