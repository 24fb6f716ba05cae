"""What the browser's correction workspace sends and receives: pure numpy, no Django.

Out (``editor_regions``): one Label Studio ``polygonlabels`` region per nucleus piece, with the
region ids of the geometry codec :mod:`backend.common.geometry` (``k<label>p<piece>``). The
outlines are traced once per piece and simplified to about one pixel: a 512x512 tile with 300
nuclei then holds ~8 points per nucleus instead of ~20, and Label Studio's editor (one MobX
node per point) opens it about twice as fast. They are for *display and editing* only.

In (``apply_edits``): the browser sends only what the pathologist changed — the regions of the
nuclei they added, reshaped or relabelled, the nuclei they deleted, and the groups they
merged — and the server applies that to the label map the editor was opened from. Nuclei
nobody touched keep their pixels exactly (their simplified outline is never rasterised), and
every polygon that *is* rasterised goes through the one rasterisation rule shared with the
Label Studio sync (:func:`backend.common.geometry.rasterize_polygon`).

Splitting a merged pair: draw an outline over one half; later outlines win where they
overlap, so that half becomes a new nucleus and the rest keeps the old id. Merging fragments:
select them and merge; they become one instance id.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backend.common import geometry

DISPLAY_TOLERANCE = 0.8  # pixels: the outline deviates at most this much from the traced one
MAX_REGIONS = 20_000
MAX_POINTS = 5_000


class EditError(ValueError):
    """The edit cannot be applied (bad region, unknown id ...); the message is for people."""


def editor_config(nucleus_classes: list[dict]) -> str:
    """Label Studio config of the embedded editor: the tile and one polygon label per class
    (no brush layer: thousands of brush masks are what freezes the browser)."""
    return geometry.labeling_config([(c["name"], c["color"]) for c in nucleus_classes])


def editor_regions(instances: np.ndarray, *, classes: dict | None, nucleus_classes: list[dict]) -> list[dict]:
    """Label Studio ``polygonlabels`` results, one per 4-connected piece of every nucleus (holes
    filled), larger first (a nucleus inside another's hole is drawn on top); outlines within
    ``DISPLAY_TOLERANCE`` of the exact ones."""
    names = {c["id"]: c["name"] for c in nucleus_classes}
    default = nucleus_classes[0]["name"]
    return geometry.polygon_results(
        instances, class_of=lambda label: names.get((classes or {}).get(str(label)), default), simplify=DISPLAY_TOLERANCE
    )


def with_scores(regions: list[dict], confidence: dict[str, float]) -> list[dict]:
    """The regions with Label Studio's per-region ``score`` (the model's confidence in the
    nucleus' class), for the nuclei that have one; the cached list is not modified."""
    out = []
    for region in regions:
        label = geometry.label_from_region_id(str(region.get("id") or ""))
        score = confidence.get(str(label)) if label is not None else None
        out.append(region if score is None else {**region, "score": score})
    return out


@dataclass
class EditResult:
    instances: np.ndarray
    classes: dict[str, int]
    changed: int = 0  # nuclei added, reshaped or relabelled
    deleted: int = 0
    merged: int = 0  # instance ids that disappeared into another by a merge
    untouched: int = 0
    new_ids: dict[str, int] = field(default_factory=dict)  # region id -> instance id given


def _points(region: dict, width: int, height: int) -> np.ndarray:
    value = region.get("value") if isinstance(region, dict) else None
    points = (value or {}).get("points")
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POINTS:
        raise EditError(f"region {region.get('id') if isinstance(region, dict) else '?'}: a polygon needs 3 to {MAX_POINTS} points")
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise EditError("polygon points must be [x%, y%] pairs of numbers") from None
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise EditError("polygon points must be [x%, y%] pairs of numbers")
    # Percent of the tile: a little outside is clipped by rasterisation, far outside is a bad request
    # (and 1e308 would overflow the conversion to pixels).
    if np.abs(array).max(initial=0.0) > 1000:
        raise EditError("polygon points are percentages of the tile: each coordinate must lie within -1000..1000")
    return geometry.from_percent(array.tolist(), width, height)


def apply_edits(
    base: np.ndarray,
    base_classes: dict | None,
    *,
    regions: list[dict],
    deleted: list,
    merges: list[list[str]],
    nucleus_classes: list[dict],
) -> EditResult:
    """The base label map with the browser's edits applied (see the module docstring).

    ``regions``: Label Studio polygon results of every nucleus that changed (all pieces of it)
    and of every new outline, in drawing order. A region id ``k<label>p<piece>`` (or the older
    ``n<label>``/``n<label>p<k>``) of a nucleus in ``base`` replaces that nucleus; any other id
    is a new nucleus.
    ``deleted``: instance ids (or region ids) removed. ``merges``: groups of region ids that
    become one nucleus (the first's id).
    """
    base = np.asarray(base)
    height, width = base.shape
    if not isinstance(regions, list) or len(regions) > MAX_REGIONS:
        raise EditError(f"regions must be a list of at most {MAX_REGIONS} polygons")
    by_name = {c["name"]: c["id"] for c in nucleus_classes}
    known_classes = {c["id"] for c in nucleus_classes}
    default_class = nucleus_classes[0]["id"]
    instances = base.astype(np.int32, copy=True)
    present = {int(v) for v in np.unique(instances) if v}
    classes = {int(k): int(v) for k, v in (base_classes or {}).items() if int(k) in present}
    next_id = max(present, default=0) + 1

    def label_of(value) -> int | None:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value) if value.isdigit() else geometry.label_from_region_id(value)
        return None

    removed = set()
    for value in deleted or []:
        label = label_of(value)
        if label is None:
            raise EditError(f"deleted: {value!r} is neither an instance id nor a region id")
        if label in present:
            removed.add(label)

    # Which label each sent region paints: its own (an existing nucleus) or a new one.
    assigned: list[tuple[int, np.ndarray, int]] = []
    repainted: set[int] = set()
    new_ids: dict[str, int] = {}
    for region in regions:
        if not isinstance(region, dict) or region.get("type", "polygonlabels") != "polygonlabels":
            raise EditError("every region must be a Label Studio polygonlabels result")
        points = _points(region, width, height)
        region_id = str(region.get("id") or "")
        label = geometry.label_from_region_id(region_id)
        if label is None or label not in present or label in removed:
            if region_id in new_ids:
                label = new_ids[region_id]
            else:
                label, next_id = next_id, next_id + 1
                new_ids[region_id or f"new-{label}"] = label
        else:
            repainted.add(label)
        names = (region.get("value") or {}).get("polygonlabels") or []
        class_id = by_name.get(names[0]) if names else None
        if class_id is None and names and isinstance(names[0], int) and names[0] in known_classes:
            class_id = names[0]
        assigned.append((label, points, class_id or default_class))

    if removed | repainted:
        instances[np.isin(instances, list(removed | repainted))] = 0
    for label in removed | repainted:
        classes.pop(label, None)
    for label, points, class_id in assigned:
        mask = geometry.rasterize_polygon(points, height, width)
        instances[mask] = label
        classes[label] = class_id

    merged = 0
    for group in merges or []:
        if not isinstance(group, list) or len(group) < 2:
            raise EditError("each merge is a list of at least two region ids")
        labels = []
        for value in group:
            label = new_ids.get(str(value)) if str(value) in new_ids else label_of(value)
            if label is None:
                raise EditError(f"merge: {value!r} is not a region of this tile")
            labels.append(label)
        target = labels[0]
        for label in labels[1:]:
            if label != target and (instances == label).any():
                instances[instances == label] = target
                classes.pop(label, None)
                merged += 1

    final = {int(v) for v in np.unique(instances) if v}
    classes = {label: cls for label, cls in classes.items() if label in final}
    for label in final - classes.keys():
        classes[label] = default_class
    touched = removed | repainted
    return EditResult(
        instances=instances,
        classes={str(k): v for k, v in sorted(classes.items())},
        changed=len({label for label, _, _ in assigned}),
        deleted=len(removed - {label for label, _, _ in assigned}),
        merged=merged,
        untouched=len(present - touched),
        new_ids=new_ids,
    )


