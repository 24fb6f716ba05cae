"""Image-level truth: the nuclei of an image stitched from the annotation versions of its tiles.

A tile is a unit of work; a nucleus belongs to the image. Tiles overlap (``tile_overlap``, and
the last tile of a row or column is shifted back to end at the image border) and a nucleus that
crosses a tile border is cut in each tile's mask. :func:`stitch` puts the pieces back together:

1. every instance of every tile's label map is a *fragment* (image coordinates, a boolean crop);
2. fragments of two tiles are the same nucleus when
   - the tiles overlap and the fragments agree in the overlap (their common pixels are at least
     half of the smaller one's pixels inside the overlap), or
   - the tiles abut (no overlap, a shared edge) and the fragments face each other across that
     edge (the touching pixels are at least half of the smaller one's pixels along the edge).
     Without an overlap, two different nuclei whose outlines both end exactly on the edge are
     indistinguishable from one nucleus cut there: they are merged (tile overlap avoids this),
     unless both tiles' label maps share the image's instance ids (``shared_ids``: versions
     written by a data set import, which cuts one image-level label map into tiles and keeps its
     ids), where facing fragments are one nucleus exactly when their ids are equal;
3. a group of matched fragments is one nucleus: the union of their pixels.

A version made in the workspace's context frame (``TileLabels.whole``: ``Annotation.context_mask``)
already holds the nuclei its tile owns, each whole with its parts in the margin, and none that
another tile owns. Its nuclei are pasted as they are: no matching, no halving, so two touching
nuclei whose outlines both end on a shared tile edge stay two. Versions of the tile box only
(older versions, imports) go through steps 1-3; such a nucleus is dropped when its centroid lies
in a tile with a whole version (that version decides what is there), or when it is mostly the
same pixels as a whole nucleus (a piece of it seen from the neighbour); one that matches a whole
nucleus across the border of the whole version's tile (as in step 2) joins it.

**Ownership rule**: a nucleus belongs to the tile that holds its centroid. Where tiles overlap,
the centroid's owner is the contributing tile whose centre is nearest (Euclidean; ties go to the
tile higher up, then further left), so ownership partitions the annotated area. The owner gives
the nucleus its class and its provenance (tile, annotation version). A nucleus seen only by a
tile that does not own its centroid is dropped when the owning tile's rectangle holds the whole
nucleus (the owner looked at that place and drew something else there, or nothing); otherwise
it is kept (the owner saw only part of it).

Coordinates are pixels of the tiles' grid (the working resolution). On an image whose level-0
resolution is the working one (every image without MPP metadata) that is level 0; the caller
converts otherwise. Nothing here holds a full-size map: nuclei are crops, and
:func:`label_window` paints any window of the image on request.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

_CROSS = ndi.generate_binary_structure(2, 1)


@dataclass
class TileLabels:
    """One tile's label map in the image: origin (x, y), the (h, w) instance map and its classes.

    ``whole``: the map holds the nuclei the tile owns, whole (a context-frame version): it starts
    at (x + ox, y + oy) and may be larger than the tile, whose size is then ``tile_w`` x ``tile_h``.
    """

    tile_id: int
    x: int
    y: int
    instances: np.ndarray
    classes: dict[int, int]
    annotation_id: int | None = None
    version: int | None = None
    shared_ids: bool = False  # instance ids are the image's (an import), not the tile's own
    whole: bool = False
    ox: int = 0
    oy: int = 0
    tile_w: int | None = None
    tile_h: int | None = None

    @property
    def h(self) -> int:
        return int(self.tile_h if self.tile_h is not None else self.instances.shape[0])

    @property
    def w(self) -> int:
        return int(self.tile_w if self.tile_w is not None else self.instances.shape[1])

    @property
    def rect(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.w, self.y + self.h


@dataclass
class Nucleus:
    """A stitched nucleus: a boolean crop at (x0, y0) of the image, its class and its owner."""

    x0: int
    y0: int
    crop: np.ndarray
    class_id: int
    tile_id: int
    annotation_id: int | None
    version: int | None
    source_label: int  # the instance id in the owner tile's label map (0 when the owner only saw it whole elsewhere)
    tiles: tuple[int, ...]  # every tile whose version holds a piece of it

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the pixel centres' mean, in image pixels."""
        rows, cols = np.nonzero(self.crop)
        return float(cols.mean() + self.x0 + 0.5), float(rows.mean() + self.y0 + 0.5)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.crop.shape[1], self.y0 + self.crop.shape[0]


