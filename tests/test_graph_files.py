"""The compact graph file (schema 5: safetensors edge arrays beside the JSON of nodes and metadata): loss-free round
trips in both layouts, one content hash for both, identical bytes for two runs apart from the run section, questions
about a node answered without building networkx, damaged files refused with one clear message."""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from graph_helpers import as_filed, assert_same_graph, hand_built_graph, traced_graph
from safetensors import safe_open
from safetensors.numpy import save_file

from circuits.graph.attribution_graph import GRAPH_SCHEMA_VERSION, AttributionGraph
from circuits.graph.queries import node_report, top_nodes
from circuits.graph.supernodes import group_by_feature, merge_nodes
from cli import main
from dictionaries.errors import CircuitscopeError


def _header(path) -> dict:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size))


def _data_bytes(path) -> bytes:
    raw = open(path, "rb").read()
    (size,) = struct.unpack("<Q", raw[:8])
    return raw[8 + size:]


def test_a_traced_graph_with_its_unpruned_section_round_trips_through_both_layouts(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm, keep_unpruned=True)
    assert graph.unpruned is not None and graph.unpruned.weights
    compact = AttributionGraph.load(graph.save(tmp_path / "g.safetensors"))
    plain = AttributionGraph.load(graph.save(tmp_path / "g.json"))
    assert_same_graph(as_filed(graph), compact)
    assert_same_graph(compact, plain)
    with safe_open(str(tmp_path / "g.safetensors"), framework="np") as fh:
        assert json.loads(fh.metadata()["circuitscope.graph"])["schema_version"] == GRAPH_SCHEMA_VERSION
        assert fh.get_tensor("edges.weights").dtype == np.float32  # a trace's weights are float32 values
        assert len(fh.get_tensor("edges.sources")) == graph.graph.number_of_edges()
        assert len(fh.get_tensor("unpruned.weights")) == len(graph.unpruned.weights)
    assert (tmp_path / "g.safetensors").stat().st_size < (tmp_path / "g.json").stat().st_size
    again = AttributionGraph.load(compact.save(tmp_path / "again.safetensors"))
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "g.safetensors").read_bytes()
    assert_same_graph(compact, again)


def test_both_layouts_record_one_content_hash_that_changes_with_any_weight(tmp_path):
    graph = hand_built_graph()
    compact_hash = json.loads(_compact_json(graph.save(tmp_path / "g.safetensors")))["content_hash"]
    json_hash = json.loads((graph.save(tmp_path / "g.json")).read_text())["content_hash"]
    assert compact_hash == json_hash == graph.content_hash and len(compact_hash) == 64
    s, t = next(iter(graph.graph.edges))
    graph.graph.edges[s, t]["weight"] = np.nextafter(np.float32(graph.graph.edges[s, t]["weight"]), np.float32(9))
    assert graph.content_hash != compact_hash


def _compact_json(path) -> str:
    with safe_open(str(path), framework="np") as fh:
        return fh.get_tensor("graph").tobytes().decode()


def test_weights_that_are_not_float32_values_are_kept_in_float64(tmp_path):
    merged = merge_nodes(hand_built_graph(), group_by_feature(hand_built_graph()))
    merged.graph.add_edge("token@0", "logit:10@2", weight=0.1)  # 0.1 is no float32
    loaded = AttributionGraph.load(merged.save(tmp_path / "m.safetensors"))
    assert_same_graph(merged, loaded)
    assert loaded.graph.edges["token@0", "logit:10@2"]["weight"] == 0.1


def test_two_runs_give_identical_tensor_bytes_and_differ_only_in_the_run_metadata(tiny_lm, tmp_path):
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.assembly import random_dictionary_set

    dicts = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 16, seed=0)

    paths = [trace(tiny_lm, dicts, "The cat sat", TraceSettings(max_features=6)).save(tmp_path / f"{n}.safetensors")
             for n in ("a", "b")]
    headers = [_header(p) for p in paths]
    abouts = [json.loads(h.pop("__metadata__")["circuitscope.graph"]) for h in headers]
    runs = [about.pop("run") for about in abouts]
    assert abouts[0] == abouts[1] == {"schema_version": GRAPH_SCHEMA_VERSION}
    assert runs[0]["timings"]["total"] > 0 and runs[0] != runs[1]
    assert headers[0] == headers[1]
    assert _data_bytes(paths[0]) == _data_bytes(paths[1])
    loaded = AttributionGraph.load(paths[0])
    assert loaded.metadata.timings == runs[0]["timings"]


def test_questions_about_one_node_are_answered_from_the_columns(tiny_lm, tmp_path):
    graph = traced_graph(tiny_lm)
    path = graph.save(tmp_path / "g.safetensors")
    loaded = AttributionGraph.load(path)
    busiest = max(graph.graph, key=lambda n: graph.graph.degree(n))
    for node in (busiest, *graph.logit_nodes):
        assert node_report(loaded, node) == node_report(graph, node)
    assert top_nodes(loaded, 10) == top_nodes(graph, 10)
    assert loaded._graph is None  # no networkx graph was built for any of it
    assert node_report(loaded, busiest, top=3) == node_report(graph, busiest, top=3)
    with pytest.raises(CircuitscopeError, match="no node"):
        node_report(loaded, "feature:99:99@0")
    loaded.graph.remove_node(busiest)  # once built, networkx is the graph's one truth
    assert AttributionGraph.load(loaded.save(tmp_path / "h.safetensors")).graph.number_of_nodes() == \
        graph.graph.number_of_nodes() - 1


