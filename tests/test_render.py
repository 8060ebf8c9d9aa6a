"""SVG through graphviz (parses as XML, one shape per node, limits for big graphs, a clear message when
graphviz is missing) and the self-contained HTML page (loads in headless Chromium without errors)."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import graphviz
import pytest
from graph_helpers import hand_built_graph, traced_graph

from circuits.graph.supernodes import group_by_label, merge_nodes
from dictionaries.errors import CircuitscopeError
from viz.html import PageOptions, page_data, render_html, save_html
from viz.palette import NEGATIVE, POSITIVE
from viz.selection import DrawLimits, layout, select
from viz.svg import render_svg, save_svg

SVG = "{http://www.w3.org/2000/svg}"
XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"
SHAPES = {f"{SVG}{name}" for name in ("ellipse", "polygon", "path", "rect", "polyline", "circle")}
needs_graphviz = pytest.mark.skipif(shutil.which("neato") is None,
                                    reason="graphviz is not installed (apt-get install graphviz)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="headless Chromium is not installed (apt-get install chromium)")


def _drawn_nodes(svg_text: str) -> dict[str, int]:
    """Node id (from its tooltip) -> number of shapes in its group, for every graph node (axis labels apart)."""
    root = ET.fromstring(svg_text)
    drawn = {}
    for group in root.iter(f"{SVG}g"):
        classes = group.get("class", "").split()
        if "node" in classes and "axis" not in classes:
            title = next(a.get(XLINK_TITLE) for a in group.iter(f"{SVG}a"))
            drawn[title.split(" | ")[0]] = sum(1 for el in group.iter() if el.tag in SHAPES)
    return drawn


@needs_graphviz
def test_svg_has_one_shape_per_node(tmp_path):
    graph = merge_nodes(hand_built_graph(), {"pair": ["feature:0:5@1", "feature:0:5@2"]})
    path = save_svg(graph, tmp_path / "g.svg", DrawLimits(mark_influence=0.0))  # every error marked
    drawn = _drawn_nodes(path.read_text())
    assert drawn == dict.fromkeys(graph.graph.nodes, 1)
    root = ET.fromstring(path.read_text())
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(edges) == graph.graph.number_of_edges()
    colours = {p.get("stroke") for g in edges for p in g.iter(f"{SVG}path")}
    assert colours == {POSITIVE, NEGATIVE}  # positive and negative edges
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "“cat”" in text and "animal" in text and "pair" in text and "L1" in text and "tokens" in text


@needs_graphviz
def test_svg_of_a_traced_graph_keeps_to_its_limits(tiny_lm):
    graph = traced_graph(tiny_lm)
    limits = DrawLimits(max_nodes=25, max_edges=60)
    svg = render_svg(graph, limits)
    drawn = _drawn_nodes(svg)
    always = set(graph.nodes_of_kind("token")) | set(graph.logit_nodes)
    chosen = select(graph, limits)
    marks = {members[0] for members in chosen.marks.values()}  # a mark is named by its first member
    assert set(drawn) == always | set(chosen.nodes) | marks
    assert len(drawn) == len(always) + 25 + len(marks) and set(drawn.values()) == {1}
    edges = [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") == "edge"]
    assert 0 < len(edges) <= 60
    assert "hidden" in svg


def test_layout_puts_layers_bottom_to_top_and_positions_left_to_right(tiny_lm):
    graph = traced_graph(tiny_lm)
    placement = layout(graph, list(graph.graph.nodes))
    for s, t in graph.graph.edges:
        assert placement.where[s][1] > placement.where[t][1]  # sources sit lower (larger y)
    tokens = sorted(graph.nodes_of_kind("token"), key=lambda n: graph.graph.nodes[n]["position"])
    xs = [placement.where[n][0] for n in tokens]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_missing_graphviz_names_the_install(monkeypatch):
    def missing(*args, **kwargs):
        raise graphviz.ExecutableNotFound(["neato"])

    monkeypatch.setattr(graphviz.Digraph, "pipe", missing)
    with pytest.raises(CircuitscopeError, match="apt-get install graphviz"):
        render_svg(hand_built_graph())


def test_html_is_self_contained(tiny_lm):
    page = render_html(traced_graph(tiny_lm))
    assert "<link" not in page and not re.search(r"\bsrc\s*=", page) and "@import" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace only
    assert "default-src 'none'" in page  # the browser may fetch nothing


def test_html_data_cannot_break_out_of_its_script(tmp_path):
    graph = hand_built_graph()
    graph.graph.nodes["feature:0:7@2"]["label"] = "</script><script>alert(1)</script>"
    page = render_html(graph)
    assert page.count("</script>") == 3  # the error trap, the data and the page script
    data = page.split('<script id="graph-data" type="application/json">')[1].split("</script>")[0]
    (node,) = [n for n in json.loads(data)["nodes"] if n["id"] == "feature:0:7@2"]
    assert node["l1"].startswith("</script>")


def test_page_data_edges_are_ranked_and_capped(tiny_lm):
    graph = traced_graph(tiny_lm)
    data = page_data(graph, PageOptions(max_edges=50))
    assert len(data["edges"]) == 50 and len(data["nodes"]) == graph.graph.number_of_nodes()
    ids = [n["id"] for n in data["nodes"]]
    assert all(graph.graph.has_edge(ids[s], ids[t]) for s, t, _ in data["edges"])
    shares = [n["cum"] for n in data["nodes"] if n["cum"] is not None]
    assert max(shares) == pytest.approx(1.0)
    assert all(n["cum"] is None for n in data["nodes"] if n["kind"] in ("token", "logit"))


CONSOLE_ERROR = r"CONSOLE.*(Uncaught|Error)"  # how Chromium's stderr log shows a page's console errors


def _chromium(tmp_path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def _body(dom: str) -> str:
    return re.search(r"<body[^>]*>", dom).group(0)


@needs_chromium
def test_html_loads_in_headless_chromium_without_errors(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm)
    path = save_html(graph, tmp_path / "g.html")
    node = [n for n in graph.nodes_of_kind("feature") if graph.graph.in_degree(n) and graph.graph.out_degree(n)][0]
    run = _chromium(tmp_path, path.as_uri() + "#node=" + node, "--dump-dom")
    body = _body(run.stdout)
    assert 'data-state="ready"' in body, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r'<pre id="errors"></pre>', run.stdout)
    assert not re.search(CONSOLE_ERROR, run.stderr), run.stderr[-2000:]
    assert int(re.search(r'data-visible-nodes="(\d+)"', body).group(1)) > len(graph.metadata.tokens)
    assert int(re.search(r'data-drawn-edges="(\d+)"', body).group(1)) > 0
    # the node named in the address is selected: its inputs and outputs are listed
    assert 'id="inputs"' in run.stdout and 'id="outputs"' in run.stdout
    assert run.stdout.count('class="node ') == int(re.search(r'data-visible-nodes="(\d+)"', body).group(1))


@needs_chromium
def test_html_page_reports_its_own_errors(tmp_path):
    """The check above can fail: a page whose data is broken says so in the DOM."""
    page = render_html(merge_nodes(hand_built_graph(), group_by_label(hand_built_graph())))
    opening = '<script id="graph-data" type="application/json">'
    broken = page.replace(opening + "{", opening + "{{")  # the data is no longer JSON
    (tmp_path / "broken.html").write_text(broken)
    run = _chromium(tmp_path, (tmp_path / "broken.html").as_uri(), "--dump-dom")
    assert 'data-state="error"' in _body(run.stdout)
    assert "error: " in run.stdout.split('<pre id="errors">')[1]
    assert re.search(CONSOLE_ERROR, run.stderr)  # and the console check sees it too


# --- a readable default drawing (issue 14) ---------------------------------------------------------------------

def _svg_groups(svg_text: str, kind: str) -> list[ET.Element]:
    return [g for g in ET.fromstring(svg_text).iter(f"{SVG}g") if kind in g.get("class", "").split()]


def test_default_edges_are_each_nodes_strongest_inputs_under_a_cap(tiny_lm):
    from circuits.graph.weights import edge_importance, normalised_weights

    graph = traced_graph(tiny_lm)
    limits = DrawLimits(max_nodes=30, edges_per_node=2, min_edge_share=0.05, max_edges=25)
    chosen = select(graph, limits)
    drawn = set(chosen.drawn_as())
    among = [(s, t) for s, t in graph.graph.edges if s in drawn and t in drawn]
    assert len(among) > limits.max_edges  # the limits bite
    assert 0 < len(chosen.edges) <= limits.max_edges
    shares, importance = normalised_weights(graph), edge_importance(graph)
    per_target = {}
    for s, t in chosen.edges:
        per_target[t] = per_target.get(t, 0) + 1
        assert shares[s, t] >= limits.min_edge_share
    assert max(per_target.values()) <= limits.edges_per_node
    strongest = max(among, key=lambda e: importance[e])
    assert strongest in chosen.edges  # the most important edge among the drawn nodes is drawn
    for t in per_target:  # a target with edges drawn shows its strongest input
        best = max((e for e in among if e[1] == t), key=lambda e: shares[e])
        assert best in chosen.edges


@needs_graphviz
def test_default_svg_draws_at_most_the_edge_cap(tiny_lm):
    graph = traced_graph(tiny_lm)
    svg = render_svg(graph)
    assert 0 < len(_svg_groups(svg, "edge")) <= DrawLimits().max_edges


def _cells_above(graph, floor: float) -> int:
    cells = {}
    for _, data in graph.graph.nodes(data=True):
        if data["kind"] == "error":
            key = data["layer"], data["position"]
            cells[key] = cells.get(key, 0.0) + data["influence"]
    return sum(1 for v in cells.values() if v >= floor)


@needs_graphviz
def test_errors_are_one_small_mark_per_cell_above_the_threshold(tiny_lm):
    graph = traced_graph(tiny_lm)
    errors = [graph.graph.nodes[n]["influence"] for n in graph.nodes_of_kind("error")]
    floor = sorted(errors)[len(errors) // 2]  # about half the error cells pass
    svg = render_svg(graph, DrawLimits(mark_influence=floor))
    marks = _svg_groups(svg, "mark")
    assert 0 < len(marks) <= _cells_above(graph, floor) < len(errors)
    assert not [g for g in _svg_groups(svg, "error") if "mark" not in g.get("class")]  # no full-size error node
    for g in marks:
        (polygon,) = g.iter(f"{SVG}polygon")
        xs = [float(p.split(",")[0]) for p in polygon.get("points").split()]
        assert max(xs) - min(xs) <= 15  # points: a small mark, not a 88-point node
        assert not [t for t in g.iter(f"{SVG}text") if (t.text or "").strip()]  # no label
    # by default a cell is marked when its errors are as influential as the weakest feature drawn
    chosen = select(graph, DrawLimits())
    weakest = min(graph.graph.nodes[n]["influence"] for n in chosen.nodes if graph.graph.nodes[n]["kind"] == "feature")
    assert len(chosen.marks) == _cells_above(graph, weakest)


def test_labels_wrap_on_word_boundaries():
    from viz.wrapping import wrap_label

    label = "capital city France Paris | Paris/London/Berlin/Madrid"
    lines = wrap_label(label, width=20, max_lines=4)
    assert len(lines) > 1 and all(len(line) <= 20 for line in lines)
    assert re.fullmatch(r"\s*".join(map(re.escape, lines)), label)  # the lines join back to the label
    for line in lines[:-1]:  # each break is at a space or after a slash, never inside a word
        end = label.index(line) + len(line)
        assert label[end] == " " or label[end - 1] == "/"
    cut = wrap_label("one two three four five six seven", width=9, max_lines=2)
    assert cut == ["one two", "three…"]  # too long: whole words, then an ellipsis
    assert wrap_label("supercalifragilistic", width=5) == ["supercalifragilistic"]  # a long word stays whole


@needs_graphviz
def test_svg_shows_whole_labels_wrapped_and_escapes_what_the_font_lacks():
    graph = hand_built_graph()
    label = "animal | cat 髓\x07\ue000 &amp; <b>"
    graph.graph.nodes["feature:1:3@2"]["label"] = label
    svg = render_svg(graph)
    ET.fromstring(svg)  # still XML: the control character is escaped
    (group,) = [g for g in _svg_groups(svg, "feature") if next(g.iter(f"{SVG}a")).get(XLINK_TITLE).startswith(
        "feature:1:3@2 ")]
    lines = [t.text for t in group.iter(f"{SVG}text")]
    assert len(lines) == 4  # the label in three lines, then the token
    shown = "animal | cat \\u9ad3\\x07\\ue000 &amp; <b>"
    assert re.fullmatch(r"\s*".join(map(re.escape, lines[:-1])), shown)
    assert "髓" not in svg.split("<title>")[0] + "".join(lines)


def test_drawable_characters():
    from viz.glyphs import drawable_text, visible_text

    assert drawable_text("Paris é Ж → ␣ ⏎") == "Paris é Ж → ␣ ⏎"
    assert drawable_text("a\u200bb\x00c\u00a0d") == "a\\u200bb\\x00c\\xa0d"  # invisible characters shown
    assert drawable_text("髓 ก 😀") == "\\u9ad3 \\u0e01 \\U0001f600"
    assert visible_text("髓\x07") == "髓\\x07"


@pytest.mark.skipif(not (shutil.which("fc-query") and shutil.which("fc-match")), reason="fontconfig is not installed")
def test_drawable_ranges_are_in_dejavu_sans():
    import unicodedata

    from viz.glyphs import DRAWABLE_RANGES, drawable_char

    found = subprocess.run(["fc-match", "--format=%{file}", "DejaVu Sans"], capture_output=True, text=True,
                           check=False).stdout
    if "DejaVuSans" not in found:
        pytest.skip("DejaVu Sans is not installed")
    charset = subprocess.run(["fc-query", "--format=%{charset}", found], capture_output=True, text=True,
                             check=False).stdout
    covered = set()
    for part in charset.split():
        first, _, last = part.partition("-")
        covered.update(range(int(first, 16), int(last or first, 16) + 1))
    drawable = [c for a, b in DRAWABLE_RANGES for c in range(a, b + 1) if drawable_char(chr(c))]
    missing = [hex(c) for c in drawable if c not in covered and unicodedata.category(chr(c)) != "Cn"]
    assert not missing


FIT_CHECK = """<script>
(function () {  // after the page's script: is every node and mark inside the canvas as first shown?
  var canvas = document.getElementById('canvas').getBoundingClientRect(), out = [];
  document.querySelectorAll('g.node, g.mark').forEach(function (g) {
    var r = g.getBoundingClientRect();
    if (r.left < canvas.left - 0.5 || r.top < canvas.top - 0.5 || r.right > canvas.right + 0.5 ||
        r.bottom > canvas.bottom + 0.5) { out.push(g.getAttribute('data-id')); }
  });
  document.body.setAttribute('data-outside', String(out.length));
  document.body.setAttribute('data-drawn', String(document.querySelectorAll('g.node, g.mark').length));
})();
</script></body>"""


@needs_chromium
def test_html_first_view_fits_the_whole_graph(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm)
    page = render_html(graph, PageOptions(threshold=1.0))  # every node: a drawing far larger than the window
    (tmp_path / "g.html").write_text(page.replace("</body>", FIT_CHECK))
    run = _chromium(tmp_path, (tmp_path / "g.html").as_uri(), "--window-size=900,600", "--dump-dom")
    body = _body(run.stdout)
    assert 'data-state="ready"' in body, run.stdout[-2000:]
    assert int(re.search(r'data-drawn="(\d+)"', body).group(1)) > 50
    assert float(re.search(r'data-zoom="([\d.]+)"', body).group(1)) < 1  # it had to zoom out
    assert re.search(r'data-outside="(\d+)"', body).group(1) == "0"


def test_html_opens_with_as_many_nodes_as_the_svg(tiny_lm):
    graph = traced_graph(tiny_lm)
    data = page_data(graph, PageOptions())
    ranked = sorted(n["cum"] for n in data["nodes"] if n["cum"] is not None)
    wanted = min(DrawLimits().max_nodes, len(ranked))
    assert sum(1 for c in ranked if c <= data["view"]["threshold"]) == wanted
    smaller = page_data(graph, PageOptions(threshold=ranked[9]))  # an explicit threshold is kept
    assert smaller["view"]["threshold"] == ranked[9]
    assert all(n["cum"] is None for n in data["nodes"] if n["kind"] == "error")  # errors are marks, not ranked
