// agentplane console: a small single-page app over the public REST API (/api/v1).
// No framework, no build step, nothing from another host. The token lives in this tab's
// sessionStorage only and travels in the Authorization header, never in a URL.
"use strict";

const TOKEN_KEY = "agentplane.token";
const PROJECT_KEY = "agentplane.project";
const main = () => document.getElementById("main");
let pageAbort = new AbortController(); // streams and fetches of the page on screen

// DOM -------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the CSP, unlike style=""
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const fmt = new Intl.NumberFormat("en-US");
const num = (v) => fmt.format(Number(v || 0));
const usd = (v) => "$" + Number(v || 0).toFixed(Number(v || 0) < 10 ? 4 : 2);
const when = (t) => (t ? new Date(t).toLocaleString() : "—");
const up = (s) => String(s || "").toUpperCase(); // some routes answer statuses in lower case
const status = (s) => h("span", { class: "status " + up(s) }, up(s));

function flash(text, ok = true) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = ok ? "ok" : "bad";
}

// API -------------------------------------------------------------------------------
class ApiError extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function project() { return sessionStorage.getItem(PROJECT_KEY) || "-"; }

async function api(method, path, body, signal) {
  const headers = { authorization: "Bearer " + token() };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, {
    method, headers, signal: signal || pageAbort.signal,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
  if (res.status === 401) { signOut("Your token was refused; sign in again."); throw new ApiError("unauthenticated"); }
  const text = await res.text();
  const data = text ? JSON.parse(text) : {};
  if (!res.ok) throw new ApiError((data.error && data.error.message) || res.status + " " + res.statusText);
  return data;
}
const get = (path, signal) => api("GET", path, undefined, signal);
const qs = (params) => {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== undefined && v !== null) q.set(k, v);
  const s = q.toString();
  return s ? "?" + s : "";
};
const enc = encodeURIComponent;

// Server-sent events with the Authorization header (EventSource cannot send one).
async function stream(path, onEvent, onOpen) {
  const signal = pageAbort.signal;
  while (!signal.aborted) {
    try {
      const res = await fetch(path, { headers: { authorization: "Bearer " + token(), accept: "text/event-stream" },
        signal, credentials: "omit", cache: "no-store" });
      if (!res.ok) throw new ApiError(res.status + " " + res.statusText);
      if (onOpen) onOpen(); // the gateway answers once the service has opened the stream
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (!data) continue;
          if (block.startsWith("event: error")) { flash(JSON.parse(data).error.message, false); return; }
          onEvent(JSON.parse(data));
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 1000)); // reconnect after a drop
  }
}

// A button that runs an action and reports success or the API's error.
function action(label, run, opts = {}) {
  const button = h("button", { type: "button", class: opts.class }, label);
  button.addEventListener("click", async () => {
    if (opts.confirm && !button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = opts.confirm;
      const cancel = h("button", { type: "button", class: "secondary", onclick: () => {
        delete button.dataset.armed; button.textContent = label; cancel.remove(); button.focus(); } }, "Cancel");
      button.after(cancel);
      return;
    }
    button.disabled = true;
    try {
      const message = await run();
      flash(message || label + ": done");
    } catch (err) {
      flash(label + " failed: " + err.message, false);
    } finally {
      button.disabled = false;
      delete button.dataset.armed;
      button.textContent = label;
      if (button.nextSibling && button.nextSibling.textContent === "Cancel") button.nextSibling.remove();
    }
  });
  return button;
}

// Pages that list: next/previous with what the API gives for the next page (a page
// token, a page number or an offset).
function pager(load) {
  const tokens = [""];
  const box = h("div", { class: "pager" });
  async function show(index) {
    const next = await load(tokens[index]);
    box.replaceChildren(
      h("button", { type: "button", class: "secondary", disabled: index === 0, onclick: () => show(index - 1) }, "Previous"),
      h("span", { class: "muted" }, "Page " + (index + 1)),
      h("button", { type: "button", class: "secondary", disabled: !next, onclick: () => { tokens[index + 1] = next; show(index + 1); } }, "Next"),
    );
  }
  return { box, show: () => show(0) };
}

function bar(percent, thresholds = []) {
  const p = Math.max(0, Math.min(100, Number(percent || 0)));
  const cls = p >= 100 ? "over" : p >= 80 ? "hot" : "";
  return h("div", { class: "bar", role: "img", "aria-label": p.toFixed(1) + "% used" },
    h("span", { class: cls, style: "width:" + p + "%" }),
    thresholds.map((t) => h("i", { style: "left:calc(" + Math.min(100, t) + "% - 1px)", title: t + "% alert" })));
}