def _labelled():
    from circuits.graph.schema import FeatureContext, FeatureInfo

    graph = hand_built_graph()
    graph.metadata.feature_info = {"0:5": FeatureInfo(label="cat·dog", frequency=0.01, mean_activation=2.5, contexts=[
        FeatureContext(tokens=["the", "cat"], activations=[0.0, 2.5], peak=1)], promoted=[" meow"])}
    return graph


def test_the_features_contexts_are_read_only_when_asked_for(tmp_path):
    graph = _labelled()
    loaded = AttributionGraph.load(graph.save(tmp_path / "g.safetensors"))
    assert node_report(loaded, "feature:0:5@1") == node_report(graph, "feature:0:5@1")
    assert loaded.tokens == graph.metadata.tokens
    assert loaded._feature_info is not None  # not parsed for a question about a node
    assert loaded.metadata == graph.metadata and loaded.metadata.feature_info["0:5"].label == "cat·dog"
    assert loaded.content_hash == graph.content_hash
    assert_same_graph(AttributionGraph.load(graph.save(tmp_path / "g.json")), loaded)


def test_the_cli_reads_both_layouts_alike_and_render_converts_between_them(tmp_path):
    compact = hand_built_graph().save(tmp_path / "g.safetensors")
    runner = CliRunner()
    converted = tmp_path / "out" / "g.json"
    result = runner.invoke(main, ["render", str(compact), "-o", str(converted)])
    assert result.exit_code == 0, result.output
    node = "feature:0:5@1"
    answers = [runner.invoke(main, ["query", str(p), "node", node, "--json"]) for p in (compact, converted)]
    assert answers[0].exit_code == 0, answers[0].output
    assert answers[0].stdout == answers[1].stdout and json.loads(answers[0].stdout)["id"] == node
    back = tmp_path / "back.safetensors"
    assert runner.invoke(main, ["render", str(converted), "-o", str(back)]).exit_code == 0
    assert back.read_bytes() == compact.read_bytes()


def _rewrite(path, **changes):
    with safe_open(str(path), framework="np") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    for key, value in changes.items():
        if key == "metadata":
            metadata = value
        elif value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-20]), "not a graph file"),
    (lambda p: _rewrite(p, **{"edges.targets": None}), r"damaged graph file \(no edges.targets tensor\)"),
    (lambda p: _rewrite(p, **{"edges.sources": np.full(7, 10_000, dtype=np.int32)}), "damaged graph file"),
    (lambda p: _rewrite(p, **{"edges.weights": np.ones(1, dtype=np.float16)}), "damaged graph file"),
    (lambda p: _rewrite(p, graph=np.frombuffer(b"{not json", dtype=np.uint8)), "damaged graph file"),
    (lambda p: _rewrite(p, feature_info=np.frombuffer(b'{"0:5": 3}', dtype=np.uint8)),
     r"damaged graph file \(feature_info"),
    (lambda p: _rewrite(p, metadata={"circuitscope.graph": json.dumps({"schema_version": GRAPH_SCHEMA_VERSION + 1})}),
     "upgrade circuitscope"),
    (lambda p: _rewrite(p, metadata={"circuitscope.graph": "{}"}), r"damaged graph file \(schema_version None"),
    (lambda p: _rewrite(p, metadata={"format": "dictionary"}), "not a circuitscope graph file"),
    (lambda p: save_file({"W_enc": np.zeros((2, 3), np.float32)}, str(p)), "not a circuitscope graph file"),
], ids=["truncated", "no-targets", "index-out-of-range", "float16-weights", "bad-json", "bad-feature-info",
        "newer-schema", "no-version", "other-format", "a-dictionary-file"])
def test_a_damaged_compact_file_is_one_clear_error(tmp_path, damage, message):
    path = _labelled().save(tmp_path / "g.safetensors")
    damage(path)
    with pytest.raises(CircuitscopeError, match=message) as info:
        AttributionGraph.load(path).metadata  # noqa: B018  (the features' contexts are read here)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_query_node_on_a_compact_file_runs_without_torch_or_networkx_graph(tmp_path):
    import subprocess
    import sys

    path = hand_built_graph().save(tmp_path / "g.safetensors")
    script = ("import sys\nfrom cli import main\n"
              f"main(['query', {str(path)!r}, 'node', 'feature:0:5@1', '--json'], standalone_mode=False)\n"
              "assert 'torch' not in sys.modules, 'query imported torch'\n")
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == "feature:0:5@1"


def test_every_command_is_listed_where_the_cli_finds_it_lazily():
    import importlib
    import pkgutil

    import cli
    from cli.app import COMMAND_MODULES

    for module in pkgutil.iter_modules(cli.__path__):
        if module.name != "__main__":  # that one runs the command
            importlib.import_module(f"cli.{module.name}")
    assert set(main.commands) == set(COMMAND_MODULES)
    for name, module in COMMAND_MODULES.items():
        assert main.commands[name].callback.__module__ == f"cli.{module}", name


def test_a_trace_saves_the_same_bytes_before_and_after_its_networkx_graph_is_built(tiny_lm, tmp_path):
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.assembly import random_dictionary_set

    dicts = random_dictionary_set(tiny_lm.n_layers, tiny_lm.d_model, 16, seed=0)
    graph = trace(tiny_lm, dicts, "The cat sat", TraceSettings(max_features=6))
    before = graph.save(tmp_path / "before.safetensors").read_bytes()
    assert graph.graph.number_of_edges() > 0  # builds networkx from the trace's columns
    assert graph.save(tmp_path / "after.safetensors").read_bytes() == before
