// Live operator view: polls ./stats once a second with the admin token and renders it.
// The token arrives in the URL fragment (#token=...), which browsers never send to servers,
// and is kept in sessionStorage for this tab only.
"use strict";

const POLL_MS = 1000;
const HISTORY = 120;
const history = [];  // {t, total, denied, settled}
let previous = null;

function readToken() {
  const hash = new URLSearchParams(window.location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash) {
    sessionStorage.setItem("creditgate-token", fromHash);
    history_replace();
  }
  return sessionStorage.getItem("creditgate-token");
}

function history_replace() {
  window.history.replaceState(null, "", window.location.pathname + window.location.search);
}

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function fmtInt(n) {
  return Number(n).toLocaleString("en-US");
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(2) + " ms";
  return s.toFixed(2) + " s";
}

function fillTable(id, rows, columns, emptyText) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns.length;
    td.className = "empty";
    td.textContent = emptyText;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const col of columns) {
      const td = document.createElement("td");
      const value = col.get(row);
      td.textContent = value;
      if (col.num) td.className = "num";
      if (col.cls) td.className = col.cls(row);
      if (col.testid) td.dataset.testid = col.testid(row);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

function drawSpark() {
  const width = 600, height = 80;
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const dt = (history[i].t - history[i - 1].t) / 1000 || 1;
    rates.push({
      all: Math.max(0, history[i].total - history[i - 1].total) / dt,
      denied: Math.max(0, history[i].denied - history[i - 1].denied) / dt,
    });
  }
  const peak = Math.max(1, ...rates.map((r) => r.all));
  const step = width / Math.max(1, HISTORY - 1);
  const points = (key) => rates
    .map((r, i) => `${(width - (rates.length - 1 - i) * step).toFixed(1)},${(height - 2 - (r[key] / peak) * (height - 6)).toFixed(1)}`)
    .join(" ");
  document.getElementById("spark-all").setAttribute("points", points("all"));
  document.getElementById("spark-denied").setAttribute("points", points("denied"));
}

function render(stats) {
  const d = stats.decisions;
  const now = Date.now();
  text("decisions-total", fmtInt(d.total));
  text("decisions-admitted", fmtInt(d.admitted));
  text("decisions-denied", fmtInt(d.denied));
  text("latency-p50", fmtSeconds(stats.latency_seconds.p50));
  text("latency-p99", fmtSeconds(stats.latency_seconds.p99));
  text("settle-errors", fmtInt(stats.settle.errors_total));
  if (previous) {
    const dt = Math.max(0.001, (now - previous.t) / 1000);
    text("decisions-rate", (Math.max(0, d.total - previous.total) / dt).toFixed(1));
    text("settle-rate", (Math.max(0, stats.settle.events_total - previous.settled) / dt).toFixed(1));
  }
  previous = { t: now, total: d.total, denied: d.denied, settled: stats.settle.events_total };
  history.push(previous);
  while (history.length > HISTORY) history.shift();
  drawSpark();

  const reasons = Object.entries(d.by_reason).sort((a, b) => b[1] - a[1]);
  fillTable("reasons", reasons, [
    { get: (r) => r[0], testid: (r) => "reason-" + r[0] },
    { get: (r) => fmtInt(r[1]), num: true, testid: (r) => "count-" + r[0] },
  ], "no decisions yet");

  fillTable("outbox", stats.outbox.filter((s) => s.length > 0 || s.pending > 0), [
    { get: (s) => s.shard },
    { get: (s) => fmtInt(s.length), num: true },
    { get: (s) => fmtInt(s.pending), num: true },
    { get: (s) => fmtSeconds(s.oldest_pending_age_seconds), num: true },
  ], "every outbox is empty");

  fillTable("wallets", stats.wallets, [
    { get: (w) => w.project, testid: (w) => "wallet-" + w.project },
    { get: (w) => w.state, cls: (w) => "state-" + w.state },
    { get: (w) => fmtInt(w.snapshot), num: true },
    { get: (w) => fmtInt(w.held), num: true },
    { get: (w) => fmtInt(w.unsettled), num: true },
    { get: (w) => fmtInt(w.available), num: true, testid: (w) => "available-" + w.project },
    { get: (w) => w.version, num: true },
  ], "no project seen yet");

  text("gateway-id", stats.gateway_id);
  text("updated", new Date(stats.time_ms).toLocaleTimeString());
}

function setStatus(message, isError) {
  const el = document.getElementById("status");
  el.textContent = message;
  el.classList.toggle("error", Boolean(isError));
}

function showLogin() {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
}

async function poll(token) {
  try {
    const response = await fetch("stats", {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
    });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem("creditgate-token");
      setStatus("admin token refused", true);
      showLogin();
      return;
    }
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    document.getElementById("main").hidden = false;
    setStatus("live", false);
  } catch (err) {
    setStatus("gateway unreachable: " + err.message, true);
  }
  setTimeout(() => poll(token), POLL_MS);
}

function start() {
  const token = readToken();
  if (!token) {
    setStatus("admin token needed", true);
    showLogin();
    return;
  }
  document.getElementById("login").hidden = true;
  poll(token);
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("token").value.trim();
  if (value) {
    sessionStorage.setItem("creditgate-token", value);
    window.location.reload();
  }
});

start();