// Overview --------------------------------------------------------------------------
async function overview(root) {
  const p = project();
  const now = new Date();
  const dayStart = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
  const monthStart = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const hourAgo = new Date(now.getTime() - 24 * 3600 * 1000);
  const series = (granularity, start) => get(`/api/v1/projects/${enc(p)}/usage:timeSeries` +
    qs({ granularity, start_time: start.toISOString() })).catch(() => null);
  const [org, usage, month, day, hours, hot, budgets] = await Promise.all([
    get("/api/v1/organism").catch(() => null),
    get("/api/v1/usage").catch(() => null),
    series("GRANULARITY_DAY", monthStart), series("GRANULARITY_DAY", dayStart),
    series("GRANULARITY_HOUR", hourAgo),
    get("/api/v1/usage/threads" + qs({ page_size: 8 })).catch(() => null),
    p === "-" ? null : get(`/api/v1/projects/${enc(p)}/budgets` + qs({ page_size: 50 })).catch(() => null),
  ]);
  const cost = (s) => (s && s.totals ? s.totals.total_cost_usd : null);
  const burn = hours && hours.totals ? hours.totals.total_cost_usd / 24 : null;
  const totals = (usage && (usage.usage || usage).totals) || {};
  const agents = org && org.agents;
  const alerts = h("ul", { class: "alerts", id: "alerts" });
  root.replaceChildren(
    h("h1", {}, "Overview", p === "-" ? " — every project" : " — " + p),
    h("div", { class: "grid" },
      card("Tokens used", num(totals.total_tokens), num(totals.request_count) + " LLM calls", "total-tokens"),
      card("Cost", usd(totals.total_cost_usd), "all time", "total-cost"),
      card("Spend today", cost(day) === null ? "—" : usd(cost(day)), "since 00:00 UTC", "spend-today"),
      card("Spend this month", cost(month) === null ? "—" : usd(cost(month)), "since the 1st, UTC", "spend-month"),
      card("Burn rate", burn === null ? "—" : usd(burn) + "/h", "average over the last 24 h", "burn-rate"),
      card("Active threads", num(usage ? (usage.usage || usage).active_threads : 0), "with an open budget", "active-threads"),
    ),
    h("div", { class: "grid", style: "margin-top:12px" },
      h("section", { class: "card" }, h("h2", {}, "Agents by status"),
        agents ? h("table", { id: "agents-by-status" }, ["idle", "working", "waiting", "paused", "terminated"].map((s) =>
          h("tr", {}, h("td", {}, status(s.toUpperCase())), h("td", {}, num(agents[s]))))) : h("p", { class: "muted" }, "Superuser only.")),
      h("section", { class: "card" }, h("h2", {}, "Hottest thread budgets"),
        hot && hot.threads && hot.threads.length ? hot.threads.map((b) => h("div", {},
          h("a", { href: "#/threads/" + enc(b.thread_id) }, b.thread_id),
          bar(b.percent_used), h("span", { class: "muted" }, num(b.total_tokens) + " / " + num(b.max_tokens) + " tokens"))) :
          h("p", { class: "muted" }, "No thread budgets.")),
      h("section", { class: "card" }, h("h2", {}, "Live alerts"), alerts,
        p === "-" ? h("p", { class: "muted" }, "Choose a project to watch its alerts.") : null),
    ),
    h("section", { class: "card", style: "margin-top:12px" }, h("h2", {}, "Budgets"),
      p === "-" ? h("p", { class: "muted" }, "Choose a project to see its budgets.") :
        budgets && budgets.budgets && budgets.budgets.length ? h("div", { id: "budget-bars" }, budgets.budgets.map(budgetBar)) :
          h("p", { class: "muted" }, "No budgets in this project.")),
  );
  root.dataset.ready = "1";
  if (p !== "-") {
    stream(`/api/v1/projects/${enc(p)}/budgets:watchAlerts`, (a) => {
      alerts.prepend(h("li", { "data-alert": a.alert_id }, status(a.threshold + "%"), " ",
        up(a.scope) + (a.scope_id ? " " + a.scope_id : ""), " budget ", a.budget_id,
        " at " + Number(a.percent_used).toFixed(1) + "% — " + when(a.create_time)));
    }, () => { alerts.dataset.live = "1"; });
  }
}
function card(title, figure, note, id) {
  return h("section", { class: "card" }, h("h2", {}, title), h("div", { class: "figure", id }, figure),
    h("div", { class: "muted" }, note));
}
const WINDOWS = { minute: "the last minute", hour: "the last hour" };
function budgetBar(b) {
  // A window (minute, hour) shows what its last 60 / 3,600 seconds admitted: used and
  // still held by open reservations; a calendar budget its period's use.
  const windowed = WINDOWS[String(b.period).toLowerCase()];
  const taken = (used, held) => Number(used) + (windowed ? Number(held || 0) : 0);
  const parts = [];
  if (Number(b.limit_tokens)) parts.push(num(taken(b.used_tokens, b.reserved_tokens)) + " / " + num(b.limit_tokens) + " tokens");
  if (Number(b.limit_cost_micros)) parts.push(usd(taken(b.used_cost_micros, b.reserved_cost_micros) / 1e6) + " / " + usd(b.limit_cost_micros / 1e6));
  if (Number(b.limit_requests)) parts.push(num(b.used_requests) + " / " + num(b.limit_requests) + " requests");
  const text = (windowed ? "used in " + windowed + ": " : "") + parts.join(", ");
  const flight = Number(b.max_in_flight) ? h("span", { class: "muted in-flight" }, " · in flight " + num(b.in_flight || 0) + " / " + num(b.max_in_flight)) : "";
  return h("div", { class: "budget" }, h("strong", {}, b.display_name || up(b.scope) + (b.scope_id ? " " + b.scope_id : "")),
    " ", h("span", { class: "muted" }, up(b.period) + ", " + up(b.enforcement)), bar(b.percent_used, windowed ? [] : b.alert_thresholds || []),
    h("span", { class: "muted" }, text + (parts.length ? " (" + Number(b.percent_used).toFixed(1) + "%)" : "")), flight);
}

