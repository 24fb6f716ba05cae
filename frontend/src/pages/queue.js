// The ranked queue: thumbnails with the prediction drawn, an uncertainty heat-map toggle, and
// "Start annotating" (leases the top tile nobody holds and opens it).
import { api, ApiError } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { etaText, metric, plural, relativeTime, roleAtLeast, runEtaSeconds, runProgress, withArticle } from "../lib/format.js";
import { card, emptyState, errorBox, onWorkerStatus, projectUrl, spinner, toast } from "../lib/layout.js";

export async function startAnnotating(project) {
  const entry = await api(`/api/projects/${project.id}/queue/next/`, { method: "POST" });
  if (!entry) return null;
  location.assign(projectUrl(project, `tiles/${entry.tile}/?from=queue`));
  return entry;
}

export async function render(main, { config, socket }) {
  const { project, user } = config;
  const canAnnotate = roleAtLeast(project.my_role, "annotator");
  const isAdmin = roleAtLeast(project.my_role, "admin");
  let showHeat = false;
  const start = h("button", { class: "btn btn-primary btn-large", "data-testid": "start-annotating", disabled: !canAnnotate || null }, "Start annotating");
  const heatToggle = h("label", { class: "toggle" }, h("input", { type: "checkbox", "data-testid": "heat-toggle" }), " Uncertainty heat map");
  const meta = h("div", { class: "queue-meta muted" });
  const banner = h("div", {});
  const grid = h("div", { class: "thumb-grid", "data-testid": "queue-grid" }, spinner("Loading the queue…"));
  const rankForm = isAdmin
    ? h("form", { class: "inline-form", onsubmit: async (e) => {
      e.preventDefault();
      const strategy = e.target.elements.strategy.value;
      try {
        await api(`/api/projects/${project.id}/rank/`, { method: "POST", body: { strategy } });
        toast(`Re-ranking with ${strategy}: the queue updates when the worker is done.`);
      } catch (error) {
        toast(error.message, "error");
      }
    } },
    h("select", { name: "strategy", "aria-label": "Strategy" }),
    h("button", { class: "btn btn-small", type: "submit" }, "Re-rank"))
    : null;

  start.addEventListener("click", async () => {
    start.disabled = true;
    try {
      const entry = await startAnnotating(project);
      if (!entry) {
        toast("The queue is empty: every ranked tile is annotated or held by someone else.", "info");
        start.disabled = false;
      }
    } catch (error) {
      toast(error.message, "error");
      start.disabled = false;
    }
  });
  heatToggle.querySelector("input").addEventListener("change", (e) => {
    showHeat = e.target.checked;
    grid.classList.toggle("show-heat", showHeat);
    if (showHeat) for (const img of grid.querySelectorAll("img.heat[data-src]")) {
      img.src = img.dataset.src;
      img.removeAttribute("data-src");
    }
  });

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Annotation queue"),
      h("p", { class: "muted" }, "Tiles ranked by how much a correction should teach the model. The prediction is already drawn: fix it and submit."),
      h("div", { class: "head-actions" }, start, heatToggle, rankForm)),
    banner, meta, grid);
  if (!canAnnotate) banner.append(h("div", { class: "note" }, `You are ${withArticle(project.my_role)} in this project: you can look at the queue, but annotating needs the annotator role.`));

  onWorkerStatus((status) => {
    banner.querySelector(".worker-offline")?.remove();
    if (!status.online) banner.append(h("div", { class: "note note-warn worker-offline", "data-testid": "worker-offline" },
      h("strong", {}, "The worker is offline. "), "Predictions, ranking and training wait until a worker runs (make run starts one). You can still annotate tiles already in the queue."));
  });

  async function load() {
    const [queue, summary] = await Promise.all([
      api(`/api/projects/${project.id}/queue/?limit=60`),
      api(`/api/projects/${project.id}/summary/`),
    ]);
    const entries = queue.results;
    const select = rankForm?.querySelector("select");
    if (select && !select.options.length) {
      for (const s of summary.strategies) select.append(h("option", { value: s, selected: s === summary.project.al_strategy || null }, s));
    }
    const first = entries[0];
    replace(meta,
      h("span", {}, plural(queue.count, "tile"), " in the queue"),
      first ? h("span", {}, " · strategy ", h("strong", { "data-testid": "strategy" }, first.strategy)) : null,
      first?.model_version ? h("span", {}, ` · scored by model v${summary.active_model?.version ?? "?"}`) : null,
      summary.queue.leased ? h("span", {}, ` · ${summary.queue.leased} being annotated`) : null);
    if (!entries.length) {
      const c = summary.counts;
      replace(grid, c.tiles === 0
        ? emptyState("No tiles yet", "Upload images to the project first; they are cut into tiles automatically.")
        : c.unlabelled === 0
          ? emptyState("Queue empty: everything is annotated", "Every tile has an annotation. Reviewers can accept or reject them on the Review page.", null, "ok")
          : emptyState("Queue empty", summary.active_model
            ? "The queue is being ranked or has not been ranked yet. An admin can re-rank it."
            : summary.live_run
              ? `The first model is training (${trainingNow(summary.live_run)}); the tiles are ranked as soon as it finishes.`
              : "No model has been trained yet, so nothing is ranked. An admin can rank the tiles at random (Re-rank → random) or launch a first training run.",
          isAdmin ? h("a", { class: "btn", href: projectUrl(project, "training/") }, "Training") : null));
      start.disabled = true;
      return;
    }
    start.disabled = !canAnnotate;
    banner.querySelector(".no-model")?.remove();
    if (!summary.active_model) banner.append(h("div", { class: "note no-model", "data-testid": "no-model-note" }, summary.live_run
      ? `The first model is training (${trainingNow(summary.live_run)}). Until it finishes, tiles are in random order and show no prediction.`
      : "No model yet: tiles are in random order and show no prediction. Corrections start from an empty tile."));
    replace(grid, entries.map((e) => {
      const mine = e.leased_by === user.username;
      const held = e.leased_by && !mine;
      return h("a", { class: ["thumb", held && "held", mine && "mine"], href: canAnnotate && !held ? projectUrl(project, `tiles/${e.tile}/?from=queue`) : null, "data-testid": "queue-tile", "data-tile": e.tile },
        h("div", { class: "thumb-img" },
          h("img", { src: `/api/tiles/${e.tile}/prediction.png?size=224`, alt: `tile ${e.tile}`, loading: "lazy" }),
          h("img", { class: "heat", "data-src": `/api/tiles/${e.tile}/uncertainty.png?size=224`, alt: "", onerror: (ev) => ev.target.closest(".thumb").classList.add("no-heat") }),
          h("span", { class: "rank" }, `#${e.rank + 1}`),
          h("span", { class: "no-heat-label" }, "no heat map")),
        h("div", { class: "thumb-meta" },
          h("span", {}, `tile ${e.tile}`),
          h("span", { class: "muted", title: "uncertainty score" }, `score ${metric(e.score, 3)}`),
          held ? h("span", { class: "held-by", title: `lease expires ${relativeTime(e.lease_expires_at)}` }, `with ${e.leased_by}`) : null,
          mine ? h("span", { class: "held-by mine" }, "yours") : null));
    }));
    if (showHeat) heatToggle.querySelector("input").dispatchEvent(new Event("change"));
  }

  try {
    await load();
  } catch (error) {
    replace(grid, errorBox(error instanceof ApiError ? error : new Error(String(error)), () => location.reload()));
    return;
  }
  let timer = null;
  socket?.subscribe((event) => {
    if (!event.kind.startsWith("queue.") && event.kind !== "model.promoted") return;
    clearTimeout(timer);
    timer = setTimeout(() => load().catch(() => {}), 500);
  });
}

function trainingNow(run) {
  const bar = runProgress(run, (run.epoch_metrics || []).length, Number(run.config?.epochs));
  return `run ${run.id}, ${bar.label}, ${etaText(runEtaSeconds(run))}`;
}
