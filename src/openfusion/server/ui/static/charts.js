// The run page's charts, drawn as inline SVG: the timeline (a Gantt chart of stages, members,
// model calls and tool calls) and horizontal cost bars.

import { duration, el, svg, usd } from "./common.js";

// Rows in reading order: each stage, and under it what ran in it — for the panel, each member
// followed by its model calls and tool calls.
function timelineRows(run) {
  const spans = run.timeline;
  const placed = new Set();
  const rows = [];
  const add = (span, depth) => { if (!placed.has(span)) { placed.add(span); rows.push({ span, depth }); } };
  const members = spans.filter((s) => s.kind === "member").sort((a, b) => a.member - b.member);
  const childrenOf = (member) => spans
    .filter((s) => (s.kind === "model" || s.kind === "tool") && s.member === member)
    .sort((a, b) => a.start_ms - b.start_ms || a.seq - b.seq);
  for (const stage of spans.filter((s) => s.kind === "stage").sort((a, b) => a.start_ms - b.start_ms)) {
    add(stage, 0);
    if (stage.name === "panel") {
      for (const m of members) {
        add(m, 1);
        for (const child of childrenOf(m.member)) add(child, 2);
      }
    }
    for (const s of spans) {
      if ((s.kind === "model" || s.kind === "tool") && s.member == null && s.stage === stage.name) add(s, 1);
    }
  }
  for (const m of members) {
    add(m, 0);
    for (const child of childrenOf(m.member)) add(child, 1);
  }
  for (const s of [...spans].sort((a, b) => a.start_ms - b.start_ms)) add(s, 0);
  return rows;
}

function niceStep(span) {
  const rough = span / 6;
  const power = 10 ** Math.floor(Math.log10(Math.max(rough, 1)));
  for (const f of [1, 2, 5, 10]) if (f * power >= rough) return f * power;
  return 10 * power;
}

function spanLabel(span) {
  if (span.kind === "stage") return `${span.name} stage`;
  if (span.kind === "member") return span.name;
  if (span.kind === "tool") return `tool: ${span.name}`;
  return span.stage === "panel" ? `call ${span.model || span.name}` : `${span.stage || "call"}: ${span.model || span.name}`;
}

export function drawTimeline(run) {
  const rows = timelineRows(run);
  const wrap = el("div", { class: "chart", id: "timeline-chart" });
  if (!rows.length) {
    wrap.append(el("p", { class: "muted", text: "Nothing has run yet." }));
    return wrap;
  }
  const now = run.status === "running" ? Date.now() - new Date(run.created_at).getTime() : 0;
  const ends = rows.map(({ span }) => span.end_ms ?? Math.max(now, span.start_ms));
  const total = Math.max(1, run.latency_ms || 0, ...ends);
  const labelW = 250;
  const rowH = 24;
  const top = 26;
  const width = Math.max(800, (document.getElementById("app").clientWidth || 1100) - 44);
  const plotW = width - labelW - 130;
  const height = top + rows.length * rowH + 8;
  const x = (ms) => labelW + (ms / total) * plotW;
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `Timeline of ${rows.length} spans over ${duration(total)}`,
  });
  const step = niceStep(total);
  for (let t = 0; t <= total + 1e-9; t += step) {
    chart.append(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 6, y2: height - 4 }),
      svg("text", { class: "muted", x: x(t), y: 14, "text-anchor": "middle" }, duration(t)));
  }
  rows.forEach(({ span, depth }, i) => {
    const y = top + i * rowH;
    if (i % 2 === 0) chart.append(svg("rect", { class: "rowband", x: 0, y, width, height: rowH }));
    const label = spanLabel(span);
    const shown = label.length > 34 - depth * 2 ? label.slice(0, 33 - depth * 2) + "…" : label;
    chart.append(svg("text", { x: 8 + depth * 16, y: y + 16, class: span.kind === "stage" ? "" : "muted",
      "font-weight": span.kind === "stage" || span.kind === "member" ? 600 : 400 }, svg("title", {}, label), shown));
    const end = span.end_ms ?? Math.max(now, span.start_ms);
    const running = span.end_ms == null;
    const bad = ["failed", "cancelled", "unfinished"].includes(span.status) ? ` bar-${span.status}` : "";
    const barH = span.kind === "stage" ? 8 : 14;
    const bar = svg("rect", {
      class: `bar-${span.kind}${bad}${running ? " bar-running" : ""}`,
      x: x(span.start_ms), y: y + (rowH - barH) / 2, width: Math.max(2, x(end) - x(span.start_ms)), height: barH, rx: 3,
      "data-kind": span.kind, "data-name": span.name,
    }, svg("title", {}, tooltip(span, end)));
    chart.append(bar);
    const note = `${duration(end - span.start_ms)}${running ? " …" : ""}${span.cost != null && span.kind !== "stage" ? " · " + usd(span.cost) : ""}`;
    chart.append(svg("text", { class: "muted", x: x(end) + 6, y: y + 16, "font-size": 11 }, note));
  });
  wrap.append(chart);
  return wrap;
}

function tooltip(span, end) {
  const lines = [spanLabel(span), `status: ${span.status}`, `${duration(span.start_ms)} → ${duration(end)} (${duration(end - span.start_ms)})`];
  if (span.model) lines.push(`model: ${span.model}`);
  if (span.cost !== null && span.cost !== undefined) lines.push(`cost: ${usd(span.cost)}`);
  if (span.usage && span.usage.total_tokens != null) lines.push(`tokens: ${span.usage.total_tokens}`);
  if (span.tries > 1) lines.push(`tries: ${span.tries}`);
  if (span.kind === "tool" && span.arguments) lines.push(`arguments: ${String(span.arguments).slice(0, 200)}`);
  const error = span.error || span.failure;
  if (error) lines.push(`error: ${typeof error === "string" ? error : [error.reason, error.message].filter(Boolean).join(": ")}`);
  return lines.join("\n");
}

export function barChart(title, entries, id) {
  const wrap = el("div", { class: "chart", id });
  wrap.append(el("h3", { text: title }));
  if (!entries.length) {
    wrap.append(el("p", { class: "muted small", text: "No priced calls." }));
    return wrap;
  }
  const known = entries.map(([, v]) => v ?? 0);
  const max = Math.max(...known, 1e-12);
  const labelW = 150;
  const rowH = 26;
  const width = 400;
  const plotW = width - labelW - 75;
  const height = entries.length * rowH + 6;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": title });
  entries.forEach(([name, value], i) => {
    const y = i * rowH + 3;
    const shown = name.length > 20 ? name.slice(0, 19) + "…" : name;
    chart.append(svg("text", { x: 0, y: y + 16 }, svg("title", {}, name), shown));
    const w = value == null ? plotW : Math.max(2, (value / max) * plotW);
    chart.append(svg("rect", {
      class: value == null ? "bar-unknown" : "bar-cost", x: labelW, y: y + 4, width: w, height: rowH - 10, rx: 3,
      "data-name": name,
    }, svg("title", {}, `${name}: ${usd(value)}`)));
    chart.append(svg("text", { x: labelW + (value == null ? 8 : w + 6), y: y + 16, class: value == null ? "muted" : "" },
      value == null ? "price unknown" : usd(value)));
  });
  wrap.append(chart);
  return wrap;
}
