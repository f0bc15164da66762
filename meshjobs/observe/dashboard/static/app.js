// meshjobs dashboard: plain DOM, no build step.
//
// Rule: everything shown comes from peers or servers (names, capabilities,
// reasons, details), so the DOM is built with textContent and text nodes
// only, never innerHTML. The CSP forbids inline scripts as a second line.
"use strict";

const MAX_JOBS = 200;
const state = {
  identity: "",
  actions: false,
  servers: {},
  peers: [],
  quarantine: [],
  jobs: new Map(),
  notes: {},
  approvals: { configured: false, waiting: [] },
  selected: null,
  detailTimer: null,
};

// -- DOM helpers ---------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key === "title") node.title = String(value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

function shortKey(key) {
  return key && key.length > 12 ? key.slice(0, 12) + "…" : key || "–";
}

function keyCell(key) {
  return el("code", { class: "key", title: key, text: shortKey(key) });
}

function time(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? (value / 1000).toFixed(2) + " s" : value.toFixed(1) + " ms";
}

function badge(text, kind) {
  return el("span", { class: "badge badge-" + kind, text });
}

const STATUS_KIND = {
  success: "ok", done: "ok", ok: "ok",
  running: "info", queued: "info",
  failure: "bad", failed: "bad", dead: "bad", timeout: "bad", rejected: "bad", disputed: "bad",
  quarantined: "bad", "auto-quarantined": "bad", release: "ok", quarantine: "bad",
};

function statusBadge(status) {
  return badge(status, STATUS_KIND[status] || "muted");
}

function peerName(key) {
  const peer = state.peers.find((p) => p.peer === key);
  return peer && peer.name ? peer.name : "";
}

// -- panels --------------------------------------------------------------------

function renderHeader() {
  $("identity").textContent = state.identity;
  $("identity").title = state.identity;
  const mode = $("mode");
  mode.textContent = state.actions ? "operator: actions enabled" : "read-only";
  mode.className = "badge " + (state.actions ? "badge-bad" : "badge-muted");
}

function renderNotes() {
  fill($("notes"), Object.entries(state.notes).map(([source, text]) => el("li", { text: source + ": " + text })));
}

function renderServers() {
  const view = state.servers || {};
  const servers = view.servers || [];
  const source = view.source === "topology" ? "topology " + view.mesh : "monitoring endpoints";
  const overall = servers.length ? (view.healthy ? "all healthy" : "problems") : "no servers";
  $("mesh-source").textContent = "from " + source + " · " + overall;
  fill($("servers").tBodies[0], servers.map((s) =>
    el("tr", { dataset: { server: s.name }, class: s.healthy ? "" : "problem" },
      el("td", {}, el("strong", { text: s.name }), s.role && s.role !== "server" ? " (" + s.role + ")" : "",
        s.meta_leader && s.meta_leader === s.name ? " ★" : ""),
      el("td", { text: s.region || "–" }),
      el("td", {}, s.healthy ? badge("healthy", "ok") : badge((s.problems || []).join("; ") || "down", "bad")),
      el("td", { text: s.version || "–" }),
      el("td", { text: s.connections }),
      el("td", { text: (s.routes || []).join(", ") || "–" }),
      el("td", { text: (s.gateways || []).join(", ") || "–" }),
      el("td", { text: s.leafnodes + ((s.leafs || []).length ? " (" + s.leafs.join(", ") + ")" : "") }),
    )));
  const links = view.links || [];
  fill($("links"), links.length
    ? links.map((l) => el("li", {}, badge(l.kind, "muted"), " " + l.a + (l.kind === "leaf" ? " → " : " ⇄ ") + l.b + " ",
      l.up ? badge("up", "ok") : badge("down", "bad")))
    : el("li", { class: "muted", text: "none (a single server)" }));
  renderPlaces();
}

function countBy(items, key) {
  const counts = new Map();
  for (const item of items) if (item[key]) counts.set(item[key], (counts.get(item[key]) || 0) + 1);
  return counts;
}

