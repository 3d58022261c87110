# ruff: noqa: E501 - the page's own HTML, CSS and JS lines, in one string
"""The dashboard page: HTML, CSS and JS in one string, shipped in the package (no CDN, no download).

It polls /api/snapshot every few seconds and draws each device's readings as an inline SVG (normal
points blue, anomalies red, the line between them light), beside the model versions with their
aliases, the canary stage, the recent alerts, drift per feature and the lake and device state.
Every value reaches the page as text (textContent, SVG attributes): nothing from the data is parsed
as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Platform dashboard</title>
<style>
  :root { --blue: #1f77b4; --red: #ff0000; --line: #b0c4de; --muted: #667; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #223; background: var(--bg); }
  header { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; padding: 10px 16px; background: #1d2733; color: #fff; }
  header h1 { font-size: 16px; margin: 0 12px 0 0; font-weight: 600; }
  header label { color: #cbd3dc; }
  header select { margin-left: 4px; }
  #live { margin-left: auto; color: #9fe3a8; }
  #live.stale { color: #f3c26b; }
  #errors { background: #fff4e5; color: #7a4b00; padding: 6px 16px; display: none; white-space: pre-wrap; }
  main { display: grid; grid-template-columns: minmax(0, 1fr) 430px; gap: 14px; padding: 14px 16px; }
  section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 12px; margin-bottom: 14px; }
  section h2 { font-size: 13px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
  .chart h3 { font-size: 13px; margin: 0 0 2px; }
  .chart .sub { color: var(--muted); font-weight: normal; }
  svg.readings { width: 100%; height: 170px; display: block; }
  svg .axis { stroke: #ccd; stroke-width: 1; }
  svg text { font-size: 10px; fill: #667; }
  svg polyline { fill: none; stroke: var(--line); stroke-width: 1; }
  circle.normal { fill: var(--blue); }
  circle.anomaly { fill: var(--red); }
  circle.unscored { fill: #999; }
  .legend span { margin-right: 14px; }
  .dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 4px; vertical-align: middle; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid #eef0f3; vertical-align: top; }
  th { color: var(--muted); font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .chip { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11px; margin-right: 3px; background: #e6e9ee; }
  .chip.champion { background: #d5f2dc; color: #145c26; }
  .chip.challenger { background: #ffe8cc; color: #8a4b00; }
  .chip.previous { background: #e6e9ee; color: #445; }
  .bar { height: 8px; background: #e6e9ee; border-radius: 4px; overflow: hidden; }
  .bar > div { height: 100%; background: #f39c12; }
  .drift-yes { color: #c0392b; font-weight: 600; }
  .drift-no { color: #1e8449; }
  .windows span { display: inline-block; width: 14px; height: 14px; margin-right: 2px; border-radius: 2px; background: #8fd19e; }
  .windows span.drift { background: #e74c3c; }
  .windows span.alarm { outline: 2px solid #7b241c; }
  .muted { color: var(--muted); }
  @media (max-width: 1100px) { main { grid-template-columns: 1fr; } }
</style>
</head>
<body>
<header>
  <h1>IoT MLOps platform</h1>
  <label>dataset <select id="dataset"></select></label>
  <label>reading <select id="column"></select></label>
  <label>device <select id="device"><option value="">all</option></select></label>
  <span id="live">connecting…</span>
</header>
<div id="errors"></div>
<main>
  <div>
    <section>
      <h2>Readings over time</h2>
      <div class="legend muted">
        <span><i class="dot" style="background:var(--blue)"></i>normal</span>
        <span><i class="dot" style="background:var(--red)"></i>anomaly (score at or above the model's threshold)</span>
        <span id="scope"></span>
      </div>
      <div id="charts"></div>
    </section>
  </div>
  <div>
    <section id="models"><h2>Model versions</h2><div class="body"></div></section>
    <section id="canary"><h2>Canary</h2><div class="body"></div></section>
    <section id="alerts"><h2>Recent alerts</h2><div class="body"></div></section>
    <section id="drift"><h2>Drift per feature</h2><div class="body"></div></section>
    <section id="state"><h2>Lake and devices</h2><div class="body"></div></section>
  </div>
</main>
<script>
"use strict";
const SVG = "http://www.w3.org/2000/svg";
const MAX_CHARTS = 12;
const params = new URLSearchParams(location.search);
let refreshMs = 2000, timer = null, lastOk = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits === undefined ? 3 : digits);
}
function when(iso) { return iso ? iso.replace("T", " ").replace(/\+00:00$|Z$/, "").slice(0, 19) : "–"; }
function table(headers, rows) {
  const t = el("table");
  t.append(el("tr", {}, ...headers.map(h => el("th", {}, h))));
  for (const r of rows) t.append(el("tr", {}, ...r));
  return t;
}
function fill(id, ...nodes) { const b = document.querySelector(`#${id} .body`); b.replaceChildren(...nodes); }

function chart(device, s, unit, column) {
  const W = 900, H = 170, L = 46, R = 8, T = 8, B = 20;
  const box = el("div", { class: "chart", "data-device": device });
  box.append(el("h3", {}, device, el("span", { class: "sub" }, ` · ${s.t.length} readings · ${s.anomalies} anomalies · last ${when(s.last)}`)));
  const g = svg("svg", { class: "readings", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const vs = s.v.filter(v => v !== null);
  if (!s.t.length || !vs.length) { box.append(el("p", { class: "muted" }, "no readings")); return box; }
  let lo = Math.min(...vs), hi = Math.max(...vs);
  if (hi === lo) { lo -= 1; hi += 1; }
  const t0 = s.t[0], t1 = s.t[s.t.length - 1] === t0 ? t0 + 1 : s.t[s.t.length - 1];
  const x = t => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = v => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  g.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }), svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  for (const [v, yy] of [[hi, T + 8], [lo, H - B]]) { const tx = svg("text", { x: 2, y: yy }); tx.textContent = fmt(v, 2); g.append(tx); }
  const label = svg("text", { x: 2, y: (H - B) / 2 }); label.textContent = unit ? `${column} (${unit})` : column; g.append(label);
  for (const [t, anchor, xx] of [[t0, "start", L], [t1, "end", W - R]]) {
    const tx = svg("text", { x: xx, y: H - 5, "text-anchor": anchor }); tx.textContent = when(new Date(t).toISOString()); g.append(tx);
  }
  const pts = [];
  for (let i = 0; i < s.t.length; i++) if (s.v[i] !== null) pts.push(`${x(s.t[i]).toFixed(1)},${y(s.v[i]).toFixed(1)}`);
  g.append(svg("polyline", { points: pts.join(" ") }));
  const top = [];
  for (let i = 0; i < s.t.length; i++) {
    if (s.v[i] === null) continue;
    const cls = s.f[i] === 1 ? "anomaly" : s.f[i] === 0 ? "normal" : "unscored";
    const c = svg("circle", { class: `pt ${cls}`, cx: x(s.t[i]).toFixed(1), cy: y(s.v[i]).toFixed(1), r: cls === "anomaly" ? 3.6 : 1.7 });
    const tip = svg("title"); tip.textContent = `${when(new Date(s.t[i]).toISOString())}  ${column} ${fmt(s.v[i])}  score ${fmt(s.s[i])}`;
    c.append(tip);
    if (cls === "anomaly") top.push(c); else g.append(c);
  }
  g.append(...top);  // anomalies drawn last, on top
  box.append(g);
  return box;
}

function renderCharts(snap) {
  const charts = document.getElementById("charts");
  const names = Object.keys(snap.series);
  const shown = names.slice(0, MAX_CHARTS);
  document.getElementById("scope").textContent = snap.devices.length > names.length && !params.get("device")
    ? `last ${snap.hours} h; showing ${names.length} of ${snap.devices.length} devices: choose one above` : `last ${snap.hours} h per device`;
  if (snap.loading) { charts.replaceChildren(el("p", { class: "muted" }, "reading the lake and loading the model…")); return; }
  if (!names.length) {
    const why = snap.lake && snap.lake.partitions && snap.lake.partitions.length ? "no readings passed silver's rules" : "nothing in bronze yet for this dataset";
    charts.replaceChildren(el("p", { class: "muted" }, why));
    return;
  }
  charts.replaceChildren(...shown.map(d => chart(d, snap.series[d], snap.unit, snap.column)));
  if (!snap.scored) charts.prepend(el("p", { class: "muted" }, "Not scored: no champion loaded (grey points); see Model versions."));
}

function renderModels(snap) {
  const m = snap.model || {};
  const loaded = m.loaded || {};
  const rows = (m.versions || []).map(v => [
    el("td", { class: "version" }, `v${v.version}`),
    el("td", {}, ...(v.aliases.length ? v.aliases.map(a => el("span", { class: `chip alias ${a}` }, `@${a}`)) : [el("span", { class: "muted" }, "–")])),
    el("td", {}, when(v.created)),
    el("td", {}, Object.entries(loaded).filter(([, ver]) => ver === v.version).map(([r]) => `serving as ${r}`).join(", ")),
  ]);
  const head = el("p", {}, el("b", {}, m.name || ""), m.note ? el("span", { class: "muted" }, ` · ${m.note}`) : "");
  fill("models", head, rows.length ? table(["version", "aliases", "registered", "loaded here"], rows) : el("p", { class: "muted" }, "no versions"));
}

function renderCanary(snap) {
  const c = snap.canary;
  if (!c) { fill("canary", el("p", { class: "muted" }, "rollout state not read yet")); return; }
  const bar = el("div", { class: "bar", title: `${c.weight}% of devices to the challenger` }, el("div", { style: `width:${Math.max(0, Math.min(100, c.weight || 0))}%` }));
  const rows = [
    [el("th", {}, "stage"), el("td", { id: "canary-stage" }, c.status === "running" ? `${c.step_name} (running)` : c.status)],
    [el("th", {}, "weight"), el("td", {}, `${c.weight || 0}% to challenger`, bar)],
    [el("th", {}, "shadow"), el("td", {}, c.shadow || "none")],
    [el("th", {}, "versions"), el("td", {}, c.champion_version || c.challenger_version ? `champion v${c.champion_version || "?"} · challenger v${c.challenger_version || "–"}` : "–")],
    [el("th", {}, "updated"), el("td", {}, when(c.updated_at))],
  ];
  const t = el("table"); for (const r of rows) t.append(el("tr", {}, ...r));
  fill("canary", t, c.note ? el("p", { class: "muted" }, c.note) : "");
}

function renderAlerts(snap) {
  const rows = (snap.alerts || []).map(a => [
    el("td", {}, when(a.ts)), el("td", {}, a.device), el("td", { class: "num" }, fmt(a.value, 2)),
    el("td", { class: "num" }, `${fmt(a.score)} ≥ ${fmt(a.threshold)}`), el("td", {}, `v${a.model_version} ${a.role}`),
  ]);
  fill("alerts", rows.length ? table(["time", "device", snap.column, "score", "model"], rows) : el("p", { class: "muted" }, snap.scored ? "no anomaly in the shown range" : "not scored"));
}

function renderDrift(snap) {
  const d = snap.drift;
  if (!d) { fill("drift", el("p", { class: "muted" }, "drift reports not read yet")); return; }
  const nodes = [];
  if (d.windows && d.windows.length) {
    const strip = el("div", { class: "windows", title: "monitoring windows, oldest first" });
    for (const w of d.windows) strip.append(el("span", { class: (w.drifted ? "drift" : "") + (w.alarm ? " alarm" : ""), title: `${when(w.window_start)}: ${w.status} (${w.n_rows} rows${w.model_version ? `, v${w.model_version}` : ""})` }));
    const latest = d.windows[d.windows.length - 1];
    nodes.push(el("p", {}, "windows ", strip, el("br"),
      el("span", { id: "drift-status", class: latest.alarm || latest.drifted ? "drift-yes" : "drift-no" }, `latest ${when(latest.window_start)}: ${latest.status}`),
      latest.reasons.length ? el("span", { class: "muted" }, ` · ${latest.reasons.join("; ")}`) : ""));
  }
  const limit = (d.thresholds && d.thresholds.wasserstein) || 0.1;
  const rows = (d.features || []).map(f => [
    el("td", {}, f.feature), el("td", { class: f.drifted ? "drift-yes" : "drift-no" }, f.status || (f.drifted ? "drift" : "ok")),
    el("td", { class: "num" }, fmt(f.wasserstein)), el("td", {}, el("div", { class: "bar" }, el("div", { style: `width:${Math.min(100, 100 * (f.wasserstein || 0) / (2 * limit))}%` }))),
    el("td", { class: "num" }, fmt(f.jensen_shannon)), el("td", { class: "num" }, fmt(f.psi)),
  ]);
  if (rows.length) nodes.push(table(["feature", "status", "Wasserstein", "", "JS", "PSI"], rows));
  if (d.note) nodes.push(el("p", { class: "muted" }, d.note));
  fill("drift", ...nodes);
}

function renderState(snap) {
  const l = snap.lake || {};
  const nodes = [el("p", {}, `bronze: ${(l.partitions || []).join(", ") || "–"} · ${l.rows || 0} rows · last commit ${when(l.last_commit)}`,
    el("br"), el("span", { class: "muted" }, `by ${l.last_run_id || "–"}`))];
  const live = snap.live;
  if (live && Object.keys(live).length) {
    const rows = Object.entries(live).map(([d, s]) => [
      el("td", {}, d), el("td", {}, when(s && s.ts)), el("td", { class: "num" }, fmt(s && s.score)),
      el("td", {}, s && s.is_anomaly ? "anomaly" : "normal"), el("td", {}, s ? `v${s.model_version}` : ""),
    ]);
    nodes.push(table(["device (stream state)", "last reading", "score", "", "model"], rows));
  } else if (live === null) {
    nodes.push(el("p", { class: "muted" }, "stream device state: no Redis configured (PLATFORM_STREAM_REDIS_URL)"));
  }
  fill("state", ...nodes);
}

function setOptions(select, values, current, first) {
  const have = Array.from(select.options).map(o => o.value).join("|");
  const want = [...(first !== undefined ? [""] : []), ...values].join("|");
  if (have !== want) select.replaceChildren(...(first !== undefined ? [el("option", { value: "" }, "all")] : []), ...values.map(v => el("option", { value: v }, v)));
  select.value = current || "";
}

function render(snap) {
  setOptions(document.getElementById("column"), snap.columns, snap.column);
  setOptions(document.getElementById("device"), snap.devices, params.get("device") || "", "");
  renderCharts(snap); renderModels(snap); renderCanary(snap); renderAlerts(snap); renderDrift(snap); renderState(snap);
  const errs = Object.entries(snap.errors || {});
  const box = document.getElementById("errors");
  box.style.display = errs.length ? "block" : "none";
  box.textContent = errs.map(([k, v]) => `${k}: ${v}`).join("\n");
  const live = document.getElementById("live");
  live.textContent = `live · data refreshed ${when(snap.updated_at)} UTC`;
  live.className = "";
  document.body.dataset.refreshes = snap.refreshes;
}

async function poll() {
  clearTimeout(timer);
  try {
    const q = new URLSearchParams({ dataset: params.get("dataset") || "" });
    if (params.get("column")) q.set("column", params.get("column"));
    if (params.get("device")) q.set("device", params.get("device"));
    const r = await fetch(`api/snapshot?${q}`, { cache: "no-store" });
    if (!r.ok) throw new Error(`${r.status} ${await r.text()}`);
    render(await r.json());
    lastOk = Date.now();
  } catch (e) {
    const live = document.getElementById("live");
    live.textContent = `not updating: ${e.message}`.slice(0, 200);
    live.className = "stale";
  }
  timer = setTimeout(poll, refreshMs);
}

function choose(key, value) {
  if (value) params.set(key, value); else params.delete(key);
  history.replaceState(null, "", `?${params}`);
  poll();
}

async function start() {
  const r = await fetch("api/datasets", { cache: "no-store" });
  const info = await r.json();
  refreshMs = Math.max(500, 1000 * (info.refresh_seconds || 2));
  if (!params.get("dataset") || !info.datasets.includes(params.get("dataset"))) params.set("dataset", info.datasets[0]);
  setOptions(document.getElementById("dataset"), info.datasets, params.get("dataset"));
  document.getElementById("dataset").onchange = e => { params.delete("device"); params.delete("column"); choose("dataset", e.target.value); };
  document.getElementById("column").onchange = e => choose("column", e.target.value);
  document.getElementById("device").onchange = e => choose("device", e.target.value);
  poll();
}
start();
</script>
</body>
</html>
"""
