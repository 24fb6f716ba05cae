// The slide viewer's overlay: nuclei outlines and the tile grid drawn on one canvas over
// OpenSeadragon, in level-0 pixel coordinates. Only what is in view is fetched and drawn, so a
// slide with 100,000 nuclei stays smooth: nuclei are kept per tile in a bounded cache, indexed in
// a uniform grid of buckets, and below a zoom threshold the outlines give way to tile-level
// summaries (the grid coloured by status or uncertainty). Pure apart from the canvas context
// passed in, so test/overlay.test.js checks the culling under node.

// Below this many screen pixels per level-0 pixel, outlines are not drawn (nor fetched): a
// nucleus of ~15 px would be a few screen pixels, and one viewport would hold tens of thousands.
export const OUTLINE_MIN_SCALE = 0.2;
// Cached nuclei beyond this are evicted, least recently seen tiles first.
export const MAX_CACHED_NUCLEI = 60000;

export function intersects(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

export function bboxOf(points) {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const [x, y] of points) {
    if (x < x0) x0 = x;
    if (x > x1) x1 = x;
    if (y < y0) y0 = y;
    if (y > y1) y1 = y;
  }
  return { x: x0, y: y0, w: Math.max(0, x1 - x0), h: Math.max(0, y1 - y0) };
}

// Items with a bounding box ({x, y, w, h}) in square buckets; query(rect) returns each item
// whose box intersects rect once.
export class GridIndex {
  constructor(cell = 512) {
    this.cell = cell;
    this.buckets = new Map();
    this.size = 0;
  }

  cells(box, visit) {
    const c = this.cell;
    const x0 = Math.floor(box.x / c), x1 = Math.floor((box.x + box.w) / c);
    const y0 = Math.floor(box.y / c), y1 = Math.floor((box.y + box.h) / c);
    for (let cy = y0; cy <= y1; cy += 1) for (let cx = x0; cx <= x1; cx += 1) visit(cy * 1048576 + cx);
  }

  insert(item, box = item.box) {
    this.size += 1;
    this.cells(box, (key) => {
      let bucket = this.buckets.get(key);
      if (!bucket) this.buckets.set(key, (bucket = []));
      bucket.push(item);
    });
  }

  query(rect) {
    const seen = new Set();
    const out = [];
    this.cells(rect, (key) => {
      for (const item of this.buckets.get(key) || []) {
        if (seen.has(item)) continue;
        seen.add(item);
        if (intersects(item.box, rect)) out.push(item);
      }
    });
    return out;
  }
}

// Level-0 rectangle -> screen: x_screen = offsetX + scale * x (OpenSeadragon never rotates here).
export function viewTransform(osd, viewer) {
  const p0 = viewer.viewport.imageToViewerElementCoordinates(new osd.Point(0, 0));
  const p1 = viewer.viewport.imageToViewerElementCoordinates(new osd.Point(1000, 0));
  return { scale: (p1.x - p0.x) / 1000, offsetX: p0.x, offsetY: p0.y };
}

// The level-0 rectangle a viewer element of width x height shows, clipped to the image.
export function visibleRect(transform, width, height, image) {
  const x0 = Math.max(0, -transform.offsetX / transform.scale);
  const y0 = Math.max(0, -transform.offsetY / transform.scale);
  const x1 = Math.min(image.width, (width - transform.offsetX) / transform.scale);
  const y1 = Math.min(image.height, (height - transform.offsetY) / transform.scale);
  return { x: x0, y: y0, w: Math.max(0, x1 - x0), h: Math.max(0, y1 - y0) };
}

export function grow(rect, fraction, image) {
  const dx = rect.w * fraction, dy = rect.h * fraction;
  const x = Math.max(0, rect.x - dx), y = Math.max(0, rect.y - dy);
  return { x, y, w: Math.min(image.width, rect.x + rect.w + dx) - x, h: Math.min(image.height, rect.y + rect.h + dy) - y };
}

export function showOutlines(scale) {
  return scale >= OUTLINE_MIN_SCALE;
}

// Nuclei kept per tile. The nuclei endpoint answers with every nucleus of each tile that
// intersects the asked rectangle, so after a complete (not truncated) answer those tiles are
// known and never asked for again until evicted.
export class NucleusCache {
  constructor(tiles, { maxNuclei = MAX_CACHED_NUCLEI, cell = 512 } = {}) {
    this.tiles = new GridIndex(Math.max(cell, 256));
    // The tile objects themselves are indexed (given a `box`), so a status the page updates in
    // place is what the next frame draws.
    for (const t of tiles) {
      t.box = { x: t.x, y: t.y, w: t.w, h: t.h };
      this.tiles.insert(t);
    }
    this.loaded = new Map(); // tile id -> {nuclei, seen}
    this.maxNuclei = maxNuclei;
    this.cell = cell;
    this.count = 0;
    this.clock = 0;
    this.index = new GridIndex(cell);
    this.partial = null;
  }

  tilesIn(rect) {
    return this.tiles.query(rect);
  }