// Agents ----------------------------------------------------------------------------
async function agents(root) {
  const p = project();
  const filter = h("select", { id: "agent-status" }, ["", "IDLE", "WORKING", "WAITING", "PAUSED", "TERMINATED"].map((s) =>
    h("option", { value: s ? "AGENT_STATUS_" + s : "" }, s || "any status")));
  const search = h("input", { id: "agent-search", type: "search", placeholder: "name contains…" });
  const body = h("tbody");
  let shown = [];
  const draw = () => body.replaceChildren(...shown.filter((a) => a.name.toLowerCase().includes(search.value.toLowerCase())).map(agentRow));
  const pages = pager(async (page) => {
    // This route keeps its page/limit paging (and {data, pagination}) for older clients.
    const data = await get(`/api/v1/projects/${enc(p)}/agents` + qs({ status: filter.value, limit: 25, page: page || 1 }));
    shown = data.data || [];
    draw();
    root.dataset.ready = "1";
    return data.pagination && data.pagination.has_next ? (page || 1) + 1 : "";
  });
  filter.addEventListener("change", () => pages.show());
  search.addEventListener("input", draw);
  root.replaceChildren(h("h1", {}, "Agents"),
    h("div", { class: "toolbar inline" }, h("label", { for: "agent-status" }, "Status"), filter,
      h("label", { for: "agent-search" }, "Search"), search),
    h("div", { class: "scroll card" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"),
      h("th", { class: "hide-narrow" }, "Project"), h("th", { class: "hide-narrow" }, "Tokens"), h("th", {}, "Cost"), h("th", {}, "Actions"))), body)),
    pages.box);
  await pages.show();
}
function agentRow(a) {
  const row = h("tr", { "data-agent": a.id },
    h("td", {}, h("a", { href: "#/agents/" + enc(a.id) }, a.name)), h("td", { class: "agent-status" }, status(a.status)),
    h("td", { class: "hide-narrow" }, a.project_id), h("td", { class: "hide-narrow" }, num(a.tokens_used)), h("td", {}, usd(a.cost_usd)),
    h("td", {}, agentActions(a, (changed) => row.replaceWith(agentRow(changed)))));
  return row;
}
function agentActions(a, redraw) {
  const act = (label, verb, opts) => action(label, async () => {
    redraw(await api("POST", `/api/v1/agents/${enc(a.id)}${verb}`, {}));
    return `${label}: ${a.name} done`;
  }, opts);
  if (up(a.status) === "TERMINATED") return [];
  return [up(a.status) === "PAUSED" ? act("Resume", "/resume") : act("Pause", "/pause"), " ",
    act("Terminate", ":terminate", { class: "danger", confirm: "Confirm terminate" })];
}
async function agentPage(root, id) {
  const [a, metrics, usage] = await Promise.all([get(`/api/v1/agents/${enc(id)}`),
    get(`/api/v1/agents/${enc(id)}/metrics`).catch(() => null), get(`/api/v1/usage/agents/${enc(id)}`).catch(() => null)]);
  const totals = usage || {}; // this route answers the agent's totals, flat
  const actions = h("div", { class: "toolbar" }, agentActions(a, () => agentPage(root, id)));
  root.replaceChildren(h("h1", {}, "Agent ", a.name, " ", status(a.status)), actions,
    h("div", { class: "grid" },
      card("Tokens", num(totals.total_tokens), num(totals.request_count) + " LLM calls", "agent-tokens"),
      card("Cost", usd(totals.total_cost_usd), "avg latency " + Number(totals.avg_latency_ms || 0).toFixed(0) + " ms", "agent-cost"),
      card("Tasks completed", num(metrics ? metrics.tasks_completed : a.tasks_completed), "", "agent-tasks")),
    h("section", { class: "card", style: "margin-top:12px" }, h("table", {},
      [["Id", a.id], ["Project", a.project_id], ["Type", a.agent_type_id], ["Current task", a.current_task || "—"],
        ["Peers", (a.peers || []).join(", ") || "—"], ["Last activity", when(a.last_activity_time)], ["Created", when(a.create_time)]]
        .map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))),
    h("h2", {}, "Last model calls"),
    h("section", { class: "card" }, await callsTable(a.project_id, { agent_id: a.id }, 10, "agent-calls")));
  root.dataset.ready = "1";
}

