// The slide viewer (/projects/<id>/images/<image>/): OpenSeadragon over the image's Deep Zoom
// tiles, with one canvas on top for the tile grid (coloured by status or by uncertainty) and the
// nuclei outlines of the tiles in view (the latest accepted annotation, else the active model's
// prediction; fetched per viewport, see lib/overlay.js). A click on a tile opens it in the
// correction workspace.
import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { plural } from "../lib/format.js";
import { errorBox, progressBar, projectUrl, spinner } from "../lib/layout.js";
import { NucleusCache, STATUS_COLORS, drawHover, drawOverlay, grow, reproject, scoreRange, showOutlines, tileAt, uncertaintyColor,
  viewTransform, visibleRect } from "../lib/overlay.js";

export const OPENSEADRAGON_VERSION = "6.1.1"; // frontend/package.json's; build.mjs copies it to dist/vendor/
const NUCLEI_LIMIT = 20000;
const FETCH_DEBOUNCE_MS = 200;

let loading = null;
function loadOpenSeadragon() {
  if (globalThis.OpenSeadragon) return Promise.resolve(globalThis.OpenSeadragon);
  const base = new URL(`../../vendor/openseadragon-${OPENSEADRAGON_VERSION}/`, import.meta.url);
  loading ??= new Promise((resolve, reject) => {
    const script = h("script", { src: new URL("openseadragon.min.js", base).href });
    script.onload = () => resolve(globalThis.OpenSeadragon);
    script.onerror = () => reject(new Error("The slide viewer (OpenSeadragon) could not be loaded: run `make frontend`."));
    document.head.append(script);
  });
  return loading.then((osd) => Object.assign(osd, { karyoImages: new URL("images/", base).href }));
}

const SOURCE_LABELS = { annotation: "latest accepted annotation", prediction: "active model's prediction",
  mixed: "accepted annotations, else the active model's prediction" };

function legend(mode, range) {
  if (mode === "status") {
    return h("div", { class: "legend-row" }, Object.entries(STATUS_COLORS).map(([k, color]) =>
      h("span", { class: "legend-item" }, h("i", { class: "dot", style: { background: color } }), k)));
  }
  if (mode === "uncertainty") {
    return h("div", { class: "legend-row" }, h("span", { class: "muted small" }, range ? `uncertainty ${range.lo.toFixed(2)}` : "no scores yet"),
      range ? h("span", { class: "ramp", style: { background: `linear-gradient(90deg, ${[0, 0.25, 0.5, 0.75, 1].map((t) => uncertaintyColor(t, 0, 1)).join(", ")})` } }) : null,
      range ? h("span", { class: "muted small" }, range.hi.toFixed(2)) : null);
  }
  return h("div", { class: "legend-row" });
}

