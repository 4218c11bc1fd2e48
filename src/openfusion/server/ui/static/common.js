// The trace viewer's shared pieces: DOM building (text only: a run holds model output, which is
// never inserted as HTML), formatting, and the runs API behind the viewer's login.

export const API = "/ui/api";
const SVG_NS = "http://www.w3.org/2000/svg";

// --- small DOM helpers -------------------------------------------------------------------------

export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

export function svg(tag, attrs, ...children) {
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

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
}

// --- formatting --------------------------------------------------------------------------------

export function usd(value) {
  if (value === null || value === undefined) return "unknown";
  if (value === 0) return "$0";
  if (value >= 1) return "$" + value.toFixed(2);
  const digits = value < 0.01 ? value.toPrecision(2) : value.toFixed(4);
  return "$" + digits.replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

export function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

export function tokens(n) {
  if (n === null || n === undefined) return "–";
  return n >= 10000 ? `${(n / 1000).toFixed(1)}k` : String(n);
}

export function when(iso) {
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

export function badge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

export function httpUrl(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:";
  } catch {
    return false;
  }
}

// --- the API -------------------------------------------------------------------------------------

export class NotLoggedIn extends Error {}

export async function api(path, etag) {
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

export function showError(root, error) {
  if (error instanceof NotLoggedIn) return;
  clear(root);
  root.append(el("p", { class: "error", role: "alert", text: error.message || String(error) }));
}

export async function showWho() {
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
