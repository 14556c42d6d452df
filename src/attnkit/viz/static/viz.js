/* attnkit.viz: the views, in plain JavaScript (no libraries, no network).
 * Data come from the JSON element #attnkit-data. Every token string is
 * put into the page with textContent or canvas fillText, never parsed as HTML. */
(function () {
  "use strict";
  var root = document.getElementById("attnkit-root");
  var data = JSON.parse(document.getElementById("attnkit-data").textContent);
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
    "#3182bd"];
  var SVGNS = "http://www.w3.org/2000/svg";
  var ROW = 18;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function color(h) { return COLORS[h % COLORS.length]; }
  function decode(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  /* weights of a group: w[layer] is a Uint8Array (H*T*S), value/255 = attention weight */
  function layerWeights(g, layer) {
    if (!g._cache) g._cache = {};
    if (!g._cache[layer]) g._cache[layer] = decode(g.w[layer]);
    return g._cache[layer];
  }
  function weight(g, layer, h, i, j) {
    return layerWeights(g, layer)[(h * g.T + i) * g.S + j] / 255;
  }
  function select(label, options, onchange, cls) {
    var wrap = el("label", {}, label + " ");
    var s = el("select", {"class": cls});
    options.forEach(function (o, i) { s.appendChild(el("option", {value: String(i)}, o)); });
    s.addEventListener("change", function () { onchange(parseInt(s.value, 10)); });
    wrap.appendChild(s);
    return wrap;
  }
  function range(n) { var a = []; for (var i = 0; i < n; i++) a.push(i); return a; }

  /* ---- lines (head view and enlarged model-view heads) ---------------------------------- */
  function linesDiagram(g, state) {
    var width = state.width || 520, n = Math.max(g.T, g.S), height = n * ROW + 30;
    var svg = svgEl("svg", {width: width, height: height, "class": "lines"});
    var left = 150, right = width - 150, lineLayer = svgEl("g", {"class": "line-layer"});
    svg.appendChild(lineLayer);
    var lefts = [], rights = [];
    function tok(x, y, anchor, text, side, i) {
      var t = svgEl("text", {x: x, y: y, "text-anchor": anchor, "class": "tok tok-" + side,
        "data-i": String(i)}, text);
      svg.appendChild(t);
      return t;
    }
    g.rows.forEach(function (r, i) { lefts.push(tok(left - 6, 20 + i * ROW, "end", r, "left", i)); });
    g.cols.forEach(function (c, j) { rights.push(tok(right + 6, 20 + j * ROW, "start", c, "right", j)); });
    function draw() {
      while (lineLayer.firstChild) lineLayer.removeChild(lineLayer.firstChild);
      var focus = state.pinned || state.hover;
      lefts.concat(rights).forEach(function (t) { t.classList.remove("active"); });
      if (focus) (focus.side === "left" ? lefts : rights)[focus.i].classList.add("active");
      var heads = state.heads.filter(function (on) { return on !== false; });
      var nOn = heads.length || 1;
      state.heads.forEach(function (on, h) {
        if (!on) return;
        for (var i = 0; i < g.T; i++) {
          if (focus && focus.side === "left" && focus.i !== i) continue;
          for (var j = 0; j < g.S; j++) {
            if (focus && focus.side === "right" && focus.i !== j) continue;
            var w = weight(g, state.layer, h, i, j);
            if (w < data.min_weight) continue;
            lineLayer.appendChild(svgEl("line", {x1: left, y1: 16 + i * ROW, x2: right,
              y2: 16 + j * ROW, stroke: color(h), "stroke-width": 2,
              "stroke-opacity": Math.min(1, w * (focus ? 1 : 1.5 / Math.sqrt(nOn))).toFixed(3),
              "class": "attn-line", "data-head": h, "data-row": i, "data-col": j,
              "data-w": w.toFixed(3)}));
          }
        }
      });
      svg.setAttribute("data-lines", String(lineLayer.childNodes.length));
    }
    function bind(list, side) {
      list.forEach(function (t, i) {
        t.addEventListener("mouseenter", function () { state.hover = {side: side, i: i}; draw(); });
        t.addEventListener("mouseleave", function () { state.hover = null; draw(); });
        t.addEventListener("click", function () {
          var p = state.pinned;
          state.pinned = (p && p.side === side && p.i === i) ? null : {side: side, i: i};
          draw();
        });
      });
    }
    bind(lefts, "left"); bind(rights, "right");
    draw();
    return {svg: svg, draw: draw};
  }

  function headView(panel, container) {
    var state = {group: 0, layer: 0, heads: [], hover: null, pinned: null};
    var controls = el("div", {"class": "controls"}), body = el("div", {"class": "body"});
    container.appendChild(controls); container.appendChild(body);
    function build() {
      var g = panel.groups[state.group];
      while (controls.firstChild) controls.removeChild(controls.firstChild);
      if (panel.groups.length > 1) {
        var gs = select("Attention:", panel.groups.map(function (x) { return x.name; }),
          function (v) { state.group = v; state.layer = 0; state.pinned = null; build(); },
          "group-select");
        gs.querySelector("select").value = String(state.group);
        controls.appendChild(gs);
      }
      var ls = select("Layer:", range(g.L).map(function (l) { return String(l); }),
        function (v) { state.layer = v; diagram.draw(); }, "layer-select");
      controls.appendChild(ls);
      state.heads = range(g.H).map(function () { return true; });
      range(g.H).forEach(function (h) {
        var t = el("span", {"class": "head-toggle", "data-head": String(h)});
        var sw = el("span", {"class": "swatch"}); sw.style.background = color(h);
        t.appendChild(sw); t.appendChild(document.createTextNode(String(h)));
        t.addEventListener("click", function () {
          state.heads[h] = !state.heads[h];
          t.classList.toggle("off", !state.heads[h]);
          diagram.draw();
        });
        t.addEventListener("dblclick", function () {
          state.heads = state.heads.map(function (_, k) { return k === h; });
          controls.querySelectorAll(".head-toggle").forEach(function (x, k) {
            x.classList.toggle("off", k !== h);
          });
          diagram.draw();
        });
        controls.appendChild(t);
      });
      while (body.firstChild) body.removeChild(body.firstChild);
      var diagram = linesDiagram(g, state);
      body.appendChild(diagram.svg);
    }
    build();
  }

  /* ---- heatmaps (model view thumbnails, rollout) ---------------------------------------- */
  function heat(canvas, rows, cols, value, size, scale) {
    /* draw value(i, j) into a canvas of at most size x size pixels (max-pooled), darkest at
     * `scale` (0 = the largest value of this map, so faint heads stay readable) */
    var h = Math.min(rows, size), w = Math.min(cols, size);
    if (!scale) {
      for (var a = 0; a < rows; a++) for (var b = 0; b < cols; b++) scale = Math.max(scale, value(a, b));
      scale = scale || 1;
    }
    canvas.width = w; canvas.height = h;
    var ctx = canvas.getContext("2d"), img = ctx.createImageData(w, h);
    for (var y = 0; y < h; y++) {
      var i0 = Math.floor(y * rows / h), i1 = Math.max(i0 + 1, Math.floor((y + 1) * rows / h));
      for (var x = 0; x < w; x++) {
        var j0 = Math.floor(x * cols / w), j1 = Math.max(j0 + 1, Math.floor((x + 1) * cols / w));
        var v = 0;
        for (var i = i0; i < i1; i++) for (var j = j0; j < j1; j++) v = Math.max(v, value(i, j));
        var p = 4 * (y * w + x), c = Math.round(255 * (1 - Math.min(1, v / scale)));
        img.data[p] = c; img.data[p + 1] = c; img.data[p + 2] = 255; img.data[p + 3] = 255;
        if (v / scale > 0.5) { img.data[p + 2] = Math.round(255 - 200 * (v / scale - 0.5)); }
      }
    }
    ctx.putImageData(img, 0, 0);
  }

  function modelGrid(g, container, onpick, value, scale) {
    var grid = el("div", {"class": "grid model-grid"});
    grid.style.gridTemplateColumns = "40px repeat(" + g.H + ", auto)";
    grid.appendChild(el("div", {"class": "label"}, ""));
    range(g.H).forEach(function (h) { grid.appendChild(el("div", {"class": "label"}, "head " + h)); });
    range(g.L).forEach(function (l) {
      grid.appendChild(el("div", {"class": "label"}, "layer " + l));
      range(g.H).forEach(function (h) {
        var c = el("canvas", {"class": "thumb", "data-layer": String(l), "data-head": String(h),
          title: "layer " + l + ", head " + h});
        heat(c, g.T, g.S, function (i, j) { return value(l, h, i, j); }, 96, scale || 0);
        c.style.width = "80px"; c.style.height = Math.round(80 * Math.min(g.T, 96) /
          Math.min(g.S, 96)) + "px";
        c.addEventListener("click", function () {
          grid.querySelectorAll("canvas.selected").forEach(function (x) { x.classList.remove("selected"); });
          c.classList.add("selected");
          onpick(l, h);
        });
        grid.appendChild(c);
      });
    });
    container.appendChild(grid);
  }

  function modelView(panel, container) {
    var controls = el("div", {"class": "controls"}), body = el("div", {"class": "body"});
    container.appendChild(controls); container.appendChild(body);
    function build(gi) {
      var g = panel.groups[gi];
      while (body.firstChild) body.removeChild(body.firstChild);
      var detail = el("div", {"class": "detail"});
      modelGrid(g, body, function (l, h) {
        while (detail.firstChild) detail.removeChild(detail.firstChild);
        detail.appendChild(el("h3", {}, g.name + " attention, layer " + l + ", head " + h));
        var heads = range(g.H).map(function (k) { return k === h; });
        detail.appendChild(linesDiagram(g, {layer: l, heads: heads, width: 520}).svg);
      }, function (l, h, i, j) { return weight(g, l, h, i, j); });
      body.appendChild(detail);
    }
    if (panel.groups.length > 1) {
      controls.appendChild(select("Attention:", panel.groups.map(function (x) { return x.name; }),
        build, "group-select"));
    }
    controls.appendChild(el("span", {"class": "note"}, "click a head to enlarge it"));
    build(0);
  }

  /* ---- neuron view ------------------------------------------------------------------------ */
  function vecRow(tr, vec, scale) {
    vec.forEach(function (v) {
      var td = el("td", {"class": "vec", title: String(v)});
      var a = Math.min(1, Math.abs(v) / (scale || 1));
      td.style.background = v >= 0 ? "rgba(31,119,180," + a + ")" : "rgba(214,39,40," + a + ")";
      tr.appendChild(td);
    });
  }
  function neuronView(container) {
    var groups = data.neuron, state = {group: 0, layer: 0, head: 0, query: 0};
    var controls = el("div", {"class": "controls"}), body = el("div", {"class": "body"});
    container.appendChild(controls); container.appendChild(body);
    function draw() {
      var g = groups[state.group], L = state.layer, H = state.head, i = state.query;
      var q = g.q[L][H][i], scores = g.scores[L][H][i];
      var all = q.concat.apply(q, g.k[L][H]).map(Math.abs), scale = Math.max.apply(null, all);
      while (body.firstChild) body.removeChild(body.firstChild);
      var finite = scores.filter(function (s) { return s !== null; });
      var mx = Math.max.apply(null, finite), z = 0;
      finite.forEach(function (s) { z += Math.exp(s - mx); });
      var table = el("table", {"class": "neuron-table"});
      var head = el("tr"); ["key token", "k", "q \u00d7 k", "score", "softmax"].forEach(function (t) {
        head.appendChild(el("th", {"class": "tokcell"}, t));
      });
      table.appendChild(head);
      var qr = el("tr", {"class": "query-row"});
      qr.appendChild(el("td", {"class": "tokcell"}, "query: " + g.rows[i]));
      var qtd = el("td"), qt = el("table"), qtr = el("tr"); vecRow(qtr, q, scale);
      qt.appendChild(qtr); qtd.appendChild(qt); qr.appendChild(qtd);
      table.appendChild(qr);
      g.cols.forEach(function (c, j) {
        var k = g.k[L][H][j], tr = el("tr", {"class": "key-row", "data-j": String(j)});
        tr.appendChild(el("td", {"class": "tokcell"}, c));
        [k, k.map(function (v, d) { return v * q[d]; })].forEach(function (vec, n) {
          var td = el("td"), t = el("table"), r = el("tr");
          vecRow(r, vec, n ? scale * scale / 4 : scale); t.appendChild(r); td.appendChild(t);
          tr.appendChild(td);
        });
        var s = scores[j];
        tr.appendChild(el("td", {"class": "score"}, s === null ? "masked" : s.toFixed(4)));
        tr.appendChild(el("td", {"class": "prob"}, s === null ? "0" :
          (Math.exp(s - mx) / z).toFixed(4)));
        table.appendChild(tr);
      });
      body.appendChild(table);
    }
    function build() {
      var g = groups[state.group];
      while (controls.firstChild) controls.removeChild(controls.firstChild);
      if (groups.length > 1) {
        var gs = select("Attention:", groups.map(function (x) { return x.name; }), function (v) {
          state.group = v; state.layer = 0; state.head = 0; state.query = 0; build();
        }, "group-select");
        gs.querySelector("select").value = String(state.group);
        controls.appendChild(gs);
      }
      controls.appendChild(select("Layer:", range(g.L).map(String), function (v) {
        state.layer = v; draw(); }, "layer-select"));
      controls.appendChild(select("Head:", range(g.H).map(String), function (v) {
        state.head = v; draw(); }, "head-select"));
      controls.appendChild(select("Query token:", g.rows, function (v) {
        state.query = v; draw(); }, "query-select"));
      draw();
    }
    build();
  }

  /* ---- rollout / flow / summaries ------------------------------------------------------- */
  function matrixCanvas(m, rows, cols, title, cls) {
    var wrap = el("div", {"class": cls});
    wrap.appendChild(el("h3", {}, title));
    var n = rows.length, cell = Math.max(2, Math.min(18, Math.floor(480 / Math.max(n, cols.length))));
    var labels = n <= 64, pad = labels ? 110 : 0;
    var c = el("canvas", {"class": "matrix"});
    c.width = pad + cols.length * cell; c.height = pad + n * cell;
    var ctx = c.getContext("2d"), mx = 0;
    m.forEach(function (r) { r.forEach(function (v) { mx = Math.max(mx, v); }); });
    m.forEach(function (r, i) {
      r.forEach(function (v, j) {
        var a = mx > 0 ? v / mx : 0;
        ctx.fillStyle = "rgba(31,119,180," + a.toFixed(3) + ")";
        ctx.fillRect(pad + j * cell, pad + i * cell, cell, cell);
      });
    });
    if (labels) {
      ctx.fillStyle = "#222"; ctx.font = Math.min(12, cell) + "px monospace";
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      rows.forEach(function (t, i) { ctx.fillText(t, pad - 4, pad + (i + 0.5) * cell); });
      cols.forEach(function (t, j) {
        ctx.save(); ctx.translate(pad + (j + 0.5) * cell, pad - 4); ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left"; ctx.fillText(t, 0, 0); ctx.restore();
      });
    }
    wrap.appendChild(c);
    return wrap;
  }
  function numberTable(title, m, rowLabel, colLabel, cls) {
    var wrap = el("div", {"class": cls}); wrap.appendChild(el("h3", {}, title));
    var t = el("table"), head = el("tr"); head.appendChild(el("th"));
    m[0].forEach(function (_, h) { head.appendChild(el("th", {}, colLabel + " " + h)); });
    t.appendChild(head);
    m.forEach(function (r, l) {
      var tr = el("tr"); tr.appendChild(el("th", {}, rowLabel + " " + l));
      r.forEach(function (v) { tr.appendChild(el("td", {}, v === null ? "-" : v.toFixed(3))); });
      t.appendChild(tr);
    });
    wrap.appendChild(t);
    return wrap;
  }
  function rolloutView(container) {
    var controls = el("div", {"class": "controls"}), body = el("div", {"class": "body"});
    container.appendChild(controls); container.appendChild(body);
    var groups = data.analysis;
    function build(gi) {
      var a = groups[gi];
      while (body.firstChild) body.removeChild(body.firstChild);
      var mats = el("div", {"class": "panels"});
      if (a.rollout) mats.appendChild(matrixCanvas(a.rollout, a.rows, a.cols,
        "attention rollout (all layers)", "rollout"));
      if (a.flow) mats.appendChild(matrixCanvas(a.flow, a.rows, a.cols, "attention flow", "flow"));
      body.appendChild(mats);
      if (a.note) body.appendChild(el("p", {"class": "note"}, a.note));
      body.appendChild(numberTable("entropy of each head (nats)", a.entropy, "layer", "head",
        "entropy"));
      Object.keys(a.attends).forEach(function (k) {
        body.appendChild(numberTable("fraction of attention to the " + k + " token", a.attends[k],
          "layer", "head", "attends attends-" + k));
      });
    }
    if (groups.length > 1) {
      controls.appendChild(select("Attention:", groups.map(function (x) { return x.name; }),
        build, "group-select"));
    }
    build(0);
  }

  /* ---- comparison of two checkpoints ---------------------------------------------------- */
  function compareView(container) {
    var panels = el("div", {"class": "panels"});
    container.appendChild(panels);
    data.panels.forEach(function (p) {
      var box = el("div", {"class": "panel"}); box.appendChild(el("h3", {}, p.label));
      modelView(p, box); panels.appendChild(box);
    });
    var a = data.panels[0], b = data.panels[1];
    var box = el("div", {"class": "panel diff"}), grid = el("div");
    box.appendChild(el("h3", {}, "|A \u2212 B| per head"));
    function diff(gi) {
      while (grid.firstChild) grid.removeChild(grid.firstChild);
      var ga = a.groups[gi], gb = b.groups[gi];
      if (!gb || ga.L !== gb.L || ga.H !== gb.H || ga.T !== gb.T || ga.S !== gb.S) {
        grid.appendChild(el("p", {"class": "note"}, "the two captures differ in shape"));
        return;
      }
      var d = function (l, h, i, j) {
        return Math.abs(weight(ga, l, h, i, j) - weight(gb, l, h, i, j));
      }, mx = 0;
      range(ga.L).forEach(function (l) { range(ga.H).forEach(function (h) {
        range(ga.T).forEach(function (i) { range(ga.S).forEach(function (j) {
          mx = Math.max(mx, d(l, h, i, j)); }); }); }); });
      grid.appendChild(el("p", {"class": "note"}, "one colour scale for all heads; darkest = " +
        mx.toFixed(3)));
      modelGrid(ga, grid, function () {}, d, mx || 1);
    }
    if (a.groups.length > 1) {
      box.appendChild(select("Attention:", a.groups.map(function (x) { return x.name; }), diff,
        "diff-group-select"));
    }
    box.appendChild(grid);
    panels.appendChild(box);
    diff(0);
  }

  var start = performance.now();
  root.appendChild(el("h2", {}, data.title));
  var views = {head: function () { headView(data.panels[0], root); },
    model: function () { modelView(data.panels[0], root); },
    neuron: function () { neuronView(root); }, rollout: function () { rolloutView(root); },
    compare: function () { compareView(root); }};
  views[data.view]();
  root.setAttribute("data-render-ms", String(Math.round(performance.now() - start)));
  root.setAttribute("data-ready", "1");
})();
