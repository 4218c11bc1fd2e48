// openfusion trace viewer: plain JavaScript over the runs API, no framework, no build step.
//
// Two views on one page: the run list (/ui) and a run (/ui/runs/{id}). Data comes from
// /ui/api/runs[/{id}] (the runs API behind the viewer's login). Everything a run holds came from
// models and tools, so it is only ever inserted as text (textContent, SVG text nodes): never as
// HTML. A run in progress is polled with If-None-Match; an unchanged run answers 304 and is not
// redrawn.

"use strict";

const API = "/ui/api";
const POLL_MS = 1000;
const LIST_POLL_MS = 4000;
const SVG_NS = "http://www.w3.org/2000/svg";
const TIME_FILTERS = [
  ["", "Any time"],
  ["1h", "Last hour"],
  ["24h", "Last 24 hours"],
  ["7d", "Last 7 days"],
  ["30d", "Last 30 days"],
];
const STATUSES = ["running", "ok", "error", "cancelled", "unfinished"];
const SECTIONS = [
  ["answer", "Answer"],
  ["analysis", "Analysis"],
  ["panel", "Panel answers"],
  ["timeline", "Timeline"],
  ["cost", "Cost"],
  ["request", "Request"],
];
const KINDS = [
  ["fusion", "fusion"],
  ["caller", "caller tier"],
  ["call", "single model"],
];

// --- small DOM helpers -------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function clear(node) {
  while (node.firstChild) node.firstChild.remove();
}

// --- formatting --------------------------------------------------------------------------------

function usd(value) {
  if (value === null || value === undefined) return "unknown";
  if (value === 0) return "$0";
  if (value >= 1) return "$" + value.toFixed(2);
  const digits = value < 0.01 ? value.toPrecision(2) : value.toFixed(4);
  return "$" + digits.replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function tokens(n) {
  if (n === null || n === undefined) return "–";
  return n >= 10000 ? `${(n / 1000).toFixed(1)}k` : String(n);
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const seconds = (Date.now() - date.getTime()) / 1000;
  let ago;
  if (seconds < 60) ago = "just now";
  else if (seconds < 3600) ago = `${Math.floor(seconds / 60)} min ago`;
  else if (seconds < 86400) ago = `${Math.floor(seconds / 3600)} h ago`;
  else ago = `${Math.floor(seconds / 86400)} d ago`;
  return { ago, full: date.toLocaleString() };
}

function badge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

function httpUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:";
  } catch {
    return false;
  }
}

// --- the API -------------------------------------------------------------------------------------

class NotLoggedIn extends Error {}

