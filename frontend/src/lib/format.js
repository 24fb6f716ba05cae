// Formatting and small rules shared by the pages (pure: unit-tested in test/format.test.js).

export const ROLES = ["viewer", "annotator", "reviewer", "admin"];

export function roleAtLeast(role, minimum) {
  return ROLES.indexOf(role) >= 0 && ROLES.indexOf(role) >= ROLES.indexOf(minimum);
}

// "a viewer", "an annotator", "an admin": the article for a role (or any word).
export function withArticle(word) {
  return `${/^[aeiou]/i.test(String(word ?? "")) ? "an" : "a"} ${word}`;
}

export function relativeTime(value, now = Date.now()) {
  if (!value) return "—";
  const then = typeof value === "number" ? value : Date.parse(value);
  if (Number.isNaN(then)) return "—";
  const seconds = Math.round((now - then) / 1000);
  if (seconds < 0) return "just now";
  if (seconds < 45) return "just now";
  if (seconds < 90) return "a minute ago";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} minutes ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 24) return hours === 1 ? "an hour ago" : `${hours} hours ago`;
  const days = Math.round(hours / 24);
  if (days < 30) return days === 1 ? "yesterday" : `${days} days ago`;
  return new Date(then).toISOString().slice(0, 10);
}

export function metric(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "—";
}

export function percent(part, total) {
  if (!total) return "0%";
  const p = (100 * part) / total;
  return (p > 0 && p < 1 ? p.toFixed(1) : Math.round(p)) + "%";
}

export function plural(n, one, many = one + "s") {
  return `${n} ${n === 1 ? one : many}`;
}

export function duration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const minutes = Math.floor(ms / 60_000);
  return `${minutes} min ${Math.round((ms % 60_000) / 1000)} s`;
}

const STATUS_LABELS = {
  null: "not annotated",
  undefined: "not annotated",
  draft: "draft",
  submitted: "awaiting review",
  reviewed: "accepted",
  rejected: "rejected",
  queued: "queued",
  running: "running",
  succeeded: "succeeded",
  failed: "failed",
  cancelled: "cancelled",
  candidate: "candidate",
  active: "active",
  retired: "retired",
};

export function statusLabel(status) {
  return STATUS_LABELS[status] ?? String(status);
}

// Numbers typed in the training form, with the API's own bounds, or an error message.
export function parseTrainingForm(values) {
  const config = {};
  const errors = {};
  const integer = (key, min, max) => {
    const raw = String(values[key] ?? "").trim();
    if (raw === "") return;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) errors[key] = `a whole number from ${min} to ${max}`;
    else config[key] = n;
  };
  integer("epochs", 1, 10000);
  integer("batch_size", 1, 1024);
  integer("tile_size", 32, 4096);
  integer("width", 1, 512);
  integer("steps_per_epoch", 1, 1_000_000);
  const lr = String(values.lr ?? "").trim();
  if (lr !== "") {
    const n = Number(lr);
    if (!(n > 0 && n < 1)) errors.lr = "a number between 0 and 1, e.g. 0.001";
    else config.lr = n;
  }
  for (const key of ["stain_norm", "loss", "augment"]) {
    const v = String(values[key] ?? "").trim();
    if (v) config[key] = v;
  }
  return { config, errors, ok: Object.keys(errors).length === 0 };
}

// Validation metrics of a model version, the keys the charts and tables show.
export function versionMetrics(version) {
  const m = version?.metrics || {};
  return { dice: m.dice ?? null, aji: m.aji ?? null, pq: m.pq ?? m.panoptic_quality ?? null, f1: m.object_f1 ?? m.f1 ?? null };
}

// A typed model's class metrics (PanNuke multi-class and binary PQ, PQ per class name); null for a
// binary model. A class absent from the validation tiles has no PQ (null).
export function typedMetrics(version) {
  const m = version?.metrics || {};
  if (!("mpq" in m) && !m.per_class_pq) return null;
  return { mpq: m.mpq ?? null, bpq: m.bpq ?? null, perClass: m.per_class_pq || {} };
}

// A training run's bar and counter. Step events reach progress 1.0 at the last step of the last
// epoch, before that epoch is validated (and the model gated): a live run never shows 100 %, and
// the counter names the epoch in progress, not the last one finished.
export function runProgress(run, epochsDone, totalEpochs) {
  const total = Number.isFinite(totalEpochs) && totalEpochs > 0 ? totalEpochs : null;
  if (run.status === "succeeded") {
    const counter = !total ? `${epochsDone} epochs`
      : epochsDone < total ? `stopped early after ${epochsDone} of ${total} epochs` : `${epochsDone} of ${total} epochs`;
    return { fraction: 1, label: "100%", counter };
  }
  if (run.status === "queued") return { fraction: 0, label: "queued", counter: total ? `${total} epochs planned` : "queued" };
  if (run.status !== "running") {
    const fraction = total ? epochsDone / total : (run.progress || 0);
    return { fraction, label: `${Math.floor(fraction * 100)}%`, counter: total ? `${epochsDone} of ${total} epochs` : `${epochsDone} epochs` };
  }
  const fraction = Math.min(Math.max(run.progress || 0, total ? epochsDone / total : 0), 0.99);
  const current = total ? Math.min(epochsDone + 1, total) : epochsDone + 1;
  const validating = total && (run.progress || 0) >= current / total - 1e-9;
  return {
    fraction,
    label: `${Math.floor(fraction * 100)}%${validating ? ` · validating epoch ${current}` : ""}`,
    counter: total ? `epoch ${current} of ${total}` : `epoch ${current}`,
  };
}

// Seconds left, from the time the run has taken so far and its progress (null when unknown).
export function runEtaSeconds(run, now = Date.now()) {
  if (run.status !== "running" || !run.started_at) return null;
  const progress = run.progress || 0;
  if (progress < 0.02) return null;
  const elapsed = (now - Date.parse(run.started_at)) / 1000;
  if (!Number.isFinite(elapsed) || elapsed <= 0) return null;
  return Math.max(0, Math.round(elapsed * (1 - progress) / progress));
}

export function etaText(seconds) {
  if (seconds === null || seconds === undefined) return "estimating time left…";
  if (seconds < 60) return "under a minute left";
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return `about ${minutes} min left`;
  return `about ${(minutes / 60).toFixed(1)} h left`;
}
