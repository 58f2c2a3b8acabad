// HeteroScale status page: polls /api/v1/status and draws it. Plain JS, no libraries.
// Embedded (index.html?embedded=1, as the demo panel does), it does not poll on its own:
// the parent calls window.heteroscaleRender(doc) with the document it fetched, so both
// pages show the same coordinator tick.
"use strict";

const REFRESH_MS = 3000;
const EMBEDDED = new URLSearchParams(window.location.search).has("embedded");
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

const fmt = (x, digits = 0) => (x === null || x === undefined || Number.isNaN(x)) ? "–"
  : Number(x).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
const ms = (s) => (s === null || s === undefined) ? "–" : `${fmt(s * 1000, 0)} ms`;
const time = (t) => new Date(t * 1000).toLocaleTimeString();
const counts = (c) => c ? `${c.prefill}P ${c.decode}D` : "–";

function kv(label, value, cls = "v") {
  return el("div", { class: "kv" }, el("div", { class: "k" }, label), el("div", { class: cls }, value));
}

function sourced(node, title) {
  node.title = title;
  node.classList.add("sourced");
  return node;
}

// "1 / 2" fresh decode reports, with why the others were left out (reports.excluded).
function reportsKv(r) {
  const node = kv("fresh decode reports", `${r.fresh_decode} / ${r.expected_decode}`, "v small");
  const excluded = Object.entries(r.excluded || {}).filter(([, n]) => n > 0);
  if (excluded.length) {
    node.append(el("div", { class: "excluded" }, "excluded: "
      + excluded.map(([why, n]) => `${why.replace(/_/g, " ")} ${n}`).join(", ")));
  }
  return node;
}

function pool(role, p) {
  const moving = p.desired !== null && p.current !== null && p.desired !== p.current;
  const dir = moving ? (p.desired > p.current ? "up" : "down") : "";
  return kv(`${role} current → desired`,
    el("span", {}, fmt(p.current), el("span", { class: "arrow" }, "→"), el("span", { class: dir }, fmt(p.desired))));
}

// A line chart on a canvas: series = [{values:[[t,v]...], color, label}].
function chart(canvas, series, { title, yUnit = "", integer = false }) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 160;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 48, r: 8, t: 18, b: 18 };
  const pts = series.flatMap((s) => s.values.filter((p) => p[1] !== null && p[1] !== undefined));
  ctx.fillStyle = "#6b7385"; ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(title, pad.l, 12);
  canvas.dataset.points = String(pts.length);   // lets a headless browser test see what was drawn
  if (pts.length === 0) { ctx.fillText("no data yet", pad.l, h / 2); return; }
  const t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
  let vmax = Math.max(1e-9, ...pts.map((p) => p[1])) * 1.1;
  if (integer) vmax = Math.max(4, Math.ceil(vmax / 4) * 4);   // whole-instance grid lines
  const x = (t) => pad.l + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / vmax) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#dde1e8"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (vmax * i) / 4, yy = y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(`${fmt(v, integer || v >= 10 ? 0 : 1)}${yUnit}`, 2, yy + 4);
  }
  ctx.fillText(time(t0), pad.l, h - 4);
  const last = time(t1); ctx.fillText(last, w - pad.r - ctx.measureText(last).width, h - 4);
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.8; ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    let started = false;
    for (const [t, v] of s.values) {
      if (v === null || v === undefined) { started = false; continue; }
      if (!started) { ctx.moveTo(x(t), y(v)); started = true; } else { ctx.lineTo(x(t), y(v)); }
    }
    ctx.stroke();
  }
  ctx.setLineDash([]);
}

function legend(items) {
  return el("div", { class: "legend" }, ...items.map(([label, color]) =>
    el("span", {}, el("i", { style: `background:${color}` }), label)));
}

function decisionsTable(decisions) {
  const rows = decisions.slice(0, 12).map((d) => el("tr", {},
    el("td", {}, time(d.at)),
    el("td", {}, el("code", { class: "reason" }, d.reason)),
    el("td", {}, counts(d.from)), el("td", {}, counts(d.to)),
    el("td", { class: "muted" }, d.detail || "")));
  return el("table", {}, el("tr", {}, ...["at", "reason", "from", "to", "detail"].map((h) => el("th", {}, h))), ...rows);
}

function draining(g) {
  if (g.draining === null || g.draining === undefined) return "–";
  const by = g.draining_by_role;
  if (!g.draining || !by) return fmt(g.draining);
  return `${g.draining} (${by.prefill}P ${by.decode}D)`;
}

