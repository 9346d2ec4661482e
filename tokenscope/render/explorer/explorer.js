// tokenscope explorer: the data set, one image, or one image under every method of a comparison.
// Everything the page shows comes from the traces tokenscope wrote (see render/explorer/__init__.py);
// it makes no network request of its own: inline data, or the run folder it is served from.
"use strict";
(function () {
  const GATE_COLOURS = ["#d1495b", "#edae49", "#66a182", "#00798c", "#8d6a9f", "#30638e"];
  const PAGE_ROWS = 500;
  const state = { view: "dataset", image: null, block: 1, hoverPatch: -1, selected: null,
                  layers: { merges: true, exits: true, confidence: false, prediction: false, truth: false, errors: false },
                  sortKey: null, sortDir: 1, filter: "", shown: PAGE_ROWS };
  const cache = {};
  let DATA = null;
  let current = null; // the open image's payload

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));

  // ---- data -----------------------------------------------------------------------------------
  async function boot() {
    try {
      const raw = JSON.parse($("ts-data").textContent);
      if (raw.lazy) {
        const r = await fetch(raw.lazy + "/index.json");
        if (!r.ok) throw new Error("index: HTTP " + r.status);
        DATA = { index: await r.json(), images: {}, lazy: raw.lazy };
      } else {
        DATA = { index: raw.index, images: raw.images, lazy: null };
      }
    } catch (e) {
      document.body.insertAdjacentHTML("afterbegin", '<div class="error">cannot read this explorer\'s data: ' + esc(e.message) + "</div>");
      document.body.dataset.ready = "error";
      return;
    }
    $("title").textContent = DATA.index.title || "tokenscope explorer";
    renderDataset();
    if (DATA.index.open) await openImage(DATA.index.open);
    document.body.dataset.ready = "1";
  }

  async function payload(name) {
    if (cache[name]) return cache[name];
    let p;
    if (!DATA.lazy) {
      p = DATA.images[name] || { name: name, error: name + ": no data for this image in the page" };
    } else {
      try {
        const r = await fetch(DATA.lazy + "/images/" + encodeURIComponent(name) + ".json");
        if (!r.ok) throw new Error("HTTP " + r.status);
        p = await r.json();
      } catch (e) {
        p = { name: name, error: name + ": its data cannot be loaded (" + e.message + ")" };
      }
    }
    for (const panel of p.panels || []) {
      if (panel.error) continue;
      panel.T = panel.level.length;
      panel.gh = panel.grid[0];
      panel.gw = panel.grid[1];
      panel.top = Int32Array.from(panel.top);
      panel.coverCache = {};
    }
    return (cache[name] = p);
  }

  // which token covers each patch as block k begins (merges inside earlier blocks applied)
  function coverAt(panel, k) {
    if (panel.coverCache[k]) return panel.coverCache[k];
    const T = panel.T, step = new Int32Array(T);
    for (let i = 0; i < T; i++) step[i] = panel.mat[i] > 0 && panel.mat[i] < k ? panel.minto[i] : i;
    for (let round = 0; round < 40; round++) { // pointer doubling: merge chains end in O(log T) rounds
      let changed = false;
      for (let i = 0; i < T; i++) { const s = step[step[i]]; if (s !== step[i]) { step[i] = s; changed = true; } }
      if (!changed) break;
    }
    const cover = new Int32Array(panel.top.length);
    for (let j = 0; j < cover.length; j++) cover[j] = step[panel.top[j]];
    return (panel.coverCache[k] = cover);
  }

  // a token is in the sequence at block k if it exits at a gate after block k or later
  // (k = depth + 1 shows the tokens that went through every block)
  const live = (panel, t, k) => panel.exit[t] >= Math.min(k, panel.depth);

  function liveCount(panel, k) {
    const cover = coverAt(panel, k), seen = new Uint8Array(panel.T);
    let n = 0;
    for (let j = 0; j < cover.length; j++) {
      const t = cover[j];
      if (!seen[t]) { seen[t] = 1; if (live(panel, t, k)) n++; }
    }
    return n;
  }

  const PRUNED_COLOUR = "#7b3294";  // tokens a method's step pruned (not a gate's exit)
  const gateColour = (panel, block) => GATE_COLOURS[Math.max(0, panel.gates.indexOf(block)) % GATE_COLOURS.length];
  function classColour(panel, c) {
    const col = panel.colours[c];
    if (col) return "rgb(" + col[0] + "," + col[1] + "," + col[2] + ")";
    return "hsl(" + ((c * 137.5) % 360) + ",65%,50%)";
  }

  // ---- data-set view -------------------------------------------------------------------------
  const PREFERRED = ["image", "method", "tokens", "reduction", "mean_tokens", "mean_tokens_per_block", "merged",
                     "exited_early_pct", "gflops", "baseline_gflops", "flop_reduction", "latency_ms", "forward_ms",
                     "speedup", "agreement", "miou", "miou_step", "miou_baseline", "miou_drop"];

  function columnsOf(rows) {
    const all = new Set();
    rows.forEach((r) => Object.keys(r).forEach((k) => all.add(k)));
    const cols = PREFERRED.filter((c) => all.has(c));
    all.forEach((c) => { if (c.includes("miou") && !cols.includes(c)) cols.push(c); }); // accuracy and its change
    return cols.length ? cols : Array.from(all).slice(0, 12);
  }

  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && isNaN(v))) return "-";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(Math.abs(v) >= 100 ? 1 : 3);
    return esc(v);
  }

  function renderDataset() {
    const idx = DATA.index;
    let rows = idx.rows && idx.rows.length ? idx.rows.slice() : idx.images.map((n) => ({ image: n }));
    if (state.filter) {
      const f = state.filter.toLowerCase();
      rows = rows.filter((r) => String(r.image).toLowerCase().includes(f) || String(r.method || "").toLowerCase().includes(f));
    }
    if (state.sortKey) {
      const k = state.sortKey, d = state.sortDir;
      rows.sort((a, b) => (a[k] === b[k] ? 0 : (a[k] === null || a[k] === undefined) ? 1 : (b[k] === null || b[k] === undefined) ? -1 : a[k] < b[k] ? -d : d));
    }
    const cols = columnsOf(idx.rows && idx.rows.length ? idx.rows : [{ image: "" }]);
    const table = $("images-table");
    table.tHead.innerHTML = "<tr>" + cols.map((c) => '<th data-key="' + esc(c) + '" class="' +
      (state.sortKey === c ? (state.sortDir > 0 ? "sorted-asc" : "sorted-desc") : "") + '">' + esc(c) + "</th>").join("") + "</tr>";
    const shown = rows.slice(0, state.shown);
    table.tBodies[0].innerHTML = shown.map((r) => '<tr data-image="' + esc(r.image) + '">' +
      cols.map((c) => "<td>" + fmt(r[c]) + "</td>").join("") + "</tr>").join("");
    $("row-count").textContent = rows.length + " rows" + (rows.length > shown.length ? " (" + shown.length + " shown)" : "");
    $("more").hidden = rows.length <= shown.length;
    if (idx.missing && idx.missing.length) {
      $("missing").hidden = false;
      $("missing").textContent = "images without data (missing folders, or images the run could not process): " + idx.missing.join("; ");
    }
    if (idx.warnings && idx.warnings.length) {  // conditions of the run's numbers (e.g. a class mismatch let through)
      $("warnings").hidden = false;
      $("warnings").textContent = "warnings: " + idx.warnings.join("; ");
    }
    renderClasses();
  }

  function renderClasses() {
    const rows = DATA.index.classes || [];
    if (!rows.length) return;
    $("classes-title").hidden = false;
    const levels = [0, 1, 2, 3, 4].filter((l) => ("patches_level" + l) in rows[0]);
    // every token's fate (merged, pruned, exited, reached the end) as a share of the class's patches;
    // run folders written before fates had only exit columns, shares of tokens
    const fates = ["merged", "pruned", "exited", "reached_end"].filter((f) => rows.some((r) => (r["patches_" + f] || 0) > 0));
    const exits = fates.length ? [] : Object.keys(rows[0]).filter((k) => k.startsWith("tokens_exit_"));
    const cost = "token_blocks_per_patch" in rows[0];
    const head = ["class", "name", "patches", ...levels.map((l) => "level " + l + " %"),
      ...fates.map((f) => f.replace("_", " ") + " %"), ...exits.map((e) => e.replace("tokens_exit_", "exit ") + " %"),
      ...(cost ? ["token-blocks / patch", "GFLOPs / 1000 patches"] : [])];
    $("classes-table").tHead.innerHTML = "<tr>" + head.map((h) => "<th>" + esc(h) + "</th>").join("") + "</tr>";
    $("classes-table").tBodies[0].innerHTML = rows.map((r) => {
      const p = r.patches || 0, t = r.tokens || 0;
      const pct = (a, b) => (b ? (100 * a / b).toFixed(1) : "-");
      const num = (v, d) => (typeof v === "number" && isFinite(v) ? v.toFixed(d) : "-");
      return "<tr><td>" + fmt(r["class"]) + "</td><td>" + fmt(r.name) + "</td><td>" + fmt(p) + "</td>" +
        levels.map((l) => "<td>" + pct(r["patches_level" + l] || 0, p) + "</td>").join("") +
        fates.map((f) => "<td>" + pct(r["patches_" + f] || 0, p) + "</td>").join("") +
        exits.map((e) => "<td>" + pct(r[e] || 0, t) + "</td>").join("") +
        (cost ? "<td>" + num(r.token_blocks_per_patch, 2) + "</td><td>" + num(1000 * r.gflops_per_patch, 2) + "</td>" : "") +
        "</tr>";
    }).join("");
  }

  // ---- image view ----------------------------------------------------------------------------
  async function openImage(name) {
    state.view = "image";
    state.image = name;
    state.selected = null;
    state.hoverPatch = -1;
    $("dataset-view").hidden = true;
    $("image-view").hidden = false;
    $("image-name").textContent = name;
    const p = await payload(name);
    current = p;
    const panelsEl = $("panels");
    panelsEl.innerHTML = "";
    $("image-error").hidden = !p.error;
    $("image-error").textContent = p.error || "";
    $("details").textContent = "click a token";
    const ok = (p.panels || []).filter((q) => !q.error);
    const depth = Math.max(1, ...ok.map((q) => q.depth));
    $("scrubber").max = String(depth + 1);
    state.block = Math.min(state.block, depth + 1);
    $("scrubber").value = String(state.block);
    const img = new Image();
    img.onload = () => redraw();
    if (p.image) img.src = p.image;
    p.img = img;
    const maxWidth = (p.panels || []).length > 1 ? 420 : 720;
    (p.panels || []).forEach((panel, i) => {
      const el = document.createElement("div");
      el.className = "panel";
      el.dataset.panel = String(i);
      el.dataset.method = panel.method || panel.name;
      if (panel.error) {
        el.innerHTML = "<h3>" + esc(panel.name) + '</h3><div class="error">' + esc(panel.error) + "</div>";
        panelsEl.appendChild(el);
        return;
      }
      const canvas = document.createElement("canvas");
      if (panel.box) { // a sliding window, drawn at its place over the whole (stitched) image
        const scale = Math.min(maxWidth / panel.whole[1], 1.5);
        panel.cell = scale * panel.patch;
        panel.offY = panel.box[0] * scale;
        panel.offX = panel.box[1] * scale;
        canvas.width = Math.round(panel.whole[1] * scale);
        canvas.height = Math.round(panel.whole[0] * scale);
      } else {
        const scale = Math.min(maxWidth / panel.padded[1], 1.5);
        panel.cell = scale * panel.patch;
        panel.offX = panel.offY = 0;
        canvas.width = Math.round(panel.gw * panel.cell);
        canvas.height = Math.round(panel.gh * panel.cell);
      }
      el.innerHTML = "<h3>" + esc(panel.name === p.name ? (panel.method || "trace") : panel.name) + "</h3>";
      el.appendChild(canvas);
      el.insertAdjacentHTML("beforeend", '<div class="caption"></div><div class="tooltip" hidden></div>');
      canvas.addEventListener("mousemove", (ev) => hover(ev, panel, canvas));
      canvas.addEventListener("mouseleave", () => { state.hoverPatch = -1; redraw(); });
      canvas.addEventListener("click", (ev) => select(ev, panel, canvas, i));
      panelsEl.appendChild(el);
      panel.el = el;
      panel.canvas = canvas;
      if (panel.image) { // a sliding window: drawn over its own part of the image
        panel.img = new Image();
        panel.img.onload = () => redraw();
        panel.img.src = panel.image;
      }
    });
    redraw();
  }

  function patchAt(ev, panel, canvas) {
    const rect = canvas.getBoundingClientRect();
    const x = (ev.clientX - rect.left) * (canvas.width / rect.width) - panel.offX;
    const y = (ev.clientY - rect.top) * (canvas.height / rect.height) - panel.offY;
    const r = Math.floor(y / panel.cell), c = Math.floor(x / panel.cell);
    return r >= 0 && c >= 0 && r < panel.gh && c < panel.gw ? r * panel.gw + c : -1;
  }

  function hover(ev, panel, canvas) {
    const j = patchAt(ev, panel, canvas);
    if (j === state.hoverPatch) return;
    state.hoverPatch = j;
    redraw();
  }

  function select(ev, panel, canvas, i) {
    const j = patchAt(ev, panel, canvas);
    if (j < 0) return;
    const t = coverAt(panel, state.block)[j];
    state.selected = { panel: i, token: t };
    const side = 1 << panel.level[t];
    let patches = 0;
    for (let q = 0; q < panel.top.length; q++) if (panel.top[q] === t) patches++;
    const cells = [["token", t], ["level", panel.level[t]], ["row", panel.row[t]], ["col", panel.col[t]], ["side", side],
      ["patches", patches], ["exit_block", panel.exit[t]], ["confidence", panel.conf[t]],
      ["class", panel.classes[panel.cls[t]] || panel.cls[t]], ["merged_at", panel.mat[t]], ["merged_into", panel.minto[t]],
      ["pruned_at", panel.pruned ? panel.pruned[t] : 0], ["fate", panel.fate ? panel.fate[t] : "-"],
      ["token_blocks", panel.tblocks ? panel.tblocks[t] : "-"]];
    $("details").innerHTML = "<b>" + esc(panel.method || panel.name) + "</b><table><tr>" + cells.map((c) => "<th>" + c[0] + "</th>").join("") +
      '</tr><tr id="selected-row">' + cells.map((c) => "<td>" + fmt(c[1]) + "</td>").join("") + "</tr></table>";
    redraw();
  }

  function tooltip(panel, t) {
    const side = 1 << panel.level[t];
    const pruned = panel.pruned && panel.pruned[t] > 0;
    const exitText = pruned ? "pruned at block " + panel.pruned[t] + " (the decoder predicts it from its features then)"
      : panel.exit[t] >= panel.depth ? "reached the end" : "exited after block " + panel.exit[t];
    const merged = panel.mat[t] > 0 ? " · merged into " + panel.minto[t] + " in block " + panel.mat[t] : "";
    const fate = panel.fate ? " · fate " + esc(panel.fate[t]) : "";
    return '<b>token ' + t + "</b> · level " + panel.level[t] + " (" + side + "x" + side + " patches)" + merged + fate +
      "<br>" + exitText + " · confidence " + Number(panel.conf[t]).toFixed(3) + " · " + esc(panel.classes[panel.cls[t]] || "class " + panel.cls[t]);
  }

  function redraw() {
    if (!current) return;
    const k = state.block;
    const depth = Math.max(1, ...(current.panels || []).filter((q) => !q.error).map((q) => q.depth));
    $("block-label").textContent = k <= depth ? "tokens entering block " + k + " of " + depth : "after block " + depth + " (the end)";
    for (const panel of current.panels || []) if (!panel.error && panel.canvas) drawPanel(panel);
    drawHistogram();
  }

  function outline(ctx, panel, member, colour, width) {
    const { gh, gw, cell } = panel;
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) {
      const j = r * gw + c;
      if (!member(j)) continue;
      const x = c * cell, y = r * cell;
      if (r === 0 || !member(j - gw)) { ctx.moveTo(x, y); ctx.lineTo(x + cell, y); }
      if (r === gh - 1 || !member(j + gw)) { ctx.moveTo(x, y + cell); ctx.lineTo(x + cell, y + cell); }
      if (c === 0 || !member(j - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + cell); }
      if (c === gw - 1 || !member(j + 1)) { ctx.moveTo(x + cell, y); ctx.lineTo(x + cell, y + cell); }
    }
    ctx.stroke();
  }

  function drawPanel(panel) {
    const k = state.block, ctx = panel.canvas.getContext("2d"), cover = coverAt(panel, k);
    const { gh, gw, cell } = panel, L = state.layers, n = gh * gw;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#eee";
    ctx.fillRect(0, 0, panel.canvas.width, panel.canvas.height);
    const picture = panel.img || current.img;
    const ready = picture && picture.complete && picture.naturalWidth;
    if (panel.box) { // the whole image, dimmed outside this window
      if (ready) ctx.drawImage(picture, 0, 0, panel.canvas.width, panel.canvas.height);
      ctx.fillStyle = "rgba(255,255,255,0.6)";
      ctx.fillRect(0, 0, panel.canvas.width, panel.canvas.height);
      if (ready) {
        const sx = picture.naturalWidth / panel.canvas.width, sy = picture.naturalHeight / panel.canvas.height;
        const w = panel.input[1] * cell / panel.patch, h = panel.input[0] * cell / panel.patch;
        ctx.drawImage(picture, panel.offX * sx, panel.offY * sy, w * sx, h * sy, panel.offX, panel.offY, w, h);
      }
      ctx.translate(panel.offX, panel.offY);
    } else if (ready) {
      ctx.drawImage(picture, 0, 0, panel.input[1] * cell / panel.patch, panel.input[0] * cell / panel.patch);
    }
    const fill = (j, style, alpha) => {
      ctx.globalAlpha = alpha;
      ctx.fillStyle = style;
      ctx.fillRect((j % gw) * cell, Math.floor(j / gw) * cell, cell, cell);
    };
    for (let j = 0; j < n; j++) {
      const t = cover[j];
      if (L.prediction) fill(j, classColour(panel, panel.cls[t]), 0.45);
      if (L.truth && panel.truth && panel.truth[j] !== 255) fill(j, classColour(panel, panel.truth[j]), 0.45);
      if (L.errors && panel.truth && panel.truth[j] !== 255 && panel.truth[j] !== panel.cls[t]) fill(j, "#ff0000", 0.55);
      if (L.confidence) fill(j, "#000", 0.75 * (1 - panel.conf[t]));
      if (L.exits && !live(panel, t, k)) {
        fill(j, "#888", 0.45);
        fill(j, panel.pruned && panel.pruned[t] > 0 ? PRUNED_COLOUR : gateColour(panel, panel.exit[t]), 0.45);
      }
    }
    ctx.globalAlpha = 1;
    if (L.merges) { // a line wherever two neighbouring patches belong to different tokens
      ctx.strokeStyle = "rgba(255,255,255,0.9)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let r = 0; r < gh; r++) for (let c = 0; c < gw; c++) {
        const j = r * gw + c;
        if (c + 1 < gw && cover[j] !== cover[j + 1]) { ctx.moveTo((c + 1) * cell, r * cell); ctx.lineTo((c + 1) * cell, (r + 1) * cell); }
        if (r + 1 < gh && cover[j] !== cover[j + gw]) { ctx.moveTo(c * cell, (r + 1) * cell); ctx.lineTo((c + 1) * cell, (r + 1) * cell); }
      }
      ctx.stroke();
    }
    const tip = panel.el.querySelector(".tooltip");
    const hp = state.hoverPatch;
    panel.el.dataset.hoverPatch = String(hp);
    if (hp >= 0 && hp < n) {
      const t = cover[hp];
      outline(ctx, panel, (j) => cover[j] === t, "#ffd400", 2.5);
      outline(ctx, panel, (j) => j === hp, "#00e5ff", 2);
      tip.hidden = false;
      tip.innerHTML = tooltip(panel, t);
      Object.assign(tip.dataset, { token: t, level: panel.level[t], exit: panel.exit[t], cls: panel.classes[panel.cls[t]] || panel.cls[t] });
      const x = (hp % gw + 1) * cell + 10 + panel.offX, y = Math.floor(hp / gw) * cell + 24 + panel.offY;
      tip.style.left = Math.min(x, panel.canvas.width - 120) + "px";
      tip.style.top = y + "px";
    } else {
      tip.hidden = true;
    }
    if (state.selected && current.panels[state.selected.panel] === panel) {
      const t = state.selected.token;
      outline(ctx, panel, (j) => cover[j] === t, "#ff00d4", 3);
    }
    const count = liveCount(panel, k);
    panel.el.dataset.tokens = String(count);
    panel.el.dataset.block = String(k);
    const inQueries = panel.query_blocks && k >= panel.query_blocks[0] && k <= panel.query_blocks[1];
    panel.el.querySelector(".caption").textContent = count + (k <= panel.depth ? " tokens enter block " + k : " tokens reached the end") +
      (inQueries ? " (+ the queries)" : "") + " · " + panel.T + " at the start · " + panel.gflops + " GFLOPs";
  }

  function drawHistogram() {
    const canvas = $("histogram"), ctx = canvas.getContext("2d");
    const panels = (current.panels || []).filter((q) => !q.error);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!panels.length) return;
    const depth = Math.max(...panels.map((q) => q.depth));
    const top = Math.max(1, ...panels.map((q) => Math.max(...q.blocks_in)));
    const w = (canvas.width - 40) / depth, h = canvas.height - 28, bw = Math.max(1, (w - 4) / panels.length);
    ctx.font = "10px sans-serif";
    for (let b = 1; b <= depth; b++) {
      const x0 = 30 + (b - 1) * w;
      if (b === state.block) { ctx.fillStyle = "#fff3c4"; ctx.fillRect(x0, 0, w, h + 2); }
      const qb = panels[0].query_blocks;  // EoMT: the blocks its queries go through, shaded
      if (qb && b >= qb[0] && b <= qb[1]) { ctx.fillStyle = "rgba(120, 90, 200, 0.12)"; ctx.fillRect(x0, 0, w, h + 2); }
      panels.forEach((q, i) => {
        const v = q.blocks_in[b - 1] || 0;
        ctx.fillStyle = GATE_COLOURS[(i + 3) % GATE_COLOURS.length];
        ctx.fillRect(x0 + 2 + i * bw, h - (h - 10) * v / top, bw - 1, (h - 10) * v / top);
      });
      ctx.fillStyle = "#333";
      ctx.fillText(String(b), x0 + w / 2 - 3, h + 12);
      if (panels[0].gates.includes(b)) { ctx.fillStyle = gateColour(panels[0], b); ctx.fillRect(x0 + w - 2, 0, 2, h); }
    }
    ctx.fillStyle = "#333";
    ctx.fillText(String(top), 0, 10);
    ctx.fillText(panels.map((q) => q.method || q.name).join(" / "), 30, h + 24);
    canvas.dataset.block = String(state.block);
  }

  function setBlock(k) {
    const max = Number($("scrubber").max);
    state.block = Math.max(1, Math.min(max, k));
    $("scrubber").value = String(state.block);
    redraw();
  }

  // ---- wiring --------------------------------------------------------------------------------
  function wire() {
    $("filter").addEventListener("input", (ev) => { state.filter = ev.target.value; state.shown = PAGE_ROWS; renderDataset(); });
    $("more").addEventListener("click", () => { state.shown += PAGE_ROWS; renderDataset(); });
    $("images-table").tHead.addEventListener("click", (ev) => {
      const key = ev.target.dataset && ev.target.dataset.key;
      if (!key) return;
      state.sortDir = state.sortKey === key ? -state.sortDir : 1;
      state.sortKey = key;
      renderDataset();
    });
    $("images-table").tBodies[0].addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr");
      if (tr && tr.dataset.image) openImage(tr.dataset.image.split("/")[0]); // "im0/w00": a window of im0
    });
    $("back").addEventListener("click", () => { state.view = "dataset"; $("image-view").hidden = true; $("dataset-view").hidden = false; });
    $("scrubber").addEventListener("input", (ev) => setBlock(Number(ev.target.value)));
    $("histogram").addEventListener("click", (ev) => {
      if (!current) return;
      const depth = Number($("scrubber").max) - 1, rect = ev.target.getBoundingClientRect();
      const x = (ev.clientX - rect.left) * (ev.target.width / rect.width) - 30;
      setBlock(Math.floor(x / ((ev.target.width - 40) / depth)) + 1);
    });
    document.addEventListener("keydown", (ev) => {
      if (state.view !== "image" || ev.target.tagName === "INPUT") return; // the slider steps itself
      if (ev.key === "ArrowRight") { setBlock(state.block + 1); ev.preventDefault(); }
      if (ev.key === "ArrowLeft") { setBlock(state.block - 1); ev.preventDefault(); }
    });
    document.querySelectorAll("#layers input").forEach((box) => box.addEventListener("change", () => {
      state.layers[box.dataset.layer] = box.checked;
      redraw();
    }));
  }

  window.tokenscopeExplorer = { openImage: (n) => openImage(n), setBlock: (k) => setBlock(k), state: state };
  wire();
  boot();
})();
