"""The page's heads panel: which attention heads carry a selected edge, and why they attended (docs/design.md §3.11).

Inlined only into a page with an attention section (``data.attention``, the JSON of
:class:`circuits.attention.summary.AttentionSummary`), before the page script, as an extension of it
(:mod:`viz.page_script`). When a node is selected, each of its input rows (``#inputs tr``) whose edge has head data
is marked ``.has-heads`` and gets a ``heads`` button (``.heads-link``, ``data-source``: the edge's source). The
button (not the row, which still selects the other node) opens ``#heads`` under the inputs (``data-edge-source``,
``data-edge-target``): the edge's weight, its head routes (``table.head-routes``: layer.head, signed share, share
of |edge|) and, for edges with QK, per head the score and pattern, the top pairs of sources (``table.qk-pairs``,
query source × key source), the query-side and key-side marginals (``table.qk-query``, ``table.qk-key``) and the
bias terms (``table.qk-bias``). Sources are named by their page label; a source outside the graph (pruned) by its
id.
"""

HEADS_CSS = """
#heads { border: 1px solid #d69e2e; border-radius: 4px; padding: 2px 6px 6px; margin: 6px 0; background: #fffff0; }
#heads h3 { font-size: 12px; margin: 10px 0 2px; }
#heads h4 { font-size: 11px; margin: 6px 0 1px; color: #4a5568; font-weight: normal; }
tr.has-heads td:first-child { font-weight: 600; }
tr.chosen { background: #fefcbf; }
button.heads-link { font-size: 11px; padding: 0 4px; margin: 0; }
"""

HEADS_JS = """
window.circuitscopeExtensions = (window.circuitscopeExtensions || []).concat([function (page) {
  'use strict';
  var byEdge = new Map(), indexOf = new Map();
  page.data.attention.edges.forEach(function (e) { byEdge.set(e.source + ' ' + e.target, e); });
  page.nodes.forEach(function (n, i) { indexOf.set(n.id, i); });

  function name(id) {
    var i = indexOf.get(id);
    return i === undefined ? id : page.nodes[i].l1 + ' ' + page.nodes[i].l2;
  }
  function hover(id) {
    var i = indexOf.get(id);
    return i === undefined ? id + ' (not in the graph)' : page.nodes[i].desc;
  }
  function signed(x) { return (x >= 0 ? '+' : '') + (+x).toPrecision(4); }
  function add(parent, tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined) { node.textContent = text; }
    if (cls) { node.className = cls; }
    parent.appendChild(node);
    return node;
  }
  // a table of rows [[text, weight or null, hover]]: the text, then the signed weight
  function rows(parent, cls, list) {
    var t = add(parent, 'table', undefined, cls);
    list.forEach(function (r) {
      var row = t.insertRow();
      row.insertCell().textContent = r[0];
      var cell = row.insertCell();
      cell.className = 'num ' + (r[1] >= 0 ? 'pos' : 'neg');
      cell.textContent = signed(r[1]);
      if (r[2]) { row.title = r[2]; }
    });
    return t;
  }

  function qkBlock(box, q) {
    add(box, 'h3', 'L' + q.layer + '.H' + q.head + ': query ' + q.query + ' attends to key ' + q.key);
    add(box, 'div', 'score ' + signed(q.score) + ' (pre-softmax; clean run ' + signed(q.clean_score) + '), pattern ' +
        (+q.pattern).toPrecision(3) + (q.masked ? ' (masked: outside the sliding window)' : ''), 'hint');
    add(box, 'h4', 'top pairs (query source × key source)');
    rows(box, 'qk-pairs', q.pairs.map(function (p) {
      return [name(p.query_source) + ' × ' + name(p.key_source), p.weight,
              hover(p.query_source) + ' × ' + hover(p.key_source)];
    }));
    add(box, 'h4', 'query side (source · key)');
    rows(box, 'qk-query', q.query_marginals.map(function (m) { return [name(m[0]), m[1], hover(m[0])]; }));
    add(box, 'h4', 'key side (query · source)');
    rows(box, 'qk-key', q.key_marginals.map(function (m) { return [name(m[0]), m[1], hover(m[0])]; }));
    add(box, 'h4', 'bias terms (the pairs and the first three sum to the score)');
    rows(box, 'qk-bias', Object.keys(q.bias_terms).map(function (k) { return [k, q.bias_terms[k], null]; }));
  }

  function show(edge, row) {
    var old = document.getElementById('heads');
    if (old) { old.parentNode.removeChild(old); }
    document.querySelectorAll('tr.chosen').forEach(function (r) { r.classList.remove('chosen'); });
    row.classList.add('chosen');
    var box = document.createElement('div');
    box.id = 'heads';
    box.setAttribute('data-edge-source', edge.source);
    box.setAttribute('data-edge-target', edge.target);
    add(box, 'h3', 'Heads: ' + name(edge.source) + ' → ' + name(edge.target));
    add(box, 'div', 'edge ' + signed(edge.weight) + ' (rerun ' + signed(edge.recomputed) + '); each head route ' +
        'is its signed part of the edge', 'hint');
    var total = Math.abs(edge.weight) || 1e-30;
    var routes = rows(box, 'head-routes', edge.heads.map(function (h) {
      return ['L' + h[0] + '.H' + h[1], h[2], null];
    }));
    Array.prototype.forEach.call(routes.rows, function (r, k) {
      var share = r.insertCell();
      share.className = 'num';
      share.textContent = (100 * Math.abs(edge.heads[k][2]) / total).toFixed(1) + '%';
    });
    if (!edge.qk.length) {
      add(box, 'div', 'no QK attribution: the page has it for the ' + page.data.attention.qk_edges +
          ' strongest edges (query attention --qk-edges)', 'hint');
    }
    edge.qk.forEach(function (q) { qkBlock(box, q); });
    var table = document.getElementById('inputs'), after = table.nextSibling;
    if (after && after.className === 'hint') { after = after.nextSibling; }
    table.parentNode.insertBefore(box, after);
    if (box.scrollIntoView) { box.scrollIntoView({ block: 'nearest' }); }
  }

  return { selected: function () {
    var table = document.getElementById('inputs');
    if (!table) { return; }
    Array.prototype.forEach.call(table.rows, function (row) {
      var e = page.edges[+row.getAttribute('data-edge')];
      var edge = byEdge.get(page.nodes[e[0]].id + ' ' + page.nodes[e[1]].id);
      if (!edge) { return; }
      row.classList.add('has-heads');
      var button = add(row.insertCell(), 'button', 'heads', 'heads-link');
      button.setAttribute('data-source', edge.source);
      button.title = 'the attention heads that carry this edge' + (edge.qk.length ? ', and why they attended' : '');
      button.addEventListener('click', function (ev) { ev.stopPropagation(); show(edge, row); });
    });
  } };
}]);
"""
