// A run's page: question, answer with its citations, the judge's analysis, the panel's answers,
// the timeline and the cost, redrawn while the run is in progress (polled with If-None-Match:
// an unchanged run answers 304 and is not redrawn).

import { barChart, drawTimeline } from "./charts.js";
import {
  API, NotLoggedIn, api, badge, clear, duration, el, httpUrl, showError, tokens, usd, when,
} from "./common.js";

const POLL_MS = 1000;
const SECTIONS = [
  ["answer", "Answer"],
  ["analysis", "Analysis"],
  ["panel", "Panel answers"],
  ["timeline", "Timeline"],
  ["cost", "Cost"],
  ["request", "Request"],
];

export function runView(root, runId) {
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
