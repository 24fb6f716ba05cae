import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { GridIndex, NucleusCache, OUTLINE_MIN_SCALE, drawOverlay, gridPositions, grow, intersects, reproject, scoreRange, tileAt,
  uncertaintyColor, visibleRect } from "../src/lib/overlay.js";

// A seeded generator, so a failure can be replayed.
function rng(seed) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

function grid(width, height, size) {
  const tiles = [];
  let id = 1;
  for (let y = 0; y < height; y += size) for (let x = 0; x < width; x += size) {
    tiles.push({ id: id++, x, y, w: Math.min(size, width - x), h: Math.min(size, height - y), status: "unlabelled", score: null });
  }
  return tiles;
}

// ~n nuclei (octagons of radius 4-9 px) spread over the tiles, each inside its tile.
function nucleiOn(tiles, n, seed = 1) {
  const rand = rng(seed);
  const out = [];
  for (let i = 0; i < n; i += 1) {
    const t = tiles[Math.floor(rand() * tiles.length)];
    const r = 4 + rand() * 5;
    const cx = t.x + r + rand() * (t.w - 2 * r), cy = t.y + r + rand() * (t.h - 2 * r);
    const polygon = Array.from({ length: 8 }, (_, k) => [cx + r * Math.cos((k * Math.PI) / 4), cy + r * Math.sin((k * Math.PI) / 4)]);
    out.push({ id: i + 1, tile_id: t.id, class_id: 1 + (i % 2), polygon });
  }
  return out;
}

// The calls a CanvasRenderingContext2D would get, counted.
function recordingContext() {
  const calls = { moveTo: 0, lineTo: 0, stroke: 0, strokeRect: 0, fillRect: 0, rect: 0, fill: 0, points: [] };
  const ctx = {
    setTransform() {}, beginPath() {}, closePath() {},
    rect() { calls.rect += 1; },
    fill() { calls.fill += 1; },
    moveTo(x, y) { calls.moveTo += 1; calls.points.push([x, y]); },
    lineTo() { calls.lineTo += 1; },
    stroke() { calls.stroke += 1; },
    strokeRect() { calls.strokeRect += 1; },
    fillRect() { calls.fillRect += 1; },
  };
  return { ctx, calls };
}

const SLIDE = { width: 20480, height: 20480 };

describe("the spatial index", () => {
  it("returns exactly the boxes that intersect a rectangle, each once", () => {
    const rand = rng(7);
    const index = new GridIndex(300);
    const items = Array.from({ length: 3000 }, (_, i) => ({ i, box: { x: rand() * 5000, y: rand() * 5000, w: rand() * 700, h: rand() * 40 } }));
    for (const item of items) index.insert(item);
    for (const rect of [{ x: 0, y: 0, w: 800, h: 600 }, { x: 2345, y: 1000, w: 1, h: 1 }, { x: -50, y: 4000, w: 9000, h: 3000 }]) {
      const got = index.query(rect).map((item) => item.i).sort((a, b) => a - b);
      const want = items.filter((item) => intersects(item.box, rect)).map((item) => item.i);
      expect(got).toEqual(want);
    }
  });
});

describe("viewport geometry", () => {
  it("turns the viewer's transform into the level-0 rectangle in view, clipped to the slide", () => {
    const t = { scale: 0.5, offsetX: -1000, offsetY: 100 };
    expect(visibleRect(t, 1440, 900, SLIDE)).toEqual({ x: 2000, y: 0, w: 2880, h: 1600 });
    expect(grow({ x: 100, y: 100, w: 1000, h: 1000 }, 0.25, { width: 1200, height: 5000 })).toEqual({ x: 0, y: 0, w: 1200, h: 1350 });
  });
  it("finds the tile under a click", () => {
    const tiles = grid(1000, 1000, 256);
    expect(tileAt(tiles, 300, 10).id).toBe(2);
    expect(tileAt(tiles, 999, 999).id).toBe(16);
    expect(tileAt(tiles, 1200, 5)).toBeNull();
  });
  it("finds the grid's columns when background tiles are missing and the edge tile is shifted", () => {
    // A 2400-px slide in 256-px tiles: the last tile starts at 2144; columns 2 and 5 had no tissue.
    expect(gridPositions([0, 256, 768, 1024, 1536, 1792, 2048, 2144])).toEqual([0, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2144]);
    expect(gridPositions([128])).toEqual([128]);
    expect(gridPositions([])).toEqual([]);
  });
});

