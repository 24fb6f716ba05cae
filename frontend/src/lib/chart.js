// Small SVG line charts (no library): validation curves, loss, metrics per model version.
// `lineChart` returns SVG markup; every text in it is escaped.

import { escapeHtml } from "./text.js";

export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) {
    const pad = Math.abs(min) > 0 ? Math.abs(min) * 0.1 : 1;
    min -= pad;
    max += pad;
  }
  const span = max - min;
  const raw = span / Math.max(1, count);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) ?? 10 * magnitude;
  const start = Math.floor(min / step) * step;
  const ticks = [];
  for (let v = start; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toFixed(10)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toFixed(10)));
  return ticks;
}

export function extent(series, key) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const s of series) {
    for (const p of s.points) {
      const v = p[key];
      if (typeof v === "number" && Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
  }
  return lo === Infinity ? null : [lo, hi];
}

// Tick labels with as many decimals as the step between ticks needs (0.25 -> "0.25", 0.05 -> "1.65").
export function tickFormat(step) {
  const decimals = step > 0 ? Math.max(0, Math.min(6, Math.ceil(-Math.log10(step) - 1e-9) + (String(step).includes("25") ? 1 : 0))) : 2;
  return (v) => {
    const text = v.toFixed(decimals);
    return text.includes(".") ? text.replace(/\.?0+$/, "") : text;
  };
}

const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v * 100) / 100) : String(Number(v.toPrecision(4))));

/**
 * series: [{name, color, points: [{x, y}], dashed?}]; options: width, height, yMin, yMax,
 * xLabel, yLabel, title, xInteger (ticks at whole numbers), emptyText.
 */
export function lineChart(series, options = {}) {
  const width = options.width ?? 560;
  const height = options.height ?? 240;
  const m = { top: 16, right: 16, bottom: 40, left: 52 };
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  const title = options.title ? `<title>${escapeHtml(options.title)}</title>` : "";
  const xs = extent(series, 0);
  const ys = extent(series, 1);
  const open = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${width} ${height}" width="100%" role="img" class="line-chart">${title}`;
  if (!xs || !ys) {
    return `${open}<rect x="0.5" y="0.5" width="${width - 1}" height="${height - 1}" rx="8" class="chart-empty-box"/>`
      + `<text x="${width / 2}" y="${height / 2}" text-anchor="middle" class="chart-empty">${escapeHtml(options.emptyText ?? "No data yet")}</text></svg>`;
  }
  let [x0, x1] = xs;
  if (x0 === x1) {
    x0 -= 1;
    x1 += 1;
  }
  const yTicks = niceTicks(options.yMin ?? ys[0], options.yMax ?? ys[1], 4);
  const y0 = Math.min(yTicks[0], options.yMin ?? Infinity);
  const y1 = Math.max(yTicks[yTicks.length - 1], options.yMax ?? -Infinity);
  let xTicks = niceTicks(x0, x1, 6).filter((t) => t >= x0 - 1e-9 && t <= x1 + 1e-9);
  if (options.xInteger) xTicks = [...new Set(xTicks.map(Math.round))].filter((t) => t >= x0 && t <= x1);
  const yFmt = tickFormat(yTicks.length > 1 ? yTicks[1] - yTicks[0] : 0);
  const xFmt = tickFormat(xTicks.length > 1 ? xTicks[1] - xTicks[0] : 0);
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => m.top + plotH - ((y - y0) / (y1 - y0 || 1)) * plotH;
  const parts = [open];
  for (const t of yTicks) {
    parts.push(`<line x1="${m.left}" x2="${m.left + plotW}" y1="${sy(t).toFixed(1)}" y2="${sy(t).toFixed(1)}" class="grid"/>`);
    parts.push(`<text x="${m.left - 8}" y="${(sy(t) + 4).toFixed(1)}" text-anchor="end" class="tick">${yFmt(t)}</text>`);
  }
  for (const t of xTicks) {
    parts.push(`<text x="${sx(t).toFixed(1)}" y="${m.top + plotH + 18}" text-anchor="middle" class="tick">${xFmt(t)}</text>`);
  }
  parts.push(`<line x1="${m.left}" x2="${m.left + plotW}" y1="${m.top + plotH}" y2="${m.top + plotH}" class="axis"/>`);
  if (options.xLabel) parts.push(`<text x="${m.left + plotW / 2}" y="${height - 4}" text-anchor="middle" class="axis-label">${escapeHtml(options.xLabel)}</text>`);
  if (options.yLabel) parts.push(`<text transform="translate(13 ${m.top + plotH / 2}) rotate(-90)" text-anchor="middle" class="axis-label">${escapeHtml(options.yLabel)}</text>`);
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])).sort((a, b) => a[0] - b[0]);
    if (!pts.length) return;
    const color = s.color ?? ["#2563eb", "#16a34a", "#dc2626", "#9333ea"][i % 4];
    const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)} ${sy(p[1]).toFixed(1)}`).join(" ");
    parts.push(`<path d="${d}" fill="none" stroke="${escapeHtml(color)}" stroke-width="2"${s.dashed ? ' stroke-dasharray="5 4"' : ""} class="series" data-series="${escapeHtml(s.name)}"/>`);
    if (pts.length <= 60) {
      for (const p of pts) {
        parts.push(`<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="3" fill="${escapeHtml(color)}"><title>${escapeHtml(s.name)}: ${fmt(p[1])} at ${fmt(p[0])}</title></circle>`);
      }
    }
  });
  // Legend, top right.
  let lx = m.left + plotW;
  series.slice().reverse().forEach((s, k) => {
    const i = series.length - 1 - k;
    const color = s.color ?? ["#2563eb", "#16a34a", "#dc2626", "#9333ea"][i % 4];
    const w = 26 + 7 * s.name.length;
    lx -= w;
    parts.push(`<g class="legend" transform="translate(${lx} ${m.top - 6})"><rect width="12" height="3" y="-2" fill="${escapeHtml(color)}"/><text x="16" y="2" class="legend-text">${escapeHtml(s.name)}</text></g>`);
  });
  parts.push("</svg>");
  return parts.join("");
}

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
