import { describe, it } from "node:test";
import { expect } from "./expect.js";
import { alignSeries, formatValue, hasPoints, runSeries } from "../src/lib/chart.js";

describe("alignSeries (uPlot's columns)", () => {
  it("joins every series on the union of their x values, null where one has no point", () => {
    const data = alignSeries([
      { name: "step loss", points: [[0.5, 1.2], [1, 0.9], [1.5, 0.8]] },
      { name: "train loss", points: [[1, 0.95], [2, 0.7]] },
    ]);
    expect(data).toEqual([[0.5, 1, 1.5, 2], [1.2, 0.9, 0.8, null], [null, 0.95, null, 0.7]]);
  });
  it("drops non-finite values and sorts by x", () => {
    expect(alignSeries([{ points: [[3, 2], [1, NaN], [2, 5]] }])).toEqual([[2, 3], [5, 2]]);
  });
  it("knows when there is nothing to draw", () => {
    expect(hasPoints([{ points: [] }, { points: [[1, NaN]] }])).toBe(false);
    expect(hasPoints([{ points: [[1, 0.5]] }])).toBe(true);
  });
});

describe("tooltip values", () => {
  it("show four significant digits, integers as they are", () => {
    expect(formatValue(0.123456)).toBe("0.1235");
    expect(formatValue(3)).toBe("3");
    expect(formatValue(null)).toBe("—");
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
