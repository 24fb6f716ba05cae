import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { exportFilters } from "../src/pages/exports.js";

describe("export filters", () => {
  it("builds the API's filter object from the form", () => {
    expect(exportFilters({ status: "submitted", annotators: "alice, bob ,", date_from: "2026-01-01", split: "random" })).toEqual({
      status: "submitted", annotators: ["alice", "bob"], date_from: "2026-01-01", split: { train: 0.7, val: 0.15, test: 0.15, seed: 1 },
    });
    expect(exportFilters({})).toEqual({ status: "reviewed" });
    expect(exportFilters({ split: "frozen", classes: "nucleus" })).toEqual({ status: "reviewed", classes: ["nucleus"], split: "frozen" });
  });
});