async function api(path, etag) {
  const headers = { Accept: "application/json" };
  if (etag) headers["If-None-Match"] = etag;
  const response = await fetch(API + path, { headers, cache: "no-store", credentials: "same-origin" });
  if (response.status === 304) return { unchanged: true, etag };
  if (response.status === 401) {
    const next = location.pathname + location.search;
    location.assign("/ui/login?next=" + encodeURIComponent(next));
    throw new NotLoggedIn();
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return { data, etag: response.headers.get("ETag") };
}

function showError(root, error) {
  if (error instanceof NotLoggedIn) return;
  clear(root);
  root.append(el("p", { class: "error", role: "alert", text: error.message || String(error) }));
}

async function showWho() {
  try {
    const { data } = await api("/me");
    const who = document.getElementById("who");
    if (data.via === "local") who.textContent = "this machine · no API keys configured";
    else who.textContent = `key ${data.key.name}${data.admin ? " (admin: every run)" : " (its own runs)"}`;
    document.getElementById("logout").hidden = data.via !== "session";
  } catch (error) {
    if (!(error instanceof NotLoggedIn)) console.error(error);
  }
}

// --- run list ----------------------------------------------------------------------------------

function sinceFor(code) {
  const hours = { "1h": 1, "24h": 24, "7d": 168, "30d": 720 }[code];
  return hours ? new Date(Date.now() - hours * 3600 * 1000).toISOString() : "";
}

function listView(root) {
  const params = new URLSearchParams(location.search);
  const state = { rows: [], cursor: null, timer: null, pagesLoaded: 0 };

  const q = el("input", { type: "search", name: "q", placeholder: "Search questions…", value: params.get("q") || "" });
  const status = el("select", { name: "status" }, el("option", { value: "", text: "Any status" }),
    STATUSES.map((s) => el("option", { value: s, text: s, selected: params.get("status") === s })));
  const kind = el("select", { name: "kind" }, el("option", { value: "", text: "Any kind" }),
    KINDS.map(([v, label]) => el("option", { value: v, text: label, selected: params.get("kind") === v })));
  const preset = el("input", { name: "preset", list: "presets", placeholder: "any", value: params.get("preset") || "", size: 12 });
  const presets = el("datalist", { id: "presets" });
  const time = el("select", { name: "time" },
    TIME_FILTERS.map(([v, label]) => el("option", { value: v, text: label, selected: (params.get("time") || "") === v })));

  const form = el("form", { class: "filters", role: "search", on: { submit: (e) => { e.preventDefault(); reload(); } } },
    el("label", { class: "grow" }, "Search", q),
    el("label", {}, "Status", status),
    el("label", {}, "Kind", kind),
    el("label", {}, "Preset", preset, presets),
    el("label", {}, "Time", time),
  );
  const count = el("span", { class: "muted" });
  const live = el("span", { class: "live", hidden: true, text: "runs in progress, refreshing" });
  const body = el("tbody");
  const table = el("div", { class: "tablewrap" }, el("table", { class: "runs" },
    el("thead", {}, el("tr", {},
      el("th", { text: "Started" }), el("th", { text: "Status" }), el("th", { text: "Question" }),
      el("th", { text: "Preset / model" }), el("th", { text: "Kind" }),
      el("th", { class: "num", text: "Cost" }), el("th", { class: "num", text: "Time" }),
      el("th", { class: "num", text: "Tokens" }))),
    body));
  const more = el("button", { type: "button", on: { click: () => load(false) } }, "Load more");
  const moreRow = el("div", { class: "more", hidden: true }, more);
  const message = el("div");

  clear(root);
  root.append(el("div", { class: "listhead" }, el("h1", { text: "Runs" }), count, live), form, message, table, moreRow);

  let typing = null;
  q.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(reload, 300); });
  preset.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(reload, 300); });
  for (const select of [status, kind, time]) select.addEventListener("change", reload);

  function query() {
    const out = new URLSearchParams();
    if (q.value.trim()) out.set("q", q.value.trim());
    if (status.value) out.set("status", status.value);
    if (kind.value) out.set("kind", kind.value);
    if (preset.value.trim()) out.set("preset", preset.value.trim());
    if (time.value) out.set("time", time.value);
    return out;
  }

  function reload() {
    const shown = query();
    history.replaceState(null, "", "/ui" + (shown.toString() ? "?" + shown : ""));
    load(true);
  }

  async function load(fresh) {
    clearTimeout(state.timer);
    const wanted = query();
    const request = new URLSearchParams();
    for (const name of ["q", "status", "kind", "preset"]) if (wanted.get(name)) request.set(name, wanted.get(name));
    if (wanted.get("time")) request.set("since", sinceFor(wanted.get("time")));
    request.set("limit", "50");
    if (!fresh && state.cursor) request.set("cursor", state.cursor);
    try {
      const { data } = await api("/runs?" + request);
      state.rows = fresh ? data.data : state.rows.concat(data.data);
      state.cursor = data.next_cursor;
      state.pagesLoaded = fresh ? 1 : state.pagesLoaded + 1;
      draw();
    } catch (error) {
      showError(message, error);
      return;
    }
    const running = state.rows.some((r) => r.status === "running");
    live.hidden = !running;
    if (running && state.pagesLoaded === 1) state.timer = setTimeout(() => load(true), LIST_POLL_MS);
  }

  function draw() {
    clear(message);
    clear(body);
    const seen = new Set(state.rows.map((r) => r.preset).filter(Boolean));
    clear(presets);
    for (const name of [...seen].sort()) presets.append(el("option", { value: name }));
    count.textContent = state.rows.length ? `${state.rows.length}${state.cursor ? "+" : ""} shown` : "";
    if (!state.rows.length) {
      const filtered = query().toString() !== "";
      body.append(el("tr", {}, el("td", { colspan: 8, class: "empty",
        text: filtered ? "No run matches these filters." :
          "No runs yet. Every request this gateway answers is recorded here as it runs." })));
    }
    for (const run of state.rows) {
      const href = "/ui/runs/" + encodeURIComponent(run.id);
      const started = when(run.created_at);
      body.append(el("tr", { "data-run": run.id },
        el("td", { class: "when", title: started.full, text: started.ago }),
        el("td", {}, badge(run.status)),
        el("td", { class: "q" }, el("a", { href, text: run.question || "(no question)" }),
          run.failure_reason ? el("div", { class: "small muted", text: run.failure_reason }) : null),
        el("td", {}, run.preset ? el("span", { class: "chip", text: run.preset }) : null,
          el("span", { class: "small muted", text: run.model || "" })),
        el("td", { class: "small", text: run.kind }),
        el("td", { class: "num", text: run.status === "running" ? "…" : usd(run.cost) }),
        el("td", { class: "num", text: duration(run.latency_ms) }),
        el("td", { class: "num", text: tokens(run.total_tokens) }),
      ));
    }
    moreRow.hidden = !state.cursor;
  }

  load(true);
}

