"""The one geometry codec: instance label maps <-> polygons, <-> Label Studio regions, and the
Label Studio labelling config. Framework-free (numpy and scipy; OpenCV, pycocotools and the
Label Studio SDK are imported only by the functions that need them): the editor, the Label
Studio sync and the export formats all use it, and so can the engine side.

Coordinates are pixels with the *corner* convention: pixel (row r, column c) is the unit square
[c, c+1) x [r, r+1), so its centre is (c+0.5, r+0.5). ``offset`` arguments are whole-pixel
(x, y) added to every vertex written (a tile's position in its image, a slide region's level-0
origin) and, when decoding, the origin of the window to rasterise.

One rasterisation rule (:func:`rasterize_rings`): a pixel belongs to a polygon when its centre
lies inside it (even-odd over all rings, so hole rings cut holes; a centre exactly on an edge
counts when the edge is on its left or above: half-open spans). Pixel-corner polygons keep
0.5 px between every edge and every centre, so they survive any centre-sampling rasteriser.

Three encodings of a label map, all exact under that rule:

* **Polygons with holes** (:func:`label_parts`, :func:`instance_parts`): per instance, one
  :class:`Part` per 4-connected piece, outer ring + hole rings along the pixel edges ("crack"
  boundaries; vertices are pixel corners, only the corners kept). COCO, QuPath and GeoJSON use
  this; ``rasterize(parts) == mask`` for every mask.
* **Label Studio polygon regions** (:func:`mask_to_regions`, :func:`polygon_results`): percent
  of the image size, one region per piece, id ``k<instance>p<piece>`` (pieces from 1, largest
  first); larger outlines first, so a nucleus lying in another's hole is painted after it by a
  reader that paints in order (``order="instance"``: by instance id instead).
  Label Studio polygons have no holes: holes are filled (background enclosed by a nucleus comes
  back as that nucleus; that is the only loss). ``simplify="exact"`` (the sync) traces the
  outline through the midpoints of the pixel edges (the marching-squares contour at 0.5) and
  simplifies it with the largest Douglas-Peucker tolerance whose rasterisation, after the
  percent rounding Label Studio will store, still equals the piece; ``"none"`` (export files)
  writes the pixel-corner ring; a number is a display outline within that many pixels (the
  editor: light in the browser, not exact; untouched nuclei are never rasterised from it).
* **Label Studio brush RLE** (:func:`mask_to_brush_rle`): the SDK's own codec.

Foreground is 4-connected everywhere: pixels touching only at a corner are separate pieces (and
background is 8-connected, which is what "hole" means here).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from xml.sax.saxutils import quoteattr

import numpy as np
from scipy import ndimage as ndi

# Label Studio control names Karyo uses in every config it writes (the sync, the embedded
# editor and the export files), so exported tasks fit Karyo's own projects.
IMAGE = "image"
POLYGONS = "nuclei"
BRUSH = "touchup"
BACKGROUND = "background"
POLYGON_OPACITY = "0.3"

PERCENT_DECIMALS = 4  # 1e-4 % of a 4096 px tile is 0.004 px: far below the margins checked
SIMPLIFY_TOLERANCES = (0.45, 0.3, 0.15, 0.0)  # pixels; tried largest first, each checked exactly

_CROSS = ndi.generate_binary_structure(2, 1)
_SQUARE = np.ones((3, 3), bool)
# Edge directions on screen (y down), clockwise order: right, down, left, up.
_DX = (1, 0, -1, 0)
_DY = (0, 1, 0, -1)

Offset = tuple[float, float]


# --- polygons with holes (pixel corners) -------------------------------------------------------

@dataclass
class Part:
    """One 4-connected piece of an instance: its outer ring and the rings of its holes; rings are
    (k, 2) (x, y) vertex arrays, not closed (first != last)."""

    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    @property
    def rings(self) -> list[np.ndarray]:
        return [self.outer, *self.holes]


def shoelace(ring: np.ndarray) -> float:
    """Signed area; outer crack rings (clockwise on screen, y down) are negative, holes positive."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(x[:-1] @ y[1:] - x[1:] @ y[:-1] + x[-1] * y[0] - x[0] * y[-1])


