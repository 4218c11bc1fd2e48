// The run list: search and filters (kept in the page's address), pages of 50, refreshed while a
// listed run is running.

import { api, badge, clear, duration, el, showError, tokens, usd, when } from "./common.js";

const LIST_POLL_MS = 4000;
const TIME_FILTERS = [
  ["", "Any time"],
  ["1h", "Last hour"],
  ["24h", "Last 24 hours"],
  ["7d", "Last 7 days"],
  ["30d", "Last 30 days"],
];
const STATUSES = ["running", "ok", "error", "cancelled", "unfinished"];
const KINDS = [
  ["fusion", "fusion"],
  ["caller", "caller tier"],
  ["call", "single model"],
];

function sinceFor(code) {
  const hours = { "1h": 1, "24h": 24, "7d": 168, "30d": 720 }[code];
  return hours ? new Date(Date.now() - hours * 3600 * 1000).toISOString() : "";
}

export function listView(root) {
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
