"""Karyo <-> Label Studio formats: the labeling config, prediction results, annotation results.

No database access here: callers pass the project's nucleus classes and the arrays. The
geometry (polygons, percent coordinates, region ids, the config XML) is the one codec in
:mod:`backend.common.geometry`; this module holds the sync's choices on top of it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ml_worker import catalog

from backend.common import geometry
from backend.common.geometry import BACKGROUND, BRUSH, POLYGONS


def labeling_config(nucleus_classes: list[dict]) -> str:
    """The image, one polygon label per nucleus class (one polygon per nucleus: instance-aware
    and light for the browser) and an optional brush layer for touch-ups: a brush stroke with a
    class adds its pixels, ``background`` erases. Label Studio reads the tiles from Karyo's origin."""
    return geometry.labeling_config([(c["name"], c["color"]) for c in nucleus_classes], brush=True, cross_origin=True)


def config_sha(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()


def result_digest(result: list) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- out: instance mask -> polygons -----------------------------------------------------------

def prediction_result(instances: np.ndarray, *, classes: dict[str, int] | None, nucleus_classes: list[dict],
                      scores: dict[str, float] | None = None) -> list[dict]:
    """One ``polygonlabels`` region per nucleus (per piece, for the rare split nucleus), simplified
    yet rasterising back to the exact pixels, labelled with its class (``classes``: instance id ->
    class id; default the first class). ``scores`` (instance id -> the model's confidence in the
    nucleus' class) become Label Studio's per-region ``score``."""
    names = {c["id"]: c["name"] for c in nucleus_classes}
    default = nucleus_classes[0]["name"]
    result = geometry.polygon_results(
        instances, class_of=lambda label: names.get((classes or {}).get(str(label)), default), simplify="exact"
    )
    if scores:
        for region in result:
            label = geometry.label_from_region_id(region["id"])
            if label is not None and str(label) in scores:
                region["score"] = float(scores[str(label)])
    return result


# --- in: annotation result -> instance mask ---------------------------------------------------

@dataclass
class Conversion:
    instances: np.ndarray
    classes: dict[str, int]
    polygons: int
    brush_strokes: int
    ignored: int


def annotation_to_instances(result: list[dict], *, height: int, width: int, nucleus_classes: list[dict]) -> Conversion:
    """Rasterise an annotation's polygons (in order: a later polygon wins where two overlap),
    then apply the brush layer: a stroke with a class adds its pixels to the nucleus it touches
    most (or becomes a new nucleus), ``background`` strokes erase.

    Polygons Karyo sent (region id ``k<label>p<piece>``, or ``n<label>`` from before) keep their
    instance id; new ones get new ids.
    """
    by_name = {c["name"]: c["id"] for c in nucleus_classes}
    default_class = nucleus_classes[0]["id"]
    polygons = [r for r in result if r.get("type") == "polygonlabels" and r.get("from_name") == POLYGONS]
    brushes = [r for r in result if r.get("type") == "brushlabels" and r.get("from_name") == BRUSH]
    ignored = len(result) - len(polygons) - len(brushes)

    kept = {geometry.label_from_region_id(r.get("id", "")) for r in polygons} - {None}
    next_id = max(kept, default=0) + 1
    instances = np.zeros((height, width), dtype=np.int32)
    classes: dict[int, int] = {}
    for region in polygons:
        value = region.get("value") or {}
        points = value.get("points") or []
        if len(points) < 3:
            ignored += 1
            continue
        label = geometry.label_from_region_id(region.get("id", ""))  # k5p1 and k5p2: pieces of nucleus 5
        if label is None:
            label, next_id = next_id, next_id + 1
        mask = geometry.rasterize_polygon(geometry.from_percent(points, width, height), height, width)
        instances[mask] = label
        names = value.get("polygonlabels") or []
        classes[label] = by_name.get(names[0], default_class) if names else default_class

    for region in brushes:
        value = region.get("value") or {}
        if value.get("format", "rle") != "rle" or not value.get("rle"):
            ignored += 1
            continue
        stroke = geometry.brush_rle_to_mask(value["rle"], width, height)
        names = value.get("brushlabels") or []
        if names and names[0] == BACKGROUND:
            instances[stroke] = 0
            continue
        class_id = by_name.get(names[0], default_class) if names else default_class
        parts, count = ndimage.label(stroke)
        for part in range(1, count + 1):
            pixels = parts == part
            touched = instances[ndimage.binary_dilation(pixels)]
            touched = touched[touched > 0]
            if touched.size:
                label = int(np.bincount(touched).argmax())
            else:
                label, next_id = next_id, next_id + 1
                classes[label] = class_id
            instances[pixels & (instances == 0)] = label

    present = {int(v) for v in np.unique(instances) if v}
    return Conversion(
        instances=instances,
        classes={str(k): v for k, v in classes.items() if k in present},
        polygons=len(polygons), brush_strokes=len(brushes), ignored=ignored,
    )


# --- scores: Label Studio's order = Karyo's queue ---------------------------------------------

def scores_from_ranks(ranked_tile_ids: list[int]) -> dict[int, float]:
    """Queue position -> score in [0, 1): the first tile (most worth annotating) scores 0, and
    Label Studio's uncertainty sampling opens the lowest score first."""
    n = len(ranked_tile_ids)
    return {tile_id: round(i / max(n, 1), 6) for i, tile_id in enumerate(ranked_tile_ids)}


def scores_from_uncertainty(uncertainty: dict[int, float]) -> dict[int, float]:
    """score = 1 - normalised uncertainty (min-max over the model version's predictions), so the
    most uncertain tile scores 0. Equal uncertainties score 0.5."""
    if not uncertainty:
        return {}
    low, high = min(uncertainty.values()), max(uncertainty.values())
    if high - low < 1e-12:
        return {tile_id: 0.5 for tile_id in uncertainty}
    return {tile_id: round(1.0 - (u - low) / (high - low), 6) for tile_id, u in uncertainty.items()}


def uncertainty_value(uncertainty: dict, strategy: str) -> float:
    """The prediction's score that the project's strategy ranks by (the catalog's score key, e.g.
    ``entropy`` for ``hybrid``), else the mean of the scores it has."""
    key = catalog.score_key(strategy) if strategy in catalog.strategy_names() else strategy
    if isinstance(uncertainty.get(key), (int, float)):
        return float(uncertainty[key])
    values = [float(v) for v in uncertainty.values() if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else 0.0