// Threads ---------------------------------------------------------------------------
async function threads(root) {
  const p = project();
  const filter = h("select", { id: "thread-status" }, ["", "ACTIVE", "COMPLETED", "FAILED", "KILLED"].map((s) =>
    h("option", { value: s ? "THREAD_STATUS_" + s : "" }, s || "any status")));
  const body = h("tbody");
  const pages = pager(async (offset) => {
    // This route keeps its offset/limit paging (and {threads, total}) for older clients.
    const data = await get("/api/v1/threads" + qs({ project_id: p, status: filter.value, limit: 25, offset: offset || 0 }));
    body.replaceChildren(...(data.threads || []).map((t) => h("tr", { "data-thread": t.id },
      h("td", {}, h("a", { href: "#/threads/" + enc(t.id) }, t.title || t.id)), h("td", {}, status(t.status)),
      h("td", { class: "hide-narrow" }, t.project_id), h("td", {}, num(t.message_count)),
      h("td", { class: "hide-narrow" }, num(t.max_tokens)), h("td", { class: "hide-narrow" }, when(t.create_time)))));
    root.dataset.ready = "1";
    const next = (offset || 0) + (data.threads || []).length;
    return next < data.total ? next : "";
  });
  filter.addEventListener("change", () => pages.show());
  root.replaceChildren(h("h1", {}, "Threads"),
    h("div", { class: "toolbar inline" }, h("label", { for: "thread-status" }, "Status"), filter),
    h("div", { class: "scroll card" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Title"), h("th", {}, "Status"),
      h("th", { class: "hide-narrow" }, "Project"), h("th", {}, "Messages"), h("th", { class: "hide-narrow" }, "Budget (tokens)"),
      h("th", { class: "hide-narrow" }, "Created"))), body)), pages.box);
  await pages.show();
}
function messageItem(m) {
  return h("li", { "data-message": m.id }, h("strong", {}, m.from_agent), " → ", h("strong", {}, m.to_agent), " ",
    h("span", { class: "muted" }, when(m.create_time) + " · " + m.payload_type), h("pre", {}, JSON.stringify(m.payload)));
}
async function threadPage(root, id) {
  const [t, list] = await Promise.all([get(`/api/v1/threads/${enc(id)}`), get(`/api/v1/threads/${enc(id)}/messages` + qs({ page_size: 100 }))]);
  const thread = t;  // the thread's fields at the top level, its latest messages beside
  const head = h("h1", { id: "thread-head" });
  const items = h("ul", { class: "messages", id: "messages" }, (list.messages || []).map(messageItem));
  const reason = h("input", { id: "kill-reason", placeholder: "reason (optional)" });
  const drawHead = (th) => head.replaceChildren("Thread ", th.title || th.id, " ", status(th.status),
    th.end_reason ? h("span", { class: "muted", id: "end-reason" }, " — ", th.end_reason) : "");
  drawHead(thread);
  const kill = action("Kill thread", async () => {
    const killed = await api("POST", `/api/v1/threads/${enc(id)}/kill`, { reason: reason.value });
    drawHead(killed);
    return "Thread killed";
  }, { class: "danger", confirm: "Confirm kill" });
  root.replaceChildren(head,
    h("p", { class: "muted" }, thread.project_id, " · ", num(thread.message_count), " messages",
      list.dropped_count ? " (" + num(list.dropped_count) + " oldest dropped)" : "", " · budget ", num(thread.max_tokens), " tokens"),
    up(thread.status) === "ACTIVE" ? h("div", { class: "toolbar" }, h("label", { for: "kill-reason" }, "Reason"), reason, kill) : null,
    h("section", { class: "card" }, h("h2", {}, "Messages (live)"), items));
  root.dataset.ready = "1";
  if (up(thread.status) === "ACTIVE") {
    stream(`/api/v1/threads/${enc(id)}/events`, (e) => {
      if (e.message && e.message.id) { if (!items.querySelector(`[data-message="${CSS.escape(e.message.id)}"]`)) items.append(messageItem(e.message)); }
      if (e.thread && e.thread.id) drawHead(e.thread);
    }, () => { items.dataset.live = "1"; });
  }
}

