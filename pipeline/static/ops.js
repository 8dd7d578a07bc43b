// The ops page: polls GET v1/ops/summary and GET v1/dlq, replays dead letters.
// Every call carries "Authorization: Bearer <token>" from the token field, kept in
// sessionStorage (this tab only). Everything is rendered with textContent: device and
// order strings never become markup. No build step, no dependencies.

const TOKEN_KEY = "iot-orders-ops-token";
const WINDOW_MS = 10_000; // throughput: change over about the last 10 s
const HISTORY_MS = 120_000; // samples kept for the sparklines
const DLQ_PAGE = 20;

const params = new URLSearchParams(location.search);
const intervalMs = Math.min(60_000, Math.max(250, Number(params.get("interval_ms")) || 2000));
const samples = []; // {at, added, read}
let role = null;
let timer = null;

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { status: response.status, ok: response.ok, body };
}

function problemText(result) {
  const b = result.body || {};
  return `${result.status} ${b.code || b.title || "error"}${b.detail ? `: ${b.detail}` : ""}`;
}

// A transient message (the API failing) clears once a refresh works again;
// the outcome of an operator's action stays until the next action.
function say(text, kind = "info", transient = false) {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "error" ? "error" : "";
  box.dataset.transient = transient ? "1" : "";
  box.hidden = !text;
}

function cell(row, value, className = "") {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(tbodyParent, rows, columns, render) {
  const tbody = $(tbodyParent).querySelector("tbody");
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "none", "empty");
    td.colSpan = columns;
    tbody.appendChild(tr);
    return;
  }
  for (const item of rows) {
    const tr = document.createElement("tr");
    render(tr, item);
    tbody.appendChild(tr);
  }
}

const MAX_AGE_MS = 30 * 24 * 3_600_000; // pipeline/health.py MAX_UNRECEIPTED_AGE_MS

function age(ms) {
  if (ms === null || ms === undefined) return "–";
  if (!Number.isFinite(ms) || ms < 0 || ms > MAX_AGE_MS) return "?";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

function rate(key) {
  const last = samples[samples.length - 1];
  const first = samples.find((s) => last.at - s.at <= WINDOW_MS) || last;
  if (!last || last === first || last.at === first.at) return null;
  return ((last[key] - first[key]) * 1000) / (last.at - first.at);
}

function sparkline(id, key) {
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].at - samples[i - 1].at;
    if (dt > 0) points.push([samples[i].at, ((samples[i][key] - samples[i - 1][key]) * 1000) / dt]);
  }
  const line = $(id).querySelector("polyline");
  if (!points.length) {
    line.setAttribute("points", "");
    return;
  }
  // x spans the samples kept (up to HISTORY_MS), y the largest rate among them.
  const t0 = samples[0].at;
  const span = Math.max(1, samples[samples.length - 1].at - t0);
  const top = Math.max(1, ...points.map((p) => p[1]));
  const xy = ([t, v]) => `${(((t - t0) / span) * 120).toFixed(1)},${(29 - (v / top) * 28).toFixed(1)}`;
  line.setAttribute("points", points.map(xy).join(" "));
}

function yesNo(value, yes = "yes", no = "NO") {
  if (value === null || value === undefined) return ["unknown", "muted"];
  return value ? [yes, "ok"] : [no, "bad"];
}

