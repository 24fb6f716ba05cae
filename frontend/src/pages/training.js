// Training: admins launch a run; everyone watches loss and validation curves arrive live over
// the project's WebSocket, and sees the run land as a candidate or active model version.
import { api, listAll } from "../lib/api.js";
import { runSeries } from "../lib/chart.js";
import { lineChart } from "../lib/plot.js";
import { h, replace } from "../lib/dom.js";
import { duration, etaText, metric, parseTrainingForm, relativeTime, roleAtLeast, runEtaSeconds, runProgress, statusLabel, withArticle } from "../lib/format.js";
import { badge, card, emptyState, errorBox, onWorkerStatus, progressBar, projectUrl, spinner, toast } from "../lib/layout.js";

const LIVE = ["queued", "running"];

function field(label, input, help = null) {
  return h("label", { class: "field" }, h("span", { class: "field-label" }, label), input, help ? h("span", { class: "field-help" }, help) : null);
}

function select(name, options, value) {
  return h("select", { name }, options.map(([v, label]) => h("option", { value: v, selected: String(v) === String(value ?? "") || null }, label)));
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
  try {
    summary = await api(`/api/projects/${project.id}/summary/`);
  } catch (error) {
    replace(runsSlot, errorBox(error, () => location.reload()));
    return;
  }

  // --- launch form (admins) ---
  if (isAdmin) {
    const tf = summary.training_form;
    const d = tf.defaults;
    const errors = h("div", { class: "form-errors", role: "alert" });
    const form = h("form", { class: "form", "data-testid": "launch-form" },
      field("Architecture", select("architecture", tf.architectures.map((a) => [a, a]), tf.default_architecture)),
      h("div", { class: "field-row" },
        field("Epochs", h("input", { name: "epochs", type: "number", min: 1, value: d.epochs ?? "" })),
        field("Learning rate", h("input", { name: "lr", type: "text", inputmode: "decimal", value: d.lr ?? "" }))),
      h("div", { class: "field-row" },
        field("Batch size", h("input", { name: "batch_size", type: "number", min: 1, value: d.batch_size ?? "" })),
        field("Tile size", h("input", { name: "tile_size", type: "number", min: 32, step: 32, value: d.tile_size ?? "" }))),
      field("Stain normalisation", select("stain_norm", tf.stain_norms.map((s) => [s, s]), d.stain_norm)),
      field("Loss", select("loss", [["", "the architecture's default"], ...tf.losses.map((l) => [l, l])], d.loss || "")),
      h("details", { class: "advanced" }, h("summary", {}, "More options"),
        h("div", { class: "field-row" },
          field("Width", h("input", { name: "width", type: "number", min: 1, value: d.width ?? "", placeholder: "model default" })),
          field("Patches per epoch", h("input", { name: "steps_per_epoch", type: "number", min: 1, value: d.steps_per_epoch ?? "", placeholder: "auto" }))),
        field("Augmentation", select("augment", tf.augment.map((a) => [a, a]), d.augment))),
      errors,
      h("button", { class: "btn btn-primary", type: "submit", "data-testid": "launch" }, "Launch training run"));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const values = Object.fromEntries(new FormData(form).entries());
      const parsed = parseTrainingForm(values);
      replace(errors, Object.entries(parsed.errors).map(([k, v]) => h("div", {}, `${k.replace("_", " ")}: ${v}`)));
      if (!parsed.ok) return;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const run = await api(`/api/projects/${project.id}/training-runs/`, { method: "POST", body: { architecture: values.architecture, config: parsed.config } });
        toast(`Run ${run.id} queued.`, "ok");
        state.selected = run.id;
        await loadRuns();
      } catch (error) {
        replace(errors, h("div", {}, error.message));
      } finally {
        button.disabled = false;
      }
    });
    replace(formSlot, card("Launch a run", form));
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
