// Training: admins launch a run; everyone watches loss and validation curves arrive live over
// the project's WebSocket, and sees the run land as a candidate or active model version.
import { api, listAll } from "../lib/api.js";
import { runSeries } from "../lib/chart.js";
import { lineChart } from "../lib/plot.js";
import { h, replace } from "../lib/dom.js";
import { architectureRules, describeOption, duration, errorField, etaText, metric, parseTrainingForm, relativeTime, roleAtLeast, runEtaSeconds, runProgress, statusLabel, trainingFormStart, withArticle } from "../lib/format.js";
import { badge, card, emptyState, errorBox, onWorkerStatus, progressBar, projectUrl, spinner, toast } from "../lib/layout.js";

const LIVE = ["queued", "running"];

// The launch form's fields, in order; the rest of the catalog's run options stay at the
// project's defaults (set them in the project's training defaults).
const MAIN_FIELDS = [["epochs", "Epochs"], ["lr", "Learning rate"], ["batch_size", "Batch size"], ["tile_size", "Tile size"],
  ["stain_norm", "Stain normalisation"], ["loss", "Loss"]];
const MORE_FIELDS = [["width", "Width"], ["steps_per_epoch", "Patches per epoch"], ["augment", "Augmentation"],
  ["optimizer", "Optimizer"], ["lr_schedule", "Learning-rate schedule"], ["warmup_epochs", "Warm-up epochs"],
  ["ema_decay", "Weight averaging (EMA decay)"], ["early_stopping_patience", "Early-stopping patience"]];

// One labelled field: its input, a one-line explanation and a slot for its error.
function field(name, label, input, help) {
  return h("label", { class: "field", "data-field": name }, h("span", { class: "field-label" }, label), input,
    h("span", { class: "field-help", "data-testid": `help-${name}` }, help ?? ""),
    h("span", { class: "form-errors", role: "alert", "data-testid": `error-${name}` }));
}

function choiceOptions(choices, value, empty = null) {
  const items = empty ? [["", empty], ...choices] : choices;
  return items.map(([v, label, title]) => h("option", { value: v, title, selected: String(v) === String(value ?? "") || null }, label));
}

// An input for one catalog option: a select of its choices, else a number or text box with its bounds.
function optionInput(option, value, choices = null, emptyLabel = "default") {
  const named = choices ?? (option.choices ? option.choices.map((c) => [c, c]) : null);
  if (named) return h("select", { name: option.name }, choiceOptions(named, value, option.nullable ? emptyLabel : null));
  const numeric = option.type === "int";
  return h("input", {
    name: option.name, type: numeric ? "number" : "text", inputmode: option.type === "float" ? "decimal" : null,
    min: numeric ? (option.minimum ?? option.exclusive_minimum) : null, max: numeric ? (option.maximum ?? option.exclusive_maximum) : null,
    value: value ?? "", placeholder: option.nullable ? "default" : null,
  });
}

