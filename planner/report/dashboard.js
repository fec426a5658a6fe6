// planner dashboard: draws and links the views from the JSON in #planner-data (see dashboard.py).
"use strict";
const boot = JSON.parse(document.getElementById("planner-data").textContent);
const LIVE = boot.live;
let D = boot, axis = D.budget.metric === "bytes" ? "mb" : D.budget.metric, sel = null, picked = null;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
const AXES = {bits: "bits (code bits per weight)", bpw: "bpw (stored bits per weight)", mb: "MB stored",
  ms: "predicted latency (ms per decode step)"};
const $ = (id) => document.getElementById(id);
const range = (n) => Array.from({length: n}, (_, i) => i);
const uniq = (a) => [...new Set(a)];
const fmt = (v, d = 4) => (v === null || v === undefined ? "—" : Number(v).toPrecision(d));
const nPlans = () => D.plans.id.length;
const methodColor = (m) => COLORS[uniq(D.plans.method).indexOf(m) % COLORS.length];

function hover(i) {
  const P = D.plans;
  return `plan ${P.id[i]}${P.label[i] ? " (" + P.label[i] + ")" : ""}<br>bits ${fmt(P.bits[i])} | bpw ${fmt(P.bpw[i])}` +
    ` | ${fmt(P.mb[i])} MB<br>KL ${fmt(P.kl[i])} | ppl ${fmt(P.ppl[i])}<br>${P.methods[i]} gen ${P.generation[i]}` +
    ` | ${P.tokens[i]} tokens | run ${P.run[i]}` + (P.predicted[i] !== null ? `<br>predicted ${fmt(P.predicted[i])}` : "") +
    (P.ms[i] !== null ? `<br>latency ${fmt(P.ms[i])} ms` : "");
}

function budgetOnAxis() {
  const b = D.budget;
  return b.metric === axis || (b.metric === "bytes" && axis === "mb") ? b.value : null;
}

function scatterTraces() {
  const P = D.plans, traces = [];
  for (const m of uniq(P.method)) {
    const idx = range(nPlans()).filter((i) => P.method[i] === m);
    traces.push({type: "scatter", mode: "markers", name: m, meta: "plans", customdata: idx,
      x: idx.map((i) => P[axis][i]), y: idx.map((i) => P.kl[i]), text: idx.map(hover), hoverinfo: "text",
      marker: {color: methodColor(m), opacity: 0.75, symbol: idx.map((i) => (P.uniform[i] ? "diamond" : "circle")),
        size: idx.map((i) => (P.uniform[i] ? 12 : 7)), line: {color: "black", width: idx.map((i) => (P.uniform[i] ? 1.5 : 0))}}});
  }
  const front = range(nPlans()).filter((i) => P["front_" + axis][i]).sort((a, b) => P[axis][a] - P[axis][b]);
  traces.push({type: "scatter", mode: "lines+markers", name: "front (all methods, within budget)", meta: "front",
    x: front.map((i) => P[axis][i]), y: front.map((i) => P.kl[i]), hoverinfo: "skip",
    marker: {size: 14, symbol: "circle-open", color: "black", line: {width: 2}}, line: {color: "black", dash: "dot", width: 1}});
  traces.push({type: "scatter", mode: "markers", name: "selected", meta: "selected", hoverinfo: "skip", showlegend: false,
    x: sel === null ? [] : [P[axis][sel]], y: sel === null ? [] : [P.kl[sel]],
    marker: {size: 20, symbol: "star", color: "gold", line: {width: 1, color: "black"}}});
  return traces;
}

function scatterLayout() {
  const shapes = [], notes = [], b = budgetOnAxis();
  if (b !== null) {
    shapes.push({type: "line", x0: b, x1: b, y0: 0, y1: 1, yref: "paper", line: {color: "red", dash: "dash"}});
    notes.push({x: b, y: 1, yref: "paper", text: "budget " + D.budget.text, showarrow: false, xanchor: "left", font: {color: "red"}});
  }
  if (picked !== null) shapes.push({type: "line", x0: picked, x1: picked, y0: 0, y1: 1, yref: "paper", line: {color: "#888"}});
  return {xaxis: {title: {text: AXES[axis]}}, yaxis: {type: "log", title: {text: "KL to base model"}}, shapes,
    annotations: notes, legend: {title: {text: "method (click to hide)"}}, margin: {t: 30}, uirevision: axis};
}

function drawScatter() {
  Plotly.react("scatter", scatterTraces(), scatterLayout(), {responsive: true});
  $("counts").textContent = `${nPlans()} plans from ${D.plans.evaluations.reduce((a, b) => a + b, 0)} evaluations` +
    (D.failed ? `, ${D.failed} failed (not plotted)` : "");
}