@dataclass
class _Fragment:
    tile: int  # index into the tiles list
    label: int
    x0: int
    y0: int
    crop: np.ndarray


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _fragments(tiles: list[TileLabels]) -> tuple[list[_Fragment], dict[tuple[int, int], int]]:
    fragments: list[_Fragment] = []
    index: dict[tuple[int, int], int] = {}
    for t, tile in enumerate(tiles):
        labels = np.asarray(tile.instances).astype(np.int64, copy=False)
        for label, box in enumerate(ndi.find_objects(labels), start=1):
            if box is None:
                continue
            rows, cols = box
            index[(t, label)] = len(fragments)
            fragments.append(_Fragment(t, label, tile.x + cols.start, tile.y + rows.start, labels[box] == label))
    return fragments, index


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label pairs (a, b) that share pixels (both non-zero), with their pixel counts."""
    both = (a > 0) & (b > 0)
    if not both.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    key = a[both].astype(np.int64) * (1 << 32) + b[both].astype(np.int64)
    keys, counts = np.unique(key, return_counts=True)
    return keys >> 32, keys & ((1 << 32) - 1), counts


def _match(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of labels of two aligned windows that are the same nucleus (see the module docstring)."""
    la, lb, counts = _pairs(a, b)
    if not len(counts):
        return []
    area_a = np.bincount(a.ravel().astype(np.int64))
    area_b = np.bincount(b.ravel().astype(np.int64))
    smaller = np.minimum(area_a[la], area_b[lb])
    keep = 2 * counts >= smaller
    return list(zip(la[keep].tolist(), lb[keep].tolist()))


def _neighbours(tiles: list[TileLabels]) -> list[tuple[int, int]]:
    """Index pairs of tiles that overlap or share an edge."""
    if not tiles:
        return []
    rects = np.array([t.rect for t in tiles], dtype=np.int64)
    pairs = []
    for i, (x0, y0, x1, y1) in enumerate(rects.tolist()):
        rest = rects[i + 1 :]
        ix = np.minimum(rest[:, 2], x1) - np.maximum(rest[:, 0], x0)
        iy = np.minimum(rest[:, 3], y1) - np.maximum(rest[:, 1], y0)
        touching = ((ix >= 0) & (iy > 0)) | ((ix > 0) & (iy >= 0))
        pairs.extend((i, i + 1 + j) for j in np.nonzero(touching)[0].tolist())
    return pairs


