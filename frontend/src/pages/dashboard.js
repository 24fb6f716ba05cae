// Project dashboard: progress, the active model, metrics per version, images and their tiles,
// recent activity. Refreshes itself on live events.
import { api, listAll } from "../lib/api.js";
import { lineChart } from "../lib/plot.js";
import { h, replace } from "../lib/dom.js";
import { etaText, metric, percent, plural, relativeTime, roleAtLeast, runEtaSeconds, runProgress, statusLabel, versionMetrics } from "../lib/format.js";
import { badge, card, emptyState, errorBox, progressBar, projectUrl, spinner } from "../lib/layout.js";
import { gridPositions } from "../lib/overlay.js";

export function versionChart(versions) {
  const sorted = [...versions].sort((a, b) => a.version - b.version);
  const pick = (key) => sorted.map((v) => [v.version, versionMetrics(v)[key]]).filter((p) => typeof p[1] === "number");
  return lineChart(
    [{ name: "Dice", color: "#2563eb", points: pick("dice") }, { name: "AJI", color: "#16a34a", points: pick("aji") }],
    { xLabel: "model version", yLabel: "validation", xInteger: true, yMin: 0, yMax: 1, emptyText: "No model trained yet", title: "Validation Dice and AJI per model version" },
  );
}

function stat(label, value, sub = null, testid = null) {
  return h("div", { class: "stat", "data-testid": testid }, h("div", { class: "stat-label" }, label), h("div", { class: "stat-value" }, value), sub ? h("div", { class: "stat-sub" }, sub) : null);
}