export async function render(main, { config, socket }) {
  const { project, image_id: imageId } = config;
  const head = h("div", { class: "page-head compact" }, h("a", { href: projectUrl(project, "images/"), class: "link" }, "← Images"));
  const body = h("div", {}, spinner("Opening the slide…"));
  main.append(head, body);
  let image;
  try {
    image = await api(`/api/images/${imageId}/`);
  } catch (error) {
    replace(body, errorBox(error, () => location.reload()));
    return;
  }
  const size = `${image.width.toLocaleString("en")} × ${image.height.toLocaleString("en")} px`;
  replace(head, h("a", { href: projectUrl(project, "images/"), class: "link" }, "← Images"),
    h("h1", { "data-testid": "slide-name" }, image.name),
    h("span", { class: "muted" }, size, image.microns_per_pixel ? ` · ${image.microns_per_pixel.toFixed(3)} µm/px` : "",
      image.tiles_grid ? ` · ${image.tiles_kept} of ${plural(image.tiles_grid, "grid tile")} kept` : ""));

  if (image.state && image.state !== "ready") {
    const waiting = image.state === "failed"
      ? h("div", { class: "error-box", role: "alert" }, h("strong", {}, "Ingest failed. "), image.state_reason || "")
      : h("div", { class: "card" }, h("p", {}, "This slide is still being ingested."), progressBar(image.ingest_progress, `${Math.round((image.ingest_progress || 0) * 100)}%`));
    replace(body, waiting);
    socket?.subscribe((event) => {
      if (event.kind === "image.ingest" && event.image_id === image.id && event.state !== "ingesting") location.reload();
    });
    return;
  }

  let tiles, osd;
  try {
    [tiles, osd] = await Promise.all([api(`/api/images/${imageId}/tiles/`), loadOpenSeadragon()]);
  } catch (error) {
    replace(body, errorBox(error, () => location.reload()));
    return;
  }
  // The tiles endpoint gives each tile's footprint in level-0 px (already scaled from the
  // working resolution), like the nuclei's polygons.
  const footprints = tiles;
  let cache = new NucleusCache(footprints);
  const range = scoreRange(footprints);
  const classColors = Object.fromEntries((project.nucleus_classes || []).map((c) => [c.id, c.color]));

  const state = { gridMode: "status", outlines: true, hover: null, source: undefined, truncated: false, fetching: false };
  const status = h("div", { class: "overlay-status muted small", "data-testid": "overlay-status" }, "");
  const legendBox = h("div", {}, legend(state.gridMode, range));
  const modeButtons = ["status", "uncertainty", "off"].map((mode) => h("button", {
    type: "button", class: ["tab", mode === state.gridMode && "active"], "data-testid": `grid-${mode}`,
    onclick: () => {
      state.gridMode = mode;
      for (const b of modeButtons) b.classList.toggle("active", b.dataset.testid === `grid-${mode}`);
      replace(legendBox, legend(mode, range));
      redraw();
    },
  }, { status: "Tiles by status", uncertainty: "By uncertainty", off: "No grid" }[mode]));
  const outlineToggle = h("input", { type: "checkbox", checked: true, "data-testid": "outlines-toggle",
    onchange: (e) => {
      state.outlines = e.target.checked;
      redraw();
      scheduleFetch();
    } });
  const toolbar = h("div", { class: "slide-toolbar" },
    h("div", { class: "tabs" }, modeButtons),
    h("label", { class: "check" }, outlineToggle, " Nuclei outlines"),
    legendBox, status);
  const viewerEl = h("div", { class: "slide-viewer", id: "slide-viewer", "data-testid": "slide-viewer" });
  replace(body, toolbar, viewerEl,
    tiles.length ? null : h("p", { class: "muted" }, "No tiles on this slide (no tissue found above the project's minimum tissue fraction)."));

  const viewer = osd({
    element: viewerEl,
    prefixUrl: osd.karyoImages,
    tileSources: `/api/images/${imageId}/slide.dzi`,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    animationTime: 0.5,
    drawer: "canvas", // the WebGL drawer needs a GPU-backed context that headless and remote sessions often lack
  });
  window.karyoViewer = viewer;

  const canvas = h("canvas", { class: "slide-overlay", "data-testid": "slide-overlay" });
  viewer.canvas.append(canvas);
  const ctx = canvas.getContext("2d");

  function transform() {
    return viewTransform(osd, viewer);
  }

  // Frames: a full frame draws the grid and every nucleus in view into `buffer`; while
  // OpenSeadragon animates (zoom, pan, drag) the last full frame is moved with the view, and a
  // full frame follows when the view rests (or a throttled one during long drags). So panning
  // stays smooth whatever the number of nuclei in view.
  const buffer = document.createElement("canvas");
  const bufferCtx = buffer.getContext("2d");
  let bufferAt = null; // the transform the buffer was drawn at
  let lastFull = 0;
  let lastDrawn = { nuclei: 0, tiles: 0, mode: "summary", ms: 0 };
  let frame = 0;
  let wantFull = true;
  function redraw(full = true) {
    wantFull = wantFull || full;
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(paint);
  }
  const moved = () => redraw(false);

  function paint() {
    if (!viewer.world.getItemCount()) return;
    const dpr = window.devicePixelRatio || 1;
    const { clientWidth: w, clientHeight: hgt } = viewer.canvas;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(hgt * dpr)) {
      for (const c of [canvas, buffer]) {
        c.width = Math.round(w * dpr);
        c.height = Math.round(hgt * dpr);
      }
      canvas.style.width = `${w}px`;
      canvas.style.height = `${hgt}px`;
      wantFull = true;
    }
    const t = transform();
    const now = performance.now();
    // During an animation a full frame is redrawn only when it is cheap (measured on the last one).
    if (wantFull || !bufferAt || (now - lastFull > 250 && lastDrawn.ms < 40)) {
      bufferCtx.setTransform(1, 0, 0, 1, 0, 0);
      bufferCtx.clearRect(0, 0, buffer.width, buffer.height);
      const rect = visibleRect(t, w, hgt, image);
      const started = performance.now();
      lastDrawn = drawOverlay(bufferCtx, { transform: t, rect, dpr, cache, gridMode: state.gridMode, outlines: state.outlines,
        classColors, range });
      lastDrawn.ms = Math.round(performance.now() - started);
      bufferAt = t;
      lastFull = performance.now();
      wantFull = false;
      Object.assign(canvas.dataset, { nuclei: lastDrawn.nuclei, outlines: lastDrawn.outlines, tiles: lastDrawn.tiles,
        mode: lastDrawn.mode, ms: lastDrawn.ms });
    }
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const { k, dx, dy } = reproject(bufferAt, t, dpr);
    ctx.setTransform(k, 0, 0, k, dx, dy);
    ctx.drawImage(buffer, 0, 0);
    drawHover(ctx, { transform: t, dpr, tile: state.hover });
    describe(lastDrawn, t);
  }

  function describe(drawn, t) {
    const parts = [];
    if (!state.outlines) parts.push("Outlines hidden.");
    else if (!showOutlines(t.scale)) parts.push("Zoomed out: tiles only; zoom in to see the nuclei outlines.");
    else if (state.source === null) parts.push("No annotation or prediction for the tiles in view yet.");
    else if (state.source) {
      parts.push(`${drawn.nuclei.toLocaleString("en")} nuclei in view (${SOURCE_LABELS[state.source] || state.source}).`);
      if (state.truncated) parts.push("Too many to load at once: zoom in for all of them.");
    }
    if (state.predicting) parts.push(`Predicting the slide: ${state.predicting.done} of ${plural(state.predicting.total, "tile")}.`);
    if (state.fetching) parts.push("Loading outlines…");
    if (state.hover) parts.push(`Tile ${state.hover.id} (${state.hover.status || "unlabelled"}${typeof state.hover.score === "number" ? `, score ${state.hover.score.toFixed(3)}` : ""}): click to open it.`);
    status.textContent = parts.join(" ");
    status.title = status.textContent;
  }

  let timer = null;
  let controller = null;
  function scheduleFetch() {
    clearTimeout(timer);
    timer = setTimeout(fetchNuclei, FETCH_DEBOUNCE_MS);
  }

  async function fetchNuclei() {
    if (!viewer.world.getItemCount() || !state.outlines) return;
    const t = transform();
    const view = visibleRect(t, viewer.canvas.clientWidth, viewer.canvas.clientHeight, image);
    cache.touch(view);
    if (!showOutlines(t.scale)) return;
    const ask = cache.missing(grow(view, 0.25, image));
    if (!ask || ask.w <= 0 || ask.h <= 0) return;
    controller?.abort();
    controller = new AbortController();
    const r = { x: Math.floor(ask.x), y: Math.floor(ask.y), w: Math.ceil(ask.w), h: Math.ceil(ask.h) };
    state.fetching = true;
    redraw();
    try {
      const answer = await api(`/api/images/${imageId}/nuclei/?x=${r.x}&y=${r.y}&w=${r.w}&h=${r.h}&limit=${NUCLEI_LIMIT}`, { signal: controller.signal });
      cache.add(r, answer);
      if (answer.source !== null || state.source === undefined) state.source = answer.source;
      state.truncated = Boolean(answer.truncated);
      state.fetching = false;
      redraw();
    } catch (error) {
      if (error?.name === "AbortError") return;
      state.fetching = false;
      status.textContent = `Outlines could not be loaded: ${error.message}`;
    }
  }

  for (const event of ["animation", "update-viewport"]) viewer.addHandler(event, moved);
  for (const event of ["animation-finish", "resize", "open"]) viewer.addHandler(event, () => redraw());
  for (const event of ["animation-finish", "open", "resize"]) viewer.addHandler(event, scheduleFetch);
  viewer.addHandler("open-failed", (e) => replace(body, errorBox(new Error(`The slide's tiles could not be opened: ${e.message || "unknown error"}`))));

  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick) return;
    const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
    const tile = tileAt(footprints, p.x, p.y);
    if (tile) location.href = projectUrl(project, `tiles/${tile.id}/`);
  });
  new osd.MouseTracker({
    element: viewer.canvas,
    moveHandler: (e) => {
      const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
      const tile = tileAt(footprints, p.x, p.y);
      if (tile !== state.hover) {
        state.hover = tile;
        viewer.canvas.style.cursor = tile ? "pointer" : "";
        redraw(false);
      }
    },
    leaveHandler: () => {
      state.hover = null;
      redraw(false);
    },
  });

  // Whole-slide prediction: progress in the status line; when it ends the outlines are fetched again.
  socket?.subscribe((event) => {
    if (event.kind !== "slide.predict" || event.image_id !== image.id) return;
    const finished = event.total && event.done >= event.total;
    state.predicting = finished ? null : { done: event.done, total: event.total };
    if (finished) {
      cache = new NucleusCache(footprints);
      state.source = undefined;
      scheduleFetch();
    }
    redraw(false);
  });

  // Tile statuses change as people annotate: refresh the grid on those events.
  let refresh = null;
  socket?.subscribe((event) => {
    if (!["annotation.submitted", "annotation.reviewed", "queue.ranked", "predict.done", "model.promoted"].includes(event.kind)) return;
    clearTimeout(refresh);
    refresh = setTimeout(async () => {
      const fresh = await api(`/api/images/${imageId}/tiles/`).catch(() => null);
      if (!fresh) return;
      const byId = new Map(fresh.map((t) => [t.id, t]));
      for (const t of footprints) Object.assign(t, { status: byId.get(t.id)?.status ?? t.status, score: byId.get(t.id)?.score ?? t.score });
      redraw();
    }, 800);
  });
}
