// Model registry: every version with its validation metrics; admins promote or roll back.
import { api, listAll } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { metric, relativeTime, roleAtLeast, statusLabel, typedMetrics, versionMetrics } from "../lib/format.js";
import { badge, card, emptyState, errorBox, projectUrl, spinner, toast } from "../lib/layout.js";
import { versionChart } from "./dashboard.js";

export async function render(main, { config, socket }) {
  const { project } = config;
  const isAdmin = roleAtLeast(project.my_role, "admin");
  const body = h("div", {}, spinner());
  const rollback = isAdmin ? h("button", { class: "btn", "data-testid": "rollback" }, "Roll back to the previous version") : null;
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Model versions"),
      h("p", { class: "muted" }, "Candidates did not beat the active model on the frozen validation images (or were not promoted yet). Promoting a version re-predicts every tile and re-ranks the queue."),
      h("div", { class: "head-actions" }, rollback)),
    body);

  rollback?.addEventListener("click", async () => {
    if (!confirm("Re-activate the version that was active before the current one?")) return;
    try {
      const v = await api(`/api/projects/${project.id}/model-versions/rollback/`, { method: "POST" });
      toast(`Model v${v.version} is active again; predictions are being refreshed.`, "ok");
      load();
    } catch (error) {
      toast(error.message, "error");
    }
  });

  async function promote(version) {
    if (!confirm(`Make model v${version.version} the active model? Every tile will be predicted again.`)) return;
    try {
      await api(`/api/model-versions/${version.id}/promote/`, { method: "POST" });
      toast(`Model v${version.version} is active; predictions are being refreshed.`, "ok");
      load();
    } catch (error) {
      toast(error.message, "error");
    }
  }

  async function load() {
    let versions;
    try {
      versions = await listAll(`/api/projects/${project.id}/model-versions/`, { max: 500 });
    } catch (error) {
      replace(body, errorBox(error, load));
      return;
    }
    if (rollback) rollback.disabled = !versions.some((v) => v.status === "retired");
    if (!versions.length) {
      replace(body, emptyState("No model yet", "Train a first model on the Training page; it becomes active by itself.",
        isAdmin ? h("a", { class: "btn btn-primary", href: projectUrl(project, "training/") }, "Training") : null));
      return;
    }
    replace(body,
      card("Validation Dice and AJI per version", versionChart(versions)),
      card("Registry", h("table", { class: "table", "data-testid": "versions-table" },
        h("thead", {}, h("tr", {}, ["Version", "Status", "Architecture", "Dice", "AJI", "PQ", "Object F1", "mPQ / bPQ", "Run", "Created", "Why", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, versions.map((v) => {
          const m = versionMetrics(v);
          return h("tr", { "data-testid": "version-row", "data-status": v.status, class: v.status === "active" ? "active" : null },
            h("td", {}, h("strong", {}, `v${v.version}`)), h("td", {}, badge(v.status, statusLabel(v.status))), h("td", {}, v.architecture),
            h("td", {}, metric(m.dice)), h("td", {}, metric(m.aji)), h("td", {}, metric(m.pq)), h("td", {}, metric(m.f1)),
            typedCell(typedMetrics(v)),
            h("td", {}, v.training_run ? `#${v.training_run}` : "—"), h("td", {}, relativeTime(v.created_at)),
            h("td", { class: "small muted why" }, v.status_reason || ""),
            h("td", {}, isAdmin && v.status !== "active"
              ? h("button", { class: "btn btn-small", "data-testid": "promote", onclick: () => promote(v) }, "Promote") : null));
        })))));
  }

  await load();
  socket?.subscribe((event) => {
    if (event.kind === "model.promoted" || event.kind === "run.succeeded") load();
  });
}

// mPQ / bPQ of a typed model, the PQ of each class beneath ("—" for a binary model).
function typedCell(typed) {
  if (!typed) return h("td", { class: "muted" }, "—");
  const perClass = Object.entries(typed.perClass).map(([name, pq]) => `${name} ${metric(pq)}`).join(" · ");
  return h("td", { "data-testid": "typed-metrics" }, `${metric(typed.mpq)} / ${metric(typed.bpq)}`,
    perClass ? h("div", { class: "small muted" }, perClass) : null);
}