describe("nuclei per viewport", () => {
  const tiles = grid(SLIDE.width, SLIDE.height, 256);
  const all = nucleiOn(tiles, 100_000);
  // The server's answer for a rectangle: every nucleus of each tile intersecting it.
  const answer = (rect, limit = Infinity) => {
    const ids = new Set(tiles.filter((t) => intersects(t, rect)).map((t) => t.id));
    const nuclei = all.filter((n) => ids.has(n.tile_id));
    return { source: "prediction", nuclei: nuclei.slice(0, limit), truncated: nuclei.length > limit };
  };

  it("asks only for the tiles it does not have yet", () => {
    const cache = new NucleusCache(tiles);
    const view = { x: 1000, y: 1000, w: 1440, h: 900 };
    expect(cache.missing(view)).toEqual(view);
    cache.add(view, answer(view));
    expect(cache.missing(view)).toBeNull();
    const panned = { x: 2000, y: 1000, w: 1440, h: 900 };
    const ask = cache.missing(panned);
    expect(ask.x).toBeGreaterThanOrEqual(2440 - 256);
    expect(ask.x + ask.w).toBe(3440);
  });

  it("does not keep a truncated answer", () => {
    const cache = new NucleusCache(tiles);
    const view = { x: 0, y: 0, w: 4000, h: 4000 };
    const partial = answer(view, 500);
    cache.add(view, partial);
    expect(cache.visible(view)).toHaveLength(partial.nuclei.filter((n) => n.polygon.some(([x, y]) => x < 4000 && y < 4000)).length);
    expect(cache.missing(view)).toEqual(view);
  });

  it("draws only the nuclei in view, with 100,000 on the slide", (t) => {
    const cache = new NucleusCache(tiles, { maxNuclei: 200_000 });
    const whole = { x: 0, y: 0, ...{ w: SLIDE.width, h: SLIDE.height } };
    cache.add(whole, answer(whole));
    expect(cache.count).toBe(100_000);
    const transform = { scale: 0.5, offsetX: -6000, offsetY: -4000 };
    const rect = visibleRect(transform, 1440, 900, SLIDE);
    const { ctx, calls } = recordingContext();
    const started = performance.now();
    const drawn = drawOverlay(ctx, { transform, rect, cache, gridMode: "status", classColors: { 1: "#ff0", 2: "#0ff" } });
    const ms = performance.now() - started;
    t.diagnostic(`drew ${drawn.nuclei} of 100000 nuclei and ${drawn.tiles} tiles in ${ms.toFixed(1)} ms`);
    const want = all.filter((n) => n.polygon.some(([x, y]) => x >= rect.x - 9 && x <= rect.x + rect.w + 9 && y >= rect.y - 9 && y <= rect.y + rect.h + 9));
    expect(drawn.mode).toBe("outlines");
    expect(drawn.nuclei).toBeGreaterThan(0);
    expect(Math.abs(drawn.nuclei - want.length)).toBeLessThanOrEqual(want.length * 0.02 + 5);
    expect(drawn.nuclei).toBeLessThan(2000);
    expect(calls.moveTo).toBe(drawn.outlines);
    expect(calls.fillRect).toBe(drawn.dots);
    expect(drawn.outlines).toBeGreaterThan(drawn.dots); // at half size most nuclei are still big enough to outline
    // Outlines are stroked in batches of 20 per class colour (2 colours here), tiles in one path per colour.
    expect(calls.stroke - 1).toBeLessThanOrEqual(Math.ceil(drawn.outlines / 20) + 2);
    expect(calls.stroke - 1).toBeGreaterThanOrEqual(Math.ceil(drawn.outlines / 20));
    expect(drawn.tiles).toBe(cache.tilesIn(rect).length);
    expect(calls.rect).toBe(drawn.tiles);
    expect(ms).toBeLessThan(250);
  });

  it("shows tile summaries instead of outlines when zoomed out", () => {
    const cache = new NucleusCache(tiles);
    const view = { x: 0, y: 0, w: 3000, h: 3000 };
    cache.add(view, answer(view));
    const transform = { scale: OUTLINE_MIN_SCALE / 2, offsetX: 0, offsetY: 0 };
    const { ctx, calls } = recordingContext();
    const drawn = drawOverlay(ctx, { transform, rect: visibleRect(transform, 1440, 900, SLIDE), cache, gridMode: "uncertainty",
      range: { lo: 0, hi: 1 } });
    expect(drawn.mode).toBe("summary");
    expect(calls.fill).toBeLessThanOrEqual(5); // one path per colour, not one per tile
    expect(drawn.nuclei).toBe(0);
    expect(calls.moveTo).toBe(0);
    expect(drawn.tiles).toBeGreaterThan(0);
  });

  it("keeps the cache bounded, dropping the tiles seen longest ago", () => {
    const cache = new NucleusCache(tiles, { maxNuclei: 5000 });
    const views = [0, 1, 2, 3, 4, 5].map((i) => ({ x: i * 3000, y: 0, w: 3000, h: 3000 }));
    for (const view of views) cache.add(view, answer(view));
    expect(cache.count).toBeLessThanOrEqual(5000);
    expect(cache.missing(views[5])).toBeNull();
    expect(cache.missing(views[0])).toEqual(views[0]);
  });
});

describe("moving the last frame while the view animates", () => {
  it("maps a point drawn at one transform to where the new transform puts it", () => {
    const from = { scale: 0.5, offsetX: 100, offsetY: -40 };
    const to = { scale: 0.8, offsetX: -300, offsetY: 25 };
    const { k, dx, dy } = reproject(from, to, 2);
    const x = 1234, y = 567; // level-0 point
    const drawnAt = [2 * (from.offsetX + from.scale * x), 2 * (from.offsetY + from.scale * y)];
    const want = [2 * (to.offsetX + to.scale * x), 2 * (to.offsetY + to.scale * y)];
    expect(Math.abs(k * drawnAt[0] + dx - want[0])).toBeLessThan(1e-9);
    expect(Math.abs(k * drawnAt[1] + dy - want[1])).toBeLessThan(1e-9);
  });
});

describe("tile colours", () => {
  it("maps uncertainty onto a blue-to-red scale over the scores' range", () => {
    expect(uncertaintyColor(0, 0, 1)).toBe("rgb(49, 54, 149)");
    expect(uncertaintyColor(1, 0, 1)).toBe("rgb(165, 0, 38)");
    expect(uncertaintyColor(null, 0, 1)).toBeNull();
    expect(scoreRange([{ score: 0.2 }, { score: null }, { score: 0.7 }])).toEqual({ lo: 0.2, hi: 0.7 });
    expect(scoreRange([{ score: null }])).toBeNull();
  });
});