// Usage -----------------------------------------------------------------------------
const PALETTE = ["#2458d6", "#d66b24", "#1f9d6a", "#a23bb3", "#c9a227", "#2aa6c9", "#b3261e", "#6b7a99"];
async function usagePage(root) {
  const p = project();
  const gran = h("select", { id: "usage-granularity" }, h("option", { value: "GRANULARITY_HOUR" }, "hour (last 48 h)"),
    h("option", { value: "GRANULARITY_DAY" }, "day (last 30 days)"));
  const group = h("select", { id: "usage-group" }, h("option", { value: "USAGE_GROUP_BY_MODEL" }, "by model"),
    h("option", { value: "USAGE_GROUP_BY_AGENT" }, "by agent"));
  const metric = h("select", { id: "usage-metric" }, h("option", { value: "total_cost_usd" }, "cost (USD)"),
    h("option", { value: "total_tokens" }, "tokens"));
  const chart = h("div", { id: "usage-chart" });
  const start = () => new Date(Date.now() - (gran.value === "GRANULARITY_HOUR" ? 48 * 3600e3 : 30 * 86400e3)).toISOString();
  const draw = async () => {
    const from = start();
    const data = await get(`/api/v1/projects/${enc(p)}/usage:timeSeries` + qs({ granularity: gran.value, group_by: group.value, start_time: from }));
    const step = gran.value === "GRANULARITY_HOUR" ? 3600e3 : 86400e3;
    chart.replaceChildren(stackedBars(data.buckets || [], metric.value, from, step));
    root.dataset.ready = "1";
  };
  const exportCsv = action("Download CSV", async () => {
    const res = await fetch(`/api/v1/projects/${enc(p)}/usage:export` + qs({ granularity: gran.value, start_time: start(), format: "csv" }),
      { headers: { authorization: "Bearer " + token() }, credentials: "omit" });
    if (!res.ok) throw new ApiError(res.status + " " + res.statusText);
    const url = URL.createObjectURL(await res.blob());
    const link = h("a", { href: url, download: `usage-${p}.csv` });
    document.body.append(link); link.click(); link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    return "CSV exported";
  }, { class: "secondary" });
  for (const el of [gran, group, metric]) el.addEventListener("change", () => draw().catch((e) => flash(e.message, false)));
  const calls = p === "-" ? h("p", { class: "muted" }, "Choose a project to see its calls.")
    : await callsTable(p, {}, 20, "calls-table");
  root.replaceChildren(h("h1", {}, "Usage over time"),
    h("div", { class: "toolbar inline" }, h("label", { for: "usage-granularity" }, "Buckets"), gran,
      h("label", { for: "usage-group" }, "Split"), group, h("label", { for: "usage-metric" }, "Show"), metric, exportCsv),
    h("section", { class: "card" }, chart),
    h("h2", {}, "Model calls"), h("section", { class: "card" }, calls));
  await draw();
}
// The model gateway's call log: newest first, metadata only (never prompts or answers).
const secs = (d) => (d ? Math.round(parseFloat(d) * 1000) + " ms" : "—");
async function callsTable(projectId, filters, pageSize, id) {
  const body = h("tbody");
  const pages = pager(async (pageToken) => {
    const data = await get(`/api/v1/projects/${enc(projectId)}/calls` + qs({ ...filters, page_size: pageSize, page_token: pageToken }));
    body.replaceChildren(...(data.calls || []).map((c) => {
      const u = c.usage || {};
      return h("tr", {}, h("td", {}, when(c.start_time)), h("td", {}, h("a", { href: "#/agents/" + enc(c.agent_id) }, c.agent_id)),
        h("td", {}, c.model_requested), h("td", {}, status(String(c.outcome || "").replace("MODEL_CALL_OUTCOME_", ""))),
        h("td", {}, c.reason || ""), h("td", { class: "num" }, num(u.total_tokens) + (c.estimated ? " (est.)" : "")),
        h("td", { class: "num" }, usd(u.total_cost_usd)), h("td", { class: "num" }, secs(c.time_to_first_token)),
        h("td", { class: "num" }, secs(c.duration)));
    }));
    if (!(data.calls || []).length) body.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No calls through the model gateway yet.")));
    return data.next_page_token || "";
  });
  const table = h("table", { id },
    h("thead", {}, h("tr", {}, ["Started", "Agent", "Model", "Outcome", "Reason", "Tokens", "Cost", "First token", "Duration"].map((t) => h("th", {}, t)))),
    body);
  await pages.show();
  return h("div", {}, h("div", { class: "scroll" }, table), pages.box);
}