def trace_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Every crack-boundary loop of a boolean mask (outer rings and holes), as int64 (k, 2)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    if not m.any():
        return []
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = m
    inner = p[1:-1, 1:-1]
    starts, dirs = [], []
    # Edge start vertices (x, y) for each kind of exposed pixel side.
    for d, exposed, (ox, oy) in (
        (2, inner & ~p[:-2, 1:-1], (1, 0)),  # top side, going left, starts at the top-right corner
        (0, inner & ~p[2:, 1:-1], (0, 1)),  # bottom side, going right, from the bottom-left corner
        (1, inner & ~p[1:-1, :-2], (0, 0)),  # left side, going down, from the top-left corner
        (3, inner & ~p[1:-1, 2:], (1, 1)),  # right side, going up, from the bottom-right corner
    ):
        rows, cols = np.nonzero(exposed)
        starts.append((rows + oy) * (w + 1) + (cols + ox))
        dirs.append(np.full(rows.size, d, np.int8))
    start = np.concatenate(starts)
    direction = np.concatenate(dirs)
    order = np.argsort(start, kind="stable")
    start, direction = start[order], direction[order]
    n = start.size
    # A vertex has one outgoing edge, or two where pixels touch only at that corner.
    first: dict[int, int] = {}
    second: dict[int, int] = {}
    for i, s in enumerate(start.tolist()):
        if s in first:
            second[s] = i
        else:
            first[s] = i
    dir_list = direction.tolist()
    start_list = start.tolist()
    visited = bytearray(n)
    rings = []
    stride = w + 1
    for e0 in range(n):
        if visited[e0]:
            continue
        vertices = []
        e = e0
        prev = -1
        while not visited[e]:
            visited[e] = 1
            d = dir_list[e]
            if d != prev:
                s = start_list[e]
                vertices.append((s % stride, s // stride))
                prev = d
            s = start_list[e]
            end = s + _DX[d] + _DY[d] * stride
            nxt = first[end]
            alt = second.get(end)
            if alt is not None:
                # Pinch: take the left turn, which keeps diagonal pixels apart (4-connectivity).
                left = (d + 3) % 4
                if dir_list[nxt] != left and dir_list[alt] == left:
                    nxt = alt
                if visited[nxt]:
                    nxt = alt if nxt != alt else nxt
            e = nxt
        # The loop closes on e0; drop a first vertex that continues the last edge's direction.
        if len(vertices) > 1 and dir_list[e0] == prev:
            vertices.pop(0)
        rings.append(np.asarray(vertices, dtype=np.int64))
    return rings


def instance_parts(mask: np.ndarray, *, offset: Offset = (0, 0)) -> list[Part]:
    """The 4-connected pieces of a boolean mask with their holes, in scan order; vertices shifted
    by ``offset`` (x, y)."""
    labels, _ = ndi.label(mask, structure=_CROSS)
    parts = []
    for index, slc in enumerate(ndi.find_objects(labels), start=1):
        if slc is None:
            continue
        shift = np.array([slc[1].start + offset[0], slc[0].start + offset[1]])
        outer, holes = None, []
        for ring in trace_rings(labels[slc] == index):
            ring = ring + shift
            if shoelace(ring) < 0 and outer is None:
                outer = ring
            else:
                holes.append(ring)
        parts.append(Part(outer=outer, holes=holes))
    return parts


def label_parts(instances: np.ndarray, *, offset: Offset = (0, 0)) -> dict[int, list[Part]]:
    """Instance id -> its parts, for every instance of a label map, in ascending id order."""
    instances = np.asarray(instances)
    out: dict[int, list[Part]] = {}
    for index, slc in enumerate(ndi.find_objects(instances.astype(np.int64)), start=1):
        if slc is None:
            continue
        shift = (slc[1].start + offset[0], slc[0].start + offset[1])
        out[index] = instance_parts(instances[slc] == index, offset=shift)
    return out


def parts_to_instances(parts: dict[int, list[Part]], height: int, width: int, *, offset: Offset = (0, 0)) -> np.ndarray:
    """Inverse of :func:`label_parts`: (height, width) int32 label map of the window at ``offset``."""
    out = np.zeros((height, width), np.int32)
    for label, pieces in parts.items():
        rings = [ring for part in pieces for ring in part.rings]
        out[rasterize_rings(rings, height, width, x0=offset[0], y0=offset[1])] = label
    return out


# --- rasterising: one rule ---------------------------------------------------------------------

def rasterize_rings(rings: Iterable[np.ndarray], height: int, width: int, *, x0: float = 0, y0: float = 0) -> np.ndarray:
    """Boolean (height, width) mask of the pixels whose centre lies inside the rings (even-odd).

    ``x0, y0``: the mask is the window starting at that pixel of the rings' coordinate frame
    (integers; the arithmetic is the same as for the whole frame, so a window agrees with the
    full mask bit for bit)."""
    x0, y0 = int(x0), int(y0)
    mask = np.zeros((height, width), dtype=bool)
    edges = []
    for ring in rings:
        pts = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
        if len(pts) >= 3:
            edges.append(np.concatenate([pts, np.roll(pts, -1, axis=0)], axis=1))
    if not edges:
        return mask
    ax, ay, bx, by = np.concatenate(edges).T
    keep = ay != by
    ax, ay, bx, by = ax[keep], ay[keep], bx[keep], by[keep]
    if not len(ax):
        return mask
    lo, hi = np.minimum(ay, by), np.maximum(ay, by)
    r_min = max(y0, int(np.floor(lo.min() - 0.5)))
    r_max = min(y0 + height - 1, int(np.ceil(hi.max() - 0.5)))
    if r_max < r_min:
        return mask
    rows = np.arange(r_min, r_max + 1)
    yc = rows[:, None] + 0.5
    crosses = (lo[None, :] <= yc) & (yc < hi[None, :])  # half-open: each vertex counted once
    row_idx, edge_idx = np.nonzero(crosses)
    if not len(row_idx):
        return mask
    ycs = rows[row_idx] + 0.5
    ex0, ey0, ex1, ey1 = ax[edge_idx], ay[edge_idx], bx[edge_idx], by[edge_idx]
    xs = ex0 + (ycs - ey0) * (ex1 - ex0) / (ey1 - ey0)
    order = np.lexsort((xs, row_idx))
    row_idx, xs = row_idx[order], xs[order]
    # Even-odd: crossings pair up within each row (their count per row is even).
    starts, ends, pair_rows = xs[0::2], xs[1::2], row_idx[0::2]
    c_start = np.clip(np.ceil(starts - 0.5).astype(np.int64) - x0, 0, width)
    c_end = np.clip(np.ceil(ends - 0.5).astype(np.int64) - x0, 0, width)
    diff = np.zeros((len(rows), width + 1), dtype=np.int32)
    np.add.at(diff, (pair_rows, c_start), 1)
    np.add.at(diff, (pair_rows, c_end), -1)
    mask[r_min - y0 : r_max - y0 + 1] = np.cumsum(diff[:, :width], axis=1) > 0
    return mask


def rasterize_polygon(points: np.ndarray, height: int, width: int, *, x0: float = 0, y0: float = 0) -> np.ndarray:
    """One closed polygon (N, 2) (x, y) -> boolean mask, by :func:`rasterize_rings`."""
    return rasterize_rings([points], height, width, x0=x0, y0=y0)


def rasterize(regions: list[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """Instance label map from ``(label, points)`` polygons, painted in order (later wins)."""
    out = np.zeros((height, width), dtype=np.int32)
    for label, points in regions:
        out[rasterize_polygon(points, height, width)] = label
    return out


def _is_rectilinear(ring: np.ndarray) -> bool:
    if not np.all(ring == np.round(ring)):
        return False
    nxt = np.roll(ring, -1, axis=0)
    return bool(np.all((ring[:, 0] == nxt[:, 0]) | (ring[:, 1] == nxt[:, 1])))


def _fill_pycocotools(ring: np.ndarray, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([ring.astype(np.float64).ravel().tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


Rule = Literal["centre", "coco"]


def fill_polygon(rings: list[np.ndarray], h: int, w: int, *, rule: Rule = "centre") -> np.ndarray:
    """One polygon (outer ring + hole rings, any orientation) -> (h, w) boolean mask.

    ``rule="coco"``: rings that are not pixel-corner rectilinear (drawn by other tools) are
    rasterised by pycocotools, the reference COCO consumers use; pixel-corner rings give the same
    pixels under both rules."""
    rings = [np.asarray(r, dtype=np.float64) for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros((h, w), bool)
    if rule == "centre" or all(_is_rectilinear(r) for r in rings):
        return rasterize_rings(rings, h, w)
    out = np.zeros((h, w), bool)
    for ring in rings:
        out ^= rasterize_rings([ring], h, w) if _is_rectilinear(ring) else _fill_pycocotools(ring, h, w)
    return out


def rasterize_parts(polygons: list[list[np.ndarray]], h: int, w: int, *, rule: Rule = "centre") -> np.ndarray:
    """Union of polygons (each a list of rings: outer first, then holes)."""
    out = np.zeros((h, w), bool)
    for rings in polygons:
        out |= fill_polygon(rings, h, w, rule=rule)
    return out


def polygons_shape(polygons: list[list[np.ndarray]], h: int, w: int, *, rule: Rule = "centre") -> tuple[tuple[int, int], np.ndarray]:
    """Union of polygons (each a list of rings: outer, then holes), rasterised in their bounding
    box only: -> ((y0, x0), boolean crop). Cheap for small shapes on large images."""
    rings = [np.asarray(r, dtype=np.float64) for rings_ in polygons for r in rings_ if len(r)]
    if not rings:
        return (0, 0), np.zeros((0, 0), bool)
    pts = np.concatenate(rings)
    x0 = int(np.clip(np.floor(pts[:, 0].min()), 0, w))
    y0 = int(np.clip(np.floor(pts[:, 1].min()), 0, h))
    x1 = int(np.clip(np.ceil(pts[:, 0].max()) + 1, 0, w))
    y1 = int(np.clip(np.ceil(pts[:, 1].max()) + 1, 0, h))
    if x1 <= x0 or y1 <= y0:
        return (0, 0), np.zeros((0, 0), bool)
    shift = np.array([x0, y0], dtype=np.float64)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for rings_ in polygons:
        crop |= fill_polygon([np.asarray(r, dtype=np.float64) - shift for r in rings_], y1 - y0, x1 - x0, rule=rule)
    return (y0, x0), crop


def paint(shapes: list[tuple[int, tuple[int, int], np.ndarray]], h: int, w: int) -> np.ndarray:
    """(instance id, (y0, x0), boolean crop) shapes -> (h, w) int32 label map.

    Where shapes overlap the smaller one wins (it is painted last), so a nucleus lying inside
    another's filled hole survives. Crops reaching past the border are clipped.
    """
    out = np.zeros((h, w), np.int32)
    order = sorted(range(len(shapes)), key=lambda i: (-int(shapes[i][2].sum()), i))
    for i in order:
        instance_id, (y0, x0), crop = shapes[i]
        ch, cw = min(crop.shape[0], h - y0), min(crop.shape[1], w - x0)
        if ch <= 0 or cw <= 0:
            continue
        region = out[y0 : y0 + ch, x0 : x0 + cw]
        region[crop[:ch, :cw]] = instance_id
    return out


# --- Label Studio regions ----------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """One polygon of an instance: ``points`` (N, 2) (x, y) in pixels, ``percent`` the same in
    Label Studio's percent of width/height (what is sent; ``points`` is what the receiver gets
    back from it)."""

    label: int
    piece: int
    points: np.ndarray
    percent: list

    @property
    def id(self) -> str:
        return region_id(self.label, self.piece)


def to_percent(points: np.ndarray, width: int, height: int, *, decimals: int | None = PERCENT_DECIMALS) -> list[list[float]]:
    """Pixel (x, y) -> Label Studio's [x%, y%] of the image width/height."""
    pct = np.asarray(points, dtype=np.float64).reshape(-1, 2) / np.array([width, height]) * 100.0
    return (np.round(pct, decimals) if decimals is not None else pct).tolist()


def from_percent(points: list, width: int, height: int) -> np.ndarray:
    """Label Studio's percent points -> pixel (x, y); every reader of regions uses this."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) * np.array([width, height]) / 100.0


_REGION_ID = re.compile(r"^([kn])(\d+)(?:p(\d+))?$")


def region_id(label: int, piece: int = 1) -> str:
    """``k<instance>p<piece>``: an untouched region keeps its instance id when it comes back, and
    the pieces of one nucleus are put back together."""
    return f"k{label}p{piece}"


def label_from_region_id(value: str) -> int | None:
    """The instance id of a region Karyo wrote, else None (a region drawn by a person). Reads
    ``k<id>p<piece>`` and the ``n<id>`` / ``n<id>p<k>`` ids of tasks pushed before the codec."""
    match = _REGION_ID.match(str(value or ""))
    return int(match.group(2)) if match else None


def _midpoint_outline(ring: np.ndarray) -> np.ndarray:
    """The outline through the midpoints of the ring's unit pixel edges: the marching-squares
    contour at level 0.5, at least 0.35 px from every pixel centre."""
    a = np.asarray(ring, dtype=np.float64)
    d = np.roll(a, -1, axis=0) - a
    length = np.abs(d).sum(axis=1).astype(np.int64)  # sides are axis-aligned
    unit = d / length[:, None]
    side = np.repeat(np.arange(len(a)), length)
    step = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    return a[side] + (step + 0.5)[:, None] * unit[side]


def _douglas_peucker(xy: np.ndarray, tolerance: float) -> np.ndarray:
    import cv2

    return cv2.approxPolyDP(xy.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2).astype(np.float64)


Simplify = Literal["exact", "none"] | float


def _outline(ring: np.ndarray, piece: np.ndarray, x0: int, y0: int, width: int, height: int,
             simplify: Simplify) -> tuple[np.ndarray, list]:
    """(pixel points, percent points) of one hole-free piece (a boolean window at x0, y0) whose
    crack ring (image coordinates) is ``ring``."""
    if simplify == "none":
        return ring.astype(np.float64), to_percent(ring, width, height, decimals=None)
    xy = _midpoint_outline(ring)
    if simplify != "exact":
        simplified = _douglas_peucker(xy, float(simplify))
        xy = simplified if len(simplified) >= 3 else xy
        pct = to_percent(xy, width, height)
        return from_percent(pct, width, height), pct
    h, w = piece.shape
    for tolerance in SIMPLIFY_TOLERANCES:
        candidate = _douglas_peucker(xy, tolerance) if tolerance else xy
        if len(candidate) < 3:
            continue
        # Check exactly what the other side will rasterise: the percent points read back.
        pct = to_percent(candidate, width, height)
        back = from_percent(pct, width, height)
        if np.array_equal(rasterize_polygon(back, h, w, x0=x0, y0=y0), piece):
            return back, pct
    exact = to_percent(xy, width, height, decimals=None)
    return from_percent(exact, width, height), exact


def mask_to_regions(instances: np.ndarray, *, simplify: Simplify = "exact",
                    order: Literal["area", "instance"] = "area") -> list[Region]:
    """One Label Studio polygon per 4-connected piece of every instance, holes filled; pieces of
    an instance numbered from 1, largest first; regions ordered larger outline first, or by
    instance id (see the module docstring for ``simplify``)."""
    instances = np.asarray(instances)
    height, width = instances.shape
    regions: list[tuple[float, int, Region]] = []
    for index, box in enumerate(ndi.find_objects(instances.astype(np.int64)), start=1):
        if box is None:
            continue
        rows, cols = box
        # Background is 8-connected here, as the 4-connected outline sees it.
        filled = ndi.binary_fill_holes(instances[box] == index, structure=_SQUARE)
        pieces, count = ndi.label(filled, structure=_CROSS)
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        for rank, piece in enumerate(np.argsort(-sizes, kind="stable") + 1, start=1):
            window = pieces == piece
            ring = min(trace_rings(window), key=shoelace)  # a filled piece has one ring: its outer one
            points, percent = _outline(ring + (cols.start, rows.start), window, cols.start, rows.start,
                                       width, height, simplify)
            regions.append((_area(points), len(regions), Region(index, rank, points, percent)))
    if order == "area":
        regions.sort(key=lambda item: (-item[0], item[1]))
    return [region for _, _, region in regions]


def _area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_results(instances: np.ndarray, *, class_of: Callable[[int], str], simplify: Simplify = "exact",
                    order: Literal["area", "instance"] = "area") -> list[dict]:
    """Label Studio ``polygonlabels`` results (the ``result`` list of an annotation or a
    prediction) for a label map; ``class_of(instance id)`` names the label of each region."""
    height, width = np.asarray(instances).shape
    return [
        {
            "id": region.id,
            "type": "polygonlabels",
            "from_name": POLYGONS,
            "to_name": IMAGE,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {"points": region.percent, "closed": True, "polygonlabels": [class_of(region.label)]},
        }
        for region in mask_to_regions(instances, simplify=simplify, order=order)
    ]


def labeling_config(classes: Sequence[tuple[str, str]], *, brush: bool = False, cross_origin: bool = False) -> str:
    """The Label Studio labelling config: the image and one polygon label per ``(name, colour)``
    class; ``brush`` adds a brush layer with the same classes and a ``background`` eraser;
    ``cross_origin`` lets Label Studio read an image served by another origin (Karyo's)."""
    labels = "\n".join(f"    <Label value={quoteattr(name)} background={quoteattr(color)}/>" for name, color in classes)
    image_attrs = ' crossOrigin="anonymous"' if cross_origin else ""
    lines = [
        "<View>",
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true" zoomControl="true" rotateControl="false"{image_attrs}/>',
        f'  <PolygonLabels name="{POLYGONS}" toName="{IMAGE}" strokeWidth="1" pointSize="small"'
        f' opacity="{POLYGON_OPACITY}">',
        labels,
        "  </PolygonLabels>",
    ]
    if brush:
        lines += [
            f'  <BrushLabels name="{BRUSH}" toName="{IMAGE}">',
            labels,
            f'    <Label value="{BACKGROUND}" background="#000000"/>',
            "  </BrushLabels>",
        ]
    return "\n".join([*lines, "</View>", ""])


# --- brush layers (the SDK's own RLE codec) ----------------------------------------------------

def brush_rle_to_mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE -> boolean (height, width) mask."""
    from label_studio_sdk.converter.brush import decode_rle

    return np.reshape(decode_rle(rle), (height, width, 4))[..., 3] > 0


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle((np.asarray(mask) > 0).astype(np.uint8) * 255)