function groupsTable(groups) {
  if (!groups.length) return el("p", { class: "muted" }, "No Deployment Groups (placement not in use for this service).");
  const sw = (g) => g.level === "s1" ? `${g.s2} / ${g.s1}` : g.level === "s2" ? g.s2 : "cluster";
  const role = (r) => `${r.count} × ${r.gpu_type || "?"}`;
  const withGpus = groups.some((g) => typeof g.gpus === "number");
  const heads = ["group", "switch (level)", "tier", "prefill", "decode", "draining"].concat(withGpus ? ["GPUs held"] : []);
  const table = el("table", { class: "groups" }, el("tr", {}, ...heads.map((h) => el("th", {}, h))),
    ...groups.map((g) => el("tr", {}, el("td", {}, g.name), el("td", {}, `${sw(g)} (${g.level})`),
      el("td", {}, g.tier || "–"), el("td", {}, role(g.prefill)), el("td", {}, role(g.decode)),
      el("td", {}, draining(g)),
      ...(withGpus ? [el("td", {}, typeof g.gpus === "number"
        ? `${g.gpus}${g.gpus_draining ? ` (${g.gpus_draining} draining)` : ""}` : "–")] : []))));
  if (!withGpus) return table;
  // Draining instances hold their GPUs until their last request is done: say so, with the sums.
  const held = groups.reduce((a, g) => a + (g.gpus || 0), 0);
  const leaving = groups.reduce((a, g) => a + (g.gpus_draining || 0), 0);
  return el("div", {}, table, el("p", { class: "muted note", id: "gpu-note" },
    `GPUs held: ${held} = ${held - leaving} by the pools` + (leaving
      ? ` + ${leaving} by draining instances, which keep theirs until their last request is done.` : ".")));
}

function rate(bps) {
  if (bps === null || bps === undefined) return "–";
  for (const [unit, name] of [[1e9, "GB/s"], [1e6, "MB/s"], [1e3, "kB/s"]]) {
    if (Math.abs(bps) >= unit) return `${fmt(bps / unit, 2)} ${name}`;
  }
  return `${fmt(bps)} B/s`;
}

// What the engines' KV connectors moved (services[].kv_transfer: per-instance rows from the
// sidecars' kv_transfer samples). Absent from older coordinators: then nothing is drawn.
function connectorTable(kv) {
  if (!kv || !kv.instances || !kv.instances.length) return null;
  const sums = [["sent", kv.send_bytes_per_second], ["received", kv.receive_bytes_per_second]]
    .filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => `${rate(v)} ${k}`).join(", ");
  const rows = kv.instances.slice(0, 40).map((r) => el("tr", {},
    el("td", {}, r.pod), el("td", {}, r.role), el("td", {}, r.direction || "–"),
    el("td", {}, r.connector ? `${r.source}: ${r.connector}` : (r.source || "–")),
    el("td", {}, rate(r.bytes_per_second)),
    el("td", {}, r.transfers_per_second === null || r.transfers_per_second === undefined ? "–" : `${fmt(r.transfers_per_second, 1)}/s`),
    el("td", {}, ms(r.latency_p90_s))));
  return el("div", { id: "kv-connector" },
    el("p", { class: "muted" }, `Engine connector metrics (what the engines moved): ${sums || "–"}.`),
    el("table", {}, el("tr", {}, ...["instance", "role", "direction", "source", "rate", "transfers", "latency p90"]
      .map((h) => el("th", {}, h))), ...rows));
}

function kvSection(s) {
  const parts = [];
  const connectors = connectorTable(s.kv_transfer);
  if (connectors) parts.push(connectors);
  parts.push(bandwidthTable(s.kv_bandwidth, Boolean(connectors)));
  return el("div", {}, ...parts);
}

function bandwidthTable(bw, haveConnectors = false) {
  if (!bw) {
    return el("p", { class: "muted" }, haveConnectors
      ? "Bandwidth map: none yet (it needs KV probe peers, or engine connector speeds of instances in Deployment Groups)."
      : "No KV-transfer probes or engine connector metrics reported.");
  }
  const ratio = bw.cross_to_same_ratio;
  const summary = el("p", { class: "muted" }, `${bw.pairs.length} pair(s); same-switch median `
    + `${rate(bw.same_switch_median_bytes_per_second)}, cross-switch median `
    + `${rate(bw.cross_switch_median_bytes_per_second)}`
    + (ratio === null || ratio === undefined ? "" : ` (cross/same ${fmt(ratio * 100)}%)`)
    + `; ${bw.flagged.length} flagged`);
  // flagged pairs first, so a slow link is on screen however many pairs there are
  const ordered = bw.pairs.filter((p) => p.flagged).concat(bw.pairs.filter((p) => !p.flagged));
  const groups = (bw.groups || []).map((g) => `${g.group} ${rate(g.median_bytes_per_second)}`).join(", ");
  const rows = ordered.slice(0, 20).map((p) => el("tr", { class: p.flagged ? "err" : "" },
    el("td", {}, p.prefill), el("td", {}, p.decode), el("td", {}, p.group || "–"), el("td", {}, p.locality),
    el("td", {}, p.source === "engine_connector" ? "engine connector" : (p.source || "probe")),
    el("td", {}, p.error ? `error: ${p.error}` : rate(p.bytes_per_second)),
    el("td", {}, ms(p.rtt_s)), el("td", { class: "muted" }, p.reason || "")));
  return el("div", { id: "kv-bandwidth" }, summary,
    groups ? el("p", { class: "muted" }, `median per Deployment Group: ${groups}`) : "",
    el("table", {}, el("tr", {},
      ...["prefill", "decode", "group", "locality", "source", "rate", "rtt", "flag"].map((h) => el("th", {}, h))),
    ...rows));
}