function stackedBars(buckets, field, start, step) {
  // Every bucket of the range gets its place, empty or not, so time reads left to right.
  const first = Math.floor(Date.parse(start) / step) * step;
  const count = Math.max(1, Math.ceil((Date.now() - first) / step));
  const groups = [...new Set(buckets.map((b) => b.group || "all"))].sort();
  const value = (b) => Number((b.totals || {})[field] || 0);
  const slots = Array.from({ length: count }, () => []);
  for (const b of buckets) {
    const i = Math.floor((Date.parse(b.start_time) - first) / step);
    if (i >= 0 && i < count) slots[i].push(b);
  }
  const max = Math.max(1e-9, ...slots.map((s) => s.reduce((a, b) => a + value(b), 0)));
  const W = 1000, H = 200, pad = 70, gap = count > 100 ? 0 : 1, bw = (W - pad) / count;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 24}`); svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${field === "total_cost_usd" ? "cost" : "tokens"} per bucket, ${groups.length} series, peak ${max}`);
  const add = (tag, attrs, text) => { const el = document.createElementNS(svg.namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v); if (text) el.textContent = text; svg.append(el); return el; };
  add("line", { x1: pad, y1: H, x2: W, y2: H, stroke: "#9aa3b5" });
  slots.forEach((stack, i) => {
    let y = H;
    for (const b of stack) {
      const height = (value(b) / max) * (H - 12);
      y -= height;
      const rect = add("rect", { x: pad + i * bw, y, width: Math.max(1, bw - gap), height,
        fill: PALETTE[groups.indexOf(b.group || "all") % PALETTE.length] });
      const title = document.createElementNS(svg.namespaceURI, "title");
      title.textContent = `${b.group || "all"} ${when(b.start_time)}: ${value(b)}`; rect.append(title);
    }
  });
  const label = (v) => (field === "total_cost_usd" ? usd(v) : num(v));
  add("text", { x: 0, y: 12, "font-size": 12 }, label(max));
  add("text", { x: 0, y: H, "font-size": 12 }, label(0));
  add("text", { x: pad, y: H + 18, "font-size": 12 }, new Date(first).toLocaleString());
  add("text", { x: W, y: H + 18, "font-size": 12, "text-anchor": "end" }, "now");
  const legend = h("div", { class: "legend" }, groups.length ? groups.map((g, i) =>
    h("span", {}, h("i", { style: "background:" + PALETTE[i % PALETTE.length] }), g)) : h("span", { class: "muted" }, "no usage in this range"));
  return h("div", {}, svg, legend);
}

