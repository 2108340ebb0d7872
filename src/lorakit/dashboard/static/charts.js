// Line charts drawn as SVG by hand (no library). Each series path carries its data as attributes
// (data-steps, data-values) so what is drawn can be checked against metrics.jsonl.
"use strict";

LK.PALETTE = ["#1d4ed8", "#c2410c", "#047857", "#7e22ce", "#b91c1c", "#0e7490"];
const SIZE = { width: 560, height: 250, left: 62, right: 16, top: 14, bottom: 40 };

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { const pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
  const raw = (hi - lo) / count;
  const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const first = Math.floor(lo / step), last = Math.ceil(hi / step);
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(Number((i * step).toPrecision(12)));
  return ticks;
}

function thin(points, most) {
  // Keep at most `most` points for drawing (every k-th and the last); the data attributes keep all.
  if (points.length <= most) return points;
  const k = Math.ceil(points.length / most);
  const kept = points.filter((_, i) => i % k === 0);
  if (kept[kept.length - 1] !== points[points.length - 1]) kept.push(points[points.length - 1]);
  return kept;
}

// series: [{name, points: [[step, value], ...], dots: bool}]
LK.chart = function (id, title, series, options) {
  options = options || {};
  const { h } = LK;
  const figure = h("figure", { class: "chart", "data-chart": id, "aria-labelledby": "chart-title-" + id });
  const caption = h("figcaption", { id: "chart-title-" + id, text: title });
  figure.append(caption);
  const shown = series.filter((s) => s.points.length);
  if (!shown.length) {
    figure.append(h("p", { class: "empty", text: options.empty || "No data yet." }));
    return figure;
  }
  const xs = shown.flatMap((s) => s.points.map((p) => p[0]));
  const ys = shown.flatMap((s) => s.points.map((p) => p[1]));
  const xTicks = niceTicks(Math.min(...xs), Math.max(...xs), 6);
  const yTicks = niceTicks(Math.min(...ys), Math.max(...ys), 5);
  const [x0, x1] = [xTicks[0], xTicks[xTicks.length - 1]];
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  const plotW = SIZE.width - SIZE.left - SIZE.right, plotH = SIZE.height - SIZE.top - SIZE.bottom;
  const sx = (x) => SIZE.left + ((x - x0) / (x1 - x0 || 1)) * plotW;
  const sy = (y) => SIZE.top + plotH - ((y - y0) / (y1 - y0 || 1)) * plotH;

  const last = shown.map((s) => `${s.name} ${LK.num(s.points[s.points.length - 1][1])} at step ${s.points[s.points.length - 1][0]}`);
  const svg = h("svg", {
    viewBox: `0 0 ${SIZE.width} ${SIZE.height}`, role: "img", tabindex: "0", class: "plot", "data-focus-key": "chart:" + id,
    "aria-label": `${title}: ${last.join("; ")}. Use the left and right arrow keys to read values.`,
  });
  const axes = h("g", { class: "axes", "aria-hidden": "true" });
  for (const t of yTicks) {
    axes.append(h("line", { x1: SIZE.left, x2: SIZE.width - SIZE.right, y1: sy(t), y2: sy(t), class: "grid" }));
    axes.append(h("text", { x: SIZE.left - 6, y: sy(t) + 4, "text-anchor": "end", text: LK.num(t) }));
  }
  for (const t of xTicks) {
    axes.append(h("text", { x: sx(t), y: SIZE.height - SIZE.bottom + 16, "text-anchor": "middle", text: LK.num(t) }));
  }
  axes.append(h("text", { x: SIZE.left + plotW / 2, y: SIZE.height - 6, "text-anchor": "middle", class: "axis-label", text: "step" }));
  axes.append(h("line", { x1: SIZE.left, x2: SIZE.left, y1: SIZE.top, y2: SIZE.top + plotH, class: "axis" }));
  axes.append(h("line", { x1: SIZE.left, x2: SIZE.width - SIZE.right, y1: SIZE.top + plotH, y2: SIZE.top + plotH, class: "axis" }));
  svg.append(axes);

  shown.forEach((s, i) => {
    const color = LK.PALETTE[i % LK.PALETTE.length];
    const drawn = thin(s.points, 3000);
    const d = drawn.map((p, j) => (j ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    svg.append(h("path", {
      d, class: "series" + (s.dots ? " dashed" : ""), stroke: color, "data-series": s.name,
      "data-steps": s.points.map((p) => p[0]).join(","), "data-values": s.points.map((p) => p[1]).join(","),
    }));
    if (s.dots && drawn.length <= 200) {
      const dots = h("g", { fill: color, "aria-hidden": "true" });
      for (const p of drawn) dots.append(h("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3 }));
      svg.append(dots);
    }
  });
  const cursor = h("line", { class: "cursor", y1: SIZE.top, y2: SIZE.top + plotH, x1: -10, x2: -10, "aria-hidden": "true" });
  svg.append(cursor);
  figure.append(svg);

  const legend = h("ul", { class: "legend" });
  shown.forEach((s, i) => legend.append(h("li", {},
    h("span", { class: "swatch" + (s.dots ? " dashed" : ""), style: null, "data-color": LK.PALETTE[i % LK.PALETTE.length] }), s.name)));
  figure.append(legend);
  legend.querySelectorAll(".swatch").forEach((el) => { el.style.borderColor = el.dataset.color; });

  const readout = h("p", { class: "readout", "aria-live": "polite" });
  figure.append(readout);
  const steps = [...new Set(xs)].sort((a, b) => a - b);
  let at = -1;
  const show = (index) => {
    at = Math.max(0, Math.min(steps.length - 1, index));
    const step = steps[at];
    cursor.setAttribute("x1", sx(step)); cursor.setAttribute("x2", sx(step));
    const parts = shown.map((s) => { const p = s.points.find((q) => q[0] === step); return p ? `${s.name} ${LK.num(p[1])}` : null; })
      .filter(Boolean);
    readout.textContent = `step ${step}: ${parts.join(", ")}`;
  };
  svg.addEventListener("keydown", (e) => {
    let next;
    if (e.key === "Home") next = 0;
    else if (e.key === "End") next = steps.length - 1;
    else if (e.key === "ArrowLeft") next = at < 0 ? steps.length - 1 : at - 1;
    else if (e.key === "ArrowRight") next = at < 0 ? 0 : at + 1;
    else return;
    e.preventDefault();
    show(next);
  });
  svg.addEventListener("mousemove", (e) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + (((e.clientX - box.left) / box.width) * SIZE.width - SIZE.left) / plotW * (x1 - x0);
    let best = 0;
    steps.forEach((s, i) => { if (Math.abs(s - x) < Math.abs(steps[best] - x)) best = i; });
    show(best);
  });

  const details = h("details", { class: "data" }, h("summary", { text: "Data table" }));
  details.addEventListener("toggle", () => {
    if (!details.open || details.querySelector("table")) return;
    const table = h("table", {}, h("caption", { class: "sr-only", text: title }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "step" }), shown.map((s) => h("th", { scope: "col", text: s.name })))));
    const body = h("tbody");
    for (const step of steps) {
      body.append(h("tr", {}, h("th", { scope: "row", text: step }),
        shown.map((s) => { const p = s.points.find((q) => q[0] === step); return h("td", { text: p ? LK.num(p[1]) : "" }); })));
    }
    table.append(body);
    details.append(LK.tableWrap(title + " data", table));
  });
  figure.append(details);
  return figure;
};
