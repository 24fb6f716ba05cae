"""The tile in its context (issue 12): the tile with ``Project.context_margin`` pixels of the
image around it (``backend.images.margins.context_frame``: clipped at the image border), read
through the image reader, dimmed outside the tile, with the tile's border drawn.

Two pictures of it:

* the side panel's (``tile_context``): the image's stitched nuclei (``backend.images.truth``: the
  latest accepted versions of every tile) outlined whole, those that cross the tile's border in a
  second colour;
* the editor's backdrop (``tile_context(..., for_editor=True)``, full size): the correction
  workspace edits the nuclei the tile owns, whole, in this frame; the nuclei other tiles own
  (stitched truth) are outlined on the picture in the second colour, for context only (they are
  edited in their own tile; a version keeps only its tile's nuclei, ``backend.images.margins``).
"""
from __future__ import annotations

import numpy as np

from backend.images.margins import context_frame
from backend.images.models import Tile
from backend.images.pixels import level0_per_working_pixel, read_image_region
from backend.images.stitching import label_window
from backend.images.truth import stitched_nuclei

DIM = 0.45  # brightness kept outside the tile
INSIDE = np.array([255, 221, 0], np.uint8)  # outlines of nuclei inside the tile
ACROSS = np.array([0, 229, 255], np.uint8)  # outlines of nuclei crossing the tile's border
BORDER = np.array([255, 255, 255], np.uint8)


def tile_context(*, tile: Tile, for_editor: bool = False) -> tuple[np.ndarray, dict]:
    """-> ((H, W, 3) uint8 picture, {x, y, w, h of the frame in the image, margin, tile box in the
    frame, nuclei drawn, nuclei across the border})."""
    image, project = tile.image, tile.project
    scale = level0_per_working_pixel(image, working_mpp=project.working_mpp)
    frame = context_frame(tile=tile)
    tx, ty = frame.x + frame.tile_x, frame.y + frame.tile_y
    x0, y0, x1, y1 = frame.x, frame.y, frame.x + frame.w, frame.y + frame.h
    margin = int(project.context_margin)
    rgb = np.array(read_image_region(image, x=round(x0 * scale), y=round(y0 * scale), w=x1 - x0, h=y1 - y0,
                                     working_mpp=project.working_mpp), dtype=np.uint8)
    inside = np.zeros(rgb.shape[:2], bool)
    bx, by = frame.tile_x, frame.tile_y
    inside[by : by + tile.h, bx : bx + tile.w] = True
    rgb[~inside] = (rgb[~inside] * DIM).astype(np.uint8)
    # The tile's border, just outside the tile where there is room (outlines are drawn over it).
    top, left = max(by - 1, 0), max(bx - 1, 0)
    bottom, right = min(by + tile.h, rgb.shape[0] - 1), min(bx + tile.w, rgb.shape[1] - 1)
    if not for_editor or frame.margin != (0, 0, 0, 0):
        rgb[top, left : right + 1] = rgb[bottom, left : right + 1] = BORDER
        rgb[top : bottom + 1, left] = rgb[top : bottom + 1, right] = BORDER

    nuclei = stitched_nuclei(image=image)
    near = [n for n in nuclei if n.bbox[0] < x1 and x0 < n.bbox[2] and n.bbox[1] < y1 and y0 < n.bbox[3]]
    if for_editor:  # the tile's own nuclei are the editor's regions; the others are context
        near = [n for n in near if n.tile_id != tile.pk]
    labels = label_window(near, x=x0, y=y0, w=x1 - x0, h=y1 - y0)
    across = {k + 1 for k, n in enumerate(near)
              if for_editor
              or (not (tx <= n.bbox[0] and ty <= n.bbox[1] and n.bbox[2] <= tx + tile.w and n.bbox[3] <= ty + tile.h)
                  and n.bbox[0] < tx + tile.w and tx < n.bbox[2] and n.bbox[1] < ty + tile.h and ty < n.bbox[3])}
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[1:] != labels[:-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge &= labels > 0
    lut = np.zeros(len(near) + 1, bool)
    lut[list(across)] = True
    rgb[edge & ~lut[labels]] = INSIDE
    rgb[edge & lut[labels]] = ACROSS
    meta = {"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "margin": margin,
            "tile": {"x": bx, "y": by, "w": tile.w, "h": tile.h}, "nuclei": len(near), "across": len(across)}
    return rgb, meta
