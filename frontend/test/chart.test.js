import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { extent, lineChart, niceTicks, runSeries, tickFormat } from "../src/lib/chart.js";

describe("niceTicks", () => {
  it("covers the range with round steps", () => {
    expect(niceTicks(0, 1, 4)).toEqual([0, 0.25, 0.5, 0.75, 1]);
    const t = niceTicks(0.13, 0.87, 5);
    expect(t[0]).toBeLessThanOrEqual(0.13);
    expect(t[t.length - 1]).toBeGreaterThanOrEqual(0.87);
  });
  it("widens a single value", () => {
    const t = niceTicks(2, 2, 4);
    expect(t[0]).toBeLessThan(2);
    expect(t[t.length - 1]).toBeGreaterThan(2);
  });
  it("returns nothing for missing data", () => {
    expect(niceTicks(NaN, 1)).toEqual([]);
  });
});

describe("lineChart", () => {
  it("draws one path per series, a legend, and escapes names", () => {
    const markup = lineChart([{ name: "Dice <v>", points: [[1, 0.5], [2, 0.7]] }, { name: "AJI", points: [[1, 0.4], [2, 0.6]] }], { xLabel: "epoch" });
    expect(markup.match(/<path /g)).toHaveLength(2);
    expect(markup).toContain("Dice &lt;v&gt;");
    expect(markup).not.toContain("<v>");
    expect(markup).toContain(">epoch<");
  });
  it("shows the empty text without data", () => {
    expect(lineChart([{ name: "loss", points: [] }], { emptyText: "Waiting for the first epoch…" })).toContain("Waiting for the first epoch…");
  });
  it("computes extents over finite values only", () => {
    expect(extent([{ points: [[1, NaN], [3, 2], [2, 5]] }], 1)).toEqual([2, 5]);
  });
});

describe("runSeries", () => {
  it("turns epoch events into loss and validation series, de-duplicated by epoch", () => {
    const events = [
      { epoch: 2, epochs: 3, train_loss: 0.5, val: { dice: 0.6, aji: 0.4 } },
      { epoch: 1, epochs: 3, train_loss: 0.9, val: { dice: 0.3, aji: 0.2 } },
      { epoch: 2, epochs: 3, train_loss: 0.5, val: { dice: 0.6, aji: 0.4 } },
    ];
    const s = runSeries(events);
    expect(s.epochs).toBe(2);
    expect(s.loss[0].points).toEqual([[1, 0.9], [2, 0.5]]);
    expect(s.validation[0].points).toEqual([[1, 0.3], [2, 0.6]]);
    expect(s.validation[1].points).toEqual([[1, 0.2], [2, 0.4]]);
  });
});

describe("tick labels", () => {
  it("show as many decimals as the step needs", () => {
    expect([1.6, 1.65, 1.7].map(tickFormat(0.05))).toEqual(["1.6", "1.65", "1.7"]);
    expect([0, 0.25, 0.5].map(tickFormat(0.25))).toEqual(["0", "0.25", "0.5"]);
    expect([1, 2, 3].map(tickFormat(1))).toEqual(["1", "2", "3"]);
    expect([0.1, 0.2].map(tickFormat(0.09999999999999998))).toEqual(["0.1", "0.2"]);
  });
  it("never repeat a label on the loss axis of a short run", () => {
    const markup = lineChart([{ name: "loss", points: [[1, 1.66], [2, 1.78], [3, 1.6]] }]);
    const labels = [...markup.matchAll(/text-anchor="end" class="tick">([^<]+)</g)].map((m) => m[1]);
    expect(new Set(labels).size).toBe(labels.length);
  });
});
