"""Provenance of exported tiles (lineage, pre-annotation, corrections) and the dataset card."""
from __future__ import annotations

import numpy as np

from .formats import LOSSES


def lineage(annotation_id: int, history: dict[int, dict]) -> list[dict]:
    """The exported version and its ancestors, oldest first."""
    chain, seen = [], set()
    current = history.get(annotation_id)
    while current is not None and current["id"] not in seen:
        seen.add(current["id"])
        chain.append(current)
        current = history.get(current["parent_id"]) if current["parent_id"] else None
    return chain[::-1]


def prediction_changes(predicted: np.ndarray, annotated: np.ndarray) -> dict:
    """How much a person changed a model's pre-annotation.

    Instances are matched one to one at IoU > 0.5. ``pixels_changed`` counts the pixels whose
    nucleus changed: background <-> nucleus, or a nucleus that is not the matched counterpart.
    """
    if predicted.shape != annotated.shape:
        return {"pixels_changed": None, "instances_added": None, "instances_removed": None, "instances_matched": None}
    pred = predicted.astype(np.int64).ravel()
    ann = annotated.astype(np.int64).ravel()
    n_ann = int(ann.max(initial=0)) + 1
    keys, inter = np.unique(pred * n_ann + ann, return_counts=True)  # sparse contingency table
    p_ids, a_ids = keys // n_ann, keys % n_ann
    area_p, area_a = np.bincount(pred), np.bincount(ann)
    background = int(inter[(p_ids == 0) & (a_ids == 0)].sum())
    both = (p_ids > 0) & (a_ids > 0)
    p_ids, a_ids, inter = p_ids[both], a_ids[both], inter[both]
    iou = inter / (area_p[p_ids] + area_a[a_ids] - inter)
    matched = iou > 0.5  # at most one partner each at IoU > 0.5
    unchanged = background + int(inter[matched].sum())
    present_pred = int((area_p[1:] > 0).sum())
    present_ann = int((area_a[1:] > 0).sum())
    return {
        "pixels_changed": int(pred.size - unchanged),
        "instances_added": present_ann - int(matched.sum()),
        "instances_removed": present_pred - int(matched.sum()),
        "instances_matched": int(matched.sum()),
    }


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_LOADING = {
    "png": "```python\nfrom PIL import Image\nimport numpy as np\nimage = np.asarray(Image.open('images/NAME.png'))\n"
           "instances = np.asarray(Image.open('masks/NAME.png'))  # uint16, 0 = background\n```",
    "coco": "```python\nfrom pycocotools.coco import COCO\ncoco = COCO('annotations/instances.json')\n"
            "mask = coco.annToMask(coco.loadAnns(coco.getAnnIds())[0])\n```",
    "pannuke": "```python\nimport numpy as np\nimages = np.load('images.npy')  # (N, H, W, 3) uint8\n"
               "masks = np.load('masks.npy')  # (N, H, W, C+1): instance ids per class, last = background\n```",
    "labelstudio": "Create a Label Studio project with `label_config.xml`, serve `images/` (local file storage) "
                   "and import `tasks.json`.",
    "geojson": "Open `images/NAME.png` in QuPath and drag `geojson/NAME.geojson` onto it "
               "(or File > Import objects from file).",
}


def dataset_card(manifest: dict) -> str:
    """README.md of an export: what it is, counts per class and split, people, licence, losses."""
    project = manifest["project"]
    counts = manifest["counts"]
    classes = [c["name"] for c in manifest["classes"]]
    splits = sorted(counts["per_split"]) if counts["per_split"] else []
    rows = []
    for name in classes:
        row = [name, counts["per_class"].get(name, 0)]
        row += [counts["per_split"][s]["per_class"].get(name, 0) for s in splits]
        rows.append(row)
    rows.append(["**all nuclei**", counts["nuclei"]] + [counts["per_split"][s]["nuclei"] for s in splits])
    rows.append(["tiles", counts["tiles"]] + [counts["per_split"][s]["tiles"] for s in splits])
    rows.append(["images", counts["images"]] + [counts["per_split"][s]["images"] for s in splits])
    split = manifest.get("split")
    if split is None:
        split_text = "none (every tile is in one set)"
    elif split.get("mode") == "frozen":
        split_text = "the project's frozen split (by image)"
    else:
        fractions = ", ".join(f"{k} {v:g}" for k, v in split["fractions"].items())
        split_text = (f"by image, seed {split['seed']} ({fractions}"
                      f"{', stratified by each image’s most frequent class' if split.get('stratify') else ''})")
    filters = manifest["filters"]
    filter_lines = [f"- annotation status: **{filters['status']}**"]
    for key, label in (("annotators", "annotators"), ("classes", "classes"), ("images", "images")):
        if filters.get(key):
            filter_lines.append(f"- {label}: {', '.join(str(v) for v in filters[key])}")
    if filters.get("date_from") or filters.get("date_to"):
        filter_lines.append(f"- annotated from {filters.get('date_from') or 'the start'} to {filters.get('date_to') or 'now'}")
    pre = manifest.get("pre_annotation") or {}
    losses = "\n".join(f"- {line}" for line in LOSSES[manifest["format"]])
    return f"""# {project['name']} — nuclei data set ({manifest['format']})

{project.get('description') or 'Nucleus instance segmentation exported from Karyo.'}

- Exported by Karyo {manifest['karyo_version']} on {manifest['created_at']} (export {manifest.get('export_id')}, by {manifest.get('created_by') or 'the command line'})
- **Licence:** {project.get('licence') or 'not stated — ask the project owner before reuse'}
- Format: **{manifest['format']}**; tile size {project['tile_size']} px; {manifest.get('naming') or 'one item per annotated tile'}
- Split: {split_text}

## Counts

{_table(rows, ['class', 'total'] + splits)}

## People

- Annotators: {', '.join(manifest['annotators']) or 'not recorded'}
- Reviewers: {', '.join(manifest['reviewers']) or 'none'}
- Pre-annotated by a model: {pre.get('tiles', 0)} of {counts['tiles']} tiles
  (model versions: {', '.join(str(v) for v in pre.get('model_versions', [])) or 'none'})

## Selection

{chr(10).join(filter_lines)}

## What this format cannot express

{losses}

## Provenance

`manifest.json` lists, per tile: the source image and its sha256, the tile's position, the
annotation version exported (id, version, status), its authors, reviewer and timestamps, the
model version that pre-annotated it and how much the annotators changed the prediction
(pixels changed, nuclei added and removed); and the sha256 of every file in this archive
(except `manifest.json` itself).

## Loading

{_LOADING[manifest['format']]}
"""
