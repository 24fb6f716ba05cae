// Line charts with uPlot (npm `uplot`, copied into the app by build.mjs): drag to zoom (x and
// y; double-click resets), a tooltip with every series' value at the cursor, live updates that
// keep the zoom. `lineChart(series, options)` returns an element; `update(series)` redraws it.
import { h } from "./dom.js";
import { alignSeries, formatValue, hasPoints } from "./chart.js";

let uplotModule = null;
function loadUPlot() {
  if (!uplotModule) {
    const css = new URL("../vendor/uplot/uPlot.min.css", import.meta.url).href;
    if (!document.querySelector(`link[href="${css}"]`)) document.head.append(h("link", { rel: "stylesheet", href: css }));
    uplotModule = import(new URL("../vendor/uplot/uPlot.esm.js", import.meta.url).href).then((m) => m.default);
  }
  return uplotModule;
}

const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea"];

function tooltipPlugin(tip, xLabel) {
  return {
    hooks: {
      setCursor: (u) => {
        const i = u.cursor.idx;
        if (i === null || i === undefined || u.cursor.left < 0) {
          tip.hidden = true;
          return;
        }
        const rows = u.series.slice(1).map((s, k) => ({ s, v: u.data[k + 1][i] })).filter((r) => r.s.show && r.v !== null && r.v !== undefined);
        if (!rows.length) {
          tip.hidden = true;
          return;
        }
        tip.replaceChildren(h("div", { class: "plot-tip-x" }, `${xLabel} ${formatValue(u.data[0][i])}`),
          ...rows.map((r) => h("div", {}, h("i", { class: "dot", style: { background: r.s._color } }), ` ${r.s.label}: `, h("strong", {}, formatValue(r.v)))));
        tip.hidden = false;
        const left = u.cursor.left + u.over.offsetLeft;
        const flip = left > u.over.offsetLeft + u.over.clientWidth * 0.6;
        tip.style.left = `${flip ? left - tip.offsetWidth - 12 : left + 12}px`;
        tip.style.top = `${u.cursor.top + u.over.offsetTop + 8}px`;
      },
    },
  };
}

/**
 * series: [{name, color, points: [[x, y]], dashed?}]; options: height, yMin, yMax, xLabel,
 * yLabel, title, xInteger, emptyText. The element carries data-points (points drawn).
 */
export function lineChart(series, options = {}) {
  const empty = h("div", { class: "plot-empty" }, options.emptyText ?? "No data yet");
  const tip = h("div", { class: "plot-tip", hidden: true, role: "status" });
  const host = h("div", { class: "plot-host" });
  const el = h("div", { class: "plot", title: options.title ?? null }, host, tip, empty);
  let plot = null;
  let zoomed = false;
  let current = series;
  const height = options.height ?? 240;

  const mark = () => {
    el.dataset.points = String(current.reduce((n, s) => n + (s.points || []).length, 0));
    empty.hidden = hasPoints(current);
  };

  async function build() {
    const UPlot = await loadUPlot();
    if (plot || !el.isConnected) return;
    const width = Math.max(240, host.clientWidth || el.clientWidth || 560);
    const opts = {
      width, height,
      cursor: { drag: { x: true, y: true, uni: 30 } },
      scales: {
        x: { time: false },
        y: options.yMin !== undefined || options.yMax !== undefined
          ? { range: (u, lo, hi) => [Math.min(options.yMin ?? lo, lo), Math.max(options.yMax ?? hi, hi)] } : {},
      },
      axes: [
        { label: options.xLabel, ...(options.xInteger ? { incrs: [1, 2, 5, 10, 20, 50, 100] } : {}) },
        { label: options.yLabel, size: 56 },
      ],
      series: [{ label: options.xLabel ?? "x" }, ...current.map((s, i) => {
        const color = s.color ?? PALETTE[i % PALETTE.length];
        return { label: s.name, stroke: color, _color: color, width: 2, spanGaps: true, dash: s.dashed ? [5, 4] : undefined,
          points: { show: (s.points || []).length <= 60, size: 6 } };
      })],
      legend: { live: false },
      hooks: { setSelect: [() => { zoomed = true; }] },
      plugins: [tooltipPlugin(tip, options.xLabel ?? "x")],
    };
    plot = new UPlot(opts, alignSeries(current), host);
    el.plot = plot; // a handle for the browser tests
    el.dataset.ready = "1";
    retry.disconnect();
    plot.over.addEventListener("dblclick", () => { zoomed = false; });
    new ResizeObserver(() => {
      const w = Math.max(240, el.clientWidth);
      if (plot && Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height });
    }).observe(el);
  }

  el.update = (next) => {
    current = next;
    mark();
    if (plot) plot.setData(alignSeries(current), !zoomed);
    else build();
  };
  mark();
  // Built once in the document (uPlot measures its container).
  requestAnimationFrame(() => build().catch((error) => console.error(error)));
  const retry = new MutationObserver(() => {
    if (el.isConnected && !plot) build();
    if (plot) retry.disconnect();
  });
  retry.observe(document.body, { childList: true, subtree: true });
  return el;
}
