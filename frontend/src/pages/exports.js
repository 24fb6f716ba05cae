// Exports: choose the annotations and the format, start, watch progress, download.
import { api, listAll } from "../lib/api.js";
import { h, replace } from "../lib/dom.js";
import { relativeTime, roleAtLeast, statusLabel, withArticle } from "../lib/format.js";
import { badge, card, emptyState, errorBox, onWorkerStatus, progressBar, spinner, toast } from "../lib/layout.js";

const FORMATS = [
  ["png", "PNG label maps", "images/, 16-bit instance masks and class maps — lossless"],
  ["coco", "COCO", "instances as polygons (RLE where a nucleus has a hole)"],
  ["pannuke", "PanNuke arrays", "images.npy / masks.npy, as the PanNuke benchmark"],
  ["labelstudio", "Label Studio JSON", "tasks with polygon results, to import into Label Studio"],
  ["geojson", "QuPath GeoJSON", "one FeatureCollection per image"],
];

export function exportFilters(values) {
  const filters = { status: values.status || "reviewed" };
  const list = (s) => String(s || "").split(",").map((x) => x.trim()).filter(Boolean);
  if (list(values.annotators).length) filters.annotators = list(values.annotators);
  if (values.date_from) filters.date_from = values.date_from;
  if (values.date_to) filters.date_to = values.date_to;
  if (list(values.classes).length) filters.classes = list(values.classes);
  if (values.split === "frozen") filters.split = "frozen";
  else if (values.split === "random") filters.split = { train: 0.7, val: 0.15, test: 0.15, seed: 1 };
  return filters;
}

export async function render(main, { config }) {
  const { project } = config;
  const isAdmin = roleAtLeast(project.my_role, "admin");
  const listSlot = h("div", {}, spinner());
  const formSlot = h("div", {});
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Exports"),
      h("p", { class: "muted" }, "A curated data set of the project: the newest accepted annotation of each tile, in the format you choose, with a manifest and a dataset card.")),
    h("div", { class: "train-grid" }, h("div", { class: "col-side" }, formSlot), h("div", { class: "col-main" }, listSlot)));

  if (!roleAtLeast(project.my_role, "reviewer")) {
    replace(listSlot, emptyState("Exports are for reviewers and admins", `You are ${withArticle(project.my_role)} in this project.`));
    return;
  }
  const polling = new Map();

  if (isAdmin) {
    const errors = h("div", { class: "form-errors", role: "alert" });
    const form = h("form", { class: "form", "data-testid": "export-form" },
      h("fieldset", { class: "formats" }, h("legend", {}, "Format"),
        FORMATS.map(([value, label, help], i) => h("label", { class: "radio" },
          h("input", { type: "radio", name: "format", value, checked: i === 0 || null }), h("span", {}, h("strong", {}, label), h("span", { class: "field-help" }, help))))),
      h("label", { class: "field" }, h("span", { class: "field-label" }, "Annotations"),
        h("select", { name: "status" },
          h("option", { value: "reviewed" }, "accepted by a reviewer"),
          h("option", { value: "submitted" }, "submitted or accepted"),
          h("option", { value: "any" }, "any (incl. drafts and rejected)"))),
      h("div", { class: "field-row" },
        h("label", { class: "field" }, h("span", { class: "field-label" }, "From"), h("input", { type: "date", name: "date_from" })),
        h("label", { class: "field" }, h("span", { class: "field-label" }, "To"), h("input", { type: "date", name: "date_to" }))),
      h("label", { class: "field" }, h("span", { class: "field-label" }, "Annotators"), h("input", { name: "annotators", placeholder: "all (or: alice, bob)" })),
      h("label", { class: "field" }, h("span", { class: "field-label" }, "Classes"), h("input", { name: "classes", placeholder: "all (or class names)" })),
      h("label", { class: "field" }, h("span", { class: "field-label" }, "Split"),
        h("select", { name: "split" },
          h("option", { value: "" }, "none"),
          h("option", { value: "frozen" }, "the project's frozen train/validation split"),
          h("option", { value: "random" }, "random by image: 70 / 15 / 15"))),
      errors,
      h("button", { class: "btn btn-primary", type: "submit", "data-testid": "start-export" }, "Start export"));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const values = Object.fromEntries(new FormData(form).entries());
      replace(errors);
      try {
        const created = await api(`/api/projects/${project.id}/exports/`, { method: "POST", body: { format: values.format, filters: exportFilters(values) } });
        toast(`Export ${created.id} started.`, "ok");
        await load();
      } catch (error) {
        replace(errors, h("div", {}, error.message));
      }
    });
    replace(formSlot, card("New export", form));
  } else {
    replace(formSlot, card("New export", h("p", { class: "muted" }, "Starting an export needs the admin role; you can download finished ones.")));
  }

  const offline = h("div", {});
  onWorkerStatus((status) => replace(offline, status.online ? null : h("div", { class: "note note-warn" },
    h("strong", {}, "The worker is offline: "), "new exports wait in the queue until a worker runs.")));

  function row(x) {
    const live = x.status === "queued" || x.status === "running";
    const stats = x.manifest?.counts || x.manifest?.totals || null;
    return h("tr", { "data-testid": "export-row", "data-status": x.status },
      h("td", {}, `#${x.id}`), h("td", {}, x.format), h("td", {}, badge(x.status, statusLabel(x.status))),
      h("td", { class: "progress-cell" }, live ? progressBar(x.progress, `${Math.round((x.progress || 0) * 100)}%`) : x.error ? h("span", { class: "small bad" }, x.error.split("\n")[0]) : stats ? h("span", { class: "small muted" }, Object.entries(stats).slice(0, 3).map(([k, v]) => `${v} ${k}`).join(", ")) : ""),
      h("td", {}, x.created_by ?? "—"), h("td", {}, relativeTime(x.created_at)),
      h("td", {}, x.download_url ? h("a", { class: "btn btn-small", href: x.download_url, "data-testid": "download" }, "Download") : null));
  }

  async function load() {
    let exports;
    try {
      exports = await listAll(`/api/projects/${project.id}/exports/`, { max: 200 });
    } catch (error) {
      replace(listSlot, errorBox(error, load));
      return;
    }
    replace(listSlot, offline, exports.length
      ? card("Exports", h("table", { class: "table", "data-testid": "exports-table" },
        h("thead", {}, h("tr", {}, ["Export", "Format", "Status", "Progress", "By", "Started", ""].map((t) => h("th", {}, t)))),
        h("tbody", {}, exports.map(row))))
      : card("Exports", emptyState("No exports yet", isAdmin ? "Choose a format and start one." : "An admin starts exports.")));
    for (const x of exports) if ((x.status === "queued" || x.status === "running") && !polling.has(x.id)) poll(x.id);
  }

  function poll(id) {
    const timer = setInterval(async () => {
      try {
        const x = await api(`/api/exports/${id}/`);
        if (x.status !== "queued" && x.status !== "running") {
          clearInterval(timer);
          polling.delete(id);
          toast(x.status === "succeeded" ? `Export ${id} is ready to download.` : `Export ${id} ${x.status}.`, x.status === "succeeded" ? "ok" : "error");
          load();
        } else {
          const tr = [...listSlot.querySelectorAll("tr[data-testid=export-row]")].find((r) => r.firstChild.textContent === `#${id}`);
          if (tr) tr.replaceWith(row(x));
        }
      } catch {
        /* transient: keep polling */
      }
    }, 1000);
    polling.set(id, timer);
  }

  await load();
}
