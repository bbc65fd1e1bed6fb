// warmpool dashboard: reads GET /v1/admin/pools every POLL_MS with the admin key, draws each tier (and
// each worker when the API lists them), keeps HISTORY_S of counts for a chart, and sends resizes and
// drains. No library, no build step; every value from the server goes into the page as text, never HTML.
"use strict";

const KEY_STORAGE = "warmpool.adminKey";
const POLL_MS = 1500;
const HISTORY_S = 300;
const SERIES = [ // what the chart draws, in this order, with the colour class of its line
  {field: "idle", label: "idle"},
  {field: "busy", label: "busy"},
  {field: "starting", label: "starting"},
  {field: "target_idle", label: "target"},
];
const SVG_NS = "http://www.w3.org/2000/svg";

const history = new Map(); // tier name -> [{t, idle, busy, starting, target_idle}]
const cards = new Map(); // tier name -> the card's elements
let pollTimer = null;
let polling = false;

const $ = (id) => document.getElementById(id);

function adminKey() { return sessionStorage.getItem(KEY_STORAGE); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

// --- talking to the admin API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, statusText, detail) {
    super(`${status} ${statusText}: ${describeDetail(detail)}`);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI's detail is a string, a list of validation errors, or (cluster admin) an object naming the
// worker and the dimension: say each plainly.
function describeDetail(detail) {
  if (detail === undefined || detail === null) return "no detail";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (d && d.msg ? `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`
                                          : describeDetail(d))).join("; ");
  }
  if (typeof detail === "object") {
    const parts = [];
    for (const name of ["worker", "tier", "dimension"]) {
      if (detail[name] !== undefined) parts.push(`${name} ${detail[name]}`);
    }
    const message = detail.message || detail.msg || detail.detail;
    const rest = Object.entries(detail).filter(([k]) => !["worker", "tier", "dimension", "message", "msg", "detail"].includes(k));
    let text = parts.join(", ");
    if (message) text += (text ? ": " : "") + describeDetail(message);
    if (rest.length) text += (text ? " " : "") + JSON.stringify(Object.fromEntries(rest));
    return text || JSON.stringify(detail);
  }
  return String(detail);
}

async function api(method, path, body) {
  const headers = {authorization: `Bearer ${adminKey()}`};
  const init = {method, headers, cache: "no-store"};
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(0, "unreachable", `the server did not answer (${exc.message})`);
  }
  let payload = null;
  try { payload = await response.json(); } catch (_) { payload = null; }
  if (!response.ok) throw new ApiError(response.status, response.statusText, payload && payload.detail);
  return payload;
}

// --- key, banner, status ---------------------------------------------------------------------------

function showBanner(text, kind = "error") {
  const banner = $("banner");
  banner.textContent = text;
  banner.className = `banner ${kind}`;
  banner.hidden = false;
}

function hideBanner() { $("banner").hidden = true; }

function askForKey(message) {
  stopPolling();
  sessionStorage.removeItem(KEY_STORAGE);
  $("board").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("status").textContent = "";
  if (message) showBanner(message); else hideBanner();
  $("admin-key").value = "";
  $("admin-key").focus();
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
  polling = false;
}

function startPolling() {
  stopPolling();
  polling = true;
  $("login").hidden = true;
  $("signout").hidden = false;
  poll();
}

async function poll() {
  if (!polling) return;
  try {
    // Sessions are listed by their own admin route; a server without it still shows its pools.
    const [view, sessions] = await Promise.all([
      api("GET", "/v1/admin/pools"),
      api("GET", "/v1/admin/sessions").catch((exc) => {
        if (exc.status === 401 || exc.status === 403) throw exc;
        return null;
      }),
    ]);
    if (!polling) return;
    hideBanner();
    render(view, sessions);
  } catch (exc) {
    if (!polling) return;
    if (exc.status === 401 || exc.status === 403) {
      askForKey(`Admin key refused (${exc.message}).`);
      return;
    }
    showBanner(`Cannot read the pools: ${exc.message}`);
    $("status").textContent = `last attempt ${new Date().toLocaleTimeString()} failed`;
  }
  if (polling) pollTimer = setTimeout(poll, POLL_MS);
}

// --- rendering -------------------------------------------------------------------------------------

function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value >= 10 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

