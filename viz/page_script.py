"""The interactive page's script (inlined into every page; no libraries, no network).

``ERROR_TRAP`` runs first: any uncaught error is written into ``#errors`` and ``body[data-state]`` becomes
``error``, so a headless browser's DOM dump shows it. ``PAGE_JS`` reads the graph from the
``<script id="graph-data" type="application/json">`` element, draws the nodes that pass the influence
threshold (layers bottom to top, positions left to right, the same layout and grid as the SVG: ``data.grid``), a
small mark per (layer, position) whose errors are at least as influential as the weakest node drawn, and the most
important edges among them; the first view (and the "fit" button) zooms so that the whole drawing fits the canvas
(``body[data-zoom]``). On success it sets ``body[data-state]`` to ``ready``. Clicking a node lists
its inputs and outputs (rows are clickable) and, for a feature with labels (``data.features``, keyed by the
node's ``fk``), its top contexts in ``#contexts`` (one ``.ctx`` row each, tokens shaded by activation, the
maximum marked ``.peak``) and its promoted and suppressed tokens; hovering shows details; ``#node=ID`` in the
address selects a node on load. Each row of the lists carries its edge's index (``data-edge``). Extensions (the
heads panel, :mod:`viz.page_heads`) are factories in ``window.circuitscopeExtensions``, set by a script before
this one: each is called once with the page (``data``, ``nodes``, ``edges``, ``select``) and returns an object
whose ``selected(i)`` runs after a node's lists are built.
"""

ERROR_TRAP = """
(function () {
  function report(message) {
    var box = document.getElementById('errors');
    if (box) { box.textContent += message + '\\n'; }
    document.body.setAttribute('data-state', 'error');
  }
  window.addEventListener('error', function (e) { report('error: ' + e.message + ' (line ' + e.lineno + ')'); });
  window.addEventListener('unhandledrejection', function (e) { report('error: ' + e.reason); });
})();
"""