function renderPlaces() {
  const view = state.servers || {};
  const peerRegions = countBy(state.peers, "region");
  const regions = new Map((view.regions || []).filter((r) => r.name).map((r) => [r.name, r.servers]));
  for (const name of peerRegions.keys()) if (!regions.has(name)) regions.set(name, []);
  fill($("regions"), regions.size
    ? [...regions].map(([name, servers]) => el("li", {}, el("strong", { text: name }),
      servers.length ? " servers: " + servers.join(", ") : "",
      peerRegions.get(name) ? " · " + peerRegions.get(name) + " peer process(es)" : ""))
    : el("li", { class: "muted", text: "none named" }));
  const peerCommunities = countBy(state.peers, "community");
  const communities = new Map((view.communities || []).map((c) => [c.name, c.region]));
  for (const name of peerCommunities.keys()) if (!communities.has(name)) communities.set(name, null);
  fill($("communities"), communities.size
    ? [...communities].map(([name, region]) => el("li", {}, el("strong", { text: name }),
      region ? " leaf of " + region : " (reported by peers)",
      peerCommunities.get(name) ? " · " + peerCommunities.get(name) + " peer process(es)" : ""))
    : el("li", { class: "muted", text: "none" }));
}

function loadText(load) {
  if (!load) return "–";
  const rate = load.per_s === null || load.per_s === undefined ? "–" : load.per_s;
  return rate + " jobs/s · " + load.handled + " handled" + (load.errors ? " · " + load.errors + " errors" : "") +
    (load.mean_ms !== null && load.mean_ms !== undefined ? " · mean " + ms(load.mean_ms) : "");
}

function trustCell(trust) {
  if (!trust || typeof trust.score !== "number") return el("td", { class: "muted", text: "unavailable" });
  const unsigned = "signed_by" in trust && !trust.signed_by;
  return el("td", { class: "trust", title: unsigned ? "no record signed by a trust service yet" : "" },
    el("meter", { min: 0, max: 1, low: 0.3, high: 0.7, optimum: 1, value: trust.score }),
    " " + trust.score.toFixed(2), unsigned ? el("span", { class: "muted", text: " (no record)" }) : null);
}

function renderPeers() {
  const rows = state.peers.map((p) =>
    el("tr", {
      class: "clickable" + (p.peer === state.selected ? " selected" : ""),
      dataset: { peer: p.peer, instance: p.instance },
      onclick: () => selectPeer(p.peer),
    },
    el("td", {}, el("strong", { text: p.name || "(no name)" }), " ", keyCell(p.peer)),
    el("td", { text: p.kind || "–" }),
    el("td", { text: p.region || "–" }),
    el("td", { text: p.community || "–" }),
    el("td", { class: "caps" }, (p.capabilities || []).map((c) => el("span", { class: "cap", text: c }))),
    el("td", { class: "load", text: loadText(p.load) }),
    trustCell(p.trust),
    el("td", { class: "state" }, p.state === "unknown" ? badge("unknown", "muted") : statusBadge(p.state)),
    ));
  fill($("peers").tBodies[0], rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "muted", text: "no peer answers discovery" })));
}

function jobRow(job) {
  const source = job.source === "evidence" ? "evidence" : "durable state";
  const by = job.source === "evidence" ? "filed and signed by " + job.by : "written (unsigned) by " + (job.by || "?");
  return el("tr", { dataset: { job: job.job_id, key: job.key }, class: job.fresh ? "fresh" : "" },
    el("td", { text: time(job.at_ms) }),
    el("td", {}, el("code", { title: job.job_id, text: job.job_id.slice(-12) })),
    el("td", { text: job.capability || "–" }),
    el("td", { title: job.detail || "" }, statusBadge(job.status)),
    el("td", { text: ms(job.latency_ms) }),
    el("td", {}, peerName(job.peer) ? peerName(job.peer) + " " : "", job.peer ? keyCell(job.peer) : "–"),
    el("td", { class: "muted source", title: by, text: source }),
  );
}