function formatNumber(value, digits = 2) {
  if (value === undefined || value === null) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function formatReplaced(replaced) {
  const entries = Object.entries(replaced || {}).sort();
  return entries.length ? entries.map(([reason, n]) => `${reason} ${n}`).join(", ") : "none";
}

// Live sessions per tier (and per worker), from GET /v1/admin/sessions, unless the tier says itself.
function countSessions(tier, sessions) {
  if (tier.sessions !== undefined || !sessions || !Array.isArray(sessions.sessions)) return;
  const mine = sessions.sessions.filter((s) => s.tier === tier.name);
  tier.sessions = mine.length;
  tier.sessions_busy = mine.filter((s) => s.state === "busy").length;
  for (const w of Array.isArray(tier.workers) ? tier.workers : []) {
    if (w.sessions === undefined) w.sessions = mine.filter((s) => s.worker === w.worker).length;
  }
}

function render(view, sessions) {
  $("board").hidden = false;
  renderSummary(view);
  const seen = new Set();
  const now = Date.now() / 1000;
  for (const tier of view.tiers || []) {
    seen.add(tier.name);
    const card = cards.get(tier.name) || makeCard(tier.name);
    countSessions(tier, sessions);
    remember(tier, now);
    fillCard(card, tier);
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) { card.root.remove(); cards.delete(name); history.delete(name); }
  }
  $("status").textContent = `updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`;
}

function renderSummary(view) {
  const summary = $("summary");
  summary.replaceChildren();
  const capacity = view.capacity;
  if (capacity) {
    summary.append(el("span", {class: "pill", "data-field": "cpu"},
      `cpu held ${formatNumber(capacity.cpu_held)} of ${formatNumber(capacity.cpu_budget)} ` +
      `(${formatNumber(capacity.cpus)} cpus × ${formatNumber(capacity.cpu_overcommit)})`));
    summary.append(el("span", {class: "pill", "data-field": "ram"},
      `memory held ${formatBytes(capacity.ram_held_bytes)} of ${formatBytes(capacity.ram_bytes)}`));
  }
  if (view.warming) {
    summary.append(el("span", {class: "pill"}, view.warming.enabled
      ? `warming on (window ${view.warming.window_s} s, quiet ${view.warming.quiet_s} s)` : "warming off"));
  }
  if (view.persisted !== undefined) {
    summary.append(el("span", {class: `pill ${view.persisted ? "" : "warn"}`, title: view.note || ""},
      view.persisted ? "sizes persisted" : "sizes last until restart"));
  }
}

function remember(tier, now) {
  const points = history.get(tier.name) || [];
  points.push({t: now, idle: tier.idle, busy: tier.busy, starting: tier.starting,
               target_idle: tier.target_idle ?? tier.min_idle});
  while (points.length && points[0].t < now - HISTORY_S) points.shift();
  history.set(tier.name, points);
}

function makeCard(name) {
  const root = el("article", {class: "tier", "data-tier": name});
  const title = el("h2", {}, el("span", {class: "name", text: name}), el("span", {class: "spec"}));
  const counts = el("div", {class: "counts"});
  const figures = el("dl", {class: "figures"});
  const chart = svg("svg", {class: "chart", viewBox: "0 0 640 150",
                            role: "img", "aria-label": `${name}: containers over the last ${HISTORY_S / 60} minutes`});
  const legend = el("div", {class: "legend"});
  for (const s of SERIES) legend.append(el("span", {class: `key ${s.field}`, text: s.label}));
  const workers = el("div", {class: "workers"});

  const minIdle = el("input", {type: "number", min: "0", step: "1", name: "min_idle", "aria-label": "min_idle"});
  const maxSize = el("input", {type: "number", min: "1", step: "1", name: "max_size", "aria-label": "max_size"});
  const resize = el("button", {type: "submit", class: "resize", text: "Resize"});
  const drain = el("button", {type: "button", class: "drain", text: "Drain"});
  const message = el("p", {class: "message", role: "status"});
  const form = el("form", {class: "controls"},
    el("label", {}, "min_idle ", minIdle), el("label", {}, "max_size ", maxSize), resize, drain);
  root.append(title, counts, figures, el("div", {class: "chart-box"}, chart, legend), workers, form, message);
  $("tiers").append(root);

  const card = {root, spec: title.querySelector(".spec"), counts, figures, chart, workers, minIdle, maxSize, message};
  // An input the operator typed into keeps what they typed until a resize goes through.
  for (const input of [minIdle, maxSize]) input.addEventListener("input", () => { input.dataset.dirty = "1"; });
  form.addEventListener("submit", (event) => { event.preventDefault(); doResize(name, card); });
  drain.addEventListener("click", () => doDrain(name, card));
  cards.set(name, card);
  return card;
}

