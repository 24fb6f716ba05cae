// The project settings form, shared by "New project" and the settings page: nucleus classes
// (names and colours; Karyo assigns the ids), tiling, working resolution, and the model,
// strategy and stain choices with the engine catalog's one-line explanations.
import { h, replace } from "./dom.js";

// Distinct colours for new classes (Sasha Trubetskoy's list, the first few).
export const CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324"];
const LICENCES = ["CC-BY-4.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", "CC0-1.0", "proprietary"];

function choiceField({ name, label, choices, value, testid }) {
  const help = h("div", { class: "choice-help", "data-testid": `${testid}-help` });
  const select = h("select", { name, "data-testid": testid },
    choices.map((c) => h("option", { value: c.name, selected: c.name === value, title: c.help }, c.label || c.name)));
  const explain = () => { help.textContent = choices.find((c) => c.name === select.value)?.help ?? ""; };
  select.addEventListener("change", explain);
  explain();
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), select, help);
}

function numberField({ name, label, value, min, max, step = 1, help, disabled = false }) {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label),
    h("input", { type: "number", name, value, min, max, step, required: true, disabled, "data-testid": `field-${name}` }),
    help ? h("span", { class: "field-help" }, help) : null);
}

// The classes editor: one row per class; `classes` keep their ids (shown, not editable).
export function classesEditor(classes) {
  const rows = h("div", { class: "form", "data-testid": "classes" });
  const add = (item) => {
    const row = h("div", { class: "class-row", "data-testid": "class-row", dataset: item.id ? { id: String(item.id) } : {} },
      h("span", { class: "class-id", title: "class id (assigned by Karyo)" }, item.id ? `#${item.id}` : "new"),
      h("input", { type: "text", value: item.name, placeholder: "class name, e.g. epithelial", required: true, "aria-label": "class name", "data-testid": "class-name" }),
      h("input", { type: "color", value: item.color, "aria-label": "class colour", "data-testid": "class-color" }),
      h("button", { type: "button", class: "btn btn-ghost btn-small", title: "Remove this class", onclick: () => {
        if (rows.querySelectorAll(".class-row").length > 1) row.remove();
      } }, "✕"));
    rows.append(row);
  };
  for (const c of classes) add(c);
  const addButton = h("button", { type: "button", class: "btn btn-small", "data-testid": "add-class", onclick: () => {
    const used = new Set([...rows.querySelectorAll("[data-testid=class-color]")].map((i) => i.value));
    add({ name: "", color: CLASS_COLOURS.find((c) => !used.has(c)) ?? "#888888" });
    rows.lastElementChild.querySelector("[data-testid=class-name]").focus();
  } }, "+ Add class");
  const value = () => [...rows.querySelectorAll(".class-row")].map((row) => ({
    ...(row.dataset.id ? { id: Number(row.dataset.id) } : {}),
    name: row.querySelector("[data-testid=class-name]").value.trim(),
    color: row.querySelector("[data-testid=class-color]").value,
  }));
  return { element: h("div", {}, rows, h("div", { class: "head-actions" }, addButton)), value };
}

