// Formatting and small rules shared by the pages (pure: unit-tested in test/format.test.js).

export const ROLES = ["viewer", "annotator", "reviewer", "admin"];

export function roleAtLeast(role, minimum) {
  return ROLES.indexOf(role) >= 0 && ROLES.indexOf(role) >= ROLES.indexOf(minimum);
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
