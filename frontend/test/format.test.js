import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { errorFrom, cookie } from "../src/lib/api.js";
import { backoffDelay } from "../src/lib/socket.js";
import { architectureRules, describeOption, duration, errorField, metric, parseTrainingForm, predictedNuclei, trainingFormStart, percent, relativeTime, roleAtLeast, statusLabel, typedMetrics, versionMetrics, withArticle, runProgress, runEtaSeconds } from "../src/lib/format.js";

describe("roles", () => {
  it("orders viewer < annotator < reviewer < admin", () => {
    expect(roleAtLeast("admin", "annotator")).toBe(true);
    expect(roleAtLeast("viewer", "annotator")).toBe(false);
    expect(roleAtLeast("reviewer", "reviewer")).toBe(true);
    expect(roleAtLeast(null, "viewer")).toBe(false);
  });

  it("says an annotator, an admin, a viewer, a reviewer", () => {
    expect(withArticle("annotator")).toBe("an annotator");
    expect(withArticle("admin")).toBe("an admin");
    expect(withArticle("viewer")).toBe("a viewer");
    expect(withArticle("reviewer")).toBe("a reviewer");
  });
});

describe("formatting", () => {
  const now = Date.parse("2026-01-10T12:00:00Z");
  it("says how long ago", () => {
    expect(relativeTime("2026-01-10T11:59:50Z", now)).toBe("just now");
    expect(relativeTime("2026-01-10T11:55:00Z", now)).toBe("5 minutes ago");
    expect(relativeTime("2026-01-10T10:00:00Z", now)).toBe("2 hours ago");
    expect(relativeTime("2026-01-09T11:00:00Z", now)).toBe("yesterday");
    expect(relativeTime(null, now)).toBe("—");
  });
  it("formats metrics, percentages and durations", () => {
    expect(metric(0.81234)).toBe("0.812");
    expect(metric(null)).toBe("—");
    expect(percent(1, 3)).toBe("33%");
    expect(percent(1, 300)).toBe("0.3%");
    expect(percent(0, 0)).toBe("0%");
    expect(duration(850)).toBe("850 ms");
    expect(duration(1530)).toBe("1.5 s");
    expect(duration(125000)).toBe("2 min 5 s");
  });
  it("labels statuses for people", () => {
    expect(statusLabel("submitted")).toBe("awaiting review");
    expect(statusLabel(null)).toBe("not annotated");
    expect(statusLabel("weird")).toBe("weird");
  });
  it("reads the validation metrics of a version", () => {
    expect(versionMetrics({ metrics: { dice: 0.8, aji: 0.6, pq: 0.5 } })).toEqual({ dice: 0.8, aji: 0.6, pq: 0.5, f1: null });
  });
  it("reads a typed model's class metrics, and none for a binary one", () => {
    expect(typedMetrics({ metrics: { dice: 0.8, mpq: 0.4, bpq: 0.6, per_class_pq: { lymphocyte: 0.5, stromal: null } } }))
      .toEqual({ mpq: 0.4, bpq: 0.6, perClass: { lymphocyte: 0.5, stromal: null } });
    expect(typedMetrics({ metrics: { dice: 0.8, aji: 0.6 } })).toBe(null);
  });
});

// A slice of GET /api/catalog/ (ml_worker.catalog.as_dict()), as the server serves it.
const CATALOG = {
  default_architecture: "dssnet",
  architectures: [
    { name: "unet", label: "U-Net", help: "classic", default_loss: "ce_dice", output: "softmax", size_divisor: 16, width_option: "width",
      options: [{ name: "width" }, { name: "depth" }, { name: "instance_head" }], presets: [{ name: "fast", label: "fast", help: "Karyo's lighter defaults" }] },
    { name: "dssnet", label: "DSSNet", help: "small and fast", default_loss: "ce", output: "softmax", size_divisor: 8, width_option: "width",
      options: [{ name: "width" }, { name: "instance_head" }],
      presets: [{ name: "fast", label: "fast", help: "lighter" }, { name: "paper", label: "paper", help: "the reference decoder, SGD, cosine" }] },
    { name: "multihead_unet", label: "Multi-head U-Net", help: "sigmoid maps", default_loss: "bce_dice", output: "sigmoid", size_divisor: 16,
      width_option: "width", options: [{ name: "width" }, { name: "postprocess" }], presets: [{ name: "fast", label: "fast", help: "lighter" }] },
  ],
  losses: [
    { name: "ce", targets: ["class_map", "multi_label"], trainable: true },
    { name: "border_ce", targets: ["class_map"], trainable: true },
    { name: "ssim", targets: [], trainable: false },
  ],
  training_options: [
    { name: "epochs", type: "int", default: 50, help: "passes", nullable: false, minimum: 1, maximum: 10000 },
    { name: "batch_size", type: "int", default: 8, help: "patches per step", nullable: false, minimum: 1, maximum: 1024 },
    { name: "lr", type: "float", default: 0.001, help: "learning rate", nullable: false, exclusive_minimum: 0, exclusive_maximum: 1 },
    { name: "loss", type: "str", default: null, help: "loss", nullable: true, choices: ["ce", "border_ce"] },
    { name: "tile_size", type: "int", default: 256, help: "patch side", nullable: false, minimum: 32, maximum: 4096 },
    { name: "stain_norm", type: "str", default: "none", help: "stain", nullable: false, choices: ["none", "macenko", "reinhard"] },
    { name: "ema_decay", type: "float", default: null, help: "EMA", nullable: true, minimum: 0, exclusive_maximum: 1 },
    { name: "width", type: "int", default: null, help: "width", nullable: true, minimum: 1, maximum: 512 },
    { name: "preset", type: "str", default: null, help: "named set-up", nullable: true, choices: ["fast", "paper"] },
    { name: "instance_head", type: "str", default: null, help: "hv maps", nullable: true, choices: ["hv"] },
  ],
};