// `project`: the current values (defaults for a new one); `catalog`: ml_worker.catalog.as_dict().
// `tilingLocked`: images exist, so the tile size cannot change any more.
export function projectForm({ project, catalog, tilingLocked = false, submitLabel, onSubmit }) {
  const classes = classesEditor(project.nucleus_classes?.length ? project.nucleus_classes : [{ name: "nucleus", color: CLASS_COLOURS[0] }]);
  const errors = h("div", { class: "form-errors", role: "alert", "data-testid": "form-errors" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "save-project" }, submitLabel);
  const form = h("form", { class: "form", "data-testid": "project-form", novalidate: true },
    h("label", { class: "field" }, h("span", { class: "field-label" }, "Name"),
      h("input", { type: "text", name: "name", value: project.name ?? "", required: true, maxlength: 200, "data-testid": "field-name" })),
    h("label", { class: "field" }, h("span", { class: "field-label" }, "Description"),
      h("textarea", { name: "description", rows: 2, "data-testid": "field-description" }, project.description ?? "")),
    h("div", { class: "field" }, h("span", { class: "field-label" }, "Nucleus classes"),
      h("span", { class: "field-help" }, "The kinds of nuclei annotators label. Ids are assigned by Karyo and never reused."),
      classes.element),
    h("div", { class: "field-row" },
      numberField({ name: "tile_size", label: "Tile size (px)", value: project.tile_size ?? 256, min: 32, max: 4096,
        help: tilingLocked ? "Fixed: the project already has images." : "Side of one unit of work.", disabled: tilingLocked }),
      numberField({ name: "context_margin", label: "Context margin (px)", value: project.context_margin ?? 64, min: 0, max: 1024,
        help: "Surrounding image shown around a tile in the workspace." })),
    h("div", { class: "field-row" },
      numberField({ name: "working_mpp", label: "Working resolution (µm/px)", value: project.working_mpp ?? 0.5, min: 0.05, max: 20, step: 0.01,
        help: "Slides at another resolution are resampled to this one." }),
      numberField({ name: "min_tissue_fraction", label: "Minimum tissue per tile", value: project.min_tissue_fraction ?? 0.05, min: 0, max: 1, step: 0.01,
        help: "Tiles with less tissue are not served as work." })),
    choiceField({ name: "default_architecture", label: "Model architecture", testid: "field-architecture",
      choices: catalog.architectures, value: project.default_architecture ?? catalog.default_architecture }),
    choiceField({ name: "al_strategy", label: "Active-learning strategy", testid: "field-strategy",
      choices: catalog.strategies, value: project.al_strategy ?? catalog.default_strategy }),
    choiceField({ name: "stain_normalization", label: "Stain normalisation", testid: "field-stain",
      choices: catalog.stain_normalizers, value: project.stain_normalization ?? "none" }),
    h("div", { class: "field-row" },
      numberField({ name: "auto_retrain_threshold", label: "Auto-retrain after", value: project.auto_retrain_threshold ?? 20, min: 0, max: 100000,
        help: "Newly accepted annotations that start a training run by themselves (0 = off)." }),
      h("label", { class: "field" }, h("span", { class: "field-label" }, "Licence of the dataset"),
        h("input", { type: "text", name: "licence", value: project.licence ?? "", list: "licences", placeholder: "e.g. CC-BY-4.0", "data-testid": "field-licence" }),
        h("datalist", { id: "licences" }, LICENCES.map((l) => h("option", { value: l }))),
        h("span", { class: "field-help" }, "Written on the dataset card of every export."))),
    h("label", { class: "toggle" }, h("input", { type: "checkbox", name: "require_review", checked: !!project.require_review }),
      "Train only on reviewed annotations"),
    h("label", { class: "toggle" }, h("input", { type: "checkbox", name: "ssl_pretrain", checked: !!project.ssl_pretrain,
      "data-testid": "field-ssl" }),
      "Pretrain the model on this project's unlabelled tiles (self-supervised): ranks the first queue and starts the first model"),
    errors,
    h("div", { class: "head-actions" }, submit));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = {
      name: String(data.get("name") || "").trim(),
      description: String(data.get("description") || ""),
      nucleus_classes: classes.value(),
      context_margin: Number(data.get("context_margin")),
      working_mpp: Number(data.get("working_mpp")),
      min_tissue_fraction: Number(data.get("min_tissue_fraction")),
      default_architecture: data.get("default_architecture"),
      al_strategy: data.get("al_strategy"),
      stain_normalization: data.get("stain_normalization"),
      auto_retrain_threshold: Number(data.get("auto_retrain_threshold")),
      licence: String(data.get("licence") || "").trim(),
      require_review: data.get("require_review") === "on",
      ssl_pretrain: data.get("ssl_pretrain") === "on",
    };
    if (!tilingLocked) body.tile_size = Number(data.get("tile_size"));
    const problems = [];
    if (!body.name) problems.push("Give the project a name.");
    if (body.nucleus_classes.some((c) => !c.name)) problems.push("Every nucleus class needs a name.");
    if (new Set(body.nucleus_classes.map((c) => c.name)).size !== body.nucleus_classes.length) problems.push("Class names must differ.");
    if (problems.length) {
      replace(errors, problems.join(" "));
      return;
    }
    replace(errors);
    submit.disabled = true;
    try {
      await onSubmit(body);
    } catch (error) {
      replace(errors, error.message || String(error));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
