"""Karyo <-> Label Studio formats: the labeling config, prediction results, annotation results.

No database access here: callers pass the project's nucleus classes and the arrays.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import numpy as np
from scipy import ndimage

from . import geometry

IMAGE = "image"
POLYGONS = "nuclei"
BRUSH = "touchup"
BACKGROUND = "background"


def labeling_config(nucleus_classes: list[dict]) -> str:
    """The image, one polygon label per nucleus class (one polygon per nucleus: instance-aware
    and light for the browser) and an optional brush layer for touch-ups: a brush stroke with a
    class adds its pixels, ``background`` erases."""
    labels = "\n".join(
        f"    <Label value={quoteattr(c['name'])} background={quoteattr(c['color'])}/>" for c in nucleus_classes
    )
    return (
        "<View>\n"
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true" zoomControl="true" rotateControl="false"'
        ' crossOrigin="anonymous"/>\n'
        f'  <PolygonLabels name="{POLYGONS}" toName="{IMAGE}" strokeWidth="1" pointSize="small" opacity="0.25">\n'
        f"{labels}\n"
        "  </PolygonLabels>\n"
        f'  <BrushLabels name="{BRUSH}" toName="{IMAGE}">\n'
        f"{labels}\n"
        f'    <Label value="{BACKGROUND}" background="#000000"/>\n'
        "  </BrushLabels>\n"
        "</View>\n"
    )


def config_sha(config: str) -> str:
    return hashlib.sha256(config.encode()).hexdigest()


def result_digest(result: list) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- out: instance mask -> polygons -----------------------------------------------------------

def prediction_result(instances: np.ndarray, *, classes: dict[str, int] | None, nucleus_classes: list[dict]) -> list[dict]:
    """One ``polygonlabels`` region per nucleus (per part, for the rare split nucleus)."""
    height, width = instances.shape
    names = {c["id"]: c["name"] for c in nucleus_classes}
    default = nucleus_classes[0]["name"]
    result = []
    for region in geometry.mask_to_regions(instances):
        class_id = (classes or {}).get(str(region.label))
        result.append({
            "id": geometry.region_id(region),
            "type": "polygonlabels",
            "from_name": POLYGONS,
            "to_name": IMAGE,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {"points": region.percent, "closed": True, "polygonlabels": [names.get(class_id, default)]},
        })
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

    Polygons Karyo sent (region id ``n<label>``) keep their instance id; new ones get new ids.
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
        label = geometry.label_from_region_id(region.get("id", ""))  # n5 and n5p1: parts of nucleus 5
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
    """The prediction's uncertainty under the project's strategy, else the mean of what it has."""
    if isinstance(uncertainty.get(strategy), (int, float)):
        return float(uncertainty[strategy])
    values = [float(v) for v in uncertainty.values() if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else 0.0