function cells(values) {
  // per-unit values -> [kinds x blocks] numel-weighted means, and the level ids per cell
  const U = D.units, z = D.kinds.map(() => D.blocks.map(() => 0)), w = D.kinds.map(() => D.blocks.map(() => 0));
  for (let u = 0; u < U.name.length; u++) {
    if (values[u] === null || values[u] === undefined) continue;
    const r = U.kind[u], c = D.blocks.indexOf(U.block[u]);
    z[r][c] += values[u] * U.numel[u];
    w[r][c] += U.numel[u];
  }
  return z.map((row, r) => row.map((v, c) => (w[r][c] > 0 ? v / w[r][c] : null)));
}

function drawPlan() {
  if (sel === null) return;
  const P = D.plans, U = D.units, x = P.x[sel];
  const bits = x.map((l, u) => U.bits[u][l]), text = D.kinds.map(() => D.blocks.map(() => []));
  x.forEach((l, u) => text[U.kind[u]][D.blocks.indexOf(U.block[u])].push(U.levels[u][l]));
  const sparse = U.sparsity ? cells(x.map((l, u) => U.sparsity[u][l])) : null;   // pruning levels: shown too
  Plotly.react("heatmap", [{type: "heatmap", z: cells(bits), x: D.blocks, y: D.kinds, colorscale: "Viridis",
    text: text.map((r) => r.map((t) => uniq(t).join(", "))), texttemplate: "%{z:.2g}", colorbar: {title: {text: "bits"}},
    customdata: sparse, hovertemplate: "%{y} block %{x}<br>%{text}<br>%{z:.3f} bits" +
      (sparse ? ", %{customdata:.1%} sparse" : "") + "<extra></extra>"}],
    {title: {text: `plan ${P.id[sel]}: bits per layer`}, xaxis: {title: {text: "decoder block"}},
      yaxis: {autorange: "reversed"}, height: 140 + 40 * D.kinds.length, margin: {t: 40}}, {responsive: true});
  const rows = x.map((l, u) => `<tr><td>${U.name[u]}</td><td>${U.levels[u][l]}</td><td>${fmt(U.bits[u][l], 3)}</td>` +
    `<td>${fmt(U.bpw[u][l], 4)}</td>` + (U.sparsity ? `<td>${fmt(U.sparsity[u][l], 3)}</td>` : "") + `</tr>`);
  $("levels").innerHTML = `<table><tr><th>unit</th><th>level</th><th>bits</th><th>bpw</th>` +
    (U.sparsity ? "<th>sparsity</th>" : "") + `</tr>${rows.join("")}</table>`;
  drawExperts(x);
  $("selected").dataset.plan = P.id[sel];
  $("selected").textContent = `${P.id[sel]} (${P.methods[sel]}, run ${P.run[sel]}): KL ${fmt(P.kl[sel])}, ` +
    `bits ${fmt(P.bits[sel])}, bpw ${fmt(P.bpw[sel])}, ${fmt(P.mb[sel])} MB` +
    (P.heldout_kl[sel] !== null ? `, held-out KL ${fmt(P.heldout_kl[sel])}` : "");
  $("export").textContent = `planner export ${D.runs[P.run[sel]]} --plan ${P.id[sel]} --format ${$("export-format").value}` +
    ` --out exported-${P.id[sel]}`;
}

function drawExperts(x) {
  // MoE models: each expert's bits (its matrices, by numel) next to its activation frequency
  const M = D.moe, U = D.units;
  $("experts-box").classList.toggle("hidden", !M);
  if (!M) return;
  const bits = M.units.map((row) => row.map((us) => (us.length ? us.reduce((a, u) => a + U.bits[u][x[u]] * U.numel[u], 0) /
    us.reduce((a, u) => a + U.numel[u], 0) : null)));
  const map = {type: "heatmap", x: M.experts, y: M.layers, texttemplate: "%{z:.2g}"};
  const traces = [{...map, z: bits, colorscale: "Viridis", colorbar: {title: {text: "bits"}, x: M.frequency ? 0.45 : 1.02},
    hovertemplate: "layer %{y} expert %{x}<br>%{z:.3f} bits<extra></extra>"}];
  if (M.frequency) traces.push({...map, z: M.frequency, xaxis: "x2", yaxis: "y2", colorscale: "Magma",
    colorbar: {title: {text: "frequency"}}, hovertemplate: "layer %{y} expert %{x}<br>routed %{z:.3f} of tokens<extra></extra>"});
  Plotly.react("experts", traces, {grid: {rows: 1, columns: traces.length, pattern: "independent"},
    xaxis: {title: {text: "expert (bits)"}, dtick: 1}, xaxis2: {title: {text: "expert (activation frequency)"}, dtick: 1},
    yaxis: {title: {text: "layer"}, autorange: "reversed", dtick: 1}, yaxis2: {autorange: "reversed", dtick: 1},
    height: 160 + 24 * M.layers.length, margin: {t: 30}}, {responsive: true});
}

