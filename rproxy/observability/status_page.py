"""The status page: one self-contained HTML document (no CDN, no fonts from
elsewhere) that draws what the workers count: per route request rate, error
rate and p50/p99 latency with small charts of the last minutes, upstream
servers with their health and requests in flight, cache hit ratio and open
tunnels. The numbers come live over the WebSocket /status/live, once a
second; while the socket is down the page polls /status.json every 2
seconds and tries the socket again after 10 s, then less and less often."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rproxy status</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f7f8fa; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  .muted { color: #6b7280; } .tiles { display: flex; gap: 1em; flex-wrap: wrap; }
  .tile { background: #fff; border: 1px solid #e3e6ea; border-radius: 8px; padding: .7em 1em; min-width: 9em; }
  .tile b { display: block; font-size: 1.5em; }
  table { border-collapse: collapse; background: #fff; border: 1px solid #e3e6ea; min-width: 40em; }
  th, td { padding: .35em .8em; text-align: right; border-bottom: 1px solid #eef0f3; }
  th:first-child, td:first-child { text-align: left; } canvas { vertical-align: middle; }
  .up { color: #127a2e; font-weight: 600; } .down { color: #b42318; font-weight: 600; }
</style>
</head>
<body>
<h1>rproxy</h1>
<div class="muted"><span id="updated">waiting for the first numbers...</span> &middot; <span id="mode">connecting</span></div>
<div class="tiles">
  <div class="tile">requests/s<b id="total-rate">-</b></div>
  <div class="tile">requests<b id="total-requests">-</b></div>
  <div class="tile">in flight<b id="in-flight">-</b></div>
  <div class="tile">open tunnels<b id="tunnels">-</b></div>
  <div class="tile">cache hit ratio<b id="cache-ratio">-</b></div>
</div>
<h2>Routes</h2>
<table><thead><tr><th>route</th><th>req/s</th><th>errors</th><th>p50</th><th>p99</th><th>last minutes</th></tr></thead>
<tbody id="routes"></tbody></table>
<h2>Upstream servers</h2>
<table><thead><tr><th>upstream</th><th>server</th><th>health</th><th>in flight</th></tr></thead>
<tbody id="servers"></tbody></table>
<script>
"use strict";
const HISTORY = 180;           // points kept: 3 minutes at one a second
let previous = null;
const history = {};            // route -> [req/s, ...]

function sum(samples, name, match) {
  return (samples[name] || []).filter(s => Object.entries(match || {}).every(([k, v]) => s.labels[k] === v))
    .reduce((a, s) => a + s.value, 0);
}
function byLabel(samples, name, label) {
  const out = {};
  for (const s of samples[name] || []) out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
  return out;
}
function quantile(now, before, route, q) {
  // From the histogram's buckets: what changed since the previous sample.
  const buckets = {};
  for (const [samples, sign] of [[now, 1], [before, -1]]) {
    for (const s of samples["rproxy_request_duration_seconds_bucket"] || []) {
      if (s.labels.route !== route) continue;
      buckets[s.labels.le] = (buckets[s.labels.le] || 0) + sign * s.value;
    }
  }
  const bounds = Object.keys(buckets).filter(b => b !== "+Inf").map(Number).sort((a, b) => a - b);
  const total = buckets["+Inf"] || 0;
  if (total <= 0) return null;
  for (const b of bounds) if (buckets[String(b)] >= q * total) return b;
  return Infinity;
}
function ms(seconds) {
  if (seconds === null) return "-";
  if (seconds === Infinity) return "&gt;30 s";
  return seconds < 1 ? (seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0) + " ms" : seconds.toFixed(1) + " s";
}
function spark(values) {
  const canvas = document.createElement("canvas");
  canvas.width = 180; canvas.height = 28;
  const ctx = canvas.getContext("2d");
  const top = Math.max(1, ...values);
  ctx.strokeStyle = "#2563eb"; ctx.lineWidth = 1.5; ctx.beginPath();
  values.forEach((v, i) => {
    const x = i * (canvas.width - 2) / (HISTORY - 1) + 1, y = canvas.height - 2 - v / top * (canvas.height - 4);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  return canvas;
}
function cell(row, html) { const td = row.insertCell(); if (html instanceof Node) td.append(html); else td.innerHTML = html; return td; }

function draw(now) {
  const s = now.samples, dt = previous ? now.time - previous.time : 0, p = previous ? previous.samples : {};
  const total = sum(s, "rproxy_requests_total");
  document.getElementById("total-requests").textContent = total;
  document.getElementById("total-rate").textContent = dt ? ((total - sum(p, "rproxy_requests_total")) / dt).toFixed(1) : "-";
  document.getElementById("in-flight").textContent = sum(s, "rproxy_requests_in_flight");
  document.getElementById("tunnels").textContent = sum(s, "rproxy_tunnels_open");
  const cache = byLabel(s, "rproxy_cache_responses_total", "result");
  const lookups = Object.values(cache).reduce((a, v) => a + v, 0);
  document.getElementById("cache-ratio").textContent = lookups ? Math.round(100 * (cache.HIT || 0) / lookups) + " %" : "-";

  const routes = document.getElementById("routes");
  routes.replaceChildren();
  for (const route of now.routes) {
    const count = sum(s, "rproxy_requests_total", {route: route.name});
    const before = sum(p, "rproxy_requests_total", {route: route.name});
    const errors = sum(s, "rproxy_requests_total", {route: route.name, status: "5xx"})
                 - sum(p, "rproxy_requests_total", {route: route.name, status: "5xx"});
    const rate = dt ? (count - before) / dt : 0;
    (history[route.name] = history[route.name] || new Array(HISTORY).fill(0)).push(rate);
    history[route.name].splice(0, history[route.name].length - HISTORY);
    const row = routes.insertRow();
    row.dataset.route = route.name;
    cell(row, route.name + ' <span class="muted">' + (route.host.join(" ") || "any host") + " " + route.path + "</span>");
    cell(row, dt ? rate.toFixed(1) : "-");
    cell(row, count - before > 0 ? (100 * errors / (count - before)).toFixed(1) + " %" : "-");
    cell(row, previous ? ms(quantile(s, p, route.name, 0.5)) : "-");
    cell(row, previous ? ms(quantile(s, p, route.name, 0.99)) : "-");
    cell(row, spark(history[route.name]));
  }
  const servers = document.getElementById("servers");
  servers.replaceChildren();
  for (const [upstream, list] of Object.entries(now.upstreams)) {
    for (const address of list) {
      const label = address.replace(/^https?:\\/\\//, "");
      const up = (s["rproxy_upstream_server_up"] || []).find(x => x.labels.upstream === upstream && x.labels.server === label);
      const row = servers.insertRow();
      cell(row, upstream); cell(row, address);
      cell(row, up === undefined ? '<span class="muted">no traffic yet</span>'
                : up.value >= 1 ? '<span class="up">up</span>' : '<span class="down">down</span>');
      cell(row, sum(s, "rproxy_upstream_server_in_flight", {upstream: upstream, server: label}));
    }
  }
  document.getElementById("updated").textContent = "updated " + new Date(now.time * 1000).toLocaleTimeString();
  previous = now;
}

const POLL_EVERY = 2000, FIRST_RETRY = 10000, LAST_RETRY = 60000;
let pollTimer = null, retryDelay = FIRST_RETRY;
const mode = document.getElementById("mode");

async function tick() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (response.ok) {
      draw(await response.json());
      mode.dataset.polls = Number(mode.dataset.polls || 0) + 1;
    }
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach the proxy: " + e.message;
  }
}
function connect() {
  const url = new URL("status/live", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url.href);
  socket.onopen = () => {
    retryDelay = FIRST_RETRY;
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
    mode.textContent = "live";
  };
  socket.onmessage = event => {
    draw(JSON.parse(event.data));
    mode.dataset.pushes = Number(mode.dataset.pushes || 0) + 1;
  };
  socket.onclose = fallBack;   // also when it never opened
}
function fallBack() {
  // The socket dropped (a worker restarted, a proxy in between cut it):
  // poll meanwhile, and try the socket again later, less and less often.
  mode.textContent = "polling every " + POLL_EVERY / 1000 + " s";
  if (pollTimer === null) { tick(); pollTimer = setInterval(tick, POLL_EVERY); }
  setTimeout(connect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, LAST_RETRY);
}
if ("WebSocket" in window) connect(); else fallBack();
</script>
</body>
</html>
"""
