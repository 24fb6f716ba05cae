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

// --- the training launch form, described by the engine catalog (GET /api/catalog/) -------------

const TYPE_WORDS = { int: "a whole number", float: "a number", str: "a string", bool: "true or false" };

// What an option accepts, in ml_worker.catalog's words (Option.describe): "a whole number from 1
// to 10000", "a number > 0 and < 1", "one of: fast, paper, or empty for the default".
export function describeOption(option) {
  let text;
  if (option.choices) text = `one of: ${option.choices.join(", ")}`;
  else {
    text = TYPE_WORDS[option.type] ?? option.type;
    const lo = option.minimum ?? option.exclusive_minimum;
    const hi = option.maximum ?? option.exclusive_maximum;
    if (option.minimum !== undefined && option.maximum !== undefined) text += ` from ${lo} to ${hi}`;
    else {
      const parts = [];
      if (lo !== undefined) parts.push(`${option.exclusive_minimum !== undefined ? ">" : ">="} ${lo}`);
      if (hi !== undefined) parts.push(`${option.exclusive_maximum !== undefined ? "<" : "<="} ${hi}`);
      if (parts.length) text += " " + parts.join(" and ");
    }
  }
  return option.nullable ? `${text}, or empty for the default` : text;
}

// One typed value checked against its catalog option: {value} (null: empty, the default) or {error}.
export function parseOption(option, raw) {
  const text = String(raw ?? "").trim();
  if (text === "") return option.nullable ? { value: null } : { error: `${describeOption(option)}; it cannot be empty` };
  let value = text;
  if (option.type === "int" || option.type === "float") {
    value = Number(text);
    if (!Number.isFinite(value) || (option.type === "int" && !Number.isInteger(value))) return { error: describeOption(option) };
    const low = option.minimum !== undefined ? value < option.minimum : option.exclusive_minimum !== undefined && value <= option.exclusive_minimum;
    const high = option.maximum !== undefined ? value > option.maximum : option.exclusive_maximum !== undefined && value >= option.exclusive_maximum;
    if (low || high) return { error: describeOption(option) };
  } else if (option.type === "bool") {
    if (text !== "true" && text !== "false") return { error: describeOption(option) };
    value = text === "true";
  }
  if (option.choices && !option.choices.includes(value)) return { error: describeOption(option) };
  return { value };
}

// Where a launch form starts, from the project's own settings: its default architecture, its
// training defaults (else the catalog's), and its stain normalisation when its training defaults
// name none. `base`: what the server uses for an option the request leaves out (the project's
// training defaults, else the engine's default or the preset's): the form sends only what differs
// from it, or what the user edited, so an untouched field never overrides a preset.
export function trainingFormStart(catalog, project) {
  const defaults = project?.training_defaults || {};
  const values = {};
  const base = {};
  for (const option of catalog.training_options) {
    if (option.settable === false) continue;
    base[option.name] = option.name in defaults ? defaults[option.name] : option.default;
    values[option.name] = base[option.name];
  }
  if (!("stain_norm" in defaults) && project?.stain_normalization) values.stain_norm = project.stain_normalization;
  const names = catalog.architectures.map((a) => a.name);
  const architecture = names.includes(project?.default_architecture) ? project.default_architecture : catalog.default_architecture;
  return { architecture, values, base };
}

// The losses, presets and options an architecture accepts (the catalog's rules, as the server checks them).
export function architectureRules(catalog, name) {
  const arch = catalog.architectures.find((a) => a.name === name);
  if (!arch) return null;
  const target = arch.output === "softmax" ? "class_map" : "multi_label";
  return {
    arch,
    losses: catalog.losses.filter((l) => l.trainable && l.targets.includes(target)),
    presets: arch.presets,
    instanceHead: arch.options.find((o) => o.name === "instance_head") ?? null,
    width: arch.width_option !== null,
  };
}

// The launch form's typed values -> {config, errors, ok}: each field checked against its catalog
// option (and the architecture's rules), kept in the config only when it differs from `base` or
// the user edited it (`touched`).
export function parseTrainingForm(values, catalog, { architecture = null, base = {}, touched = new Set() } = {}) {
  const config = {};
  const errors = {};
  const options = new Map(catalog.training_options.map((o) => [o.name, o]));
  const rules = architecture ? architectureRules(catalog, architecture) : null;
  if (architecture && !rules) errors.architecture = `one of: ${catalog.architectures.map((a) => a.name).join(", ")}`;
  for (const [name, raw] of Object.entries(values)) {
    const option = options.get(name);
    if (!option || option.settable === false) continue;
    const parsed = parseOption(option, raw);
    if (parsed.error) {
      errors[name] = parsed.error;
      continue;
    }
    const value = parsed.value;
    if (rules && value !== null) {
      if (name === "tile_size" && value % rules.arch.size_divisor) {
        errors[name] = `a multiple of ${rules.arch.size_divisor} for ${rules.arch.name}`;
        continue;
      }
      if (name === "loss" && !rules.losses.some((l) => l.name === value)) {
        errors[name] = `${rules.arch.name} trains with one of: ${rules.losses.map((l) => l.name).join(", ")}`;
        continue;
      }
      if (name === "preset" && !rules.presets.some((p) => p.name === value)) {
        errors[name] = `${rules.arch.name} has ${rules.presets.map((p) => p.name).join(", ") || "no"} presets`;
        continue;
      }
      if (name === "instance_head" && !rules.instanceHead) {
        errors[name] = `${rules.arch.name} has its own instance outputs`;
        continue;
      }
      if (name === "width" && !rules.width) {
        errors[name] = `does not apply to ${rules.arch.name}; leave it empty`;
        continue;
      }
    }
    if (touched.has(name) || value !== (base[name] ?? null)) config[name] = value;
  }
  return { config, errors, ok: Object.keys(errors).length === 0 };
}

// The form field a server error is about: the catalog's `details.field` (a run option, or
// "architecture"), or the first key of a validation error's details; null when none is named.
export function errorField(error) {
  const details = error?.details;
  if (details && typeof details === "object" && !Array.isArray(details)) {
    if (typeof details.field === "string") return details.field;
    const keys = Object.keys(details);
    if (keys.length && !("field" in details)) return keys[0];
  }
  return null;
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

// A typed prediction's nuclei, one entry per nucleus (its pieces are one region id "k<id>p<n>"),
// with the class the model gave it and its confidence in that class (the region's score), the
// least sure first; regions without a score (drawn by a person, a binary model's) are left out.
export function predictedNuclei(result) {
  const byId = new Map();
  for (const region of result || []) {
    if (typeof region.score !== "number") continue;
    const id = String(region.id ?? "").replace(/^k/, "").split("p")[0];
    if (!byId.has(id)) byId.set(id, { id, label: region.value?.polygonlabels?.[0] ?? "?", score: region.score });
  }
  return [...byId.values()].sort((a, b) => a.score - b.score || Number(a.id) - Number(b.id));
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
