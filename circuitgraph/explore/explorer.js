// circuitgraph explorer: draws the study embedded in #study-data (see circuitgraph/explore/study_data.py).
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("study-data").textContent);
  const NAMES = D.circuits.map(c => c.name);
  const TWO = D.circuits.length > 1;
  const POS = D.style.positive, NEG = D.style.negative, OUTSIDE = "#9a9a9a";  // the static figures' colours
  const PORT_X = { q: -0.26, k: 0, v: 0.26 };
  const DASH = { 3: null, 1: "7 4", 2: "1.5 3.5", 0: null };
  const nodeById = new Map(D.nodes.map(n => [n.id, n]));
  const groupOf = new Map();
  Object.entries(D.groups).forEach(([g, info]) => info.nodes.forEach(n => { if (!groupOf.has(n)) groupOf.set(n, g); }));
  const inCircuit = new Map();  // node -> bitmask of circuits it belongs to
  D.edges.forEach(e => { if (e.in) [e.src, e.dst].forEach(n => inCircuit.set(n, (inCircuit.get(n) || 0) | e.in)); });
  Object.values(D.groups).forEach(g => g.nodes.forEach(n => inCircuit.set(n, (inCircuit.get(n) || 0) | 1)));
  const hasEffects = D.edges.some(e => e.eff.some(x => x));
  const hasScores = D.edges.some(e => e.score !== null);

  const S = {
    example: 0, mode: TWO ? "overlay" : "single", show: "all", weight: hasEffects ? "effect" : "score",
    threshold: 0, topn: null, outside: false, collapsed: new Set(), selected: null,
  };

  // ----- formatting ---------------------------------------------------------------------------
  const f3 = x => (x === null || x === undefined) ? "–" : (Math.abs(x) >= 100 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(3));
  const pm = (v, se) => v === null || v === undefined ? "–" : `${f3(v)} ± ${se === null || se === undefined ? "?" : f3(se)}`;
  const esc = s => String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  const kindOf = id => nodeById.has(id) ? nodeById.get(id).kind : "group";

  // ----- edge weights and filtering ---------------------------------------------------------------
  function effectOf(e, c) {
    if (c !== null && e.eff[c]) return { v: e.eff[c][0], se: e.eff[c][1] };
    const x = e.eff.find(x => x);
    return x ? { v: x[0], se: x[1] } : null;
  }
  function weightOf(e, c) {  // one kind at a time, so one threshold never compares effects with scores
    if (S.weight === "effect") { const eff = effectOf(e, c); return eff ? eff.v : null; }
    return e.score;
  }
  function freqOf(e, c) {  // bootstrap inclusion frequency: this panel's circuit's, else the first circuit's that has one
    if (c !== null) return e.freq[c] ?? null;
    return e.freq.find(f => f !== null) ?? null;
  }
  const hasFreq = D.edges.some(e => e.freq.some(f => f !== null));
  function membershipOk(e, c) {
    if (!e.in) return S.outside;
    if (c !== null) return (e.in >> c) & 1;
    return S.show === "all" || (S.show === "both" && e.in === 3) || (S.show === "a" && e.in === 1) || (S.show === "b" && e.in === 2);
  }
  function visibleEdges(c) {
    let es = D.edges.filter(e => membershipOk(e, c)).map(e => ({ e, w: weightOf(e, c) }));
    if (S.threshold > 0) es = es.filter(x => x.w !== null && Math.abs(x.w) >= S.threshold);  // unweighted edges: only unfiltered
    if (S.topn) es = es.sort((a, b) => Math.abs(b.w ?? -1) - Math.abs(a.w ?? -1)).slice(0, S.topn);
    return es;
  }
  function ownerOf(n) { const g = groupOf.get(n); return g && S.collapsed.has(g) ? "group:" + g : n; }
  function drawnEdges(c) {
    const merged = new Map();
    for (const { e, w } of visibleEdges(c)) {
      const src = ownerOf(e.src), dst = ownerOf(e.dst);
      if (src === dst) continue;
      const port = dst.startsWith("group:") ? null : e.port;
      const key = `${src}|${dst}|${port}|${e.in}`;
      const f = freqOf(e, c);
      if (!merged.has(key)) merged.set(key, { src, dst, port, w, mag: w === null ? null : Math.abs(w), in: e.in, list: [e], freq: f, pos: e.pos });
      else {
        const m = merged.get(key); m.list.push(e); if (w !== null) { m.w = (m.w ?? 0) + w; m.mag = (m.mag ?? 0) + Math.abs(w); }
        if (f !== null) m.freq = Math.max(m.freq ?? 0, f);
        m.pos = m.pos && e.pos ? [...new Set([...m.pos, ...e.pos])].sort() : null;  // a merged edge is positional only if all are
      }
    }
    return [...merged.values()];
  }

  // ----- geometry -----------------------------------------------------------------------------------
  const G = D.graph;
  const cols = d3.max(D.nodes, n => n.x) + 1;  // the heads' slots and the MLPs' own column (see layout.py)
  const maxY = d3.max(D.nodes, n => n.y);
  function geometry(width) {
    const slot = Math.max(46, Math.min(110, (width - 70) / cols));
    const rowH = Math.max(36, Math.min(96, slot * 0.9, 860 / (maxY + 1)));  // deep models still fit a screen
    const x = v => 60 + (v + 0.5) * slot, y = v => 24 + (maxY - v) * rowH + rowH / 2;
    return { slot, rowH, x, y, width: 60 + cols * slot + 10, height: (maxY + 1) * rowH + 30, rx: Math.min(26, slot * 0.42), ry: 12 };
  }
  function groupPos(g) {
    const members = D.groups[g].nodes.map(n => nodeById.get(n)).filter(Boolean);
    return { x: d3.mean(members, n => n.x), y: d3.mean(members, n => n.y) };
  }
  function posOf(id) {
    if (id.startsWith("group:")) return groupPos(id.slice(6));
    const n = nodeById.get(id);
    return { x: n.x, y: n.y };
  }

  // ----- tooltip ------------------------------------------------------------------------------------
  const tip = d3.select("#tooltip");
  function showTip(ev, htmlText) { tip.style("display", "block").html(htmlText); moveTip(ev); }
  function moveTip(ev) {
    const w = tip.node().offsetWidth, h = tip.node().offsetHeight;
    tip.style("left", Math.min(ev.clientX + 14, window.innerWidth - w - 6) + "px").style("top", Math.min(ev.clientY + 14, window.innerHeight - h - 6) + "px");
  }
  const hideTip = () => tip.style("display", "none");

  function membershipText(bits) {
    if (!bits) return "outside the circuits";
    if (!TWO) return "in the circuit";
    return bits === 3 ? "in both circuits" : `only in ${esc(NAMES[bits === 1 ? 0 : 1])}`;
  }
  function edgeTip(d) {
    if (d.list.length > 1) return `<b>${d.list.length} edges</b> ${esc(d.src)} → ${esc(d.dst)}<br>sum of weights ${f3(d.w)} (sum |w| ${f3(d.mag)})<br>${membershipText(d.in)}`;
    const e = d.list[0];
    let t = `<b>${esc(e.id)}</b><br>${membershipText(e.in)}`;
    if (e.score !== null) t += `<br>edge score ${f3(e.score)} <span class="note">(the spec's, no spread given)</span>`;
    e.eff.forEach((x, i) => { if (x) t += `<br>effect of removing it from ${esc(NAMES[i])}: ${pm(x[0], x[1])}`; });
    if (e.pos) t += `<br>positions: ${esc(e.pos.join(", "))}`;
    e.freq.forEach((f, i) => { if (f !== null) t += `<br>kept in ${f3(f)} of ${D.circuits[i].n_resamples ?? "?"} bootstrap resamples` + (TWO ? ` (${esc(NAMES[i])})` : ""); });
    if (e.pos_freq) t += `<br>by position: ${esc(Object.entries(e.pos_freq).map(([p, f]) => `${p} ${f3(f)}`).join(", "))}`;
    return t;
  }
  function nodeTip(id) {
    if (id.startsWith("group:")) {
      const g = id.slice(6);
      return `<b>${esc(g)}</b> (collapsed group)<br>${esc(D.groups[g].nodes.join(", "))}`;
    }
    let t = `<b>${esc(id)}</b>` + (groupOf.has(id) ? ` <span class="note">${esc(groupOf.get(id))}</span>` : "");
    const dla = D.dla.nodes[id];
    if (dla) t += `<br>direct logit attribution ${pm(dla[0], dla[1])}`;
    D.circuits.forEach(c => { const x = c.node_effects[id]; if (x) t += `<br>effect of removing it from ${esc(c.name)}: ${pm(x[0], x[1])}`; });
    if (!inCircuit.get(id) && id !== "input" && id !== "logits") t += `<br><span class="note">not in ${TWO ? "either circuit" : "the circuit"}</span>`;
    return t;
  }

  // ----- the circuit panel(s) ------------------------------------------------------------------------
  function panelsToDraw() {
    if (S.mode === "side") return D.circuits.map((c, i) => i);
    if (S.mode === "single") return [0];
    return [null];
  }
  function drawPanels() {
    const host = d3.select("#panels");
    host.selectAll("*").remove();
    const list = panelsToDraw();
    const width = Math.max(360, (host.node().clientWidth - 10 * (list.length - 1)) / list.length);
    let shown = 0, total = 0;
    list.forEach(c => {
      const panel = host.append("div").attr("class", "panel");
      const title = c === null ? (TWO ? `${NAMES[0]} and ${NAMES[1]}, overlaid` : NAMES[0]) : NAMES[c];
      const sc = c === null ? null : D.circuits[c].score;
      panel.append("h2").html(`<b>${esc(title)}</b>` + (sc ? ` · faithfulness ${pm(sc.faithfulness, sc.faithfulness_se)}, necessity ${pm(sc.necessity, sc.necessity_se)}, ${D.circuits[c].n_edges} edges` : ""));
      const r = drawCircuit(panel, c, width);
      shown += r.shown; total += r.total;
    });
    d3.select("#edge-count").text(`showing ${shown} of ${total} embedded edges` + (list.length > 1 ? " (both panels)" : ""));
  }

  function drawCircuit(panel, c, width) {
    const geo = geometry(width);
    const svg = panel.append("svg").attr("id", c === null ? "circuit-overlay" : `circuit-${c}`).attr("class", "circuit")
      .attr("viewBox", `0 0 ${geo.width} ${geo.height}`).attr("height", geo.height * Math.min(1, width / geo.width));
    const root = svg.append("g");
    svg.call(d3.zoom().scaleExtent([0.3, 8]).on("zoom", ev => root.attr("transform", ev.transform)));
    const base = D.edges.filter(e => membershipOk(e, c)).length;
    const edges = drawnEdges(c);
    // layer labels
    const ranks = d3.groups(D.nodes.filter(n => n.kind === "head" || n.kind === "mlp"), n => n.y);
    root.append("g").selectAll("text").data(ranks).join("text").attr("class", "layer-label").attr("x", 4).attr("y", d => geo.y(d[0]) + 3)
      .text(d => d[1][0].kind === "mlp" && !G.parallel ? `MLP ${d[1][0].layer}` : `layer ${d[1][0].layer}`);
    // nodes: every graph node (faint when outside the circuits shown), collapsed groups as one node each
    const shownIds = new Set(edges.flatMap(d => [d.src, d.dst]));
    const inPanel = id => c === null ? !!inCircuit.get(id) : ((inCircuit.get(id) || 0) >> c) & 1;
    const nodes = D.nodes.filter(n => !S.collapsed.has(groupOf.get(n.id)))
      .map(n => ({ id: n.id, kind: n.kind, x: n.x, y: n.y, on: n.kind === "input" || n.kind === "logits" || inPanel(n.id) || shownIds.has(n.id) }));
    [...S.collapsed].forEach(g => { const p = groupPos(g); nodes.push({ id: "group:" + g, kind: "group", x: p.x, y: p.y, on: true }); });
    const mag = d3.max(edges, d => d.mag) || 1;
    const widthOf = d => d.mag === null ? 1.2 : 0.8 + 5.2 * Math.sqrt(d.mag / mag);
    const anchor = (id, port, end) => {
      const p = posOf(id), k = kindOf(id);
      const x = geo.x(p.x) + (port && k === "head" ? PORT_X[port] * geo.rx * 2 : 0);
      const dy = k === "head" ? geo.ry : k === "group" ? 14 : 11;
      return [x, geo.y(p.y) + (end ? dy + (port && k === "head" ? 3 : 0) : -dy)];
    };
    const path = d => {
      const [x0, y0] = anchor(d.src, null, false), [x1, y1] = anchor(d.dst, d.port, true);
      const bend = Math.max(18, (y0 - y1) * 0.45);
      return `M${x0},${y0} C${x0},${y0 - bend} ${x1},${y1 + bend} ${x1},${y1}`;
    };
    root.append("g").attr("class", "edges").selectAll("path").data(edges.sort((a, b) => (a.mag ?? 0) - (b.mag ?? 0))).join("path")
      .attr("class", d => "edge" + (d.in ? "" : " outside")).attr("data-id", d => d.list.length === 1 ? d.list[0].id : `${d.src}->${d.dst}`)
      .attr("data-w", d => d.w).attr("d", path).attr("stroke-width", widthOf)
      .attr("stroke", d => d.w === null ? OUTSIDE : d.w < 0 ? NEG : POS)
      .attr("stroke-opacity", d => !d.in ? 0.3 : d.freq === null ? 0.8 : 0.12 + 0.83 * d.freq)  // opacity: inclusion frequency
      .attr("stroke-dasharray", d => c === null && TWO ? DASH[d.in] : null)
      .on("mouseenter", (ev, d) => showTip(ev, edgeTip(d))).on("mousemove", moveTip).on("mouseleave", hideTip);
    const mid = d => {  // the middle of the edge's curve (its symmetric Bezier at t = 1/2), where its positions are written
      const [x0, y0] = anchor(d.src, null, false), [x1, y1] = anchor(d.dst, d.port, true);
      return [(x0 + x1) / 2, (y0 + y1) / 2];
    };
    root.append("g").attr("class", "edge-labels").selectAll("text").data(edges.filter(d => d.pos)).join("text")
      .attr("class", "edge-label").attr("data-id", d => d.list.length === 1 ? d.list[0].id : `${d.src}->${d.dst}`)
      .attr("x", d => mid(d)[0]).attr("y", d => mid(d)[1]).attr("text-anchor", "middle").text(d => d.pos.join(","));
    const g = root.append("g").attr("class", "nodes").selectAll("g").data(nodes).join("g")
      .attr("class", d => `node ${d.kind}` + (d.on ? "" : " off") + (S.selected === d.id ? " selected" : ""))
      .attr("data-id", d => d.id).attr("transform", d => `translate(${geo.x(d.x)},${geo.y(d.y)})`)
      .on("mouseenter", (ev, d) => showTip(ev, nodeTip(d.id))).on("mousemove", moveTip).on("mouseleave", hideTip)
      .on("click", (ev, d) => { if (d.kind === "group") toggleGroup(d.id.slice(6)); else select(d.id); });
    const fill = d => d.kind === "group" ? D.groups[d.id.slice(6)].color : groupOf.has(d.id) ? D.groups[groupOf.get(d.id)].color :
      d.kind === "head" ? "#fff" : d.kind === "mlp" ? "#eee" : "#d9d9d9";
    g.filter(d => d.kind === "head").append("ellipse").attr("class", "shape").attr("rx", geo.rx).attr("ry", geo.ry).attr("fill", fill);
    g.filter(d => d.kind !== "head").append("rect").attr("class", "shape")
      .attr("x", d => d.kind === "group" ? -geo.rx * 2 : d.kind === "mlp" ? -geo.rx : -36)
      .attr("width", d => d.kind === "group" ? geo.rx * 4 : d.kind === "mlp" ? geo.rx * 2 : 72)
      .attr("y", d => d.kind === "group" ? -14 : -11).attr("height", d => d.kind === "group" ? 28 : 22)
      .attr("rx", d => d.kind === "group" ? 9 : 3).attr("fill", fill);
    g.append("text").attr("text-anchor", "middle").attr("dy", "0.35em")
      .text(d => d.kind === "group" ? d.id.slice(6) : d.kind === "head" && geo.rx < 22 ? d.id.split(".")[1] : d.id)
      .style("font-weight", d => d.kind === "group" ? "bold" : null);
    // q/k/v ports of heads that receive an edge here
    const ports = new Set(edges.filter(d => d.port && kindOf(d.dst) === "head").map(d => d.dst + "<" + d.port));
    const heads = g.filter(d => d.kind === "head");
    ["q", "k", "v"].forEach(p => {
      const h = heads.filter(d => ports.has(d.id + "<" + p));
      h.append("circle").attr("class", "port").attr("cx", PORT_X[p] * geo.rx * 2).attr("cy", geo.ry + 2).attr("r", 3).attr("fill", D.style.ports[p]);
      h.append("text").attr("class", "port-label").attr("x", PORT_X[p] * geo.rx * 2).attr("y", geo.ry + 12).attr("text-anchor", "middle").text(p);
    });
    return { shown: edges.reduce((a, d) => a + d.list.length, 0), total: base };
  }

  function toggleGroup(gname) {
    if (S.collapsed.has(gname)) S.collapsed.delete(gname); else S.collapsed.add(gname);
    d3.select("#groups").selectAll("input").property("checked", d => S.collapsed.has(d));
    drawPanels();
  }

  // ----- detail panel -------------------------------------------------------------------------------
  function select(id) {
    S.selected = id;
    d3.selectAll(".node").classed("selected", d => d.id === id);
    drawDetail();
  }
  function ex() { return D.examples[S.example]; }

  function drawDetail() {
    const host = d3.select("#detail");
    host.selectAll("*").remove();
    const id = S.selected;
    if (!id) { host.append("p").attr("class", "hint").text("Click a head or an MLP to see what it does on the chosen example."); return; }
    const kind = kindOf(id);
    host.append("h3").text(id + (groupOf.has(id) ? ` · ${groupOf.get(id)}` : ""));
    const rows = [];
    D.circuits.forEach(c => { const x = c.node_effects[id]; rows.push([`effect of removing it from ${c.name}`, x ? pm(x[0], x[1]) : (kind === "input" || kind === "logits" ? "always in" : "not in it")]); });
    const dla = D.dla.nodes[id];
    if (dla) {
      rows.push(["direct logit attribution, this example", f3(ex().dla[id])]);
      rows.push([`direct logit attribution, mean of ${D.n_examples}`, pm(dla[0], dla[1])]);
    }
    kv(host, rows);
    host.append("p").attr("class", "note").text(`Effects: drop in faithfulness (${D.metric}, ${D.ablation} ablation) when every edge into or out of the node is removed; ± standard error over examples.`);
    if (kind === "head") drawHead(host, id);
    if (kind === "mlp") drawMlp(host, id);
  }
  function kv(host, rows) {
    const t = host.append("table").attr("class", "kv");
    rows.forEach(r => { const tr = t.append("tr"); tr.append("td").text(r[0]); tr.append("td").attr("class", "num").text(r[1]); });
    return t;
  }
  function drawHead(host, id) {
    const [L, H] = id.slice(1).split(".h").map(Number);
    host.append("h4").text("head-type scores");
    const kinds = Object.keys(D.heads.scores).filter(k => k !== "dla");
    bars(host, kinds.map(k => ({ label: k.replace("_", " "), v: D.heads.scores[k][L][H], title: D.heads.notes[k] })), [-1, 1], "head-scores");
    host.append("h4").text(`attention pattern, example ${S.example}`);
    const pat = ex().patterns[id];
    if (!pat) { host.append("p").attr("class", "note").text(`Not embedded: this page keeps the patterns of the circuits' heads only (more than ${D.limits.pattern_heads} heads in the model).`); return; }
    heatmap(host, pat, ex().tokens);
  }
  function drawMlp(host, id) {
    const nEx = ex().neurons[id], all = D.neurons[id];
    host.append("h4").text(`top neurons at the last position, example ${S.example}`);
    if (!nEx) { host.append("p").attr("class", "note").text("Not embedded: this page keeps the neurons of the circuits' MLPs only."); return; }
    const lo = Math.min(0, d3.min(nEx, d => d[1]));
    bars(host, nEx.map(d => ({ label: `#${d[0]}`, v: d[1] })), [lo, d3.max(nEx, d => d[1]) || 1], "neurons");
    host.append("h4").text(`top neurons over the dataset (mean activation, max)`);
    kv(host, all.map(d => [`#${d[0]}`, `${f3(d[1])}   (max ${f3(d[2])})`]));
  }
  function bars(host, items, domain, id) {
    const w = 340, rowH = 17, lw = 110;
    const svg = host.append("svg").attr("id", id).attr("width", w).attr("height", items.length * rowH + 4);
    const x = d3.scaleLinear().domain(domain).range([lw, w - 50]);
    const g = svg.selectAll("g").data(items).join("g").attr("transform", (d, i) => `translate(0,${i * rowH + 2})`);
    g.append("title").text(d => d.title || "");
    g.append("text").attr("x", lw - 6).attr("y", 11).attr("text-anchor", "end").style("font-size", "11px").text(d => d.label);
    g.append("rect").attr("x", d => x(Math.min(0, d.v ?? 0))).attr("y", 2).attr("height", rowH - 5)
      .attr("width", d => Math.abs(x(d.v ?? 0) - x(0))).attr("fill", d => (d.v ?? 0) < 0 ? NEG : POS);
    g.append("text").attr("x", w - 46).attr("y", 11).style("font-size", "11px").text(d => f3(d.v));
    svg.append("line").attr("x1", x(0)).attr("x2", x(0)).attr("y1", 0).attr("y2", items.length * rowH + 4).attr("stroke", "#888");
  }
  function heatmap(host, pat, tokens) {
    const n = pat.length, lw = 78, cell = Math.max(7, Math.min(22, 260 / n));
    const svg = host.append("svg").attr("id", "attention").attr("width", lw + n * cell + 8).attr("height", lw + n * cell + 8);
    const color = d3.scaleSequential(d3.interpolateBlues).domain([0, 1]);
    const g = svg.append("g").attr("transform", `translate(${lw},4)`);
    pat.forEach((row, q) => row.forEach((v, k) => {
      if (k > q) return;
      g.append("rect").attr("class", "cell").attr("x", k * cell).attr("y", q * cell).attr("width", cell - 0.5).attr("height", cell - 0.5)
        .attr("fill", color(v ?? 0)).on("mouseenter", ev => showTip(ev, `query ${esc(tokens[q])} → key ${esc(tokens[k])}: ${f3(v)}`))
        .on("mousemove", moveTip).on("mouseleave", hideTip);
    }));
    const fs = Math.min(10, cell - 1) + "px";
    g.selectAll("text.q").data(tokens).join("text").attr("class", "q").attr("x", -4).attr("y", (d, i) => i * cell + cell / 2).attr("dy", "0.35em")
      .attr("text-anchor", "end").style("font-size", fs).text(d => d);
    g.selectAll("text.k").data(tokens).join("text").attr("class", "k").attr("transform", (d, i) => `translate(${i * cell + cell / 2},${n * cell + 4}) rotate(60)`)
      .style("font-size", fs).text(d => d);
    svg.attr("height", n * cell + lw + 10);
    host.append("p").attr("class", "note").text("rows: query position, columns: key position (the model's own tokens).");
  }

  // ----- prompt view --------------------------------------------------------------------------------
  function drawPrompt() {
    const host = d3.select("#prompt");
    host.selectAll("*").remove();
    const e = ex();
    const left = host.append("div");
    left.append("h3").text(`Example ${e.index}: answer "${e.answer}" vs "${e.wrong}"`);
    const ig = e.ig;
    const hi = d3.max(ig.attributions, v => Math.abs(v ?? 0)) || 1;
    const color = d3.scaleDiverging(d3.interpolateRdBu).domain([hi, 0, -hi]);
    left.append("div").attr("class", "tokens").attr("id", "saliency").selectAll("span").data(e.tokens).join("span")
      .attr("class", (d, i) => "token" + (e.differs[i] ? " differs" : "")).style("background", (d, i) => color(ig.attributions[i] ?? 0))
      .style("color", (d, i) => Math.abs(ig.attributions[i] ?? 0) > 0.6 * hi ? "#fff" : "#000")
      .text(d => d.replace(/^\d+ /, "")).on("mouseenter", (ev, d) => {
        const i = e.tokens.indexOf(d);
        showTip(ev, `${esc(d)}<br>integrated gradient ${f3(ig.attributions[i])}` + (e.differs[i] ? "<br>differs in the corrupted prompt" : ""));
      }).on("mousemove", moveTip).on("mouseleave", hideTip);
    left.append("p").attr("class", "note").text(`Integrated gradients of ${ig.metric} (${ig.steps} steps, corrupted prompt as baseline; underlined: tokens that differ). ` +
      `They add up to ${f3(ig.delta)} = clean − corrupted, up to ${f3(ig.completeness_error)}.`);
    if (e.corrupted) left.append("p").attr("class", "note").text(`corrupted: ${e.corrupted}`);
    const rows = [];
    D.circuits.forEach((c, i) => {
      rows.push([`${c.name}: faithfulness`, pm(c.score.faithfulness, c.score.faithfulness_se)]);
      rows.push([`${c.name}: necessity`, pm(c.score.necessity, c.score.necessity_se)]);
    });
    left.append("h3").text(`Circuit scores (${D.metric}, ${D.ablation} ablation, ${D.n_examples} examples, ± s.e.)`);
    kv(left, rows).attr("id", "scores");
    D.circuits.forEach(c => c.score.warnings.forEach(w => left.append("p").attr("class", "warning").text(`${c.name}: ${w}`)));
    const m = [["clean", f3(e.metric.clean)], ["corrupted", f3(e.metric.corrupted)]];
    D.circuits.forEach((c, i) => m.push([`${c.name} patched in`, f3(e.metric.circuits[i])]));
    left.append("h3").text(`This example's ${D.metric}`);
    kv(left, m);
    drawLens(host.append("div"), e.lens);
  }
  function drawLens(host, lens) {
    host.append("h3").text("Logit lens (last position)");
    const w = 440, h = 220, m = { l: 44, r: 12, t: 10, b: 46 };
    const svg = host.append("svg").attr("id", "lens").attr("width", w).attr("height", h);
    const x = d3.scalePoint().domain(lens.labels).range([m.l, w - m.r]).padding(0.3);
    const y = d3.scaleLinear().domain([0, 1]).range([h - m.b, m.t]);
    svg.append("g").attr("transform", `translate(0,${h - m.b})`).call(d3.axisBottom(x));
    svg.append("g").attr("transform", `translate(${m.l},0)`).call(d3.axisLeft(y).ticks(5));
    svg.append("text").attr("transform", `translate(12,${(h - m.b) / 2}) rotate(-90)`).attr("text-anchor", "middle").style("font-size", "11px").text("probability");
    [["answer_prob", POS, "answer"], ["wrong_prob", NEG, "wrong answer"]].forEach(([k, col, label], j) => {
      const pts = lens.labels.map((l, i) => [x(l), y(lens[k][i] ?? 0)]);
      svg.append("path").attr("d", d3.line()(pts)).attr("fill", "none").attr("stroke", col).attr("stroke-width", 2);
      svg.append("g").selectAll("circle").data(pts).join("circle").attr("cx", d => d[0]).attr("cy", d => d[1]).attr("r", 3).attr("fill", col);
      svg.append("text").attr("x", m.l + 8).attr("y", m.t + 12 + j * 14).attr("fill", col).style("font-size", "11px").text("● " + label);
    });
    svg.append("g").selectAll("text").data(lens.labels).join("text").attr("x", d => x(d)).attr("y", h - m.b + 30).attr("text-anchor", "middle")
      .style("font-size", "9px").attr("fill", "#555").text((d, i) => JSON.stringify(lens.top[i]).slice(1, -1).slice(0, 10));
    host.append("p").attr("class", "note").text("Grey labels: the top token at each state.");
  }

  // ----- controls -----------------------------------------------------------------------------------
  function setup() {
    d3.select("#title").text(D.title);
    d3.select("#subtitle").text(`${D.model} · ${D.graph.n_layers} layers × ${D.graph.n_heads} heads · ${D.metric}, ${D.ablation} ablation · ${D.n_examples} examples`);
    d3.select("#example").selectAll("option").data(D.examples).join("option").attr("value", (d, i) => i)
      .text(d => `${d.index}: ${(d.clean || d.tokens.join(" ")).slice(-70)}`);
    d3.select("#example").on("change", ev => { S.example = +ev.target.value; drawDetail(); drawPrompt(); });
    if (!TWO) { d3.select("#mode-box").remove(); d3.select("#show-box").remove(); }
    else {
      d3.select("#mode").on("change", ev => { S.mode = ev.target.value; d3.select("#show-box").style("display", S.mode === "overlay" ? null : "none"); drawPanels(); });
      d3.select("#show").selectAll("option").data([["all", "all"], ["both", "in both"], ["a", `only in ${NAMES[0]}`], ["b", `only in ${NAMES[1]}`]])
        .join("option").attr("value", d => d[0]).text(d => d[1]);
      d3.select("#show").on("change", ev => { S.show = ev.target.value; drawPanels(); });
    }
    d3.select("#weight").property("value", S.weight).on("change", ev => { S.weight = ev.target.value; setThresholdRange(); drawPanels(); });
    if (!hasEffects) d3.select("#weight option[value=effect]").attr("disabled", true);
    if (!hasScores) d3.select("#weight option[value=score]").attr("disabled", true);
    d3.select("#threshold").on("input", ev => { S.threshold = +ev.target.value; d3.select("#threshold-value").text(f3(S.threshold)); drawPanels(); });
    d3.select("#topn").on("input", ev => { const v = parseInt(ev.target.value, 10); S.topn = v > 0 ? v : null; drawPanels(); });
    if (!D.edges.some(e => !e.in)) d3.select("#outside-box").remove();
    d3.select("#outside").on("change", ev => { S.outside = ev.target.checked; setThresholdRange(); drawPanels(); });
    const gs = d3.select("#groups").selectAll("label").data(Object.keys(D.groups)).join("label").attr("title", "collapse this group into one node");
    gs.append("input").attr("type", "checkbox").on("change", (ev, g) => toggleGroup(g));
    gs.append("span").attr("class", "swatch").style("background", g => D.groups[g].color);
    gs.append("span").text(g => g);
    if (Object.keys(D.groups).length) d3.select("#groups").insert("span", ":first-child").text("collapse: ");
    setThresholdRange();
    legend();
    const L = D.limits;
    d3.select("#limits").text(`Embedded: the circuits' ${D.edges.filter(e => e.in).length} edges and the ${D.edges.filter(e => !e.in).length} best-scored others ` +
      `(limit ${L.top_edges}) of ${D.graph.n_edges} in the graph; ${D.examples.length} of ${D.n_examples} examples (limit ${L.examples}); ` +
      `attention patterns of ${L.pattern_heads_embedded.length} heads; neurons of ${L.neuron_mlps_embedded.length} MLPs (top ${L.neurons}); ` +
      `per-edge effects for circuits up to ${L.effect_edges} edges; node and edge effects on the first ${L.effect_rows_used} of ${D.n_examples} examples (limit ${L.effect_rows}). ` +
      `Model: ${D.model}${D.quantization ? ` (weights: ${D.quantization})` : ""}. Made by circuitgraph explore.`);
    window.addEventListener("resize", () => drawPanels());
  }
  function setThresholdRange() {
    const ws = D.edges.filter(e => e.in || S.outside).map(e => Math.abs(weightOf(e, null) ?? 0));
    const hi = d3.max(ws) || 1;
    d3.select("#threshold").attr("max", hi).attr("step", hi / 500);
    if (S.threshold > hi) { S.threshold = 0; d3.select("#threshold").property("value", 0); d3.select("#threshold-value").text("0"); }
  }
  function legend() {
    const host = d3.select("#legend");
    const item = (svgFn, text) => { const s = host.append("span"); svgFn(s.append("svg").attr("width", 34).attr("height", 12)); s.append("span").text(" " + text); };
    const line = (col, dash, w) => s => s.append("line").attr("x1", 2).attr("x2", 32).attr("y1", 6).attr("y2", 6).attr("stroke", col).attr("stroke-width", w || 2.5).attr("stroke-dasharray", dash);
    item(line(POS), "positive");
    item(line(NEG), "negative");
    if (TWO) { item(line("#555", null), "in both (overlay)"); item(line("#555", DASH[1]), `only in ${NAMES[0]}`); item(line("#555", DASH[2]), `only in ${NAMES[1]}`); }
    item(line(OUTSIDE, null, 1.5), "no weight of the chosen kind");
    if (D.edges.some(e => !e.in)) item(line(POS + "4d", null, 2.5), "faint: outside the circuits");
    if (hasFreq) host.append("span").text(`opacity: how often bootstrap resamples kept the edge (${D.circuits.map(c => c.n_resamples).filter(n => n).join(" / ")} resamples)`);
    if (D.edges.some(e => e.pos)) host.append("span").text("label on an edge: the token positions it is patched at");
    host.append("span").text("width: |weight| (measured effect: drop in faithfulness when removed; edge score: the spec's, e.g. attribution); q, k, v: the dots under a head where edges into its query, key and value inputs end (the static figures' port colours); scroll to zoom, drag to pan.");
  }

  setup();
  drawPanels();
  drawPrompt();
  drawDetail();
  window.explorer = { data: D, state: S, redraw: drawPanels, select };
  document.body.dataset.ready = "1";
})();