describe("the training form", () => {
  it("says what an option accepts in the catalog's words", () => {
    const [epochs, , lr, , , stain, ema, width] = CATALOG.training_options;
    expect(describeOption(epochs)).toBe("a whole number from 1 to 10000");
    expect(describeOption(lr)).toBe("a number > 0 and < 1");
    expect(describeOption(ema)).toBe("a number >= 0 and < 1, or empty for the default");
    expect(describeOption(stain)).toBe("one of: none, macenko, reinhard");
    expect(describeOption(width)).toBe("a whole number from 1 to 512, or empty for the default");
  });
  it("starts from the project's architecture, training defaults and stain normalisation", () => {
    const start = trainingFormStart(CATALOG, { default_architecture: "unet", stain_normalization: "macenko", training_defaults: { epochs: 3, tile_size: 64 } });
    expect(start.architecture).toBe("unet");
    expect([start.values.epochs, start.values.tile_size, start.values.lr, start.values.stain_norm]).toEqual([3, 64, 0.001, "macenko"]);
    expect([start.base.epochs, start.base.stain_norm]).toEqual([3, "none"]);
    // Stain normalisation named in the training defaults wins over the project's setting.
    expect(trainingFormStart(CATALOG, { stain_normalization: "macenko", training_defaults: { stain_norm: "reinhard" } }).values.stain_norm).toBe("reinhard");
    expect(trainingFormStart(CATALOG, { default_architecture: "gone" }).architecture).toBe("dssnet");
  });
  it("sends only what differs from the project's defaults or was edited, so a preset sets the rest", () => {
    const start = trainingFormStart(CATALOG, { default_architecture: "dssnet", stain_normalization: "macenko", training_defaults: { epochs: 3 } });
    const form = { epochs: "3", lr: "0.001", batch_size: "8", tile_size: "256", stain_norm: "macenko", loss: "", ema_decay: "", width: "", preset: "paper", instance_head: "hv" };
    const { config, ok } = parseTrainingForm(form, CATALOG, { architecture: "dssnet", base: start.base });
    expect(ok).toBe(true);
    expect(config).toEqual({ stain_norm: "macenko", preset: "paper", instance_head: "hv" });
    const edited = parseTrainingForm({ ...form, epochs: "3", batch_size: "4" }, CATALOG, { architecture: "dssnet", base: start.base, touched: new Set(["epochs"]) });
    expect(edited.config).toEqual({ epochs: 3, batch_size: 4, stain_norm: "macenko", preset: "paper", instance_head: "hv" });
    // Emptying an option the project sets sends null: the engine's default.
    const cleared = parseTrainingForm({ width: "" }, CATALOG, { base: { width: 16 } });
    expect(cleared.config).toEqual({ width: null });
  });
  it("rejects what the API would refuse, with the catalog's bounds", () => {
    const { errors, ok } = parseTrainingForm({ epochs: "0", lr: "1", batch_size: "x", tile_size: "16", ema_decay: "1", stain_norm: "vahadane" }, CATALOG);
    expect(ok).toBe(false);
    expect(Object.keys(errors).sort()).toEqual(["batch_size", "ema_decay", "epochs", "lr", "stain_norm", "tile_size"]);
    expect(errors.epochs).toBe("a whole number from 1 to 10000");
    expect(parseTrainingForm({ epochs: "2.5" }, CATALOG).errors.epochs).toBe("a whole number from 1 to 10000");
    expect(parseTrainingForm({ epochs: "" }, CATALOG).errors.epochs).toMatch(/cannot be empty/);
  });
  it("applies the architecture's rules: presets, instance head, losses, tile multiple", () => {
    const unet = parseTrainingForm({ preset: "paper", tile_size: "72", loss: "border_ce" }, CATALOG, { architecture: "unet" });
    expect(Object.keys(unet.errors).sort()).toEqual(["preset", "tile_size"]);
    expect(unet.errors.tile_size).toBe("a multiple of 16 for unet");
    const multi = parseTrainingForm({ instance_head: "hv", loss: "border_ce", preset: "fast" }, CATALOG, { architecture: "multihead_unet" });
    expect(Object.keys(multi.errors).sort()).toEqual(["instance_head", "loss"]);
    expect(parseTrainingForm({ tile_size: "72" }, CATALOG, { architecture: "dssnet" }).ok).toBe(true);
    const rules = architectureRules(CATALOG, "multihead_unet");
    expect([rules.instanceHead, rules.losses.map((l) => l.name), rules.presets.map((p) => p.name)]).toEqual([null, ["ce"], ["fast"]]);
  });
  it("finds the field a server error names", () => {
    expect(errorField({ details: { field: "preset", valid: ["fast"] } })).toBe("preset");
    expect(errorField({ details: { architecture: ["unknown architecture 'x'"] } })).toBe("architecture");
    expect(errorField({ details: null })).toBe(null);
    expect(errorField(new Error("offline"))).toBe(null);
  });
});

