// Chart data, shaped for uPlot (drawn by lib/plot.js): pure functions, unit-tested in Node.

// Epoch events (from a run's epoch_metrics or live run.epoch messages) -> chart series.
export function runSeries(epochs) {
  const byEpoch = new Map();
  for (const e of epochs || []) if (e && Number.isFinite(e.epoch)) byEpoch.set(e.epoch, e);
  const list = [...byEpoch.values()].sort((a, b) => a.epoch - b.epoch);
  const pick = (f) => list.map((e) => [e.epoch, f(e)]).filter((p) => typeof p[1] === "number" && Number.isFinite(p[1]));
  return {
    loss: [{ name: "train loss", color: "#ea580c", points: pick((e) => e.train_loss) }],
    validation: [
      { name: "val Dice", color: "#2563eb", points: pick((e) => e.val?.dice) },
      { name: "val AJI", color: "#16a34a", points: pick((e) => e.val?.aji) },
    ],
    epochs: list.length,
  };
}

// [{name, points: [[x, y], ...]}] -> uPlot's aligned columns [xs, ys1, ys2, ...]: the union of
// every series' x values, sorted, with null where a series has no point (drawn as a gap-free
// line by spanGaps). Non-finite values are dropped.
export function alignSeries(series) {
  const columns = series.map((s) => {
    const map = new Map();
    for (const [x, y] of s.points || []) if (Number.isFinite(x) && Number.isFinite(y)) map.set(x, y);
    return map;
  });
  const xs = [...new Set(columns.flatMap((m) => [...m.keys()]))].sort((a, b) => a - b);
  return [xs, ...columns.map((m) => xs.map((x) => (m.has(x) ? m.get(x) : null)))];
}

export function hasPoints(series) {
  return series.some((s) => (s.points || []).some(([x, y]) => Number.isFinite(x) && Number.isFinite(y)));
}

// A value for the tooltip: 4 significant digits, integers as they are.
export function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  if (Number.isInteger(v) || Math.abs(v) >= 100) return String(Math.round(v * 100) / 100);
  return String(Number(v.toPrecision(4)));
}