function count(field, value, label) {
  return el("div", {class: `count ${field}`}, el("span", {class: "value", "data-field": field, text: formatNumber(value)}),
            el("span", {class: "label", text: label}));
}

function figure(field, label, value) {
  return [el("dt", {text: label}), el("dd", {"data-field": field, text: value})];
}

function fillCard(card, tier) {
  const ram = tier.ram_bytes !== undefined ? `, ${formatBytes(tier.ram_bytes)}` : "";
  card.spec.textContent = ` ${formatNumber(tier.cpu)} cpu${ram}${tier.gpu ? `, ${tier.gpu} gpu` : ""}` +
    `${tier.runtime ? `, ${tier.runtime}` : ""} · min_idle ${tier.min_idle}, max_size ${tier.max_size}`;
  card.counts.replaceChildren(
    count("idle", tier.idle, "idle"), count("busy", tier.busy, "busy"), count("starting", tier.starting, "starting"),
    count("target_idle", tier.target_idle ?? tier.min_idle, "target idle"));
  const wait = tier.lease_wait_ms || {};
  const items = [
    ...figure("lease_rate_per_s", "lease rate", `${formatNumber(tier.lease_rate_per_s, 3)} /s`),
    ...figure("lease_wait_p95", "lease wait p95", `${formatNumber(wait.p95, 1)} ms`),
    ...figure("leases", "leases", formatNumber(tier.leases)),
    ...figure("waiting", "waiting", formatNumber(tier.waiting)),
    ...figure("replaced", "replaced", formatReplaced(tier.replaced)),
  ];
  if (tier.sessions !== undefined) {
    const busy = tier.sessions_busy !== undefined ? ` (${tier.sessions_busy} busy)` : "";
    items.push(...figure("sessions", "sessions", `${formatNumber(tier.sessions)}${busy}`));
  }
  if (tier.queued !== undefined) items.push(...figure("queued", "queued", formatNumber(tier.queued)));
  if (tier.last_start_error) items.push(...figure("last_start_error", "last start error", tier.last_start_error));
  if (tier.unfit) items.push(...figure("unfit", "unfit", tier.unfit));
  card.figures.replaceChildren(...items);
  fillWorkers(card, tier.workers);
  drawChart(card.chart, history.get(tier.name) || [], tier.max_size);
  for (const [input, value] of [[card.minIdle, tier.min_idle], [card.maxSize, tier.max_size]]) {
    if (!input.dataset.dirty && document.activeElement !== input) input.value = String(value);
  }
}

// Scale-out mode: one row per worker serving the tier, when the admin API lists them.
function fillWorkers(card, workers) {
  if (!Array.isArray(workers) || workers.length === 0) { card.workers.replaceChildren(); return; }
  const columns = [["host", "host"], ["engine", "engine"], ["state", "state"], ["inflight", "running"], ["idle", "idle"], ["busy", "busy"], ["starting", "starting"], ["target_idle", "target"],
                   ["lease_rate_per_s", "lease rate /s"],
                   ["lease_wait_p95", "wait p95 ms"], ["replaced", "replaced"], ["sessions", "sessions"],
                   ["sizes_refused", "sizes refused"]];
  const present = columns.filter(([field]) => workers.some((w) => valueOf(w, field) !== undefined));
  const head = el("tr", {}, el("th", {text: "worker"}), ...present.map(([, label]) => el("th", {text: label})));
  const rows = workers.map((w) => el("tr", {"data-worker": String(w.worker ?? w.id ?? w.name ?? "?")},
    el("td", {text: String(w.worker ?? w.id ?? w.name ?? "?")}),
    ...present.map(([field]) => {
      const value = valueOf(w, field);
      return el("td", {"data-field": field, text: field === "replaced" ? formatReplaced(value) : formatNumber(value)});
    })));
  card.workers.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
}

function valueOf(worker, field) {
  if (field === "lease_wait_p95") return worker.lease_wait_ms ? worker.lease_wait_ms.p95 : undefined;
  return worker[field];
}