function serviceCard(s) {
  const capacity = s.capacity_tps;
  const load = s.decode_tps;
  const util = (capacity && load !== null) ? load / capacity : null;
  const card = el("section", { class: "card", id: `svc-${s.name}` });
  card.append(el("h2", {}, `${s.name} `, el("span", { class: "muted" }, `(${s.namespace}, P:D ${s.pd_ratio})`)));
  const last = s.last_decision;
  card.append(el("div", { class: "row" },
    pool("prefill", s.prefill), pool("decode", s.decode),
    kv("decode tok/s vs τ×decode", `${fmt(load)} / ${fmt(capacity)}`),
    kv("utilisation", util === null ? "–" : `${fmt(util * 100)}%`),
    kv("target tok/s per decode (τ)", fmt(s.target_decode_tps_per_instance)),
    sourced(kv("TBT p90 (engines) / SLO", `${ms(s.latency.tbt_p90_s)} / ${ms(s.slo.tbt_s)}`, "v small"),
      "Engine-side: each sidecar's p90 of the engine's inter-token-latency histogram over its window, "
      + "averaged over decode instances weighted by their tokens/s. Interpolated inside histogram buckets."),
    sourced(kv("TTFT p90 (engines) / SLO", `${ms(s.latency.ttft_p90_s)} / ${ms(s.slo.ttft_s)}`, "v small"),
      "Engine-side: the sidecars' p90 of the engines' time-to-first-token histograms, weighted by tokens/s."),
    reportsKv(s.reports),
    kv("last reason", last ? el("code", { class: "reason" }, last.reason) : "–", "v small")));
  if (s.last_error) card.append(el("p", { class: "err" }, `last error: ${s.last_error}`));
  const applied = s.last_apply;
  if (applied) {
    const short = applied.shortfall.prefill + applied.shortfall.decode;
    card.append(el("p", { class: short ? "err" : "muted" },
      `last write: ${counts(applied.applied)}${short ? `, short by ${counts(applied.shortfall)}` : ""}`
      + (applied.note ? ` (${applied.note})` : "")));
  }
  if (s.manual_override) card.append(el("p", { class: "muted" }, "Replicas were changed by hand; adopted."));
  const hist = s.history || [];
  const c1 = el("canvas"), c2 = el("canvas");
  card.append(el("div", { class: "charts" },
    el("div", {}, c1, legend([["decode tok/s", "#1a9c5b"], ["smoothed", "#0e5c35"], ["τ × decode", "#8a93a6"]])),
    el("div", {}, c2, legend([["prefill", "#d9822b"], ["decode", "#2b6fd9"], ["desired (dashed)", "#6b7385"]]))));
  card.append(el("h2", {}, "Recent decisions"), decisionsTable(s.decisions || []));
  const short = s.placement_shortfall;
  if (short && short.prefill + short.decode) {
    card.append(el("p", { class: "err" }, `placement shortfall: ${counts(short)} could not be placed`));
  }
  card.append(el("h2", {}, "Deployment Groups"), groupsTable(s.groups || []));
  card.append(el("h2", {}, "KV transfer"), kvSection(s));
  setTimeout(() => {   // after the card is in the document, so the canvas has a size
    chart(c1, [
      { values: hist.map((p) => [p.at, p.decode_tps]), color: "#1a9c5b" },
      { values: hist.map((p) => [p.at, p.smoothed_decode_tps]), color: "#0e5c35", dash: [2, 2] },
      { values: hist.map((p) => [p.at, p.capacity_tps]), color: "#8a93a6", dash: [6, 3] },
    ], { title: "decode tokens/s" });
    chart(c2, [
      { values: hist.map((p) => [p.at, p.prefill]), color: "#d9822b" },
      { values: hist.map((p) => [p.at, p.decode]), color: "#2b6fd9" },
      { values: hist.map((p) => [p.at, p.desired_prefill]), color: "#d9822b", dash: [4, 3] },
      { values: hist.map((p) => [p.at, p.desired_decode]), color: "#2b6fd9", dash: [4, 3] },
    ], { title: "instances", integer: true });
  }, 0);
  return card;
}

function render(st) {
  const badge = $("#leader");
  badge.textContent = st.leader ? `leader: ${st.identity}` : `standby: ${st.identity} (read-only)`;
  badge.className = `badge ${st.leader ? "leader" : "follower"}`;
  $("#meta").textContent = `backend ${st.backend}${st.dry_run ? " (dry run)" : ""}${st.writes ? "" : " · not writing"}`
    + ` · every ${st.interval_s}s · tick ${st.ticks}`
    + (st.last_tick_duration_s !== null ? ` (${fmt(st.last_tick_duration_s * 1000)} ms)` : "");
  const main = $("#services");
  main.replaceChildren(...st.services.map(serviceCard));
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.tick = String(st.ticks);
}

async function refresh() {
  try {
    const resp = await fetch("/api/v1/status", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (err) {
    $("#updated").textContent = `refresh failed: ${err.message}`;
  }
}

window.heteroscaleRender = render;
refresh();
if (!EMBEDDED) setInterval(refresh, REFRESH_MS);
