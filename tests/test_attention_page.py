"""The attention section of the HTML page (docs/design.md §3.11, §6.4): the summary equals what the head routes and
the QK attribution return, the page embeds it and shows a selected edge's heads in headless Chromium, and
``query attention --html`` writes it (and refuses an unwritable path before the rerun)."""

from __future__ import annotations

import html
import json
import re

import pytest
from graph_helpers import traced_graph
from test_render import CONSOLE_ERROR, _body, _chromium, needs_chromium

from circuits.attention.heads import annotate_edges
from circuits.attention.qk import AttentionQueries
from circuits.attention.state import state_from_graph
from circuits.attention.summary import AttentionSummary, attention_summary
from dictionaries.assembly import random_dictionary_set
from viz.html import PageOptions, page_data, render_html, save_html
from viz.labels import node_label
from viz.page_heads import HEADS_CSS, HEADS_JS

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
N_HEADS, QK_EDGES, TOP = 2, 3, 4


@pytest.fixture(scope="module")
def traced(tiny_lm):
    """(graph, state, routes, summary) of the tiny model's graph (dictionaries rebuilt as traced_graph made them)."""
    graph = traced_graph(tiny_lm)
    state = state_from_graph(graph, tiny_lm, random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 16, seed=0))
    routes = annotate_edges(state, graph, top=12, n_heads=N_HEADS)
    return graph, state, routes, attention_summary(state, routes, qk_edges=QK_EDGES, top=TOP)


def test_summary_is_the_head_routes_and_their_qk_attributions(traced):
    graph, state, routes, summary = traced
    assert [(e.source, e.target, e.weight, e.recomputed, e.heads) for e in summary.edges] == [
        (r.source, r.target, r.weight, r.recomputed, r.heads) for r in sorted(routes, key=lambda r: -abs(r.weight))]
    assert all(graph.graph.has_edge(e.source, e.target) for e in summary.edges)
    with_qk = [e for e in summary.edges if e.qk]
    assert len(with_qk) == QK_EDGES and with_qk == summary.edges[:QK_EDGES]
    queries = AttentionQueries(state)
    for edge in with_qk:
        assert [(q.layer, q.head) for q in edge.qk] == [(layer, head) for layer, head, _ in edge.heads]
        for qk in edge.qk:
            query, key = graph.nodes[edge.target]["position"], graph.nodes[edge.source]["position"]
            expected = queries.attribute(qk.layer, qk.head, query, key, TOP)
            assert (qk.query, qk.key) == (query, key)
            assert qk.score == pytest.approx(expected.score, rel=1e-6, abs=1e-9)
            assert [(p.query_source, p.key_source) for p in qk.pairs] == [
                (p.query_source, p.key_source) for p in expected.pairs]
            assert [p.weight for p in qk.pairs] == pytest.approx([p.weight for p in expected.pairs], rel=1e-6)
            assert [n for n, _ in qk.query_marginals] == [n for n, _ in expected.query_marginals]
            assert [n for n, _ in qk.key_marginals] == [n for n, _ in expected.key_marginals]
            assert qk.bias_terms == pytest.approx(expected.bias_terms, rel=1e-6, abs=1e-9)
            assert 1 <= len(qk.pairs) <= TOP
    # the page embeds it as JSON that reads back as the same summary
    embedded = page_data(graph, PageOptions(), summary)["attention"]
    assert AttentionSummary.model_validate(json.loads(json.dumps(embedded))) == summary


def test_without_the_section_the_page_has_no_attention(traced):
    graph, *_, summary = traced
    assert "attention" not in page_data(graph, PageOptions())
    plain, with_heads = render_html(graph), render_html(graph, attention=summary)
    assert HEADS_JS not in plain and HEADS_CSS not in plain and HEADS_JS in with_heads and HEADS_CSS in with_heads
    assert with_heads.count("</script>") == plain.count("</script>") + 1  # the heads script