describe("a typed prediction in the workspace", () => {
  it("lists each predicted nucleus once with its class and confidence, the least sure first", () => {
    const region = (id, label, score) => ({ id, value: { polygonlabels: [label] }, ...(score === undefined ? {} : { score }) });
    const result = [region("k1p1", "lymphocyte", 0.92), region("k2p1", "epithelial", 0.41), region("k2p2", "epithelial", 0.41),
      region("k3p1", "stromal", 0.55), region("drawn-by-hand", "stromal")];
    expect(predictedNuclei(result)).toEqual([
      { id: "2", label: "epithelial", score: 0.41 }, { id: "3", label: "stromal", score: 0.55 }, { id: "1", label: "lymphocyte", score: 0.92 }]);
    expect(predictedNuclei([region("k1p1", "nucleus")])).toEqual([]);
  });
});

describe("API errors", () => {
  it("uses Karyo's error shape, DRF details, or a message per status", () => {
    const e = errorFrom(409, { error: { code: "conflict", message: "training run 3 is already in progress" } });
    expect([e.status, e.code, e.message]).toEqual([409, "conflict", "training run 3 is already in progress"]);
    expect(errorFrom(403, { detail: "nope" }).message).toBe("nope");
    expect(errorFrom(502, "<html>…</html>").message).toMatch(/unreachable/);
    expect(errorFrom(418, null).message).toBe("Request failed (HTTP 418)");
  });
  it("reads cookies", () => {
    expect(cookie("csrftoken", "a=1; csrftoken=abc%3D; b=2")).toBe("abc=");
    expect(cookie("missing", "a=1")).toBeNull();
  });
});

describe("reconnecting", () => {
  it("backs off exponentially up to a cap", () => {
    expect([0, 1, 2, 3].map((n) => backoffDelay(n))).toEqual([500, 1000, 2000, 4000]);
    expect(backoffDelay(20)).toBe(15000);
  });
});

describe("training run progress", () => {
  it("never shows 100 % while the last epoch is still being validated", () => {
    const bar = runProgress({ status: "running", progress: 1.0 }, 5, 6);
    expect(bar.fraction < 1).toBe(true);
    expect(bar.label).toBe("99% · validating epoch 6");
    expect(bar.counter).toBe("epoch 6 of 6");
  });

  it("counts the epoch in progress", () => {
    const bar = runProgress({ status: "running", progress: 0.6 }, 3, 6);
    expect(bar.label).toBe("60%");
    expect(bar.counter).toBe("epoch 4 of 6");
  });

  it("says when a finished run stopped early", () => {
    expect(runProgress({ status: "succeeded", progress: 1 }, 5, 6).counter).toBe("stopped early after 5 of 6 epochs");
    expect(runProgress({ status: "succeeded", progress: 1 }, 6, 6).label).toBe("100%");
    expect(runProgress({ status: "succeeded", progress: 1 }, 6, 6).counter).toBe("6 of 6 epochs");
  });

  it("estimates the time left from the time taken so far", () => {
    const now = Date.parse("2026-01-01T00:10:00Z");
    expect(runEtaSeconds({ status: "running", progress: 0.5, started_at: "2026-01-01T00:00:00Z" }, now)).toBe(600);
    expect(runEtaSeconds({ status: "running", progress: 0.0, started_at: "2026-01-01T00:00:00Z" }, now)).toBe(null);
    expect(runEtaSeconds({ status: "queued", progress: 0.5, started_at: null }, now)).toBe(null);
  });
});
