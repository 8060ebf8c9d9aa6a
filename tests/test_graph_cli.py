"""`circuitscope trace --svg/--html/--neuronpedia`, `render` and `query`: output, JSON, and exit code 2 with
one message for user errors."""

import html
import json
import shutil

import graphviz
import pytest
from click.testing import CliRunner
from graph_helpers import hand_built_graph

from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import save_native

needs_graphviz = pytest.mark.skipif(shutil.which("neato") is None,
                                    reason="graphviz is not installed (apt-get install graphviz)")


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def traced(tiny_checkpoint_dir, tmp_path_factory):
    """One CLI trace of the tiny model with every export (the SVG only when graphviz is installed)."""
    root = tmp_path_factory.mktemp("cli-trace")
    save_native(random_dictionary_set(4, 32, 16, seed=0), root / "dicts")
    exports = ["--html", root / "g.html", "--neuronpedia", root / "g.np.json"]
    if shutil.which("neato"):
        exports += ["--svg", root / "g.svg"]
    code, out = _run("trace", "the capital of france is paris", "--model", tiny_checkpoint_dir, "--dictionaries",
                     root / "dicts", "-o", root / "g.json", *exports)
    assert code == 0, out
    return root, out


def test_trace_writes_every_export(traced):
    root, out = traced
    assert "html" in out and "neuronpedia" in out
    assert (root / "g.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((root / "g.np.json").read_text())["metadata"]["prompt"] == "the capital of france is paris"
    if shutil.which("neato"):
        assert (root / "g.svg").read_text().lstrip().startswith("<?xml")


@needs_graphviz
def test_render_svg_html_and_neuronpedia(traced):
    root, _ = traced
    for name in ("r.svg", "r.html", "r.np.json"):
        code, out = _run("render", root / "g.json", "-o", root / name, "--max-nodes", 10, "--max-edges", 20)
        assert code == 0, out
        assert (root / name).stat().st_size > 0 and name in out
    code, out = _run("render", root / "g.json", "-o", root / "r.png")
    assert code == 2 and "OUT.svg, OUT.html, OUT.np.json, OUT.json or OUT.safetensors" in out
    code, out = _run("render", root / "g.json", "-o", root / "few.svg", "--edges-per-node", 1, "--max-edges", 5,
                     "--error-influence", 1e9)  # no error passes
    assert code == 0, out
    svg = (root / "few.svg").read_text()
    assert 0 < svg.count('class="edge"') <= 5 and 'class="node mark' not in svg
    code, out = _run("render", root / "g.json", "-o", root / "bad.svg", "--min-edge-share", 2)
    assert code == 2 and "--min-edge-share" in out and not (root / "bad.svg").exists()


@needs_graphviz
def test_render_with_automatic_supernodes(traced):
    root, _ = traced
    for name in ("s.svg", "s.html"):
        code, out = _run("render", root / "g.json", "-o", root / name, "--supernodes", "auto")
        assert code == 0, out
    code, out = _run("query", root / "g.json", "supernodes", "--json")
    groups = json.loads(out)
    assert groups and all(len(g["members"]) > 1 for g in groups)
    svg, page = html.unescape((root / "s.svg").read_text()), (root / "s.html").read_text()
    strongest = "supernode:" + groups[0]["name"]
    assert strongest in svg and strongest in page and f"{len(groups[0]['members'])} nodes" in svg
    assert groups[0]["members"][0] not in svg  # drawn as its group, not on its own


def test_render_without_graphviz_says_how_to_install(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise graphviz.ExecutableNotFound(["neato"])

    monkeypatch.setattr(graphviz.Digraph, "pipe", missing)
    hand_built_graph().save(tmp_path / "g.json")
    code, out = _run("render", tmp_path / "g.json", "-o", tmp_path / "g.svg")
    assert code == 2 and "apt-get install graphviz" in out and "Traceback" not in out
    assert not (tmp_path / "g.svg").exists()


def test_trace_with_svg_but_without_graphviz_stops_before_tracing(tmp_path, monkeypatch):
    import viz.svg

    monkeypatch.setattr(viz.svg.shutil, "which", lambda name: None)
    code, out = _run("trace", "some text", "--model", tmp_path / "no-model", "--dictionaries", tmp_path / "none",
                     "-o", tmp_path / "g.json", "--svg", tmp_path / "g.svg")
    assert code == 2 and "apt-get install graphviz" in out  # not a complaint about the missing model
    assert not (tmp_path / "g.json").exists()


@pytest.fixture
def hand_file(tmp_path):
    hand_built_graph().save(tmp_path / "a.json")
    hand_built_graph(variant=True).save(tmp_path / "b.json")
    return tmp_path


def test_query_paths(hand_file):
    # by default the one-edge path token@2 -> logit (0.2, second strongest) is hidden: the best two explain
    code, out = _run("query", hand_file / "a.json", "paths", "-k", 2)
    assert code == 0, out
    assert out.count("#") == 2 and "#1  strength 0.4  sign +" in out and "#2  strength 0.1333  sign +" in out
    rows = [line.split() for line in out.splitlines()]  # each node: id, layer, label, the weight into it
    assert [r[0] for r in rows if r and r[0] in ("token@2", "feature:0:5@2", "feature:1:3@2", "logit:10@2")] == [
        "token@2", "feature:0:5@2", "feature:1:3@2", "logit:10@2", "feature:1:3@2", "logit:10@2"]
    row = next(r for r in rows if r and r[0] == "feature:0:5@2")
    assert row[1] == "0" and "animal" in row and row[-1] == "+3"
    assert "--direct lists them" in out
    code, out = _run("query", hand_file / "a.json", "paths", "-k", 2, "--direct")
    assert "#2  strength 0.2  sign +" in out and "--direct lists them" not in out
    code, out = _run("query", hand_file / "a.json", "paths", "--target", "logit:11@2", "--json", "--direct")
    paths = json.loads(out)
    assert {tuple(p["nodes"]) for p in paths} == {("token@1", "logit:11@2"), ("token@2", "feature:0:7@2", "logit:11@2")}
    assert all(p["sign"] == -1 and p["strength"] == 0.5 for p in paths)


def test_query_paths_that_explain(hand_file):
    def found(*options):
        code, out = _run("query", hand_file / "a.json", "paths", "-k", 10, "--json", *options)
        assert code == 0, out
        return [tuple(p["nodes"]) for p in json.loads(out)]

    assert found("--min-feature-hops", 2) == [
        ("token@2", "feature:0:5@2", "feature:1:3@2", "logit:10@2"),
        ("token@1", "feature:0:5@1", "feature:1:3@2", "logit:10@2"),
        ("token@2", "feature:0:7@2", "feature:1:3@2", "logit:10@2")]
    assert found("--layers", "1-1") == [] and len(found("--layers", "0-1")) == 3
    assert found("--layers", "1-1", "--direct") == [("token@2", "logit:10@2")]
    assert found("--exclude", "feature", "--direct") == [("token@2", "logit:10@2")]
    # merged by label, the three "animal" features are one node: one path into it per token, then the logit
    assert found("--supernodes", "label") == [("token@2", "supernode:animal", "logit:10@2"),
                                              ("token@1", "supernode:animal", "logit:10@2"),
                                              ("token@2", "feature:0:7@2", "supernode:animal", "logit:10@2")]
    code, out = _run("query", hand_file / "a.json", "paths", "--min-feature-hops", 3)
    assert code == 0 and out.startswith("no path satisfies these constraints")
    code, out = _run("query", hand_file / "a.json", "paths", "--layers", "9-3")
    assert code == 2 and "layer range '9-3' is empty" in out and "Traceback" not in out


def test_query_supernodes(hand_file):
    code, out = _run("query", hand_file / "a.json", "supernodes", "--method", "feature")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "1 groups of 2 nodes (shown: the 1 most influential)"
    assert lines[1].split() == ["group", "members", "layers", "positions", "influence", "member", "labels"]
    assert lines[3].split() == ["0:5", "2", "0", "1,2", "0.4", "animal"]
    code, out = _run("query", hand_file / "a.json", "supernodes", "--method", "label", "--json")
    assert [(g["name"], g["members"]) for g in json.loads(out)] == [
        ("animal", ["feature:1:3@2", "feature:0:5@2", "feature:0:5@1"])]
    code, out = _run("query", hand_file / "a.json", "supernodes")  # auto: no two features alike here
    assert code == 0 and out.strip() == "no groups"


def test_query_node(hand_file):
    code, out = _run("query", hand_file / "a.json", "node", "feature:1:3@2")
    assert code == 0, out
    assert "inputs (4)" in out and "outputs (1)" in out and "+3" in out and "-0.5" in out and "50.0%" in out
    code, out = _run("query", hand_file / "a.json", "node", "feature:1:3@2", "--top", 1, "--json")
    report = json.loads(out)
    assert report["inputs"] == [{"node": "feature:0:5@2", "weight": 3.0, "share": 0.5}]
    assert report["data"]["label"] == "animal"


def test_query_top_and_search(hand_file):
    code, out = _run("query", hand_file / "a.json", "top", "-n", 2, "--kind", "feature")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["id", "kind", "layer"] and lines[2].startswith("feature:1:3@2")
    code, out = _run("query", hand_file / "a.json", "search", "--feature", "0:5", "--json")
    assert sorted(n["id"] for n in json.loads(out)) == ["feature:0:5@1", "feature:0:5@2"]
    code, out = _run("query", hand_file / "a.json", "search", "--label", "animal", "--layer", 1)
    assert code == 0 and "feature:1:3@2" in out and "feature:0:5" not in out
    code, out = _run("query", hand_file / "a.json", "search", "--token", "dog")
    assert code == 0 and "no node matches" in out


def test_query_compare(hand_file):
    code, out = _run("query", hand_file / "a.json", "compare", hand_file / "b.json")
    assert code == 0, out
    assert "feature overlap 0.500" in out and "only in a" in out and "edges that changed most" in out
    code, out = _run("query", hand_file / "a.json", "compare", hand_file / "b.json", "--json")
    result = json.loads(out)
    assert [f["feature_key"] for f in result["only_b"]] == ["1:9"]
    assert result["changed"][0]["weight_a"] == 4.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "feature:9:9@9"], "no node 'feature:9:9@9'"),
        (["paths", "-k", "0"], "k must be at least 1"),
        (["search"], "give at least one search term"),
        (["search", "--feature", "x"], "--feature 'x'"),
        (["compare", "missing.json"], "no such graph file"),
    ],
)
def test_query_user_errors(hand_file, args, message):
    code, out = _run("query", hand_file / "a.json", *[hand_file / a if a.endswith(".json") else a for a in args])
    assert code == 2 and message in out and "Traceback" not in out


def test_query_of_a_damaged_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "circuitscope.graph", "schema_version": 99}')
    code, out = _run("query", tmp_path / "bad.json", "top")
    assert code == 2 and "newer circuitscope" in out