function renderSummary(s) {
  role = s.role;
  samples.push({ at: s.at, added: s.totals.entries_added, read: s.totals.entries_read });
  while (samples.length > 2 && samples[samples.length - 1].at - samples[0].at > HISTORY_MS) samples.shift();
  const rin = rate("added");
  const rread = rate("read");
  $("rate-in").textContent = rin === null ? "–" : rin.toFixed(1);
  $("rate-read").textContent = rread === null ? "–" : rread.toFixed(1);
  sparkline("spark-in", "added");
  sparkline("spark-read", "read");

  const t = s.totals;
  $("total-lag").textContent = fmt(t.lag);
  $("total-pending").textContent = fmt(t.pending);
  $("total-length").textContent = fmt(t.length);
  $("total-added").textContent = fmt(t.entries_added);
  $("total-lag-cell").textContent = fmt(t.lag);
  $("total-pending-cell").textContent = fmt(t.pending);
  $("dlq-pipeline").textContent = fmt(s.dlq.pipeline);
  $("dlq-pipeline").className = s.dlq.pipeline ? "bad" : "";
  $("dlq-intake").textContent = fmt(s.dlq.intake);
  const [durable, durableClass] = yesNo(s.redis_durable);
  $("redis-durable").textContent = durable;
  $("redis-durable").className = durableClass;

  fill("shards", s.shards, 6, (tr, sh) => {
    cell(tr, sh.stream);
    cell(tr, fmt(sh.length), "num");
    cell(tr, fmt(sh.entries_added), "num");
    cell(tr, sh.group ? fmt(sh.lag) : `${fmt(sh.lag)} (no group yet)`, sh.lag ? "num warn" : "num");
    cell(tr, fmt(sh.pending), "num");
    cell(tr, fmt(sh.consumers), "num");
  });

  const f = s.fleet;
  $("fleet-online").textContent = fmt(f.online);
  $("fleet-offline").textContent = fmt(f.offline);
  $("fleet-stale").textContent = fmt(f.stale);
  $("fleet-devices").textContent = fmt(f.devices);
  $("fleet-unscanned").textContent = f.unscanned ? ` (${fmt(f.unscanned)} not scanned)` : "";
  $("fleet-stale").parentElement.title = `no health report for ${f.stale_after_s} s and no Will`;
  fill("versions", f.versions, 3, (tr, v) => {
    cell(tr, v.version || "not reported", v.version ? "" : "muted");
    cell(tr, fmt(v.devices), "num");
    cell(tr, fmt(v.online), "num");
  });
  fill("worst", f.worst, 6, (tr, d) => {
    cell(tr, d.device_id);
    cell(tr, age(d.oldest_unreceipted_age_ms), "num");
    cell(tr, d.outbox_depth === null ? "–" : `${fmt(d.outbox_depth)} orders`, "num");
    cell(tr, fmt(d.held), d.held ? "num bad" : "num");
    const state = d.online === false ? ["offline", "bad"] : d.stale ? ["stale", "warn"] : ["online", "ok"];
    cell(tr, state[0], state[1]);
    cell(tr, d.last_broker_error || "");
  });

  fill("bridges", s.bridges, 7, (tr, b) => {
    cell(tr, b.client_id);
    const cls = { ready: "ok", not_ready: "bad", stale: "warn", gone: "bad" }[b.state];
    cell(tr, b.state.replace("_", " "), cls);
    cell(tr, b.version || "–");
    const [d, dc] = yesNo(b.redis_durable);
    cell(tr, d, dc);
    cell(tr, fmt(b.in_flight), "num");
    cell(tr, `${age(b.age_ms)} ago`, "num");
    cell(tr, b.failing.join(", "));
  });
  const roleText = s.role === "open" ? "no tokens configured (loopback)" : `role ${s.role}`;
  $("status").textContent = `${roleText} · updated ${new Date(s.at).toLocaleTimeString()} · every ${intervalMs / 1000} s`;
}

function renderDlq(page) {
  const canReplay = role === "operate" || role === "open";
  fill("dlq", page.items, 7, (tr, e) => {
    cell(tr, e.id);
    cell(tr, e.order_id || "–");
    cell(tr, e.device_id || "–");
    cell(tr, e.reason);
    cell(tr, e.deliveries || "–", "num");
    cell(tr, (e.error || "").slice(0, 120));
    const td = cell(tr, "");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Replay";
    button.className = "replay";
    button.dataset.entry = e.id;
    button.disabled = !e.replayable || !canReplay;
    button.title = !e.replayable ? "holds no accepted order" : canReplay ? "put it back into its shard stream, once" : "needs a token of role operate";
    button.addEventListener("click", () => replay(e.id, button));
    td.appendChild(button);
  });
  $("dlq-more").hidden = !page.has_more;
}

async function replay(entryId, button) {
  button.disabled = true;
  const result = await api(`v1/dlq/${encodeURIComponent(entryId)}/replay`, { method: "POST" });
  if (result.status === 202) {
    say(`Replayed ${entryId} as ${result.body.replayed_as}`);
    await refresh();
  } else {
    say(`Replay of ${entryId} refused: ${problemText(result)}`, "error");
    button.disabled = false;
  }
}

let refreshing = false;

async function refresh() {
  if (refreshing) return; // the last poll is still out: skip a beat rather than pile up
  refreshing = true;
  try {
    const s = await api("v1/ops/summary");
    if (s.status === 401) {
      $("status").textContent = "enter an API token (read or operate)";
      say(`The API needs a token: ${problemText(s)}`, "error", true);
      return;
    }
    if (!s.ok) {
      say(`Summary failed: ${problemText(s)}`, "error", true);
      return;
    }
    renderSummary(s.body);
    const d = await api(`v1/dlq?limit=${DLQ_PAGE}`);
    if (d.ok) renderDlq(d.body);
    else say(`DLQ listing failed: ${problemText(d)}`, "error", true);
    if ($("message").dataset.transient === "1") say("");
  } catch (err) {
    say(`API unreachable: ${err}`, "error", true);
  } finally {
    refreshing = false;
  }
}

function schedule() {
  clearInterval(timer);
  timer = setInterval(refresh, intervalMs);
  refresh();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  samples.length = 0;
  say("");
  schedule();
});
$("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  role = null;
  say("Token forgotten");
  schedule();
});

schedule();