// --- a run -------------------------------------------------------------------------------------

function runView(root, runId) {
  let etag = null;
  let timer = null;
  let last = null;

  async function poll() {
    try {
      const result = await api("/runs/" + encodeURIComponent(runId), etag);
      const stale = root.querySelector("#stale");
      if (stale) stale.remove();
      if (!result.unchanged) {
        etag = result.etag;
        last = result.data;
        drawRun(root, last);
      } else if (last && last.status === "running") {
        redrawTimeline(root, last); // running bars grow with the clock
      }
    } catch (error) {
      if (!last || error instanceof NotLoggedIn) {
        showError(root, error);
        return;
      }
      // Keep what is on the page; say that it is stale, and try again.
      const banner = root.querySelector("#stale") || el("p", { id: "stale", class: "notice", role: "status" });
      banner.textContent = `Not updated: ${error.message}. Retrying…`;
      if (!banner.isConnected) root.prepend(banner);
      timer = setTimeout(poll, POLL_MS * 3);
      return;
    }
    if (last && last.status === "running") timer = setTimeout(poll, POLL_MS);
  }
  poll();
  return () => clearTimeout(timer);
}

function drawRun(root, run) {
  const scroll = window.scrollY;
  clear(root);
  document.title = `openfusion · ${run.question.slice(0, 60)}`;
  const fused = run.kind !== "call";
  root.append(
    el("a", { class: "back", href: "/ui" }, "← All runs"),
    header(run),
    answerSection(run),
    fused ? analysisSection(run) : null,
    fused ? panelSection(run) : null,
    timelineSection(run),
    costSection(run),
    requestSection(run),
  );
  window.scrollTo(0, scroll);
}

function header(run) {
  const started = when(run.created_at);
  const meta = el("div", { class: "meta" },
    badge(run.status),
    run.status === "running" ? el("span", { class: "live", text: "live" }) : null,
    el("span", {}, "kind ", el("b", { text: run.kind })),
    run.preset ? el("span", {}, "preset ", el("b", { text: run.preset })) : null,
    el("span", {}, "model ", el("b", { text: run.model || "–" })),
    run.judge ? el("span", {}, "judge ", el("b", { text: run.judge })) : null,
    el("span", { title: started.full }, "started ", el("b", { text: started.full })),
    el("span", {}, "took ", el("b", { text: duration(run.latency_ms) })),
    el("span", {}, "cost ", el("b", { text: run.status === "running" ? "…" : usd(run.cost) })),
    el("span", {}, "tokens ", el("b", { text: tokens(run.total_tokens) })),
    el("span", {}, "source ", el("b", { text: run.source })),
    run.key_id ? el("span", {}, "key ", el("b", { class: "mono", text: run.key_id })) : null,
    el("span", {}, "id ", el("b", { class: "mono", text: run.id })),
  );
  const toc = el("nav", { class: "toc" });
  for (const [id, label] of SECTIONS) {
    if (run.kind === "call" && (id === "analysis" || id === "panel")) continue; // one model, no panel
    toc.append(el("a", { href: "#" + id, text: label }));
  }
  // A run that ended ok may still carry a reason: the judge failed and the answer was written
  // without its analysis. That is a warning, not an error.
  const failure = run.failure_reason || run.failure_message
    ? el("p", { class: run.status === "ok" ? "notice" : "error", role: "alert" },
      el("b", { text: run.failure_reason || "failed" }), run.failure_message ? ": " + run.failure_message : "")
    : null;
  return el("section", { class: "card" },
    el("p", { class: "question", id: "question", text: run.question }), meta, failure, toc);
}