# --- review: an annotation against the model's prediction -------------------------------------

def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[dict[int, int], dict[int, int], dict[tuple[int, int], int]]:
    """Areas of a's and b's instances and the pixel counts of every (a, b) overlapping pair."""
    a = a.astype(np.int64).ravel()
    b = b.astype(np.int64).ravel()
    area_a = {int(k): int(v) for k, v in zip(*np.unique(a[a > 0], return_counts=True))}
    area_b = {int(k): int(v) for k, v in zip(*np.unique(b[b > 0], return_counts=True))}
    both = (a > 0) & (b > 0)
    pairs = a[both] * (int(b.max(initial=0)) + 1) + b[both]
    keys, counts = np.unique(pairs, return_counts=True)
    scale = int(b.max(initial=0)) + 1
    inter = {(int(k // scale), int(k % scale)): int(c) for k, c in zip(keys, counts)}
    return area_a, area_b, inter


def compare(annotation: np.ndarray, reference: np.ndarray, *, match_iou: float = 0.5, same_iou: float = 0.95) -> dict:
    """How an annotation differs from the reference (the prediction it corrected): nuclei
    matched one to one (IoU >= 0.5), unchanged (IoU >= 0.95), reshaped, added, removed; and
    the pixel Dice of the two foregrounds."""
    area_a, area_b, inter = _overlaps(annotation, reference)
    candidates = sorted(
        ((count / (area_a[i] + area_b[j] - count), i, j) for (i, j), count in inter.items()), reverse=True
    )
    used_a, used_b, ious = set(), set(), []
    for iou, i, j in candidates:
        if iou < match_iou:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        ious.append(iou)
    fa, fb = annotation > 0, reference > 0
    total = int(fa.sum() + fb.sum())
    return {
        "nuclei": len(area_a),
        "reference_nuclei": len(area_b),
        "matched": len(ious),
        "unchanged": sum(iou >= same_iou for iou in ious),
        "reshaped": sum(iou < same_iou for iou in ious),
        "added": len(area_a) - len(used_a),
        "removed": len(area_b) - len(used_b),
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
        "pixel_dice": round(2.0 * int((fa & fb).sum()) / total, 4) if total else 1.0,
        "changed_pixels": int((fa != fb).sum() + ((annotation != 0) & (reference != 0) & ~_same_object(annotation, reference)).sum()),
    }


def _same_object(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel: do a's and b's instances there correspond (the pair with the largest overlap)?"""
    _, _, inter = _overlaps(a, b)
    best: dict[int, tuple[int, int]] = {}
    for (i, j), count in inter.items():
        if i not in best or count > best[i][1]:
            best[i] = (j, count)
    lut = np.zeros(int(a.max(initial=0)) + 1, dtype=np.int64)
    for i, (j, _) in best.items():
        lut[i] = j
    return lut[a] == b


def diff_image(rgb: np.ndarray, annotation: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The tile with what the annotator added (green), removed (red) and the outlines of the
    annotation (yellow) over those of the reference (cyan)."""
    from skimage.segmentation import find_boundaries

    out = rgb.astype(np.float32) * 0.85
    fa, fb = annotation > 0, reference > 0
    added, removed = fa & ~fb, fb & ~fa
    out[added] = 0.45 * out[added] + 0.55 * np.array([40, 200, 70])
    out[removed] = 0.45 * out[removed] + 0.55 * np.array([230, 40, 60])
    ref_edges = find_boundaries(reference, mode="inner") & fb
    ann_edges = find_boundaries(annotation, mode="inner") & fa
    out[ref_edges] = (0, 200, 255)
    out[ann_edges] = (255, 220, 0)
    return np.clip(out, 0, 255).astype(np.uint8)


def heat_overlay(uncertainty: np.ndarray) -> np.ndarray:
    """(H, W) uncertainty in [0, 1] -> RGBA heat map (transparent where certain)."""
    u = np.clip(np.asarray(uncertainty, dtype=np.float32), 0.0, 1.0)
    # A short "inferno"-like ramp: dark purple -> red -> yellow.
    stops = np.array([[40, 10, 90], [200, 40, 60], [250, 150, 20], [255, 240, 120]], dtype=np.float32)
    pos = u * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    alpha = np.clip(u * 1.6, 0, 0.85) * 255
    return np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.uint8)