// The launch form: starts from the project's own settings (trainingFormStart), checks every value
// against the catalog before sending, sends only what differs from what the server would use
// anyway (so a preset sets what the user leaves alone), and shows a 400 next to the field it names.
function launchForm(catalog, project, launch) {
  const start = trainingFormStart(catalog, project);
  const options = new Map(catalog.training_options.map((o) => [o.name, o]));
  const touched = new Set();
  const named = (list) => list.map((c) => [c.name, c.label || c.name, c.help]);
  const explain = (o) => `${o.help}; ${describeOption(o)}`;
  const general = h("div", { class: "form-errors", role: "alert", "data-testid": "launch-errors" });
  const archSelect = h("select", { name: "architecture" }, choiceOptions(named(catalog.architectures), start.architecture));
  const archField = field("architecture", "Architecture", archSelect);
  const presetField = field("preset", "Preset", h("select", { name: "preset" }));
  const headOption = options.get("instance_head");
  const headField = field("instance_head", "Instance head", optionInput(headOption, start.values.instance_head,
    headOption.choices.map((c) => [c, c === "hv" ? "hv: horizontal/vertical distance maps (HoVer-Net style)" : c]), "none: the architecture's own split"),
  headOption.help);
  const lossField = field("loss", "Loss", h("select", { name: "loss" }));
  const input = (name) => name === "stain_norm"
    ? optionInput(options.get(name), start.values[name], named(catalog.stain_normalizers))
    : name === "augment" ? optionInput(options.get(name), start.values[name], named(catalog.augment_presets))
      : name === "optimizer" ? optionInput(options.get(name), start.values[name], named(catalog.optimizers))
        : optionInput(options.get(name), start.values[name]);
  const fieldFor = ([name, label]) => name === "loss" ? lossField
    : options.has(name) ? field(name, label, input(name), explain(options.get(name))) : null;
  const pairs = (list) => {
    const out = [];
    for (let i = 0; i < list.length; i += 2) out.push(h("div", { class: "field-row" }, list.slice(i, i + 2).map(fieldFor)));
    return out;
  };
  const form = h("form", { class: "form", "data-testid": "launch-form", novalidate: true },
    archField, presetField, headField,
    pairs(MAIN_FIELDS),
    h("details", { class: "advanced" }, h("summary", {}, "More options"), pairs(MORE_FIELDS)),
    general,
    h("button", { class: "btn btn-primary", type: "submit", "data-testid": "launch" }, "Launch training run"));

  const help = (name, text) => { form.querySelector(`[data-testid=help-${name}]`).textContent = text; };
  // The architecture decides the presets, the losses and whether an instance head applies.
  function fitArchitecture() {
    const rules = architectureRules(catalog, archSelect.value);
    help("architecture", rules?.arch.help ?? "");
    const presetSelect = form.querySelector("select[name=preset]");
    const preset = presetSelect.value || start.values.preset;
    replace(presetSelect, choiceOptions(named(rules?.presets ?? []), preset, "none: the options below"));
    const lossSelect = form.querySelector("select[name=loss]");
    const loss = lossSelect.value || start.values.loss;
    replace(lossSelect, choiceOptions(named(rules?.losses ?? []), loss, `the architecture's default (${rules?.arch.default_loss ?? "?"})`));
    help("loss", lossSelect.selectedOptions[0]?.title || options.get("loss").help);
    const head = form.querySelector("select[name=instance_head]");
    headField.hidden = !rules?.instanceHead;
    headField.style.display = headField.hidden ? "none" : ""; // .field's display: flex beats [hidden]
    const tile = form.querySelector("input[name=tile_size]");
    if (tile && rules) tile.step = rules.arch.size_divisor;
    if (!rules?.instanceHead) head.value = "";
    explainPreset();
  }
  function explainPreset() {
    const chosen = form.querySelector("select[name=preset]").selectedOptions[0];
    help("preset", chosen?.value ? `${chosen.title}. It sets what you leave unchanged below; the project's training defaults and your changes win.`
      : options.get("preset").help);
  }
  for (const name of ["stain_norm", "augment", "optimizer"]) {
    const select = form.querySelector(`select[name=${name}]`);
    const update = () => help(name, select.selectedOptions[0]?.title || options.get(name).help);
    select?.addEventListener("change", update);
    if (select) update();
  }
  archSelect.addEventListener("change", fitArchitecture);
  form.querySelector("select[name=preset]").addEventListener("change", explainPreset);
  form.addEventListener("input", (e) => { if (e.target.name) touched.add(e.target.name); });
  form.addEventListener("change", (e) => { if (e.target.name) touched.add(e.target.name); });
  fitArchitecture();

  function showErrors(errors) {
    for (const slot of form.querySelectorAll("[data-testid^=error-]")) replace(slot);
    for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
    const left = [];
    for (const [name, message] of Object.entries(errors)) {
      const slot = form.querySelector(`[data-testid=error-${name}]`);
      if (slot && !slot.closest("[hidden]")) {
        replace(slot, message);
        slot.closest(".field").classList.add("invalid");
        slot.closest("details")?.setAttribute("open", "");
      } else left.push(`${name.replaceAll("_", " ")}: ${message}`);
    }
    replace(general, left.map((m) => h("div", {}, m)));
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const values = Object.fromEntries(new FormData(form).entries());
    const architecture = values.architecture;
    delete values.architecture;
    if (headField.hidden) delete values.instance_head;
    const parsed = parseTrainingForm(values, catalog, { architecture, base: start.base, touched });
    showErrors(parsed.errors);
    if (!parsed.ok) return;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await launch({ architecture, config: parsed.config });
    } catch (error) {
      // A 400 names the field it is about (the catalog's check on the server): show it there.
      const name = errorField(error);
      showErrors(name ? { [name]: error.message.replace(/^config: /, "") } : {});
      if (!name) replace(general, h("div", {}, error.message));
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function render(main, { config, socket }) {
  const { project } = config;
  const isAdmin = roleAtLeast(project.my_role, "admin");
  const state = { runs: [], selected: null, run: null, epochs: [], steps: [], liveEpochs: 0, workerOnline: true };
  const formSlot = h("div", {});
  const runsSlot = h("div", {}, spinner());
  const runSlot = h("div", { "data-testid": "run-panel" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Training"),
      h("p", { class: "muted" }, "Each run trains on the accepted annotations and is validated on the frozen validation images; it becomes the active model only if its Dice and AJI are at least the active model's.")),
    h("div", { class: "train-grid" }, h("div", { class: "col-side" }, formSlot), h("div", { class: "col-main" }, runSlot, runsSlot)));

  let summary;
  let catalog;
  try {
    [summary, catalog] = await Promise.all([api(`/api/projects/${project.id}/summary/`), isAdmin ? api("/api/catalog/") : null]);
  } catch (error) {
    replace(runsSlot, errorBox(error, () => location.reload()));
    return;
  }

  // --- launch form (admins): every choice, bound, default and explanation from the engine catalog ---
  if (isAdmin) {
    replace(formSlot, card("Launch a run", launchForm(catalog, summary.project, async (body) => {
      const run = await api(`/api/projects/${project.id}/training-runs/`, { method: "POST", body });
      toast(`Run ${run.id} queued.`, "ok");
      state.selected = run.id;
      await loadRuns();
    })));
  } else {
    replace(formSlot, card("Launch a run", h("p", { class: "muted", "data-testid": "launch-denied" },
      `Launching and cancelling runs needs the admin role; you are ${withArticle(project.my_role)}. You can watch runs here.`)));
  }

  onWorkerStatus((status) => {
    state.workerOnline = status.online;
    drawRun();
  });

  function drawCharts() {
    const series = runSeries(state.epochs);
    const stepPoints = state.steps.map((s) => [s.epoch - 1 + s.step / s.steps, s.loss]);
    const lossSeries = [...series.loss.map((s) => ({ ...s, points: s.points }))];
    if (stepPoints.length) lossSeries.unshift({ name: "step loss", color: "#fdba74", points: stepPoints });
    // One pair of charts per run, updated in place: a redraw keeps the reader's zoom.
    if (state.charts?.run !== state.selected) {
      state.charts = {
        run: state.selected,
        loss: lineChart(lossSeries, { xLabel: "epoch", yLabel: "loss", emptyText: "Waiting for the first steps…" }),
        val: lineChart(series.validation, { xLabel: "epoch", yLabel: "score", yMin: 0, yMax: 1, xInteger: true, emptyText: "Waiting for the first epoch…" }),
      };
    } else {
      state.charts.loss.update(lossSeries);
      state.charts.val.update(series.validation);
    }
    return h("div", { class: "charts" },
      h("div", { "data-testid": "loss-chart" }, h("h3", {}, "Training loss"), state.charts.loss),
      h("div", { "data-testid": "val-chart", "data-points": series.validation[0].points.length },
        h("h3", {}, "Validation ", h("span", { class: "muted small" }, "· drag to zoom, double-click to reset")), state.charts.val));
  }

  function drawRun() {
    const run = state.run;
    if (!run) {
      replace(runSlot, card("Runs", emptyState("No training run yet", isAdmin
        ? "Launch the first one with the form. It needs accepted annotations to train on."
        : "An admin launches runs; they also start by themselves after enough new annotations.")));
      return;
    }
    const last = state.epochs[state.epochs.length - 1];
    const total = last?.epochs ?? run.config?.epochs ?? "?";
    const live = LIVE.includes(run.status);
    const bar = runProgress(run, state.epochs.length, Number(total));
    const cancel = isAdmin && live
      ? h("button", { class: "btn btn-danger btn-small", "data-testid": "cancel-run", disabled: run.cancel_requested || null, onclick: async () => {
        try {
          state.run = await api(`/api/training-runs/${run.id}/cancel/`, { method: "POST" });
          toast(`Run ${run.id}: cancel requested; it stops at its next step.`, "ok");
          drawRun();
        } catch (error) {
          toast(error.message, "error");
        }
      } }, run.cancel_requested ? "Cancelling…" : "Cancel run")
      : null;
    const offline = live && !state.workerOnline
      ? h("div", { class: "note note-warn", "data-testid": "worker-offline" }, h("strong", {}, "No worker is running: "), "the run waits in the queue until one starts (make run starts one).")
      : null;
    let outcome = null;
    if (run.status === "succeeded" && run.model_version) {
      outcome = h("div", { class: "note note-ok", "data-testid": "run-outcome" }, "Produced ", h("a", { href: projectUrl(project, "models/"), class: "link" }, "a new model version"), ` (${run.model_version_status ?? "see the registry"}).`);
    } else if (run.status === "failed") {
      outcome = h("div", { class: "note note-bad", "data-testid": "run-outcome" }, h("strong", {}, "Failed: "), h("pre", { class: "error-text" }, (run.error || "").split("\n\n")[0]));
    } else if (run.status === "cancelled") {
      outcome = h("div", { class: "note", "data-testid": "run-outcome" }, "Cancelled.");
    }
    replace(runSlot, card(`Run ${run.id} · ${run.architecture}`, h("div", {},
      h("div", { class: "run-status" }, badge(run.status, statusLabel(run.status)),
        h("span", { "data-testid": "epoch-counter", "data-epochs": state.epochs.length }, ` ${bar.counter}`),
        h("span", { class: "muted small" }, ` · ${run.trigger}${run.started_by ? ` by ${run.started_by}` : ""} · ${relativeTime(run.created_at)}`),
        h("span", { class: "muted small", "data-testid": "live-epochs", "data-count": state.liveEpochs }, state.liveEpochs ? ` · ${state.liveEpochs} live updates` : "")),
      progressBar(bar.fraction, bar.label),
      live && run.status === "running" ? h("div", { class: "muted small", "data-testid": "run-eta" }, etaText(runEtaSeconds(run))) : null,
      offline, outcome, drawCharts(),
      h("details", { class: "small" }, h("summary", {}, "Configuration"), h("pre", {}, JSON.stringify(run.config, null, 2)))),
    { actions: cancel }));
  }

  function drawRuns() {
    if (!state.runs.length) {
      replace(runsSlot);
      return;
    }
    replace(runsSlot, card("All runs", h("table", { class: "table", "data-testid": "runs-table" },
      h("thead", {}, h("tr", {}, ["Run", "Status", "Architecture", "Epochs", "Best val Dice", "Trigger", "Started", "Took"].map((t) => h("th", {}, t)))),
      h("tbody", {}, state.runs.map((r) => {
        const best = Math.max(...(r.epoch_metrics || []).map((e) => e.val?.dice ?? -1), -1);
        const took = r.finished_at && r.started_at ? Date.parse(r.finished_at) - Date.parse(r.started_at) : null;
        return h("tr", { class: ["clickable", r.id === state.selected && "active"], onclick: () => selectRun(r.id) },
          h("td", {}, `#${r.id}`), h("td", {}, badge(r.status, statusLabel(r.status))), h("td", {}, r.architecture),
          h("td", {}, `${(r.epoch_metrics || []).length}/${r.config?.epochs ?? "?"}`), h("td", {}, best >= 0 ? metric(best) : "—"),
          h("td", {}, r.trigger), h("td", {}, relativeTime(r.created_at)), h("td", {}, took !== null ? duration(took) : "—"));
      })))));
  }

  async function selectRun(id) {
    state.selected = id;
    state.steps = [];
    try {
      const run = await api(`/api/training-runs/${id}/`);
      if (run.model_version) {
        const versions = await listAll(`/api/projects/${project.id}/model-versions/`, { max: 500 });
        run.model_version_status = versions.find((v) => v.id === run.model_version)?.status;
      }
      if (state.selected !== id) return;
      state.run = run;
      // Keep epochs that arrived live but are not in the stored list yet.
      const stored = run.epoch_metrics || [];
      const liveOnly = state.epochs.filter((e) => e.run === id && !stored.some((s) => s.epoch === e.epoch));
      state.epochs = [...stored.map((e) => ({ ...e, run: id })), ...liveOnly].sort((a, b) => a.epoch - b.epoch);
    } catch (error) {
      toast(error.message, "error");
    }
    drawRun();
    drawRuns();
  }

  async function loadRuns() {
    try {
      state.runs = await listAll(`/api/projects/${project.id}/training-runs/`, { max: 100 });
    } catch (error) {
      replace(runsSlot, errorBox(error));
      return;
    }
    const live = state.runs.find((r) => LIVE.includes(r.status));
    const target = state.selected ?? live?.id ?? state.runs[0]?.id ?? null;
    if (target !== null) await selectRun(target);
    else drawRun();
    drawRuns();
  }

  await loadRuns();
  let stepDrawn = 0;
  socket?.subscribe((event) => {
    const runId = event.run;
    if (event.kind === "run.queued") {
      if (state.run && LIVE.includes(state.run.status)) return;
      state.selected = runId;
      loadRuns();
    } else if (runId && runId === state.selected) {
      if (event.kind === "run.epoch") {
        state.liveEpochs += 1;
        state.epochs = [...state.epochs.filter((e) => e.epoch !== event.epoch), { ...event, run: runId }].sort((a, b) => a.epoch - b.epoch);
        if (state.run) {
          state.run.status = "running";
          state.run.progress = event.progress ?? state.run.progress;
        }
        const row = state.runs.find((r) => r.id === runId);
        if (row) Object.assign(row, { status: "running", epoch_metrics: state.epochs });
        drawRun();
        drawRuns();
      } else if (event.kind === "run.step") {
        state.steps.push(event);
        if (state.run) {
          state.run.status = "running";
          state.run.progress = event.progress ?? state.run.progress;
        }
        if (performance.now() - stepDrawn > 1000) {
          stepDrawn = performance.now();
          drawRun();
        }
      } else if (["run.started", "run.succeeded", "run.failed", "run.cancelled", "run.cancel"].includes(event.kind)) {
        if (event.kind !== "run.started") toast(event.message || `Run ${runId}: ${event.kind.slice(4)}`, event.kind === "run.failed" ? "error" : "ok", 7000);
        loadRuns();
      }
    } else if (event.kind === "model.promoted" || event.kind.startsWith("run.")) {
      if (event.kind !== "run.step" && event.kind !== "run.epoch") loadRuns();
    }
  });
}