// The answer, its [n] markers linked to the sources they cite. The stored answer ends with the
// "Sources:" list the engine appends; the page draws that list itself, with links.
function answerSection(run) {
  const section = el("section", { class: "card", id: "answer" }, el("h2", {}, "Answer"));
  let text = run.answer || "";
  const cut = text.lastIndexOf("\n\nSources:\n");
  if (cut >= 0 && run.sources.length) text = text.slice(0, cut);
  if (!text) {
    section.append(el("p", { class: "muted", text: run.status === "running" ? "Not written yet." : "No answer." }));
    return section;
  }
  const numbers = new Map(run.sources.map((s, i) => [s.number ?? i + 1, s]));
  const body = el("div", { class: "answer", id: "answer-text" });
  let at = 0;
  for (const match of text.matchAll(/\[(\d{1,3})\]/g)) {
    body.append(text.slice(at, match.index));
    const n = Number(match[1]);
    if (numbers.has(n)) {
      body.append(el("a", {
        class: "cite", href: `#source-${n}`, title: sourceTitle(numbers.get(n)), text: `[${n}]`,
        on: { click: () => flash(`source-${n}`) },
      }));
    } else {
      body.append(el("span", { class: "cite unverified", title: "no retrieved source has this number", text: match[0] }));
    }
    at = match.index + match[0].length;
  }
  body.append(text.slice(at));
  section.append(body);
  if (run.sources.length) {
    const list = el("ol", { class: "sources" });
    run.sources.forEach((source, i) => {
      const url = sourceUrl(source);
      const title = sourceTitle(source);
      const n = source.number ?? i + 1;
      list.append(el("li", { id: `source-${n}`, value: n },
        httpUrl(url) ? el("a", { href: url, target: "_blank", rel: "noopener noreferrer", text: title }) : el("span", { text: title }),
        url && url !== title ? el("div", { class: "url", text: url }) : null));
    });
    section.append(el("h3", { text: "Sources" }), list);
  }
  if (run.unverified_citations.length) {
    const list = el("ul");
    for (const item of run.unverified_citations) {
      list.append(el("li", {}, el("code", { text: item.citation }), ` in ${item.where === "answer" ? "the answer" : item.where}`));
    }
    section.append(el("div", { class: "notice" },
      el("b", { text: "Unverified citations" }), " (cited, but no tool call retrieved them; not shown as sources):", list));
  }
  return section;
}

function sourceUrl(source) {
  return typeof source === "string" ? source : source.url || "";
}

function sourceTitle(source) {
  return typeof source === "string" ? source : source.title || source.url || "source";
}

function flash(id) {
  const target = document.getElementById(id);
  if (!target) return;
  target.classList.add("flash");
  setTimeout(() => target.classList.remove("flash"), 1600);
}

function analysisSection(run) {
  const section = el("section", { class: "card analysis", id: "analysis" },
    el("h2", {}, "Judge analysis", run.judge ? el("span", { class: "muted", text: run.judge }) : null));
  const a = run.analysis;
  if (!a) {
    let why = "This run has no analysis.";
    if (run.status === "running") why = "The judge has not analysed the panel's answers yet.";
    else if (run.failure_reason) why = `No analysis: ${run.failure_reason}.`;
    section.append(el("p", { class: "muted", text: why }));
    return section;
  }
  const part = (title, count, content) => [
    el("h3", {}, title, " ", el("span", { class: "muted small", text: `(${count})` })),
    content,
  ];
  const none = (what) => el("p", { class: "muted small", text: `No ${what}.` });

  section.append(...part("Consensus", a.consensus.length, a.consensus.length
    ? el("ul", { class: "consensus" }, a.consensus.map((c) => el("li", { text: c }))) : none("consensus")));

  const contradictions = el("div");
  for (const c of a.contradictions) {
    contradictions.append(el("div", { class: "topic" },
      el("h4", { text: c.topic }),
      el("div", { class: "stances" }, c.stances.map((s) => el("div", { class: "stance" },
        el("p", { class: "who", text: s.model }), el("div", { text: s.stance }))))));
  }
  section.append(...part("Contradictions", a.contradictions.length, a.contradictions.length ? contradictions : none("contradictions")));

  section.append(...part("Partial coverage", a.partial_coverage.length, a.partial_coverage.length
    ? el("div", {}, a.partial_coverage.map((p) => el("div", { class: "row" },
      el("span", { class: "label" }, p.models.map((m) => el("span", { class: "chip", text: m }))),
      el("span", { text: p.point }))))
    : none("points covered by only some models")));

  section.append(...part("Unique insights", a.unique_insights.length, a.unique_insights.length
    ? el("div", {}, a.unique_insights.map((u) => el("div", { class: "row" },
      el("span", { class: "label" }, el("span", { class: "chip", text: u.model })), el("span", { text: u.insight }))))
    : none("unique insights")));

  section.append(...part("Blind spots", a.blind_spots.length, a.blind_spots.length
    ? el("ul", { class: "blind" }, a.blind_spots.map((b) => el("li", { text: b }))) : none("blind spots")));
  return section;
}

