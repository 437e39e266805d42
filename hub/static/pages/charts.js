// Charts and small helpers shared by the account page and the dashboard (uPlot, vendored).
import uPlot from "../vendor/uplot.esm.js";

const PALETTE = ["#2456c7", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#e67700", "#0b7285", "#5c940d"];

export async function api(path, options = {}) {
  // Same-origin requests carry the session cookie; a body is always JSON (the CSRF rule).
  const init = { credentials: "same-origin", ...options };
  if (options.body !== undefined) {
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data?.error?.message ?? `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

export function number(value) {
  return new Intl.NumberFormat("en").format(value);
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") : "—";
}

// rows [{start, <by>, <field>}] -> uPlot data: x = bucket starts, one series per name
// (the `top` largest; the rest summed as "other").
export function seriesData(rows, by, field, top = 6) {
  const totals = new Map();
  for (const row of rows) {
    const name = row[by] ?? "(none)";
    totals.set(name, (totals.get(name) ?? 0) + row[field]);
  }
  const ranked = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
  const names = ranked.slice(0, top);
  if (ranked.length > top) names.push("other");
  const xs = [...new Set(rows.map((row) => row.start))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const ys = names.map(() => xs.map(() => 0));
  for (const row of rows) {
    let which = names.indexOf(row[by] ?? "(none)");
    if (which < 0) which = names.length - 1;
    ys[which][index.get(row.start)] += row[field];
  }
  return { names, data: [xs, ...ys] };
}

// A chart in `container`: one line per name, optional horizontal limit lines.
export function drawChart(container, title, names, data, limits = []) {
  container.replaceChildren();
  const width = Math.max(320, container.clientWidth || 560);
  const series = [{}, ...names.map((name, i) => ({
    label: name, stroke: PALETTE[i % PALETTE.length], width: 2,
    fill: PALETTE[i % PALETTE.length] + "22", points: { show: data[0].length < 40 },
  }))];
  const columns = [...data];
  for (const limit of limits) {
    series.push({ label: limit.label, stroke: "#868e96", dash: [6, 4], width: 1.5, points: { show: false } });
    columns.push(data[0].map(() => limit.value));
  }
  const options = {
    title, width, height: 220, series,
    axes: [{}, { size: 72, values: (_u, ticks) => ticks.map((t) => number(t)) }],
    scales: { x: { time: true } },
  };
  return new uPlot(options, columns, container);
}