function renderJobs() {
  const jobs = [...state.jobs.values()].sort((a, b) => (b.at_ms || 0) - (a.at_ms || 0)).slice(0, MAX_JOBS);
  fill($("jobs").tBodies[0], jobs.length ? jobs.map(jobRow)
    : el("tr", {}, el("td", { colspan: 7, class: "muted", text: "no jobs observed yet" })));
  for (const job of jobs) delete job.fresh;
}

function addJob(job) {
  job.fresh = true;
  state.jobs.delete(job.key);
  state.jobs.set(job.key, job);
  while (state.jobs.size > MAX_JOBS) state.jobs.delete(state.jobs.keys().next().value);
  renderJobs();
  if (job.peer && job.peer === state.selected) scheduleDetail();
}

function renderQuarantine() {
  const rows = state.quarantine.map((q) =>
    el("tr", { dataset: { peer: q.peer }, class: q.quarantined ? "problem" : "" },
      el("td", {}, q.name ? q.name + " " : "", keyCell(q.peer)),
      el("td", {}, statusBadge(q.action), " seq " + q.seq),
      el("td", { text: q.reason || "–" }),
      el("td", {}, keyCell(q.operator)),
      el("td", { text: time(q.at_ms) }),
      el("td", {}, state.actions && q.quarantined
        ? el("button", { class: "action release", text: "Release", onclick: () => act(q.peer, "release", "released from the dashboard") })
        : ""),
    ));
  fill($("quarantine").tBodies[0], rows.length ? rows
    : el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no quarantine orders" })));
}

function renderApprovals() {
  const approvals = state.approvals || {};
  if (!approvals.configured) {
    fill($("approvals"), el("p", { class: "muted", text: "no approval gates configured" }));
    return;
  }
  const waiting = approvals.waiting || [];
  fill($("approvals"), waiting.length
    ? el("ul", { class: "plain" }, waiting.map((a) => el("li", { text: JSON.stringify(a) })))
    : el("p", { class: "muted", text: "nothing waiting for approval" }));
}

// -- peer detail and actions ---------------------------------------------------------

function selectPeer(key) {
  state.selected = key;
  renderPeers();
  // Three parts: the head and the evidence are redrawn as data changes; the
  // order form is built once per peer, so what the operator types survives.
  fill($("detail"),
    el("div", { id: "detail-head" }, el("p", { class: "muted", text: "loading " + shortKey(key) + "…" })),
    state.actions ? actionForm(key) : null,
    el("div", { id: "detail-evidence" }));
  loadDetail();
}

function scheduleDetail() {
  clearTimeout(state.detailTimer);
  state.detailTimer = setTimeout(loadDetail, 500);
}

async function loadDetail() {
  const key = state.selected;
  if (!key) return;
  try {
    const response = await fetch("/api/peers/" + encodeURIComponent(key), { credentials: "same-origin" });
    const body = await response.json();
    if (key !== state.selected) return;
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    renderDetail(body);
  } catch (error) {
    if (key !== state.selected) return;
    fill($("detail-head"), el("p", { class: "error", text: "could not load " + shortKey(key) + ": " + error.message }));
  }
}

function evidenceRow(item) {
  if (!item.valid) return el("tr", { class: "problem" }, el("td", { colspan: 6, text: "INVALID evidence: " + item.problem }));
  return el("tr", { dataset: { job: item.job_id } },
    el("td", { text: time(item.at_ms) }),
    el("td", {}, statusBadge(item.kind)),
    el("td", {}, el("code", { title: item.job_id, text: item.job_id.slice(-12) }), " " + item.capability),
    el("td", { text: ms(item.latency_ms) }),
    el("td", {}, keyCell(item.submitter)),
    el("td", { text: item.detail || "" }),
  );
}

function renderDetail(detail) {
  const rep = detail.reputation || {};
  const order = detail.quarantine;
  const stateText = detail.quarantined ? "quarantined" : rep.auto_quarantined ? "auto-quarantined" : "ok";
  const head = [
    el("h3", {}, detail.name || "(no name)", " ", el("code", { class: "key full", text: detail.peer })),
    el("p", {}, statusBadge(stateText), typeof rep.score === "number" ? " score " + rep.score.toFixed(3) : ""),
    el("p", { class: "explain", text: rep.explanation || "" }),
  ];
  if (order) {
    head.push(el("p", {}, "last order: ", statusBadge(order.action), " by operator ", keyCell(order.operator),
      " (seq " + order.seq + ", " + time(order.at_ms) + "): " + (order.reason || "no reason given")));
  }
  fill($("detail-head"), head);
  const items = detail.evidence || [];
  fill($("detail-evidence"),
    el("h4", { text: "Evidence (latest " + items.length + ", each signature verified)" }),
    items.length
      ? el("table", { class: "evidence" },
        el("thead", {}, el("tr", {}, ["time", "kind", "job", "latency", "by", "detail"].map((h) => el("th", { text: h })))),
        el("tbody", {}, items.map(evidenceRow)))
      : el("p", { class: "muted", text: "no evidence about this peer yet" }));
}

function actionForm(peer) {
  const reason = el("input", { id: "order-reason", type: "text", maxlength: 1000, placeholder: "reason (shown to everyone)" });
  const message = el("span", { id: "order-message", class: "muted" });
  const send = (action) => act(peer, action, reason.value, message);
  return el("div", { class: "actions" }, reason,
    el("button", { id: "quarantine-button", class: "action quarantine", text: "Quarantine", onclick: () => send("quarantine") }),
    el("button", { id: "release-button", class: "action release", text: "Release", onclick: () => send("release") }),
    message);
}

async function act(peer, action, reason, message) {
  const say = (text, kind) => {
    if (message) { message.textContent = text; message.className = kind; }
  };
  say(action + "…", "muted");
  try {
    const response = await fetch("/api/orders", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ peer, action, reason }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
    say(action + " signed (seq " + body.order.seq + ")", "ok");
  } catch (error) {
    say(action + " failed: " + error.message, "error");
    if (!message) window.alert(action + " failed: " + error.message);
  }
  if (peer === state.selected) loadDetail();
}

// -- live updates ----------------------------------------------------------------------

function applySnapshot(snap) {
  state.identity = snap.identity;
  state.actions = snap.actions;
  state.servers = snap.servers || {};
  state.peers = snap.peers || [];
  state.quarantine = snap.quarantine || [];
  state.notes = snap.notes || {};
  state.approvals = snap.approvals || state.approvals;
  state.jobs = new Map((snap.jobs || []).slice().reverse().map((j) => [j.key, j]));
  renderHeader();
  renderNotes();
  renderServers();
  renderPeers();
  renderJobs();
  renderQuarantine();
  renderApprovals();
}

function setLive(text, kind) {
  const live = $("live");
  live.textContent = text;
  live.className = "badge badge-" + kind;
}

// What of the selected peer the detail panel shows: redraw it only when that changed.
function selectedSummary() {
  const row = state.peers.find((p) => p.peer === state.selected);
  const order = state.quarantine.find((q) => q.peer === state.selected);
  return JSON.stringify([row && row.state, row && row.trust, order && order.seq]);
}

function selectedChanged(before) {
  return selectedSummary() !== before;
}

function connect() {
  const events = new EventSource("/api/events");
  const on = (name, handler) => events.addEventListener(name, (e) => handler(JSON.parse(e.data)));
  on("snapshot", (snap) => { applySnapshot(snap); setLive("live", "ok"); });
  on("servers", (view) => { state.servers = view; renderServers(); });
  on("peers", (data) => {
    const before = selectedSummary();
    state.peers = data.peers;
    state.quarantine = data.quarantine;
    renderPeers();
    renderPlaces();
    renderQuarantine();
    renderJobs();
    if (state.selected && selectedChanged(before)) scheduleDetail();
  });
  on("job", addJob);
  on("jobs", (jobs) => { state.jobs = new Map(jobs.slice().reverse().map((j) => [j.key, j])); renderJobs(); });
  on("notes", (notes) => { state.notes = notes; renderNotes(); });
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) setLive("disconnected: reload the page (with its token)", "bad");
    else setLive("reconnecting…", "warn");
  };
}

document.addEventListener("DOMContentLoaded", connect);