PAGE_JS = """
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('graph-data').textContent);
  var G = data.grid, SLOT_W = G.slot_width, SLOT_H = G.slot_height, PER_ROW = G.per_row, LINE_H = G.line_height;
  var LEFT = 70, TOP = 16, RIGHT = 12, BOTTOM = 12, MARK_SIZE = [6, 14];
  var SVGNS = 'http://www.w3.org/2000/svg';
  var nodes = data.nodes, edges = data.edges, meta = data.meta;
  var index = new Map();
  nodes.forEach(function (n, i) { index.set(n.id, i); });
  var ins = nodes.map(function () { return []; });
  var outs = nodes.map(function () { return []; });
  edges.forEach(function (e, k) { outs[e[0]].push(k); ins[e[1]].push(k); });
  var ranked = [];
  nodes.forEach(function (n, i) { if (n.cum !== null) { ranked.push(i); } });
  ranked.sort(function (a, b) { return nodes[a].cum - nodes[b].cum; });
  var state = { threshold: data.view.threshold, maxEdges: data.view.edges, zoom: 1, selected: null };
  var lastPlaced = null;

  function $(id) { return document.getElementById(id); }
  function el(name, attrs, parent) {
    var node = document.createElementNS(SVGNS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(node); }
    return node;
  }
  function fmt(x) { return x === null || x === undefined ? '' : (+x).toPrecision(4); }

  function isMark(i) { return (data.kinds[nodes[i].kind] || {}).mark === true; }
  function cellOf(i) { return nodes[i].layer + ',' + nodes[i].pos; }

  // what is drawn: shown (full-size nodes) and marks (cell -> its mark-kind nodes, strongest first)
  function visible() {
    var shown = new Set(), weakest = Infinity;
    nodes.forEach(function (n, i) { if (n.cum === null && !isMark(i)) { shown.add(i); } });
    for (var r = 0; r < ranked.length; r++) {
      shown.add(ranked[r]);
      weakest = nodes[ranked[r]].infl;
      if (nodes[ranked[r]].cum >= state.threshold) { break; }
    }
    var cells = new Map();
    nodes.forEach(function (n, i) {
      if (!isMark(i)) { return; }
      if (!cells.has(cellOf(i))) { cells.set(cellOf(i), []); }
      cells.get(cellOf(i)).push(i);
    });
    var marks = new Map();
    cells.forEach(function (members, key) {
      var total = members.reduce(function (s, i) { return s + nodes[i].infl; }, 0);
      var chosen = state.selected !== null && members.indexOf(state.selected) >= 0;
      if (total >= weakest || chosen) {
        marks.set(key, members.sort(function (a, b) { return nodes[b].infl - nodes[a].infl; }));
      }
    });
    if (state.selected !== null && !isMark(state.selected)) { shown.add(state.selected); }
    return { shown: shown, marks: marks };
  }

  // the Python layout (viz.selection.layout), shifted right by LEFT and down by TOP; where: index -> [x, y, half
  // height of its shape]
  function layout(drawn) {
    var cells = new Map(), widest = new Map(), tallest = new Map();
    drawn.shown.forEach(function (i) {
      if (!cells.has(cellOf(i))) { cells.set(cellOf(i), []); }
      cells.get(cellOf(i)).push(i);
    });
    function grow(map, key, value) { map.set(key, Math.max(map.get(key) || 0, value)); }
    cells.forEach(function (members) {
      members.sort(function (a, b) { return nodes[b].infl - nodes[a].infl; });
      grow(widest, nodes[members[0]].pos, Math.min(members.length, PER_ROW));
      grow(tallest, nodes[members[0]].layer, Math.ceil(members.length / PER_ROW));
    });
    drawn.marks.forEach(function (members) {
      grow(widest, nodes[members[0]].pos, 0);
      grow(tallest, nodes[members[0]].layer, 0);
    });
    var positions = Array.from(widest.keys()).sort(function (a, b) { return a - b; });
    var layers = Array.from(tallest.keys()).sort(function (a, b) { return b - a; });
    var left = new Map(), top = new Map(), height = new Map(), x = LEFT, y = TOP;
    positions.forEach(function (p) {
      left.set(p, x + G.gutter);
      x += G.gutter + widest.get(p) * SLOT_W + G.column_gap;
    });
    layers.forEach(function (l) {
      top.set(l, y);
      height.set(l, tallest.get(l) * SLOT_H || G.mark_band);
      y += height.get(l) + G.band_gap;
    });
    var where = new Map(), markAt = new Map();
    cells.forEach(function (members) {
      var layer = nodes[members[0]].layer, pos = nodes[members[0]].pos;
      members.forEach(function (i, k) {
        var row = Math.floor(k / PER_ROW), col = k % PER_ROW;
        var inRow = Math.min(members.length - row * PER_ROW, PER_ROW);
        var offset = (widest.get(pos) - inRow) * SLOT_W / 2;
        where.set(i, [left.get(pos) + offset + (col + 0.5) * SLOT_W, top.get(layer) + (row + 0.5) * SLOT_H,
                      (SLOT_H - 10) / 2]);
      });
    });
    var strongest = 1e-30;
    drawn.marks.forEach(function (members) { strongest = Math.max(strongest, markInfluence(members)); });
    drawn.marks.forEach(function (members, key) {
      var layer = nodes[members[0]].layer, pos = nodes[members[0]].pos;
      var share = Math.max(markInfluence(members), 0) / strongest;
      var size = MARK_SIZE[0] + (MARK_SIZE[1] - MARK_SIZE[0]) * Math.sqrt(share);
      var at = [left.get(pos) - G.gutter / 2, top.get(layer) + height.get(layer) / 2, size / 2];
      markAt.set(key, at);
      members.forEach(function (i) { where.set(i, at); });
    });
    var bands = layers.map(function (l) { return [l, top.get(l) + height.get(l) / 2]; });
    return { where: where, marks: markAt, bands: bands,
             width: Math.max(x - G.column_gap, LEFT) + RIGHT, height: Math.max(y - G.band_gap, TOP) + BOTTOM };
  }

  function markInfluence(members) { return members.reduce(function (s, i) { return s + nodes[i].infl; }, 0); }

  function chosenEdges(placed) {
    var picked = new Set(), drawn = placed.where;
    for (var k = 0; k < edges.length && picked.size < state.maxEdges; k++) {
      if (drawn.has(edges[k][0]) && drawn.has(edges[k][1])) { picked.add(k); }
    }
    if (state.selected !== null) {
      ins[state.selected].concat(outs[state.selected]).forEach(function (k) {
        if (drawn.has(edges[k][0]) && drawn.has(edges[k][1])) { picked.add(k); }
      });
    }
    return Array.from(picked);
  }

  function drawNode(g, n) {
    var w = SLOT_W - 8, h = SLOT_H - 10, shape;
    var kind = data.kinds[n.kind] || { shape: 'ellipse', fill: '#eee' };
    if (kind.shape === 'box' || kind.shape === 'octagon') {  // an octagon is drawn as a rounded box
      shape = el('rect', { x: -w / 2, y: -h / 2, width: w, height: h, rx: kind.shape === 'octagon' ? 8 : 2 }, g);
    } else if (kind.shape === 'diamond') {
      shape = el('polygon', { points: [0, -h / 2, w / 2, 0, 0, h / 2, -w / 2, 0].join(' ') }, g);
    } else {  // ellipse, hexagon
      shape = el('ellipse', { rx: w / 2, ry: h / 2 }, g);
    }
    shape.setAttribute('fill', kind.fill);
    shape.setAttribute('stroke', '#4a5568');
    n.lines.forEach(function (line, k) {
      el('text', { y: (k - (n.lines.length - 1) / 2) * LINE_H + 3 }, g).textContent = line;
    });
  }

  function drawMark(g, members, half) {
    var kind = data.kinds[nodes[members[0]].kind] || { fill: '#e2e2e2' };
    el('polygon', { points: [0, -half, half, 0, 0, half, -half, 0].join(' '), fill: kind.fill, stroke: '#4a5568' }, g);
  }

  function render() {
    var drawn = visible(), shown = drawn.shown, placed = layout(drawn), picked = chosenEdges(placed);
    lastPlaced = placed;
    var svg = $('graph');
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    svg.setAttribute('viewBox', '0 0 ' + placed.width + ' ' + placed.height);
    svg.setAttribute('width', placed.width * state.zoom);
    svg.setAttribute('height', placed.height * state.zoom);
    placed.bands.forEach(function (b) {
      var name = b[0] < 0 ? 'tokens' : b[0] >= meta.n_layers ? 'logits' : 'L' + b[0];
      el('text', { x: LEFT - 12, y: b[1] + 4, 'class': 'axis' }, svg).textContent = name;
    });
    var edgeLayer = el('g', {}, svg), nodeLayer = el('g', {}, svg);
    var biggest = 1e-30;
    picked.forEach(function (k) { biggest = Math.max(biggest, Math.abs(edges[k][2])); });
    var near = new Set();
    if (state.selected !== null) {
      near.add(state.selected);
      ins[state.selected].forEach(function (k) { near.add(edges[k][0]); });
      outs[state.selected].forEach(function (k) { near.add(edges[k][1]); });
    }
    picked.slice().reverse().forEach(function (k) {
      var e = edges[k], a = placed.where.get(e[0]), b = placed.where.get(e[1]);
      var sy = a[1] - a[2], ty = b[1] + b[2], my = (sy + ty) / 2;
      var touches = state.selected !== null && (e[0] === state.selected || e[1] === state.selected);
      el('path', {
        d: 'M' + a[0] + ',' + sy + ' C' + a[0] + ',' + my + ' ' + b[0] + ',' + my + ' ' + b[0] + ',' + ty,
        stroke: e[2] >= 0 ? data.colours.positive : data.colours.negative,
        'stroke-width': (0.4 + 3.6 * Math.abs(e[2]) / biggest).toFixed(2),
        'class': 'edge' + (state.selected !== null && !touches ? ' faded' : '')
      }, edgeLayer);
    });
    shown.forEach(function (i) {
      var p = placed.where.get(i), n = nodes[i];
      var cls = 'node ' + n.kind + (i === state.selected ? ' selected' : '') +
        (state.selected !== null && !near.has(i) ? ' faded' : '');
      var g = el('g', { transform: 'translate(' + p[0] + ',' + p[1] + ')', 'class': cls, 'data-id': n.id }, nodeLayer);
      drawNode(g, n);
      g.addEventListener('click', function (ev) { ev.stopPropagation(); select(i); });
      g.addEventListener('mousemove', function (ev) { showTip(ev, n.desc); });
      g.addEventListener('mouseleave', hideTip);
    });
    drawn.marks.forEach(function (members, key) {
      var p = placed.marks.get(key), first = members[0];
      var faded = state.selected !== null && !members.some(function (i) { return near.has(i); });
      var cls = 'mark ' + nodes[first].kind + (members.indexOf(state.selected) >= 0 ? ' selected' : '') +
        (faded ? ' faded' : '');
      var g = el('g', { transform: 'translate(' + p[0] + ',' + p[1] + ')', 'class': cls, 'data-id': nodes[first].id },
                 nodeLayer);
      drawMark(g, members, p[2]);
      var text = members.map(function (i) { return nodes[i].desc; }).join(' ;; ');
      g.addEventListener('click', function (ev) { ev.stopPropagation(); select(first); });
      g.addEventListener('mousemove', function (ev) { showTip(ev, text); });
      g.addEventListener('mouseleave', hideTip);
    });
    $('threshold-value').textContent = state.threshold.toFixed(2);
    $('edges-value').textContent = String(state.maxEdges);
    $('counts').textContent = shown.size + ' of ' + nodes.length + ' nodes, ' + picked.length + ' of ' +
      meta.n_edges + ' edges drawn, ' + drawn.marks.size + ' marks' +
      (meta.n_edges > edges.length ? ' (page holds the ' + edges.length +
      ' most important edges)' : '');
    document.body.setAttribute('data-visible-nodes', String(shown.size));
    document.body.setAttribute('data-marks', String(drawn.marks.size));
    document.body.setAttribute('data-zoom', state.zoom.toFixed(4));
    document.body.setAttribute('data-drawn-edges', String(picked.length));
  }

  function showTip(ev, text) {
    var tip = $('tooltip');
    tip.textContent = text;
    tip.style.display = 'block';
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 430) + 'px';
    tip.style.top = (ev.clientY + 14) + 'px';
  }
  function hideTip() { $('tooltip').style.display = 'none'; }

  function table(title, list, end, total) {
    var box = $('details');
    var h = document.createElement('h2');
    h.textContent = title + ' (' + list.length + ')';
    box.appendChild(h);
    if (!list.length) {
      var none = document.createElement('div');
      none.className = 'hint';
      none.textContent = meta.n_edges > edges.length ? 'none among the edges this page holds' : 'none';
      box.appendChild(none);
      return;
    }
    var t = document.createElement('table');
    t.id = title.toLowerCase();
    list.slice().sort(function (a, b) { return Math.abs(edges[b][2]) - Math.abs(edges[a][2]); })
      .slice(0, 40).forEach(function (k) {
        var other = edges[k][end], w = edges[k][2], row = t.insertRow();
        row.className = 'link';
        row.insertCell().textContent = nodes[other].l1 + ' ' + nodes[other].l2;
        var cell = row.insertCell();
        cell.className = 'num ' + (w >= 0 ? 'pos' : 'neg');
        cell.textContent = (w >= 0 ? '+' : '') + fmt(w);
        var share = row.insertCell();
        share.className = 'num';
        share.textContent = total ? (100 * Math.abs(w) / total).toFixed(1) + '%' : '';
        row.title = nodes[other].desc;
        row.setAttribute('data-edge', String(k));
        row.addEventListener('click', function () { select(other); });
      });
    box.appendChild(t);
    if (list.length > 40) {
      var more = document.createElement('div');
      more.className = 'hint';
      more.textContent = '+' + (list.length - 40) + ' weaker';
      box.appendChild(more);
    }
  }

  function featurePanel(info) {  // the clicked feature's top contexts, frequency and logit effects
    var box = $('details');
    var h = document.createElement('h2');
    h.textContent = 'Top contexts (' + info.contexts.length + ')';
    box.appendChild(h);
    var about = document.createElement('div');
    about.className = 'hint';
    about.textContent = 'active on ' + (100 * info.frequency).toPrecision(3) + '% of tokens (mean ' +
      fmt(info.mean_activation) + ' when active)';
    box.appendChild(about);
    var list = document.createElement('div');
    list.id = 'contexts';
    var top = 1e-30;
    info.contexts.forEach(function (c) { c.activations.forEach(function (a) { top = Math.max(top, a); }); });
    info.contexts.forEach(function (c) {
      var row = document.createElement('div');
      row.className = 'ctx';
      c.tokens.forEach(function (t, k) {
        var span = document.createElement('span'), a = c.activations[k];
        span.className = 'tok' + (k === c.peak ? ' peak' : '');
        span.textContent = t.replace(/\\n/g, '\\u23ce');
        if (a > 0) { span.style.backgroundColor = 'rgba(221,107,32,' + (0.1 + 0.9 * a / top).toFixed(3) + ')'; }
        span.title = fmt(a);
        row.appendChild(span);
      });
      list.appendChild(row);
    });
    box.appendChild(list);
    [['promotes', info.promoted], ['suppresses', info.suppressed]].forEach(function (pair) {
      var line = document.createElement('div');
      line.className = 'logits';
      line.textContent = pair[0] + ': ' + pair[1].map(function (t) { return JSON.stringify(t); }).join(' ');
      box.appendChild(line);
    });
  }

  function remember(hash) {  // keep the selection in the address; some browsers refuse this for files
    try { history.replaceState(null, '', hash); } catch (e) { /* the page works without it */ }
  }

  function absTotal(list) { return list.reduce(function (s, k) { return s + Math.abs(edges[k][2]); }, 0); }

  function select(i) {
    state.selected = i;
    var box = $('details');
    while (box.firstChild) { box.removeChild(box.firstChild); }
    if (i === null) {
      box.textContent = 'Click a node to see its inputs and outputs.';
      remember('#');
    } else {
      var h = document.createElement('h2');
      h.textContent = nodes[i].l1 + ' ' + nodes[i].l2;
      box.appendChild(h);
      var d = document.createElement('div');
      d.textContent = nodes[i].desc;
      box.appendChild(d);
      if (nodes[i].fk && data.features && data.features[nodes[i].fk]) { featurePanel(data.features[nodes[i].fk]); }
      table('Inputs', ins[i], 0, absTotal(ins[i]));
      table('Outputs', outs[i], 1, absTotal(outs[i]));
      extensions.forEach(function (x) { x.selected(i); });
      remember('#node=' + encodeURIComponent(nodes[i].id));
    }
    render();
    if (i !== null) { reveal(i); }
  }

  function reveal(i) {  // scroll the canvas so that node i is in view
    var p = lastPlaced.where.get(i), canvas = $('canvas');
    canvas.scrollLeft = Math.max(0, p[0] * state.zoom - canvas.clientWidth / 2);
    canvas.scrollTop = Math.max(0, p[1] * state.zoom - canvas.clientHeight / 2);
  }

  function fit() {  // zoom so the whole drawing fits the canvas (never above 1.5), and scroll to its top left
    var placed = layout(visible()), canvas = $('canvas');
    state.zoom = Math.min(1.5, canvas.clientWidth / placed.width, canvas.clientHeight / placed.height);
    canvas.scrollLeft = 0;
    canvas.scrollTop = 0;
  }

  var extensions = (window.circuitscopeExtensions || []).map(function (make) {
    return make({ data: data, nodes: nodes, edges: edges, select: function (i) { select(i); } });
  });
  $('title').textContent = meta.prompt;
  $('meta').textContent = meta.summary;
  $('threshold').value = state.threshold;
  $('edges').value = state.maxEdges;
  $('edges').max = Math.max(50, Math.min(edges.length, 5000));
  $('threshold').addEventListener('input', function (e) { state.threshold = +e.target.value; render(); });
  $('edges').addEventListener('input', function (e) { state.maxEdges = +e.target.value; render(); });
  $('zoom-in').addEventListener('click', function () { state.zoom *= 1.25; render(); });
  $('zoom-out').addEventListener('click', function () { state.zoom /= 1.25; render(); });
  $('canvas').addEventListener('click', function () { if (state.selected !== null) { select(null); } });
  document.addEventListener('keydown', function (e) { if (e.key === 'Escape') { select(null); } });
  $('zoom-fit').addEventListener('click', function () { fit(); render(); });
  fit();
  var wanted = decodeURIComponent((location.hash.match(/^#node=(.*)$/) || [])[1] || '');
  select(index.has(wanted) ? index.get(wanted) : null);
  if (document.body.getAttribute('data-state') !== 'error') { document.body.setAttribute('data-state', 'ready'); }
})();
"""