// Budgets and webhooks --------------------------------------------------------------
async function budgetsPage(root) {
  const p = project();
  if (p === "-") { root.replaceChildren(h("h1", {}, "Budgets"), h("p", {}, "Choose a project above.")); root.dataset.ready = "1"; return; }
  const list = h("tbody", { id: "budget-list" });
  const hooks = h("tbody", { id: "webhook-list" });
  const deliveries = h("div", { id: "deliveries" });
  const base = `/api/v1/projects/${enc(p)}`;
  const loadBudgets = async () => {
    const data = await get(base + "/budgets" + qs({ page_size: 100 }));
    list.replaceChildren(...(data.budgets || []).map((b) => h("tr", { "data-budget": b.budget_id },
      h("td", {}, budgetBar(b)), h("td", {}, editBudget(b), " ",
        action("Reset", async () => { await api("POST", `${base}/budgets/${enc(b.budget_id)}:reset`, {}); await loadBudgets(); return "Budget reset"; },
          { class: "secondary", confirm: "Confirm reset" }), " ",
        action("Delete", async () => { await api("DELETE", `${base}/budgets/${enc(b.budget_id)}`); await loadBudgets(); return "Budget deleted"; },
          { class: "danger", confirm: "Confirm delete" })))));
  };
  const editBudget = (b) => {
    const tokens = h("input", { type: "number", min: 0, value: b.limit_tokens, "aria-label": "token limit", style: "width:9em" });
    const thresholds = h("input", { value: (b.alert_thresholds || []).join(","), "aria-label": "alert thresholds", style: "width:7em" });
    return h("span", { class: "inline" }, tokens, thresholds, action("Save", async () => {
      await api("PATCH", `${base}/budgets/${enc(b.budget_id)}`, { limit_tokens: tokens.value,
        alert_thresholds: thresholds.value.split(",").filter(Boolean).map(Number) });
      await loadBudgets();
      return "Budget saved";
    }, { class: "secondary" }));
  };
  const loadHooks = async () => {
    const data = await get(base + "/webhooks");
    hooks.replaceChildren(...(data.webhooks || []).map((w) => h("tr", {}, h("td", {}, w.url),
      h("td", {}, action("Deliveries", async () => {
        const d = await get(`${base}/webhooks/${enc(w.webhook_id)}/deliveries` + qs({ page_size: 50 }));
        deliveries.replaceChildren(h("h2", {}, "Deliveries to " + w.url), h("div", { class: "scroll" }, h("table", {},
          (d.deliveries || []).map((x) => h("tr", {}, h("td", {}, status(x.status)), h("td", {}, x.event_type),
            h("td", {}, "attempts " + (x.attempts || 0)), h("td", { class: "hide-narrow" }, x.last_error || ""), h("td", {}, when(x.update_time)))))));
        return (d.deliveries || []).length + " deliveries";
      }, { class: "secondary" }), " ",
      action("Delete", async () => { await api("DELETE", `${base}/webhooks/${enc(w.webhook_id)}`); await loadHooks(); return "Webhook deleted"; },
        { class: "danger", confirm: "Confirm delete" })))));
  };
  const field = (label, input) => h("div", {}, h("label", { for: input.id }, label), input);
  const form = h("form", { class: "inline card", id: "budget-form" },
    field("Scope", h("select", { id: "b-scope" }, ["PROJECT", "AGENT", "MODEL", "API_KEY", "THREAD"].map((s) => h("option", { value: "BUDGET_SCOPE_" + s }, s)))),
    field("Scope id", h("input", { id: "b-scope-id", placeholder: "agent id, model…" })),
    field("Token limit", h("input", { id: "b-tokens", type: "number", min: 0 })),
    field("Cost limit (USD)", h("input", { id: "b-cost", type: "number", min: 0, step: "0.01" })),
    field("Requests limit", h("input", { id: "b-requests", type: "number", min: 0 })),
    field("Max in flight", h("input", { id: "b-in-flight", type: "number", min: 0 })),
    field("Period", h("select", { id: "b-period" }, ["DAY", "WEEK", "MONTH", "LIFETIME", "MINUTE", "HOUR"].map((s) => h("option", { value: "BUDGET_PERIOD_" + s }, s)))),
    field("Time zone", h("input", { id: "b-zone", value: "UTC" })),
    field("Enforcement", h("select", { id: "b-enforcement" }, ["HARD", "SOFT"].map((s) => h("option", { value: "BUDGET_ENFORCEMENT_" + s }, s)))),
    field("Alerts at (%)", h("input", { id: "b-thresholds", value: "50,80,100" })),
    h("button", { type: "submit" }, "Create budget"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value;
    try {
      await api("POST", base + "/budgets", { scope: v("b-scope"), scope_id: v("b-scope-id"), limit_tokens: v("b-tokens") || "0",
        limit_cost_micros: String(Math.round(Number(v("b-cost") || 0) * 1e6)), limit_requests: v("b-requests") || "0",
        max_in_flight: Number(v("b-in-flight") || 0), period: v("b-period"), time_zone: v("b-zone"),
        enforcement: v("b-enforcement"), alert_thresholds: v("b-thresholds").split(",").filter(Boolean).map(Number) });
      flash("Budget created");
      form.reset();
      await loadBudgets();
    } catch (err) { flash("Create budget failed: " + err.message, false); }
  });
  const hookUrl = h("input", { id: "w-url", type: "url", placeholder: "https://example.com/hook", required: true });
  const secret = h("p", { id: "w-secret", class: "muted" });
  const hookForm = h("form", { class: "inline", id: "webhook-form" }, field("Webhook URL", hookUrl), h("button", { type: "submit" }, "Add webhook"));
  hookForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const created = await api("POST", base + "/webhooks", { url: hookUrl.value });
      secret.textContent = "Signing secret (shown once): " + created.secret;
      flash("Webhook created");
      await loadHooks();
    } catch (err) { flash("Add webhook failed: " + err.message, false); }
  });
  root.replaceChildren(h("h1", {}, "Budgets and webhooks — " + p), form,
    h("section", { class: "card scroll" }, h("h2", {}, "Budgets"), h("table", {}, list)),
    h("section", { class: "card", style: "margin-top:12px" }, h("h2", {}, "Webhooks"), hookForm, secret,
      h("div", { class: "scroll" }, h("table", {}, hooks)), deliveries));
  await Promise.all([loadBudgets(), loadHooks()]);
  root.dataset.ready = "1";
}