function panelSection(run) {
  const section = el("section", { class: "card", id: "panel" }, el("h2", {}, "Panel answers",
    el("span", { class: "muted", text: run.members.length ? `${run.members.length} members` : "" })));
  if (!run.members.length) {
    section.append(el("p", { class: "muted", text: "This run had no panel." }));
    return section;
  }
  const grid = el("div", { class: "panel" });
  for (const m of run.members) {
    const usage = m.usage || {};
    const stats = el("div", { class: "stats" },
      el("span", { text: duration(m.latency_ms ?? (m.end_ms != null && m.start_ms != null ? m.end_ms - m.start_ms : null)) }),
      el("span", { text: m.status === "running" ? "cost …" : usd(m.cost) }),
      el("span", { text: `${tokens(usage.total_tokens)} tokens` }),
      el("span", { text: `${m.tool_calls || 0} tool call${m.tool_calls === 1 ? "" : "s"}` }),
      m.tries > 1 ? el("span", { text: `${m.tries} tries` }) : null);
    const card = el("article", { class: "member", "data-member": m.name },
      el("header", {}, el("div", {}, el("span", { class: "name", text: m.name }), " ", badge(m.status)),
        m.model && m.model !== m.name ? el("div", { class: "small muted", text: m.model }) : null, stats));
    if (m.failure) {
      card.append(el("p", { class: "error small" }, el("b", { text: m.failure.reason }),
        m.failure.status ? ` (HTTP ${m.failure.status})` : "", m.failure.message ? `: ${m.failure.message}` : ""));
    }
    if (m.content) card.append(el("div", { class: "content", text: m.content }));
    else if (!m.failure) card.append(el("div", { class: "content muted", text: m.status === "running" ? "Answering…" : "No answer." }));
    grid.append(card);
  }
  section.append(grid);
  return section;
}

// --- timeline (Gantt) --------------------------------------------------------------------------

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

function drawTimeline(run) {
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

function timelineSection(run) {
  const legend = el("div", { class: "legend" },
    ["stage", "member", "model", "tool", "failed"].map((k) => el("span", {}, el("span", { class: `swatch ${k}` }),
      { stage: "stage", member: "panel member", model: "model call", tool: "tool call", failed: "failed / cancelled" }[k])));
  return el("section", { class: "card", id: "timeline" },
    el("h2", {}, "Timeline", el("span", { class: "muted", text: "milliseconds from the run's start; hover a bar for details" })),
    drawTimeline(run), legend);
}

function redrawTimeline(root, run) {
  const old = root.querySelector("#timeline-chart");
  if (old) old.replaceWith(drawTimeline(run));
}

// --- cost --------------------------------------------------------------------------------------

function barChart(title, entries, id) {
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

function costSection(run) {
  const c = run.cost_breakdown;
  const sorted = (obj) => Object.entries(obj).sort((a, b) => (b[1] ?? Infinity) - (a[1] ?? Infinity));
  const section = el("section", { class: "card", id: "cost" },
    el("h2", {}, "Cost", el("span", { class: "muted", text: `total ${usd(c.total)}${c.tools ? ` · tools ${usd(c.tools)}` : ""}` })));
  section.append(el("div", { class: "costs" },
    barChart("By stage", sorted(c.by_stage), "cost-by-stage"),
    barChart("By model and tool", sorted(c.by_model), "cost-by-model"),
    Object.keys(c.by_member).length ? barChart("By panel member (its calls and tools)", sorted(c.by_member), "cost-by-member") : null));
  if (c.unpriced.length) {
    section.append(el("p", { class: "notice small",
      text: `No price known for: ${[...new Set(c.unpriced)].join(", ")} — add it to prices.toml; totals that include it are unknown.` }));
  }
  return section;
}

function requestSection(run) {
  return el("section", { class: "card", id: "request" }, el("h2", {}, "Request"),
    el("details", { class: "raw" }, el("summary", { text: `Messages (${run.messages.length})` }),
      el("pre", { text: JSON.stringify(run.messages, null, 2) })),
    el("details", { class: "raw" }, el("summary", { text: "Options" }), el("pre", { text: JSON.stringify(run.options, null, 2) })),
    el("p", { class: "small" }, el("a", { href: `${API}/runs/${encodeURIComponent(run.id)}`, target: "_blank", text: "The whole record as JSON" })));
}

// --- start -------------------------------------------------------------------------------------

function start() {
  const root = document.getElementById("app");
  showWho();
  const match = location.pathname.match(/^\/ui\/runs\/(.+)$/);
  if (match) runView(root, decodeURIComponent(match[1]));
  else listView(root);
}

document.addEventListener("DOMContentLoaded", start);
