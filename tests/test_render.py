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
    path = save_svg(graph, tmp_path / "g.svg")
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
    assert set(drawn) == always | set(select(graph, limits).nodes)
    assert len(drawn) == len(always) + 25 and set(drawn.values()) == {1}
    edges = [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") == "edge"]
    assert len(edges) == 60
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
