// Correction workspace: the tile in Label Studio's editor, pre-filled with the prediction as one
// polygon per nucleus. Submit stores a new annotation version and opens the next queued tile
// in place (the editor's script stays loaded).
import { api } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { addMerge, planEdits, pruneMerges } from "../lib/edits.js";
import { loadLabelStudio, NucleusEditor } from "../lib/editor.js";
import { duration, plural, relativeTime, roleAtLeast, statusLabel, withArticle } from "../lib/format.js";
import { badge, card, emptyState, errorBox, projectUrl, spinner, toast } from "../lib/layout.js";
import { typedPredictionNote } from "../lib/typed.js";

const SHORTCUTS = [
  ["Ctrl+Enter", "submit and open the next tile"],
  ["Ctrl+S", "save a draft (stay on this tile)"],
  ["Alt+N", "skip: give the tile back, open the next"],
  ["G", "merge the selected outlines into one nucleus"],
  ["click / Ctrl+click", "select / add to the selection"],
  ["Backspace", "delete the selected nucleus"],
  ["1", "pick the nucleus label, then click points to draw a new nucleus (click the first point to close)"],
  ["drag a point", "reshape; double-click an edge to add a point"],
  ["Ctrl+Z / Ctrl+Shift+Z", "undo / redo"],
  ["Ctrl + / Ctrl −, H", "zoom, pan"],
  ["V", "selection tool (drag a box to select several)"],
];