def _link(tiles: list[TileLabels], i: int, j: int) -> list[tuple[int, int]]:
    """Matched (label in tile i, label in tile j) pairs."""
    a, b = tiles[i], tiles[j]
    ax0, ay0, ax1, ay1 = a.rect
    bx0, by0, bx1, by1 = b.rect
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x1 > x0 and y1 > y0:  # overlap: compare the common window
        wa = a.instances[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
        wb = b.instances[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        return _match(wa, wb)
    if x1 == x0 and y1 > y0:  # a vertical shared edge at x = x0
        left, right = (a, b) if ax1 == x0 else (b, a)
        ea = left.instances[y0 - left.y : y1 - left.y, left.w - 1 : left.w]
        eb = right.instances[y0 - right.y : y1 - right.y, 0:1]
        found = _match(ea, eb)
        found = [(p, q) for p, q in found if p == q] if a.shared_ids and b.shared_ids else found
        return found if left is a else [(q, p) for p, q in found]
    if y1 == y0 and x1 > x0:  # a horizontal shared edge at y = y0
        top, bottom = (a, b) if ay1 == y0 else (b, a)
        ea = top.instances[top.h - 1 : top.h, x0 - top.x : x1 - top.x]
        eb = bottom.instances[0:1, x0 - bottom.x : x1 - bottom.x]
        found = _match(ea, eb)
        found = [(p, q) for p, q in found if p == q] if a.shared_ids and b.shared_ids else found
        return found if top is a else [(q, p) for p, q in found]
    return []


def owner_of(tiles: list[TileLabels], x: float, y: float, *, among: list[int] | None = None) -> int | None:
    """Index of the tile that owns point (x, y): of the tiles (``among``, default all) whose
    rectangle holds it, the one whose centre is nearest (ties: higher up, then further left)."""
    return owner_of_rect([t.rect for t in tiles], x, y, among=among)


def owner_of_rect(rects: list[tuple[int, int, int, int]], x: float, y: float, *,
                  among: list[int] | None = None) -> int | None:
    """:func:`owner_of` over plain (x0, y0, x1, y1) rectangles."""
    best, best_key = None, None
    for t in among if among is not None else range(len(rects)):
        x0, y0, x1, y1 = rects[t]
        if not (x0 <= x < x1 and y0 <= y < y1):
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        key = ((x - cx) ** 2 + (y - cy) ** 2, y0, x0, t)
        if best_key is None or key < best_key:
            best, best_key = t, key
    return best


def _whole_nuclei(tiles: list[TileLabels], t: int, default_class: int) -> list[tuple[tuple[int, int], Nucleus]]:
    tile = tiles[t]
    labels = np.asarray(tile.instances).astype(np.int64, copy=False)
    out = []
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        rows, cols = box
        out.append(((t, label), Nucleus(
            x0=tile.x + tile.ox + cols.start, y0=tile.y + tile.oy + rows.start, crop=labels[box] == label,
            class_id=int(tile.classes.get(label, default_class)), tile_id=tile.tile_id,
            annotation_id=tile.annotation_id, version=tile.version, source_label=label, tiles=(tile.tile_id,),
        )))
    return out


def _covered_by(piece: Nucleus, whole: list[Nucleus], rects: list[tuple[int, int, int, int]]) -> bool:
    """Is ``piece`` (from tile-box versions whose rectangles are ``rects``) mostly the same
    pixels as one of the ``whole`` nuclei, compared inside those rectangles?"""
    px0, py0, px1, py1 = piece.bbox
    for n in whole:
        nx0, ny0, nx1, ny1 = n.bbox
        if nx1 <= px0 or px1 <= nx0 or ny1 <= py0 or py1 <= ny0:
            continue
        # The whole nucleus' pixels inside the tile-box versions' rectangles (what they could see of it).
        seen = np.zeros_like(n.crop)
        for rx0, ry0, rx1, ry1 in rects:
            cx0, cy0, cx1, cy1 = max(rx0, nx0), max(ry0, ny0), min(rx1, nx1), min(ry1, ny1)
            if cx1 > cx0 and cy1 > cy0:
                seen[cy0 - ny0 : cy1 - ny0, cx0 - nx0 : cx1 - nx0] = True
        seen &= n.crop
        x0, y0, x1, y1 = max(px0, nx0), max(py0, ny0), min(px1, nx1), min(py1, ny1)
        if x1 <= x0 or y1 <= y0:
            continue
        common = int((piece.crop[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
                      & n.crop[y0 - ny0 : y1 - ny0, x0 - nx0 : x1 - nx0]).sum())
        if common and 2 * common >= min(piece.area, int(seen.sum()) or n.area):
            return True
    return False


def stitch(tiles: list[TileLabels], *, default_class: int) -> list[Nucleus]:
    """The image's nuclei from its tiles' label maps, each once and whole (module docstring).

    Ordered by their owner tile (in the given order), then by the instance id there."""
    whole_idx = [t for t, tile in enumerate(tiles) if tile.whole]
    if not whole_idx:
        return _stitch_boxes(tiles, default_class=default_class)
    legacy_idx = [t for t, tile in enumerate(tiles) if not tile.whole]
    nuclei: list[tuple[tuple[int, int], Nucleus]] = []
    for t in whole_idx:
        nuclei.extend(_whole_nuclei(tiles, t, default_class))
    whole = [n for _, n in nuclei]
    if legacy_idx:
        legacy = [tiles[t] for t in legacy_idx]
        by_id = {tiles[t].tile_id: t for t in legacy_idx}
        decided = set(whole_idx)
        kept = []
        for n in _stitch_boxes(legacy, default_class=default_class):
            cx, cy = n.centroid
            if owner_of(tiles, cx, cy) in decided:
                continue  # the tile holding its centroid has a whole version: that version decides
            if _covered_by(n, whole, [tiles[by_id[i]].rect for i in n.tiles if i in by_id]):
                continue  # the neighbour's view of a nucleus a whole version holds
            kept.append(n)
        for n in _join_across(tiles, whole_idx, legacy_idx, nuclei, kept):
            nuclei.append(((by_id.get(n.tile_id, len(tiles)), n.source_label), n))
    nuclei.sort(key=lambda item: item[0])
    return [n for _, n in nuclei]


def _join_across(tiles: list[TileLabels], whole_idx: list[int], legacy_idx: list[int],
                 whole: list[tuple[tuple[int, int], Nucleus]], pieces: list[Nucleus]) -> list[Nucleus]:
    """Where a whole version's tile abuts or overlaps a tile-box version, a piece of the latter
    that matches one of the former's nuclei at the border (the rules of steps 2-3, on the whole
    version's tile box) is the rest of that nucleus (e.g. a nucleus the whole version's tile
    held only in part when it was opened from an older tile-box version): its pixels join the
    whole nucleus. Returns the pieces that stay nuclei of their own."""
    by_label = {(key[0], n.source_label): k for k, (key, n) in enumerate(whole)}
    gone: set[int] = set()
    for w in whole_idx:
        tw = tiles[w]
        box = TileLabels(tw.tile_id, tw.x, tw.y, tw.instances[-tw.oy : -tw.oy + tw.h, -tw.ox : -tw.ox + tw.w],
                         tw.classes)
        for li in legacy_idx:
            pair = [box, tiles[li]]
            if not _neighbours(pair):
                continue
            legacy = tiles[li]
            for lw, ll in _link(pair, 0, 1):
                k = by_label.get((w, lw))
                rows, cols = np.nonzero(legacy.instances == ll)
                if k is None or not len(rows):
                    continue
                px, py = legacy.x + int(cols[0]), legacy.y + int(rows[0])
                for p, piece in enumerate(pieces):
                    x0, y0, x1, y1 = piece.bbox
                    if p not in gone and x0 <= px < x1 and y0 <= py < y1 and piece.crop[py - y0, px - x0]:
                        whole[k] = (whole[k][0], _union(whole[k][1], piece))
                        gone.add(p)
                        break
    return [piece for p, piece in enumerate(pieces) if p not in gone]


def _union(n: Nucleus, piece: Nucleus) -> Nucleus:
    """``n`` with ``piece``'s pixels added (its class and owner kept)."""
    x0, y0 = min(n.x0, piece.x0), min(n.y0, piece.y0)
    x1, y1 = max(n.bbox[2], piece.bbox[2]), max(n.bbox[3], piece.bbox[3])
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for part in (n, piece):
        crop[part.y0 - y0 : part.bbox[3] - y0, part.x0 - x0 : part.bbox[2] - x0] |= part.crop
    return Nucleus(x0=x0, y0=y0, crop=crop, class_id=n.class_id, tile_id=n.tile_id, annotation_id=n.annotation_id,
                   version=n.version, source_label=n.source_label,
                   tiles=tuple(sorted(set(n.tiles) | set(piece.tiles))))


def _stitch_boxes(tiles: list[TileLabels], *, default_class: int) -> list[Nucleus]:
    """Steps 1-3 of the module docstring for versions of the tile box only."""
    fragments, index = _fragments(tiles)
    union = _UnionFind(len(fragments))
    for i, j in _neighbours(tiles):
        for la, lb in _link(tiles, i, j):
            fa, fb = index.get((i, la)), index.get((j, lb))
            if fa is not None and fb is not None:
                union.union(fa, fb)
    groups: dict[int, list[int]] = {}
    for f in range(len(fragments)):
        groups.setdefault(union.find(f), []).append(f)

    nuclei: list[tuple[tuple[int, int], Nucleus]] = []
    for members in groups.values():
        parts = [fragments[f] for f in members]
        x0 = min(p.x0 for p in parts)
        y0 = min(p.y0 for p in parts)
        x1 = max(p.x0 + p.crop.shape[1] for p in parts)
        y1 = max(p.y0 + p.crop.shape[0] for p in parts)
        crop = np.zeros((y1 - y0, x1 - x0), bool)
        for p in parts:
            crop[p.y0 - y0 : p.y0 - y0 + p.crop.shape[0], p.x0 - x0 : p.x0 - x0 + p.crop.shape[1]] |= p.crop
        rows, cols = np.nonzero(crop)
        cx, cy = float(cols.mean() + x0 + 0.5), float(rows.mean() + y0 + 0.5)
        contributing = sorted({p.tile for p in parts})
        owner = owner_of(tiles, cx, cy)
        if owner is not None and owner not in contributing:
            ox0, oy0, ox1, oy1 = tiles[owner].rect
            if ox0 <= x0 and oy0 <= y0 and x1 <= ox1 and y1 <= oy1:
                continue  # the owner saw all of this place and drew something else there
            owner = None
        if owner is None:
            owner = owner_of(tiles, cx, cy, among=contributing)
        if owner is None:  # the centroid lies outside every contributing tile (a crescent): nearest centre
            owner = min(contributing, key=lambda t: ((tiles[t].x + tiles[t].w / 2 - cx) ** 2
                                                     + (tiles[t].y + tiles[t].h / 2 - cy) ** 2, t))
        own = [p for p in parts if p.tile == owner]
        label = max(own, key=lambda p: p.crop.sum()).label if own else 0
        tile = tiles[owner]
        class_id = int(tile.classes.get(label, default_class)) if label else default_class
        if not label:  # take the class of the largest piece
            biggest = max(parts, key=lambda p: p.crop.sum())
            class_id = int(tiles[biggest.tile].classes.get(biggest.label, default_class))
        nuclei.append((
            (owner, label or min(p.label for p in parts)),
            Nucleus(x0=x0, y0=y0, crop=crop, class_id=class_id, tile_id=tile.tile_id, annotation_id=tile.annotation_id,
                    version=tile.version, source_label=label, tiles=tuple(tiles[t].tile_id for t in contributing)),
        ))
    nuclei.sort(key=lambda item: item[0])
    return [n for _, n in nuclei]


def label_window(nuclei: list[Nucleus], *, x: int, y: int, w: int, h: int, ids: list[int] | None = None) -> np.ndarray:
    """The (h, w) int32 instance map of the window at (x, y): nucleus k (1-based, or ``ids[k-1]``)
    painted with id k. Where two stitched nuclei overlap, the smaller one wins."""
    out = np.zeros((h, w), np.int32)
    order = sorted(range(len(nuclei)), key=lambda k: (-nuclei[k].area, k))
    for k in order:
        n = nuclei[k]
        nx0, ny0, nx1, ny1 = n.bbox
        cx0, cy0, cx1, cy1 = max(nx0, x), max(ny0, y), min(nx1, x + w), min(ny1, y + h)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        piece = n.crop[cy0 - ny0 : cy1 - ny0, cx0 - nx0 : cx1 - nx0]
        out[cy0 - y : cy1 - y, cx0 - x : cx1 - x][piece] = ids[k] if ids is not None else k + 1
    return out


def annotated_regions(tiles: list[TileLabels]) -> list[dict]:
    """The rectangles (image pixels) whose labels the stitched nuclei come from; outside them the
    image is not annotated (not background)."""
    return [{"x": t.x, "y": t.y, "w": t.w, "h": t.h, "tile_id": t.tile_id} for t in tiles]