function drawChart(chart, points, maxSize) {
  // Drawn at the element's own pixel width, so text is never stretched; the time axis grows with the
  // samples kept, up to HISTORY_S.
  const width = Math.max(200, Math.round(chart.getBoundingClientRect().width || 640)), height = 150;
  const left = 30, right = 8, top = 8, bottom = 20;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const now = Date.now() / 1000;
  const span = Math.min(HISTORY_S, Math.max(30, points.length ? now - points[0].t : 0));
  const topValue = Math.max(1, maxSize || 0, ...points.flatMap((p) => SERIES.map((s) => p[s.field] || 0)));
  const x = (t) => left + (width - left - right) * (1 - (now - t) / span);
  const y = (v) => top + (height - top - bottom) * (1 - v / topValue);
  chart.replaceChildren();
  chart.append(svg("rect", {class: "plot", x: left, y: top, width: width - left - right, height: height - top - bottom}));
  for (const v of [0, Math.round(topValue / 2), topValue]) {
    chart.append(svg("line", {class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v)}));
    const label = svg("text", {class: "axis", x: left - 4, y: y(v) + 4, "text-anchor": "end"});
    label.textContent = String(v);
    chart.append(label);
  }
  const ago = span >= 120 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`;
  for (const [t, text, anchor] of [[now - span, ago, "start"], [now, "now", "end"]]) {
    const label = svg("text", {class: "axis", x: x(t), y: height - 5, "text-anchor": anchor});
    label.textContent = text;
    chart.append(label);
  }
  for (const s of SERIES) {
    if (points.length === 0) continue;
    // A step line: a count holds its value until the next sample.
    const coords = [];
    points.forEach((p, i) => {
      if (i > 0) coords.push(`${x(p.t).toFixed(1)},${y(points[i - 1][s.field] || 0).toFixed(1)}`);
      coords.push(`${x(p.t).toFixed(1)},${y(p[s.field] || 0).toFixed(1)}`);
    });
    chart.append(svg("polyline", {class: `series ${s.field}`, "data-series": s.field, points: coords.join(" ")}));
  }
}

// --- actions -----------------------------------------------------------------------------------------

function say(card, text, kind) {
  card.message.textContent = text;
  card.message.className = `message ${kind}`;
}

// Scale-out mode: what each worker did with a resize or drain (applied, refused with why, pending).
function perWorker(workers) {
  if (!Array.isArray(workers)) return "";
  const said = workers.map((w) => `${w.worker ?? "?"}${w.host ? ` (${w.host})` : ""}: ${w.status ?? "?"}` +
                                  `${w.detail ? ` (${w.detail})` : ""}`);
  return ` · ${workers.length} worker(s): ${said.join("; ")}`;
}

async function doResize(name, card) {
  const body = {};
  for (const [field, input] of [["min_idle", card.minIdle], ["max_size", card.maxSize]]) {
    if (input.value.trim() === "") continue;
    const value = Number(input.value);
    if (!Number.isInteger(value) || value < 0) { say(card, `${field} must be a whole number ≥ 0`, "error"); return; }
    body[field] = value;
  }
  say(card, "resizing…", "pending");
  try {
    const answer = await api("PATCH", `/v1/admin/pools/${encodeURIComponent(name)}`, body);
    delete card.minIdle.dataset.dirty;
    delete card.maxSize.dataset.dirty;
    say(card, `resized: min_idle ${answer.min_idle}, max_size ${answer.max_size}${perWorker(answer.workers)}`, "ok");
  } catch (exc) {
    if (exc.status === 401 || exc.status === 403) { askForKey(`Admin key refused (${exc.message}).`); return; }
    say(card, `resize refused: ${exc.message}`, "error");
  }
}

async function doDrain(name, card) {
  say(card, "draining…", "pending");
  try {
    const answer = await api("POST", `/v1/admin/pools/${encodeURIComponent(name)}/drain`);
    say(card, `drained: ${answer.idle_replaced} idle replaced now, ${answer.busy_replaced_when_done} busy ` +
              `when done, ${answer.starting_replaced_when_ready} starting when ready${perWorker(answer.workers)}`, "ok");
  } catch (exc) {
    if (exc.status === 401 || exc.status === 403) { askForKey(`Admin key refused (${exc.message}).`); return; }
    say(card, `drain refused: ${exc.message}`, "error");
  }
}

// --- start -------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    hideBanner();
    startPolling();
  });
  $("signout").addEventListener("click", () => askForKey(""));
  if (adminKey()) startPolling(); else askForKey("");
});