function activityTable(rows) {
  const hours = (s) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${Math.round(s / 60)} min` : s ? `${s} s` : "—");
  return h("table", { class: "table", "data-testid": "activity-table" },
    h("thead", {}, h("tr", {}, ["Member", "Role", "Tiles submitted", "Accepted", "Rejected", "Time in the workspace"].map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.map((r) => h("tr", { dataset: { username: r.username } },
      h("td", {}, h("strong", {}, r.username)), h("td", {}, h("span", { class: `role role-${r.role}` }, r.role)),
      h("td", {}, String(r.tiles_submitted)), h("td", {}, String(r.accepted)), h("td", {}, String(r.rejected)),
      h("td", { title: `${r.seconds_spent} s measured from opening a tile to submitting it` }, hours(r.seconds_spent))))));
}

export async function render(main, { config, socket }) {
  const { project } = config;
  const head = h("div", { class: "page-head" }, h("h1", {}, project.name));
  const body = h("div", {}, spinner());
  main.append(head, body);

  async function load() {
    const [summary, versions, events, images] = await Promise.all([
      api(`/api/projects/${project.id}/summary/`),
      listAll(`/api/projects/${project.id}/model-versions/`, { max: 200 }),
      api(`/api/projects/${project.id}/events/?limit=15`),
      api(`/api/projects/${project.id}/tiles-by-image/`),
    ]);
    const c = summary.counts;
    const active = summary.active_model;
    const live = summary.live_run;
    const canAnnotate = roleAtLeast(project.my_role, "annotator");
    replace(head,
      h("h1", {}, project.name),
      summary.project.description ? h("p", { class: "muted" }, summary.project.description) : null,
      h("div", { class: "head-actions" },
        canAnnotate ? h("a", { class: "btn btn-primary", href: projectUrl(project, "queue/") }, "Open the queue") : null,
        roleAtLeast(project.my_role, "reviewer") && c.submitted ? h("a", { class: "btn", href: projectUrl(project, "review/") }, `Review ${plural(c.submitted, "annotation")}`) : null));

    const progress = card("Progress", h("div", {},
      h("div", { class: "stats" },
        stat("Tiles annotated", `${c.annotated} / ${c.tiles}`, percent(c.annotated, c.tiles), "stat-annotated"),
        stat("Accepted by review", String(c.reviewed), percent(c.reviewed, c.tiles), "stat-reviewed"),
        stat("Awaiting review", String(c.submitted)),
        stat("Rejected", String(c.rejected)),
        stat("In the queue", String(summary.queue.size), summary.queue.strategy ? `ranked by ${summary.queue.strategy}` : "not ranked yet")),
      h("div", { class: "stacked-bar", title: "Tiles by status" },
        ["reviewed", "submitted", "draft", "rejected", "unlabelled"].map((k) =>
          c[k] ? h("div", { class: `seg seg-${k}`, style: { flex: String(c[k]) }, title: `${statusLabel(k === "unlabelled" ? null : k)}: ${c[k]}` }) : null)),
      h("div", { class: "legend-row" },
        ["reviewed", "submitted", "draft", "rejected", "unlabelled"].map((k) =>
          h("span", { class: "legend-item" }, h("i", { class: `dot seg-${k}` }), `${statusLabel(k === "unlabelled" ? null : k)} ${c[k]}`)))));

    const model = card("Active model", active
      ? h("div", { "data-testid": "active-model" },
        h("div", { class: "model-title" }, `v${active.version}`, h("span", { class: "muted" }, ` ${active.architecture}`), badge("active")),
        h("div", { class: "metric-row" },
          ...["dice", "aji", "pq"].map((k) => h("div", { class: "metric" }, h("div", { class: "metric-value" }, metric(versionMetrics(active)[k])), h("div", { class: "metric-label" }, k.toUpperCase())))),
        h("p", { class: "muted small" }, active.status_reason),
        h("p", { class: "small" }, `Predictions for ${c.predicted} of ${c.tiles} tiles.`))
      : live
        ? emptyState("First model in training", `Run ${live.id} (${live.architecture}) is ${statusLabel(live.status)}: `
          + `${runProgress(live, (live.epoch_metrics || []).length, Number(live.config?.epochs)).label}, ${etaText(runEtaSeconds(live))}. `
          + "Its predictions appear here and in the queue when it finishes.", null, "running")
        : emptyState("No model yet", "Annotate a few tiles, then an admin launches the first training run (or it starts by itself after "
        + `${summary.project.auto_retrain_threshold} accepted annotations).`,
        roleAtLeast(project.my_role, "admin") ? h("a", { class: "btn btn-primary", href: projectUrl(project, "training/") }, "Launch training") : null),
    { actions: h("a", { href: projectUrl(project, "models/"), class: "link" }, "All versions →"), id: "model-card" });

    const liveBar = live ? runProgress(live, (live.epoch_metrics || []).length, Number(live.config?.epochs)) : null;
    const runCard = live
      ? card("Training now", h("div", {},
        h("p", {}, `Run ${live.id} (${live.architecture}) is ${statusLabel(live.status)}: ${liveBar.counter}.`),
        progressBar(liveBar.fraction, liveBar.label),
        live.status === "running" ? h("p", { class: "muted small", "data-testid": "run-eta" }, etaText(runEtaSeconds(live))) : null,
        h("a", { class: "link", href: projectUrl(project, "training/") }, "Watch the curves →")))
      : null;

    const chart = card("Validation Dice and AJI per model version", versionChart(versions), { id: "version-chart" });

    const grid = card("Images and tiles", images.images.length
      ? h("div", { class: "image-list" }, images.images.map((img) => {
        // Slides keep only their tissue tiles: each cell goes to its own row/column of the grid.
        const columns = gridPositions(img.tiles.map((t) => t.x));
        const rows = gridPositions(img.tiles.map((t) => t.y));
        const cols = Math.max(1, columns.length);
        return h("div", { class: "image-item" },
          // The size on its own line: after the name it was cut off by the ellipsis ("512x...").
          h("a", { class: "image-name", title: `${img.name}: open in the slide viewer`, href: projectUrl(project, `images/${img.id}/`) }, img.name),
          h("div", { class: "muted small", "data-testid": "image-size" }, `${img.width}×${img.height} px`),
          h("div", { class: "tile-grid", style: { gridTemplateColumns: `repeat(${cols}, 1fr)` } },
            img.tiles.map((t) => h("a", {
              class: `tile-cell seg-${t.status || "unlabelled"}`, href: projectUrl(project, `tiles/${t.id}/`),
              style: { gridColumn: String(columns.indexOf(t.x) + 1), gridRow: String(rows.indexOf(t.y) + 1) },
              title: `tile ${t.id} (${t.x},${t.y}): ${statusLabel(t.status)}${t.version ? ` v${t.version}` : ""}`,
            }))));
      }))
      : emptyState("No images yet", "An admin uploads images (PNG, JPEG, TIFF, whole slides or a zip) on the upload page, or imports a data set with `manage.py import_dataset`.",
        roleAtLeast(project.my_role, "admin") ? h("a", { class: "btn btn-primary", href: projectUrl(project, "upload/") }, "Upload images") : null));

    const activity = card("Recent activity", events.results.length
      ? h("ul", { class: "activity", "data-testid": "activity" }, events.results.map((e) =>
        h("li", {}, h("span", { class: `kind kind-${e.kind.split(".")[0]}` }, e.kind), " ", e.actor ? h("strong", {}, e.actor + " ") : null, e.message,
          h("span", { class: "muted small" }, " · " + relativeTime(e.created_at)))))
      : emptyState("Nothing yet", "Submissions, training runs and promotions will show up here."));

    const members = summary.activity ? card("Members' activity", activityTable(summary.activity), { id: "member-activity" }) : null;

    replace(body, h("div", { class: "dash-grid" },
      h("div", { class: "col-main" }, progress, members, chart, grid),
      h("div", { class: "col-side" }, runCard, model, activity)));
  }

  try {
    await load();
  } catch (error) {
    replace(body, errorBox(error, () => location.reload()));
    return;
  }
  let timer = null;
  socket?.subscribe((event) => {
    if (["hello", "run.step", "predict.progress"].includes(event.kind)) return;
    clearTimeout(timer);
    timer = setTimeout(() => load().catch(() => {}), 600);
  });
}