export async function render(main, { config }) {
  const { project, user } = config;
  const canEdit = roleAtLeast(project.my_role, "annotator");
  const perf = (window.__karyoPerf = window.__karyoPerf || []);
  const state = { tileId: config.tile_id, payload: null, editor: null, merges: [], busy: false, submitted: [], openedAt: 0 };

  const title = h("h1", {}, "Tile ", h("span", { "data-testid": "tile-id" }, String(state.tileId)));
  const sourceLine = h("div", { class: "muted source-line", "data-testid": "source" });
  const sourceSelect = h("select", { "aria-label": "Start from", "data-testid": "source-select" });
  const editorEl = h("div", { class: "editor", "data-testid": "editor", "data-ready": "0" }, spinner("Loading the editor…"));
  const perfLine = h("div", { class: "perf muted small", "data-testid": "perf" });
  const submitBtn = h("button", { class: "btn btn-primary", "data-testid": "submit", disabled: !canEdit || null, title: "Ctrl+Enter" }, "Submit");
  const draftBtn = h("button", { class: "btn", "data-testid": "save-draft", disabled: !canEdit || null, title: "Ctrl+S" }, "Save draft");
  const skipBtn = h("button", { class: "btn btn-ghost", "data-testid": "skip", disabled: !canEdit || null, title: "Alt+N" }, "Skip");
  const mergeBtn = h("button", { class: "btn btn-small", "data-testid": "merge", disabled: !canEdit || null, title: "G" }, "Merge selected");
  const mergeList = h("ul", { class: "merge-list" });
  const countLine = h("div", { class: "small", "data-testid": "region-count" });
  const history = h("div", { "data-testid": "history" }, spinner());
  const recent = h("ul", { class: "recent", "data-testid": "recent" });
  const lsLink = h("div", { class: "small" });
  // The tile in its image (issue 12): context_margin pixels around it, dimmed; nuclei outlined whole.
  const contextImg = h("img", { class: "tile-context", "data-testid": "tile-context", alt: "The tile in its image", width: "100%" });
  const contextNote = h("p", { class: "small muted" },
    `${project.context_margin ?? 64} px of the image around the tile, dimmed. Outlines: the image's accepted nuclei, whole — `,
    h("span", { style: "color:#00a8bd;font-weight:600" }, "cyan"), " where they cross the tile's border. A nucleus belongs to the tile that holds its centroid: the editor shows this tile's nuclei whole, margin parts included, and a submit keeps those; the neighbours' nuclei are outlined in cyan on the editor's picture and edited in their own tile.");
  const shortcuts = h("dl", { class: "shortcuts" }, SHORTCUTS.map(([k, v]) => [h("dt", {}, h("kbd", {}, k)), h("dd", {}, v)]));

  main.append(
    h("div", { class: "page-head compact" }, title, sourceLine,
      h("div", { class: "head-actions" },
        h("label", { class: "small" }, "Start from ", sourceSelect),
        h("a", { class: "btn btn-ghost btn-small", href: projectUrl(project, "queue/") }, "← Queue"))),
    canEdit ? "" : h("div", { class: "note" }, `You are ${withArticle(project.my_role)}: you can inspect the outlines, but saving needs the annotator role.`),
    h("div", { class: "workspace" },
      h("div", { class: "editor-wrap" }, editorEl, perfLine),
      h("aside", { class: "side" },
        card(null, h("div", { class: "actions" }, submitBtn, draftBtn, skipBtn)),
        card("Nuclei", h("div", {}, countLine,
          h("p", { class: "small muted" }, "Split a merged pair: draw an outline over one of them — a later outline wins where they overlap. Merge fragments: select them (Ctrl+click) and press G."),
          mergeBtn, mergeList)),
        card("Context", h("div", {}, contextImg, contextNote)),
        card("History of this tile", history),
        card("Submitted in this session", recent),
        lsLink,
        card("Keyboard", shortcuts, { className: "collapsible" }))));

  function setCount() {
    const n = state.editor?.regionCount() ?? 0;
    countLine.textContent = `${plural(n, "outline")} in the editor · ${plural(state.payload?.nuclei ?? 0, "nucleus", "nuclei")} when opened`;
  }

  function renderMerges() {
    replace(mergeList, state.merges.map((group, i) =>
      h("li", {}, `${group.join(" + ")} → one nucleus `,
        h("button", { class: "btn-link", onclick: () => { state.merges.splice(i, 1); renderMerges(); } }, "undo"))));
  }

  async function loadHistory(tileId) {
    try {
      const versions = await api(`/api/tiles/${tileId}/annotations/?limit=50`);
      if (tileId !== state.tileId) return;
      replace(history, versions.results.length
        ? h("ol", { class: "versions" }, versions.results.map((a) =>
          h("li", { "data-testid": "history-version", "data-version": a.version },
            h("strong", {}, `v${a.version}`), " ", badge(a.status, statusLabel(a.status)),
            h("div", { class: "small muted" }, `${a.author ?? "?"} · ${a.source.replace("_", " ")} · ${plural(a.nucleus_count, "nucleus", "nuclei")} · ${relativeTime(a.created_at)}`),
            a.review_comment ? h("div", { class: "small comment" }, `“${a.review_comment}” — ${a.reviewed_by}`) : null,
            h("button", { class: "btn-link small", onclick: () => openTile(tileId, { source: "annotation", annotation: a.id }) }, "open this version"))))
        : h("p", { class: "muted small" }, "No annotation yet: this will be version 1."));
    } catch (error) {
      replace(history, errorBox(error));
    }
  }

  function fillSourceSelect(payload) {
    const options = [["auto", "newest (prediction or annotation)"]];
    if (payload.prediction) options.push(["prediction", `prediction of model v${payload.prediction.version}`]);
    if (payload.annotation) options.push(["annotation", `annotation v${payload.annotation.version}`]);
    options.push(["empty", "an empty tile"]);
    replace(sourceSelect, options.map(([value, label]) => h("option", { value }, label)));
    sourceSelect.value = payload.source === "prediction" ? "prediction" : payload.source === "annotation" ? "annotation" : "empty";
  }

  async function openTile(tileId, { source = "auto", annotation = null, push = false } = {}) {
    const started = performance.now();
    state.editor?.destroy();
    state.editor = null;
    state.tileId = tileId;
    state.merges = [];
    renderMerges();
    title.lastChild.textContent = String(tileId);
    if (push) history_push(tileId);
    replace(editorEl, spinner("Loading the tile…"));
    editorEl.dataset.ready = "0";
    contextImg.src = `/api/tiles/${tileId}/context.png?size=512`;
    loadHistory(tileId);
    let payload;
    try {
      const query = new URLSearchParams({ source });
      if (annotation) query.set("annotation", annotation);
      const [LabelStudio, data] = await Promise.all([
        loadLabelStudio(config.label_studio),
        api(`/api/tiles/${tileId}/regions/?${query}`),
      ]);
      payload = data;
      state.payload = payload;
      const fetched = performance.now();
      fillSourceSelect(payload);
      replace(sourceLine,
        `${payload.tile.image_name} at (${payload.tile.x}, ${payload.tile.y}), ${payload.tile.w}×${payload.tile.h} px · opened from `,
        h("strong", {}, payload.source === "prediction" ? `the prediction of model v${payload.prediction.version}`
          : payload.source === "annotation" ? `annotation v${payload.annotation.version} (${statusLabel(payload.annotation.status)})` : "an empty tile"),
        ` · ${plural(payload.nuclei, "nucleus", "nuclei")}`,
        payload.source === "prediction" && payload.prediction?.typed ? typedPredictionNote(payload.result) : null,
        payload.source === "empty" && !payload.prediction ? h("span", { class: "note-inline" }, " — no prediction yet (no model), draw the nuclei yourself") : null);
      replace(lsLink, payload.label_studio?.task_url
        ? h("a", { class: "link", href: payload.label_studio.task_url, target: "_blank", rel: "noopener" }, "Open this task in the Label Studio server ↗")
        : null);
      // The editor shows the tile with its context margin (the frame): nuclei the tile owns are
      // edited whole, the margin is dimmed and the neighbours' nuclei are outlined on the picture.
      const frame = payload.frame ?? { w: payload.tile.w, h: payload.tile.h };
      editorEl.dataset.frame = `${frame.w}x${frame.h}`;
      const editor = new NucleusEditor(editorEl, {
        config: payload.config, imageUrl: payload.tile.image_url, result: payload.result, taskId: tileId, user,
        width: frame.w, height: frame.h,
        onChange: () => setCount(),
        onSubmitShortcut: () => submit("submitted"),
      });
      state.editor = editor;
      window.karyoEditor = editor; // a handle for debugging and the browser tests
      await editor.mount(LabelStudio);
      if (state.editor !== editor) return;
      editor.fitTheView();
      state.openedAt = performance.now();
      const record = {
        tile: tileId, nuclei: payload.nuclei, points: payload.result.reduce((n, r) => n + r.value.points.length, 0),
        fetch_ms: fetched - started, server_ms: payload.server_ms, editor_ms: editor.timings.open_ms,
        regions_ms: editor.timings.regions_ms, open_ms: state.openedAt - started,
      };
      perf.push({ kind: "open", ...record });
      replace(perfLine, `Opened ${plural(record.nuclei, "nucleus", "nuclei")} in ${duration(record.open_ms)} (data ${duration(record.fetch_ms)}, editor ${duration(record.editor_ms)}).`);
      setCount();
    } catch (error) {
      replace(editorEl, errorBox(error, () => openTile(tileId, { source })));
    }
  }

  function history_push(tileId) {
    const url = projectUrl(project, `tiles/${tileId}/`) + (location.search || "");
    window.history.pushState({ tileId }, "", url);
  }

  function currentBase() {
    const p = state.payload;
    if (p.source === "prediction") return { kind: "prediction", id: p.prediction.id };
    if (p.source === "annotation") return { kind: "annotation", id: p.annotation.id };
    return { kind: "empty" };
  }

  async function submit(status) {
    if (!canEdit || state.busy || !state.editor || editorEl.dataset.ready !== "1") return;
    state.busy = true;
    submitBtn.disabled = draftBtn.disabled = true;
    // Not ready while saving: the tile on screen is about to be replaced by the next one.
    editorEl.dataset.ready = "saving";
    const started = performance.now();
    const tileId = state.tileId;
    try {
      const current = state.editor.results();
      const serialized = performance.now();
      const plan = planEdits(state.payload.result, current, pruneMerges(state.merges, state.editor.regionIds()));
      const saved = await api(`/api/tiles/${tileId}/regions/`, {
        method: "POST",
        body: { base: currentBase(), regions: plan.regions, deleted: plan.deleted, merges: plan.merges, status,
          frame: state.payload.frame ? { x: state.payload.frame.x, y: state.payload.frame.y, w: state.payload.frame.w, h: state.payload.frame.h } : undefined,
          // Time with this tile open (member activity on the dashboard), capped like the server.
          seconds_spent: state.openedAt ? Math.min(86400, Math.round((performance.now() - state.openedAt) / 1000)) : undefined },
      });
      const stored = performance.now();
      const record = { kind: "submit", tile: tileId, status, version: saved.version, sent_regions: plan.regions.length,
        serialize_ms: serialized - started, request_ms: stored - serialized, server_ms: saved.edit.server_ms, submit_ms: stored - started, ...plan.stats };
      perf.push(record);
      state.submitted.push(tileId);
      recent.prepend(h("li", { "data-testid": "recent-item" },
        h("a", { href: projectUrl(project, `tiles/${tileId}/`) }, `tile ${tileId}`), ` → v${saved.version} `, badge(saved.status, statusLabel(saved.status)),
        h("span", { class: "muted small" }, ` ${plan.stats.reshaped} reshaped, ${plan.stats.added} added, ${plan.stats.deleted} deleted, ${plan.stats.merged} merged`)));
      toast(`Saved tile ${tileId} as version ${saved.version} (${duration(record.submit_ms)}).`, "ok");
      replace(perfLine, `Saved v${saved.version} in ${duration(record.submit_ms)} (server ${duration(saved.edit.server_ms)}).`);
      if (status === "draft") {
        await openTile(tileId, { source: "annotation", annotation: saved.id });
        return;
      }
      await nextTile(tileId);
    } catch (error) {
      toast(`Not saved: ${error.message}`, "error", 8000);
      if (state.editor && state.tileId === tileId) editorEl.dataset.ready = "1";
    } finally {
      state.busy = false;
      submitBtn.disabled = draftBtn.disabled = !canEdit;
    }
  }

  async function nextTile(justDone) {
    const started = performance.now();
    let entry = null;
    try {
      entry = await api(`/api/projects/${project.id}/queue/next/`, { method: "POST" });
    } catch (error) {
      toast(error.message, "error");
    }
    if (!entry || entry.tile === justDone) {
      state.editor?.destroy();
      state.editor = null;
      replace(editorEl, emptyState("The queue is empty", entry
        ? "The next tile in the queue is the one you just submitted (it waits for review). Nothing else is waiting."
        : "Every ranked tile is annotated or being annotated by someone else. Thank you! New tiles appear after the next training run re-ranks the queue.",
      h("div", { class: "head-actions" }, h("a", { class: "btn", href: projectUrl(project) }, "Dashboard"), h("a", { class: "btn", href: projectUrl(project, "queue/") }, "Queue")), "ok"));
      editorEl.dataset.ready = "done";
      return;
    }
    await openTile(entry.tile, { push: true });
    perf.push({ kind: "next", tile: entry.tile, next_ms: performance.now() - started });
  }

  async function skip() {
    if (!canEdit || state.busy) return;
    state.busy = true;
    try {
      await api(`/api/projects/${project.id}/queue/release/`, { method: "POST" });
      await nextTile(state.tileId);
    } catch (error) {
      toast(error.message, "error");
    } finally {
      state.busy = false;
    }
  }

  function merge() {
    const ids = state.editor?.selectedRegionIds() ?? [];
    if (ids.length < 2) {
      toast("Select two or more outlines first (Ctrl+click each, or drag a box with the selection tool V).", "info");
      return;
    }
    state.merges = addMerge(state.merges, ids);
    renderMerges();
    toast(`${ids.length} outlines will be saved as one nucleus.`, "ok");
  }

  submitBtn.addEventListener("click", () => submit("submitted"));
  draftBtn.addEventListener("click", () => submit("draft"));
  skipBtn.addEventListener("click", skip);
  mergeBtn.addEventListener("click", merge);
  sourceSelect.addEventListener("change", () => openTile(state.tileId, { source: sourceSelect.value }));
  window.addEventListener("popstate", (e) => {
    if (e.state?.tileId) openTile(e.state.tileId);
  });
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement?.tagName);
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      e.stopPropagation();
      submit("submitted");
    } else if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "s") {
      e.preventDefault();
      submit("draft");
    } else if (e.altKey && e.key.toLowerCase() === "n") {
      e.preventDefault();
      skip();
    } else if (!typing && !e.ctrlKey && !e.metaKey && !e.altKey && e.key.toLowerCase() === "g") {
      merge();
    }
  }, true);

  window.history.replaceState({ tileId: state.tileId }, "", location.href);
  await openTile(state.tileId);
}