  // The rectangle to ask the server for so that `rect` is fully known, or null when it is.
  missing(rect) {
    const todo = this.tilesIn(rect).filter((t) => !this.loaded.has(t.id));
    if (!todo.length) return null;
    const x0 = Math.min(...todo.map((t) => t.x)), y0 = Math.min(...todo.map((t) => t.y));
    const x1 = Math.max(...todo.map((t) => t.x + t.w)), y1 = Math.max(...todo.map((t) => t.y + t.h));
    // Asking only for the part of those tiles inside rect keeps the answer to rect's tiles.
    const x = Math.max(x0, rect.x), y = Math.max(y0, rect.y);
    return { x, y, w: Math.min(x1, rect.x + rect.w) - x, h: Math.min(y1, rect.y + rect.h) - y };
  }

  // Stores an answer of the nuclei endpoint for `rect`. Tiles already known keep their nuclei
  // (the answer repeats those on the edge of the asked rectangle). A truncated answer is drawn but
  // not kept: its tiles stay unknown, so the next (smaller) view asks again.
  add(rect, { nuclei, truncated }) {
    const byTile = new Map();
    for (const n of nuclei) {
      if (this.loaded.has(n.tile_id)) continue;
      if (!byTile.has(n.tile_id)) byTile.set(n.tile_id, []);
      byTile.get(n.tile_id).push(n);
    }
    for (const list of byTile.values()) for (const n of list) n.box = bboxOf(n.polygon);
    this.partial = new GridIndex(this.cell);
    if (truncated) {
      for (const list of byTile.values()) for (const n of list) this.partial.insert(n);
      return;
    }
    const stamp = ++this.clock;
    const ids = new Set([...this.tilesIn(rect).map((t) => t.id), ...byTile.keys()]);
    for (const id of ids) {
      const known = this.loaded.get(id);
      if (known) {
        known.seen = stamp;
        continue;
      }
      const list = byTile.get(id) || [];
      this.loaded.set(id, { nuclei: list, seen: stamp });
      this.count += list.length;
      for (const n of list) this.index.insert(n);
    }
    if (this.count > this.maxNuclei) this.evict();
  }

  touch(rect) {
    const stamp = ++this.clock;
    for (const t of this.tilesIn(rect)) {
      const entry = this.loaded.get(t.id);
      if (entry) entry.seen = stamp;
    }
  }

  // Drops the tiles seen longest ago down to 80% of the bound, then re-indexes what is left.
  evict() {
    const oldest = [...this.loaded.entries()].sort((a, b) => a[1].seen - b[1].seen);
    for (const [id, entry] of oldest) {
      if (this.count <= this.maxNuclei * 0.8) break;
      this.loaded.delete(id);
      this.count -= entry.nuclei.length;
    }
    this.index = new GridIndex(this.cell);
    for (const entry of this.loaded.values()) for (const n of entry.nuclei) this.index.insert(n);
  }

  visible(rect) {
    const found = this.index.query(rect);
    return this.partial?.size ? found.concat(this.partial.query(rect)) : found;
  }
}

export const STATUS_COLORS = {
  unlabelled: "#9aa3b2",
  queued: "#f59e0b",
  draft: "#a78bfa",
  submitted: "#3b82f6",
  reviewed: "#16a34a",
  rejected: "#ef4444",
};