function select(i) {
  sel = i;
  drawPlan();
  const s = $("scatter");
  const k = s.data ? s.data.findIndex((t) => t.meta === "selected") : -1;
  if (k >= 0) Plotly.restyle("scatter", {x: [[D.plans[axis][i]]], y: [[D.plans.kl[i]]]}, [k]);
}

function setupSlider() {
  const v = D.plans[axis].filter((a) => a !== null);
  if (!v.length) return;
  const lo = Math.min(...v), hi = Math.max(...v), s = $("budget");
  s.min = lo; s.max = hi; s.step = (hi - lo) / 500 || 1;
  s.value = budgetOnAxis() !== null ? Math.min(budgetOnAxis(), hi) : hi;
}

function bestUnder(v) {
  let best = null;
  for (let i = 0; i < nPlans(); i++) {
    if (D.plans[axis][i] !== null && D.plans[axis][i] <= v && D.plans.kl[i] !== null && (best === null || D.plans.kl[i] < D.plans.kl[best])) best = i;
  }
  return best;
}

function onSlider() {
  picked = Number($("budget").value);
  const i = bestUnder(picked);
  $("budget-text").textContent = `${fmt(picked)} ${axis}: ` + (i === null ? "no plan" : `best ${D.plans.id[i]}, KL ${fmt(D.plans.kl[i])}`);
  if (i !== null) sel = i;
  drawScatter();
  drawPlan();
}

function lines(curves, key, title, log) {
  return [Object.entries(curves).map(([m, c]) => ({type: "scatter", mode: "lines+markers", name: m, x: c.evals, y: c[key],
    line: {color: methodColor(m)}, text: c.generation.map((g) => "generation " + g)})),
  {xaxis: {title: {text: "evaluations (of that method)"}}, yaxis: {title: {text: title}, type: log ? "log" : "linear"},
    height: 380, margin: {t: 20}}];
}

function drawCurves() {
  Plotly.react("convergence", ...lines(D.convergence, "best", "best KL within budget", true));
  Plotly.react("hypervolume", ...lines(D.hypervolume, "hv", "hypervolume", false));
  const pr = Object.entries(D.predicted);
  $("predicted-box").classList.toggle("hidden", !pr.length);
  if (pr.length) {
    Plotly.react("predicted", pr.map(([m, c]) => ({type: "scatter", mode: "markers", name: m, x: c.predicted, y: c.kl,
      text: c.id.map((id, j) => `plan ${id} ${c.label[j]}`), marker: {color: methodColor(m)}})),
    {xaxis: {title: {text: "predicted damage (proxy)"}, type: "log"}, yaxis: {title: {text: "measured KL"}, type: "log"},
      height: 420, margin: {t: 20}});
  }
  const S = D.sensitivity;
  $("sensitivity-box").classList.toggle("hidden", !S);
  if (S) {
    $("sens-note").textContent = `(${S.score}, run ${S.run}; log10)`;
    const z = cells(S.value.map((v) => (v !== null && v > 0 ? Math.log10(v) : null)));
    Plotly.react("sensitivity", [{type: "heatmap", z, x: D.blocks, y: D.kinds, colorscale: "Magma",
      colorbar: {title: {text: "log10"}}, hovertemplate: "%{y} block %{x}<br>log10 sensitivity %{z:.2f}<extra></extra>"}],
    {xaxis: {title: {text: "decoder block"}}, yaxis: {autorange: "reversed"}, height: 140 + 40 * D.kinds.length, margin: {t: 20}});
  }
}

function renderAll() {
  $("header").innerHTML = D.header;
  const keep = sel === null ? D.best : D.plans.id[sel] ?? D.best;
  const i = D.plans.id.indexOf(keep);
  sel = i >= 0 ? i : (nPlans() ? 0 : null);
  setupSlider();
  drawScatter();
  drawPlan();
  drawCurves();
}

$("export-format").innerHTML = D.export_formats.map((f) => `<option>${f}</option>`).join("");
$("export-format").addEventListener("change", drawPlan);
if (D.plans.ms.some((v) => v !== null)) $("axis").insertAdjacentHTML("beforeend", '<option value="ms">latency</option>');
$("axis").value = axis;
$("axis").addEventListener("change", (e) => { axis = e.target.value; picked = null; setupSlider(); drawScatter(); });
$("budget").addEventListener("input", onSlider);
renderAll();
$("scatter").on("plotly_click", (ev) => {
  const p = ev.points && ev.points[0];
  if (p && p.customdata !== undefined && p.customdata !== null) select(p.customdata);
});
if (LIVE) {
  setInterval(async () => {
    try {
      const d = await (await fetch(LIVE.url, {cache: "no-store"})).json();
      if (d.version !== D.version) {
        const keep = sel === null ? null : D.plans.id[sel];
        D = d;
        sel = keep === null ? null : D.plans.id.indexOf(keep);
        if (sel < 0) sel = null;
        renderAll();
      }
    } catch (e) { /* the server went away: keep what is shown */ }
  }, LIVE.every * 1000);
}
