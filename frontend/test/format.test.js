import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { errorFrom, cookie } from "../src/lib/api.js";
import { backoffDelay } from "../src/lib/socket.js";
import { duration, metric, parseTrainingForm, percent, relativeTime, roleAtLeast, statusLabel, typedMetrics, versionMetrics, withArticle, runProgress, runEtaSeconds } from "../src/lib/format.js";

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

describe("the training form", () => {
  it("keeps typed numbers and drops empty fields", () => {
    const { config, ok } = parseTrainingForm({ epochs: "3", lr: "0.001", batch_size: "4", tile_size: "64", width: "", stain_norm: "macenko", loss: "" });
    expect(ok).toBe(true);
    expect(config).toEqual({ epochs: 3, lr: 0.001, batch_size: 4, tile_size: 64, stain_norm: "macenko" });
  });
  it("rejects what the API would refuse", () => {
    const { errors, ok } = parseTrainingForm({ epochs: "0", lr: "2", batch_size: "x", tile_size: "16" });
    expect(ok).toBe(false);
    expect(Object.keys(errors).sort()).toEqual(["batch_size", "epochs", "lr", "tile_size"]);
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