// Uncertainty from low (blue) to high (red), on the scores' own range.
export function uncertaintyColor(score, lo, hi) {
  if (typeof score !== "number" || !Number.isFinite(score)) return null;
  const t = hi > lo ? Math.max(0, Math.min(1, (score - lo) / (hi - lo))) : 0.5;
  const stops = [[49, 54, 149], [116, 173, 209], [254, 224, 144], [244, 109, 67], [165, 0, 38]];
  const at = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(at));
  const f = at - i;
  const c = stops[i].map((v, k) => Math.round(v + (stops[i + 1][k] - v) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

export function scoreRange(tiles) {
  const scores = tiles.map((t) => t.score).filter((s) => typeof s === "number" && Number.isFinite(s));
  if (!scores.length) return null;
  return { lo: Math.min(...scores), hi: Math.max(...scores) };
}

// The columns (or rows) of a tile grid along one axis, from the origins of the tiles kept:
// slides keep only their tissue tiles, so a column can be missing from the origins, and the
// last tile is shifted inward to stay on the image (a smaller gap). The regular stride is the
// most common gap; the positions are the regular ones plus any shifted edge origin.
export function gridPositions(origins) {
  const sorted = [...new Set(origins)].sort((a, b) => a - b);
  if (sorted.length < 2) return sorted;
  const gaps = new Map();
  for (let i = 1; i < sorted.length; i += 1) {
    const gap = sorted[i] - sorted[i - 1];
    gaps.set(gap, (gaps.get(gap) || 0) + 1);
  }
  const [stride] = [...gaps.entries()].sort((a, b) => b[1] - a[1] || b[0] - a[0])[0];
  const positions = new Set(sorted);
  for (let p = sorted[0] % stride; p < sorted[sorted.length - 1]; p += stride) positions.add(p);
  return [...positions].sort((a, b) => a - b);
}

export function tileAt(tiles, x, y) {
  return tiles.find((t) => x >= t.x && x < t.x + t.w && y >= t.y && y < t.y + t.h) || null;
}

// Nuclei smaller than this on screen (px) are drawn as dots: stroking thousands of 2-px
// outlines costs a software canvas hundreds of ms and shows nothing more.
export const DOT_BELOW_PX = 5;
// Outlines are stroked in batches: one path per nucleus costs a call each, one path for
// thousands makes Skia's stroker slow (measured in Chromium: 6,000 nuclei, ~7x slower).
const STROKE_BATCH = 20;

function byColor(items, colorOf) {
  const groups = new Map();
  for (const item of items) {
    const color = colorOf(item);
    if (!color) continue;
    if (!groups.has(color)) groups.set(color, []);
    groups.get(color).push(item);
  }
  return groups;
}

// Draws the overlay for one frame in device pixels; returns what it drew (the viewer exposes it
// for tests). ctx: a cleared 2D context; dpr: device pixels per CSS pixel.
export function drawOverlay(ctx, { transform, rect, dpr = 1, cache, gridMode = "status", outlines = true, classColors = {},
  range = null }) {
  const k = dpr * transform.scale;
  const ox = dpr * transform.offsetX, oy = dpr * transform.offsetY;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  const drawn = { tiles: 0, nuclei: 0, outlines: 0, dots: 0, mode: "summary" };
  const tiles = cache.tilesIn(rect);
  if (gridMode !== "off") {
    const colorOf = gridMode === "uncertainty"
      ? (t) => uncertaintyColor(t.score, range?.lo ?? 0, range?.hi ?? 1) || STATUS_COLORS.unlabelled
      : (t) => STATUS_COLORS[t.status] || STATUS_COLORS.unlabelled;
    ctx.lineWidth = Math.max(1, dpr);
    for (const [color, group] of byColor(tiles, colorOf)) {
      ctx.beginPath();
      for (const t of group) ctx.rect(ox + k * t.x, oy + k * t.y, k * t.w, k * t.h);
      const quiet = gridMode === "status" && (color === STATUS_COLORS.unlabelled || color === STATUS_COLORS.queued);
      ctx.globalAlpha = gridMode === "uncertainty" ? 0.35 : quiet ? 0.06 : 0.16;
      ctx.fillStyle = color;
      ctx.fill();
      // Tiles a few pixels wide are a mesh of borders: only their fill shows then.
      if (k * group[0].w >= 8 * dpr) {
        ctx.globalAlpha = 0.7;
        ctx.strokeStyle = color;
        ctx.stroke();
      }
      drawn.tiles += group.length;
    }
  }
  if (outlines && showOutlines(transform.scale)) {
    drawn.mode = "outlines";
    ctx.globalAlpha = 0.95;
    ctx.lineWidth = 1.5 * dpr;
    const dotBelow = (DOT_BELOW_PX * dpr) / k; // in level-0 px
    for (const [color, group] of byColor(cache.visible(rect), (n) => classColors[n.class_id] || "#00e5ff")) {
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      let batch = 0;
      ctx.beginPath();
      for (const n of group) {
        const pts = n.polygon;
        if (pts.length < 2) continue;
        if (n.box.w < dotBelow && n.box.h < dotBelow) {
          const d = 2 * dpr;
          ctx.fillRect(ox + k * (n.box.x + n.box.w / 2) - d / 2, oy + k * (n.box.y + n.box.h / 2) - d / 2, d, d);
          drawn.dots += 1;
          continue;
        }
        ctx.moveTo(ox + k * pts[0][0], oy + k * pts[0][1]);
        for (let i = 1; i < pts.length; i += 1) ctx.lineTo(ox + k * pts[i][0], oy + k * pts[i][1]);
        ctx.closePath();
        drawn.outlines += 1;
        if (++batch === STROKE_BATCH) {
          ctx.stroke();
          ctx.beginPath();
          batch = 0;
        }
      }
      if (batch) ctx.stroke();
    }
    drawn.nuclei = drawn.outlines + drawn.dots;
  }
  ctx.globalAlpha = 1;
  return drawn;
}

// The highlighted tile under the pointer, drawn over the frame (cheap: no redraw of the rest).
export function drawHover(ctx, { transform, dpr = 1, tile }) {
  if (!tile) return;
  const k = dpr * transform.scale;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.globalAlpha = 1;
  ctx.strokeStyle = "#6a1b9a";
  ctx.lineWidth = 3 * dpr;
  ctx.strokeRect(dpr * transform.offsetX + k * tile.x, dpr * transform.offsetY + k * tile.y, k * tile.w, k * tile.h);
}

// The transform that maps a frame drawn at `from` onto the view at `to` (for moving the last
// frame while OpenSeadragon animates, instead of drawing every nucleus again each frame).
export function reproject(from, to, dpr = 1) {
  const k = to.scale / from.scale;
  return { k, dx: dpr * (to.offsetX - from.offsetX * k), dy: dpr * (to.offsetY - from.offsetY * k) };
}