// Shell -----------------------------------------------------------------------------
const PAGES = { overview, agents, threads, usage: usagePage, budgets: budgetsPage };

async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const root = main();
  delete root.dataset.ready;
  const [page, id] = (location.hash.replace(/^#\/?/, "") || "overview").split("/");
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  root.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    if (page === "agents" && id) await agentPage(root, decodeURIComponent(id));
    else if (page === "threads" && id) await threadPage(root, decodeURIComponent(id));
    else await (PAGES[page] || overview)(root);
  } catch (err) {
    if (err.name === "AbortError") return;
    root.replaceChildren(h("p", { class: "error", role: "alert" }, err.message));
    root.dataset.ready = "1";
  }
}

async function loadProjects() {
  const select = document.getElementById("project");
  let projects = [];
  try { projects = (await api("GET", "/api/v1/projects" + qs({ page_size: 100 }), undefined, new AbortController().signal)).projects || []; } catch (err) { /* shown by the pages */ }
  select.replaceChildren(h("option", { value: "-" }, "every project"), ...projects.map((p) => h("option", { value: p.id }, p.display_name || p.id)));
  const chosen = sessionStorage.getItem(PROJECT_KEY);
  if (!chosen || ![...select.options].some((o) => o.value === chosen)) {
    sessionStorage.setItem(PROJECT_KEY, projects.length ? projects[0].id : "-"); // the newest project first
  }
  select.value = project();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  pageAbort.abort();
  document.getElementById("app").hidden = true;
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message || "";
  document.getElementById("token").focus();
}

async function start() {
  document.getElementById("signin").hidden = true;
  document.getElementById("app").hidden = false;
  try {
    const who = await api("GET", "/api/v1/whoami", undefined, new AbortController().signal);
    document.getElementById("whoami").textContent = (who.role || "") + " " + (who.subject || "");
  } catch (err) { return; }
  await loadProjects();
  await route();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    await start();
  });
  document.getElementById("signout").addEventListener("click", () => signOut("Signed out."));
  document.getElementById("project").addEventListener("change", (ev) => { sessionStorage.setItem(PROJECT_KEY, ev.target.value); route(); });
  window.addEventListener("hashchange", route);
  if (token()) start(); else signOut();
});