HEADS_CLICK = """<script>
(function () {
  var link = document.querySelector('#inputs .heads-link[data-source="SOURCE"]');
  document.body.setAttribute('data-heads-rows', String(document.querySelectorAll('#inputs tr.has-heads').length));
  if (link) { link.click(); }
})();
</script></body>"""


@needs_chromium
def test_the_page_shows_a_selected_edges_heads_and_qk_in_headless_chromium(traced, tmp_path):
    graph, state, _, summary = traced
    edge = max((e for e in summary.edges if e.qk), key=lambda e: len(e.qk[0].pairs))  # the most varied QK
    path = save_html(graph, tmp_path / "g.html", attention=summary)
    path.write_text(path.read_text().replace("</body>", HEADS_CLICK.replace("SOURCE", edge.source)))
    run = _chromium(tmp_path, path.as_uri() + "#node=" + edge.target, "--dump-dom")
    body = _body(run.stdout)
    assert 'data-state="ready"' in body, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r'<pre id="errors"></pre>', run.stdout)
    assert not re.search(CONSOLE_ERROR, run.stderr), run.stderr[-2000:]
    with_heads = {e.source for e in summary.edges if e.target == edge.target}
    assert int(re.search(r'data-heads-rows="(\d+)"', body).group(1)) == len(with_heads)
    panel = run.stdout.split('<div id="heads"')[1].split('<h2>Outputs')[0]
    assert f'data-edge-source="{edge.source}"' in panel
    for layer, head, _ in edge.heads:
        assert f"L{layer}.H{head}" in panel
    top = edge.qk[0].pairs[0]
    pair_row = panel.split('class="qk-pairs"')[1].split("</tr>")[0]
    for node in (top.query_source, top.key_source):  # named by the page's label, or by id outside the graph
        name = node_label(graph, node)[0] if node in graph.graph.nodes else node
        assert html.escape(name, quote=False) in pair_row, (name, pair_row)


def test_cli_writes_the_page_with_heads_and_refuses_an_unwritable_path(tmp_path, tiny_checkpoint_dir, monkeypatch):
    from click.testing import CliRunner
    from conftest import PROMPT

    import cli.query_commands
    from cli import main
    from dictionaries.formats.native import save_native

    folder = str(save_native(random_dictionary_set(4, 32, 16, seed=0), tmp_path / "dicts"))
    graph_path = tmp_path / "graph.json"
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", folder,
                                       "-o", str(graph_path), "--batch-size", "16", "--no-drawings"])
    assert result.exit_code == 0, (result.output, result.exception)
    page = tmp_path / "pages" / "g.html"  # its folder is created
    result = CliRunner().invoke(main, ["query", str(graph_path), "attention", "--top-edges", "6", "--heads", "2",
                                       "--html", str(page), "--qk-edges", "2", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    routes = json.loads(result.stdout)
    text = page.read_text()
    data = json.loads(text.split('<script id="graph-data" type="application/json">')[1].split("</script>")[0])
    summary = AttentionSummary.model_validate(data["attention"])
    assert [(e.source, e.target, [list(h) for h in e.heads]) for e in summary.edges] == [
        (r["source"], r["target"], r["heads"]) for r in routes]
    assert [len(e.qk) for e in summary.edges] == [2, 2, 0, 0, 0, 0] and HEADS_JS in text

    def no_rerun(*args):
        raise AssertionError("the output path is checked before the prompt is rerun")

    monkeypatch.setattr(cli.query_commands, "_trace_state", no_rerun)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for path, words in [(tmp_path, "is a directory"), (blocker / "g.html", "is not a directory")]:
        result = CliRunner().invoke(main, ["query", str(graph_path), "attention", "--html", str(path)])
        assert result.exit_code == 2 and words in result.stderr, (path, result.output, result.exception)
        assert len(result.stderr.strip().splitlines()) == 1
