// HeteroScale status page: polls /api/v1/status and draws it. Plain JS, no libraries.
"use strict";

const REFRESH_MS = 3000;
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

function groupsTable(groups) {
  if (!groups.length) return el("p", { class: "muted" }, "No Deployment Groups (placement not in use for this service).");
  const sw = (g) => g.level === "s1" ? `${g.s2} / ${g.s1}` : g.level === "s2" ? g.s2 : "cluster";
  const role = (r) => `${r.count} × ${r.gpu_type || "?"}`;
  return el("table", {}, el("tr", {}, ...["group", "switch (level)", "tier", "prefill", "decode", "draining"]
    .map((h) => el("th", {}, h))),
    ...groups.map((g) => el("tr", {}, el("td", {}, g.name), el("td", {}, `${sw(g)} (${g.level})`),
      el("td", {}, g.tier || "–"), el("td", {}, role(g.prefill)), el("td", {}, role(g.decode)),
      el("td", {}, fmt(g.draining)))));
}

const rate = (bps) => (bps === null || bps === undefined) ? "–" : `${fmt(bps / 1e9, 2)} GB/s`;

function bandwidthTable(bw) {
  if (!bw) return el("p", { class: "muted" }, "No KV-transfer probes reported.");
  const ratio = bw.cross_to_same_ratio;
  const summary = el("p", { class: "muted" }, `${bw.pairs.length} pair(s); same-switch median `
    + `${rate(bw.same_switch_median_bytes_per_second)}, cross-switch median `
    + `${rate(bw.cross_switch_median_bytes_per_second)}`
    + (ratio === null || ratio === undefined ? "" : ` (cross/same ${fmt(ratio * 100)}%)`)
    + `; ${bw.flagged.length} flagged`);
  const rows = bw.pairs.slice(0, 20).map((p) => el("tr", { class: p.flagged ? "err" : "" },
    el("td", {}, p.prefill), el("td", {}, p.decode), el("td", {}, p.locality),
    el("td", {}, p.error ? `error: ${p.error}` : rate(p.bytes_per_second)),
    el("td", {}, ms(p.rtt_s)), el("td", { class: "muted" }, p.reason || "")));
  return el("div", {}, summary, el("table", {}, el("tr", {},
    ...["prefill", "decode", "locality", "rate", "rtt", "flag"].map((h) => el("th", {}, h))), ...rows));
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
    kv("TBT p90 / SLO", `${ms(s.latency.tbt_p90_s)} / ${ms(s.slo.tbt_s)}`, "v small"),
    kv("TTFT p90 / SLO", `${ms(s.latency.ttft_p90_s)} / ${ms(s.slo.ttft_s)}`, "v small"),
    kv("fresh decode reports", `${s.reports.fresh_decode} / ${s.reports.expected_decode}`, "v small"),
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
  card.append(el("h2", {}, "KV-transfer bandwidth"), bandwidthTable(s.kv_bandwidth));
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

async function refresh() {
  try {
    const resp = await fetch("/api/v1/status", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const st = await resp.json();
    const badge = $("#leader");
    badge.textContent = st.leader ? `leader: ${st.identity}` : `standby: ${st.identity} (read-only)`;
    badge.className = `badge ${st.leader ? "leader" : "follower"}`;
    $("#meta").textContent = `backend ${st.backend}${st.dry_run ? " (dry run)" : ""}${st.writes ? "" : " · not writing"}`
      + ` · every ${st.interval_s}s · tick ${st.ticks}`
      + (st.last_tick_duration_s !== null ? ` (${fmt(st.last_tick_duration_s * 1000)} ms)` : "");
    const main = $("#services");
    main.replaceChildren(...st.services.map(serviceCard));
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("#updated").textContent = `refresh failed: ${err.message}`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
