"""Feature labels: the annotator's top contexts, frequencies and promoted/suppressed tokens equal a brute-force
search on the tiny model; the stored format round-trips memory-mapped; labels flow into graphs (node labels,
feature info in the graph JSON, Neuronpedia clerp, SVG text, HTML page data and the clicked node's contexts);
``circuitscope features annotate|show`` work and user errors exit with code 2."""

from __future__ import annotations

import html
import importlib
import json
import random
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from conftest import PROMPT, WORDS

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.neuronpedia import to_neuronpedia
from circuits.settings import TraceSettings
from circuits.tracing import trace
from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.evaluation import corpus_contexts
from dictionaries.formats.native import save_native
from dictionaries.formats.registry import load_dictionaries
from dictionaries.labels import (
    AnnotationSettings,
    FeatureLabels,
    FeatureSummary,
    TokenScore,
    TopContext,
    annotate,
    annotate_contexts,
    fingerprint,
    labels_directory,
    short_label,
)
from dictionaries.labels.format import LAYER_TENSORS, MANIFEST_FILE, layer_file
from dictionaries.labels.logit_lens import excluded_tokens
from dictionaries.labels.top_contexts import dequantize_window
from dictionaries.models.hook_sites import record_mlp_io
from dictionaries.safetensors_io import write_tensors
from viz.html import PageOptions, page_data, render_html, save_html
from viz.labels import drawn_lines, node_label
from viz.selection import DrawLimits, select
from viz.svg import render_svg

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

LENGTH, TOKENS = 24, 40 * 23  # 40 contexts of 24 tokens
SETTINGS = AnnotationSettings(contexts_per_feature=5, before=4, after=2, logit_tokens=6, batch_size=3)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(documents))
    return str(path)


def _sets(lm):
    """A TopK transcoder set whose feature 0 never fires, and a CLT with JumpReLU thresholds that make
    features 0-3 dead or rare (empty and partly filled top-context slots)."""
    transcoders = random_dictionary_set(lm.n_layers, lm.d_model, 24, activation=ActivationConfig(type="topk", k=3),
                                        seed=5)
    clt = random_dictionary_set(lm.n_layers, lm.d_model, 16, architecture="cross-layer", skip=True, seed=6)
    with torch.no_grad():
        for layer in range(lm.n_layers):
            transcoders.encoder_bias(layer)[0] = -100.0
            clt.activation(layer).threshold_tensor()[:4] = torch.tensor([100.0, 2.6, 2.8, 3.0])
    return {"transcoder": transcoders, "clt": clt}


@pytest.fixture(scope="module")
def dictionary_sets(tiny_lm):
    return _sets(tiny_lm)


@pytest.fixture(scope="module")
def labelled(tiny_lm, corpus_file, dictionary_sets, tmp_path_factory):
    """The transcoder set saved natively with its labels in DICT/labels."""
    root = save_native(dictionary_sets["transcoder"], tmp_path_factory.mktemp("labelled") / "dicts")
    annotate(dictionary_sets["transcoder"], tiny_lm, labels_directory(root), data=corpus_file, tokens=TOKENS,
             context_length=LENGTH, settings=SETTINGS)
    return root


def _brute_force_contexts(acts: torch.Tensor, settings: AnnotationSettings):
    """acts [C, T, F] -> per feature: [(context, position, max, window)] by checking every context."""
    n_contexts, length, width = acts.shape
    found = []
    for f in range(width):
        best = []
        for c in range(n_contexts):
            values = acts[c, 1:, f].tolist()
            top = max(values)
            best.append((top, c, values.index(top) + 1))
        ranked = sorted((b for b in best if b[0] > 0), key=lambda b: (-b[0], b[1]))[: settings.contexts_per_feature]
        found.append([(c, p, top, [float(acts[c, q, f]) if 1 <= q < length else 0.0
                                   for q in range(p - settings.before, p + settings.after + 1)])
                      for top, c, p in ranked])
    return found


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_top_contexts_equal_a_brute_force_search(tiny_lm, corpus_file, dictionary_sets, kind):
    dicts = dictionary_sets[kind]
    contexts = corpus_contexts(dicts, tiny_lm, corpus_file, TOKENS, "train", LENGTH).contexts
    assert contexts.shape == (40, LENGTH)
    layers = annotate_contexts(dicts, tiny_lm, contexts, SETTINGS)
    inputs = record_mlp_io(tiny_lm, contexts, with_logits=False).inputs  # every context in one pass
    partly_filled = 0
    for layer, tensors in enumerate(layers):
        acts = dicts.encode(layer, inputs[layer])
        expected = _brute_force_contexts(acts, SETTINGS)
        n_slots = SETTINGS.contexts_per_feature
        partly_filled += sum(0 < len(e) < n_slots for e in expected)
        for f, entries in enumerate(expected):
            k = len(entries)
            assert tensors["context"][f, :k].tolist() == [e[0] for e in entries]
            assert tensors["position"][f, :k].tolist() == [e[1] for e in entries]
            assert tensors["context"][f, k:].tolist() == [-1] * (n_slots - k)
            torch.testing.assert_close(tensors["max_act"][f, :k], torch.tensor([e[2] for e in entries]),
                                       atol=1e-5, rtol=1e-5)
            assert (tensors["max_act"][f, k:] == 0).all() and (tensors["window_acts"][f, k:] == 0).all()
            if k:  # stored as 8 bits of the context's maximum
                windows = dequantize_window(tensors["window_acts"][f, :k], tensors["max_act"][f, :k])
                expected_windows = torch.tensor([e[3] for e in entries])
                torch.testing.assert_close(windows, expected_windows, rtol=0,
                                           atol=float(tensors["max_act"][f, 0]) / 500 + 1e-6)
        assert not expected[0]  # a dead feature: every slot empty
        body = acts[:, 1:]  # BOS excluded
        torch.testing.assert_close(tensors["frequency"], (body > 0).float().mean((0, 1)))
        active_mean = body.sum((0, 1)) / (body > 0).sum((0, 1)).clamp(min=1)
        torch.testing.assert_close(tensors["mean_active"], active_mean, atol=1e-5, rtol=1e-5)
    assert partly_filled or kind == "transcoder"  # rare CLT features fill some of their slots


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_promoted_and_suppressed_tokens_equal_a_full_matmul(tiny_lm, dictionary_sets, kind):
    dicts = dictionary_sets[kind]
    from dictionaries.labels.annotate import logit_statistics

    lens = logit_statistics(dicts, tiny_lm, SETTINGS)
    w_u = tiny_lm.lm_head.weight.float()
    gain = 1 + tiny_lm.text_model.norm.weight.float()
    special = excluded_tokens(tiny_lm.tokenizer, w_u.shape[0])
    assert special[[0, 1, 2]].all() and special.sum() == 6  # pad, eos, bos, unk and the two turn markers
    for layer in range(dicts.n_layers):
        direction = sum(dicts.decoder_weight(layer, t) for t in dicts.decoder_targets(layer))
        scores = (direction * gain) @ w_u.T  # [F, V], every token at once
        m = SETTINGS.logit_tokens
        up = scores.masked_fill(special, -torch.inf).sort(dim=1, descending=True)
        down = scores.masked_fill(special, torch.inf).sort(dim=1)
        assert lens[layer]["promoted_ids"].tolist() == up.indices[:, :m].tolist()
        assert lens[layer]["suppressed_ids"].tolist() == down.indices[:, :m].tolist()
        torch.testing.assert_close(lens[layer]["promoted_scores"].float(), up.values[:, :m], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lens[layer]["suppressed_scores"].float(), down.values[:, :m], atol=2e-3, rtol=2e-3)


def test_stored_labels_round_trip_memory_mapped(tiny_lm, corpus_file, dictionary_sets, labelled):
    dicts = dictionary_sets["transcoder"]
    labels = FeatureLabels.load(labelled)
    assert labels is not None and labels._layers == {}  # nothing read before it is asked for
    manifest = json.loads((labels_directory(labelled) / MANIFEST_FILE).read_text())
    assert manifest["format"] == "circuitscope.feature_labels" and manifest["format_version"] == 2
    assert manifest["corpus"]["data"] == corpus_file and manifest["corpus"]["tokens"] == TOKENS
    assert manifest["dictionaries"]["widths"] == [24] * 4
    contexts = corpus_contexts(dicts, tiny_lm, corpus_file, TOKENS, "train", LENGTH).contexts
    assert torch.equal(labels.corpus.long(), contexts)
    fresh = annotate_contexts(dicts, tiny_lm, contexts, SETTINGS)
    for layer in range(dicts.n_layers):
        path = labels_directory(labelled) / layer_file(layer)
        stored = labels.layer(layer)
        assert set(stored) == set(LAYER_TENSORS)
        for name, tensor in stored.items():
            assert torch.equal(tensor, fresh[layer][name]), name
            assert tensor.untyped_storage().nbytes() == path.stat().st_size  # a view of the mapped file
    # a summary decodes the corpus window around the maximum with the tokenizer
    layer, index = next((layer, f) for layer in range(4) for f in range(24)
                        if labels.layer(layer)["context"][f, 0] >= 0)
    summary = labels.summary(layer, index)
    t = labels.layer(layer)
    first = summary.contexts[0]
    assert first.context == int(t["context"][index, 0]) and first.position == int(t["position"][index, 0])
    lo = max(first.position - SETTINGS.before, 0)
    expected_ids = contexts[first.context, lo:first.position + SETTINGS.after + 1].tolist()
    assert first.token_ids == expected_ids
    assert first.tokens == [tiny_lm.tokenizer.decode([i]) for i in expected_ids]
    assert first.activations[first.peak] == pytest.approx(first.max_activation, rel=1e-3)
    assert summary.frequency == pytest.approx(float(t["frequency"][index]))
    assert [p.token_id for p in summary.promoted] == t["promoted_ids"][index].tolist()
    assert summary.label == labels.short_label(layer, index) == short_label(summary)


def test_short_label_rule():
    def ctx(tokens, peak):
        return TopContext(context=0, position=peak, max_activation=1.0, token_ids=[0] * len(tokens), tokens=tokens,
                          activations=[0.0] * len(tokens), peak=peak)

    promoted = [TokenScore(token_id=i, token=t, score=1.0) for i, t in enumerate([" Paris", " Rome", " Berlin"])]
    summary = FeatureSummary(layer=0, index=0, label="", frequency=0.1, mean_activation=1.0, promoted=promoted,
                             suppressed=[], contexts=[ctx(["a", " capital"], 1), ctx([" France"], 0),
                                                      ctx(["x", " France"], 1)])
    assert short_label(summary) == "France | → Paris/Rome"  # the most common peak token, two promoted tokens
    summary.contexts = [ctx([" of", "\n"], 1), ctx([" x"], 0)]
    assert short_label(summary) == "⏎ | → Paris/Rome"  # a tie goes to the strongest context; whitespace made visible
    summary.contexts = []
    assert short_label(summary) == "(inactive) | → Paris/Rome"


def test_missing_or_damaged_labels(tmp_path, labelled):
    assert FeatureLabels.load(tmp_path) is None
    copy = tmp_path / "labels"
    shutil.copytree(labels_directory(labelled), copy)
    labels = FeatureLabels(copy)
    with pytest.raises(CircuitscopeError, match="layer 4 does not exist"):
        labels.summary(4, 0)
    with pytest.raises(CircuitscopeError, match="feature 24 does not exist"):
        labels.summary(0, 24)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DictionaryFileError, match="newer circuitscope"):
        FeatureLabels(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DictionaryFileError, match="corrupt JSON"):
        FeatureLabels(copy)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    (copy / layer_file(2)).write_bytes((copy / layer_file(2)).read_bytes()[:100])
    with pytest.raises(DictionaryFileError, match="truncated"):
        FeatureLabels(copy).summary(2, 0)


def test_annotate_writes_nothing_on_error_and_keeps_existing_labels(tiny_lm, corpus_file, dictionary_sets, tmp_path,
                                                                   monkeypatch, labelled):
    with pytest.raises(CircuitscopeError, match="--force"):
        annotate(dictionary_sets["transcoder"], tiny_lm, labels_directory(labelled), data=corpus_file, tokens=50)
    module = importlib.import_module("dictionaries.labels.annotate")
    written = []

    def interrupted(path, tensors, metadata=None):  # Ctrl-C after the first files are written
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        write_tensors(path, tensors, metadata)

    monkeypatch.setattr(module, "write_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        annotate(dictionary_sets["transcoder"], tiny_lm, tmp_path / "out", data=corpus_file, tokens=50,
                 context_length=LENGTH)
    assert len(written) == 2 and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# --- labels in graphs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled_graph(tiny_lm, dictionary_sets, labelled):
    labels = FeatureLabels.load(labelled)
    graph = trace(tiny_lm, dictionary_sets["transcoder"], PROMPT, TraceSettings(), dictionaries_source=str(labelled),
                  labels=labels)
    return graph, labels


def test_trace_labels_feature_nodes_and_keeps_their_contexts(labelled_graph, tmp_path):
    graph, labels = labelled_graph
    features = graph.nodes_of_kind("feature")
    assert features
    keys = set()
    for node in features:
        data = graph.graph.nodes[node]
        keys.add(data["feature_key"])
        assert data["label"] == labels.short_label(data["layer"], data["feature"])
    info = graph.metadata.feature_info
    assert set(info) == keys
    node = features[0]
    data = graph.graph.nodes[node]
    summary = labels.summary(data["layer"], data["feature"])
    record = info[data["feature_key"]]
    assert [c.tokens for c in record.contexts] == [c.tokens for c in summary.contexts]
    assert record.promoted == [t.token for t in summary.promoted]
    loaded = AttributionGraph.load(graph.save(tmp_path / "g.json"))
    assert json.loads((tmp_path / "g.json").read_text())["schema_version"] >= 3  # feature_info came with schema 3
    assert loaded.metadata.feature_info == info
    assert loaded.graph.nodes[node]["label"] == data["label"]


def test_graphs_of_schema_2_still_load(labelled_graph, tmp_path):
    raw = json.loads(labelled_graph[0].to_json())
    raw["schema_version"] = 2
    del raw["metadata"]["feature_info"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert AttributionGraph.load(tmp_path / "old.json").metadata.feature_info == {}


def test_labels_of_other_dictionaries_are_refused(tiny_lm, labelled):
    other = random_dictionary_set(4, 32, 24, activation=ActivationConfig(type="topk", k=3), seed=99)
    with pytest.raises(CircuitscopeError, match="made for other dictionaries"):
        trace(tiny_lm, other, PROMPT, labels=FeatureLabels.load(labelled))


def test_fingerprint_tells_weights_apart_but_not_their_bfloat16_copy(dictionary_sets):
    dicts = dictionary_sets["transcoder"]
    copy = random_dictionary_set(4, 32, 24, activation=ActivationConfig(type="topk", k=3), seed=5)
    assert fingerprint(copy) != fingerprint(dicts)  # dicts' feature 0 was silenced
    with torch.no_grad():
        for layer in range(4):
            copy.encoder_bias(layer)[0] = -100.0
    assert fingerprint(copy) == fingerprint(dicts) == fingerprint(copy.to(torch.bfloat16))


def test_labels_reach_neuronpedia_svg_and_html(labelled_graph, tmp_path):
    graph, _ = labelled_graph
    labels = {graph.graph.nodes[n]["label"] for n in graph.nodes_of_kind("feature")}
    clerps = {n.clerp for n in to_neuronpedia(graph).nodes if n.feature_type == "cross layer transcoder"}
    assert clerps == labels
    data = page_data(graph, PageOptions())
    by_key = {n["fk"]: n for n in data["nodes"] if n["kind"] == "feature"}
    assert set(data["features"]) == set(by_key)
    for key, node in by_key.items():
        assert data["features"][key]["label"] in node["desc"]
        assert data["features"][key]["contexts"] == [c.model_dump() for c in graph.metadata.feature_info[key].contexts]
    page = render_html(graph)
    some = next(iter(data["features"].values()))
    assert json.dumps(some["label"], ensure_ascii=False)[1:-1] in page
    if shutil.which("neato"):  # every drawn feature shows its label (wrapped to the node's width)
        texts = {t.text for t in ET.fromstring(render_svg(graph)).iter("{http://www.w3.org/2000/svg}text")}
        drawn = [n for n in select(graph, DrawLimits()).nodes if graph.graph.nodes[n]["kind"] == "feature"]
        assert drawn and all(set(drawn_lines(graph, n, 20, 3)) <= texts for n in drawn)
        assert all(node_label(graph, n)[0] == graph.graph.nodes[n]["label"] for n in drawn)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")),
                    reason="headless Chromium is not installed")
def test_clicking_a_feature_shows_its_top_contexts(labelled_graph, tmp_path):
    from test_render import _body, _chromium

    graph, _ = labelled_graph
    node = next(n for n in graph.nodes_of_kind("feature") if graph.metadata.feature_info[
        graph.graph.nodes[n]["feature_key"]].contexts)
    info = graph.metadata.feature_info[graph.graph.nodes[node]["feature_key"]]
    path = save_html(graph, tmp_path / "g.html")
    run = _chromium(tmp_path, path.as_uri() + "#node=" + node, "--dump-dom")
    assert 'data-state="ready"' in _body(run.stdout), run.stdout[-2000:] + run.stderr[-2000:]
    panel = run.stdout.split('id="contexts"')[1].split("</div></div>")[0]
    assert run.stdout.count('class="ctx"') == len(info.contexts)
    assert panel.count('class="tok peak"') >= 1
    first_row = panel.split('class="ctx">')[1].split("</div>")[0]
    assert html.unescape(re.sub(r"<[^>]+>", "", first_row)) == "".join(info.contexts[0].tokens).replace("\n", "⏎")
    assert "promotes: " in run.stdout


# --- the CLI ---------------------------------------------------------------------------------------------
def _run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def cli_dicts(tmp_path_factory):
    """A bfloat16 CLT (annotated in the float32 model's dtype)."""
    dicts = random_dictionary_set(4, 32, 16, architecture="cross-layer", seed=7, dtype=torch.bfloat16)
    return save_native(dicts, tmp_path_factory.mktemp("cli") / "dicts")


def test_cli_annotate_then_show(tiny_checkpoint_dir, corpus_file, cli_dicts):
    args = ["features", "annotate", str(cli_dicts), "--model", str(tiny_checkpoint_dir), "--data", corpus_file,
            "--tokens", "400", "--context-length", str(LENGTH), "--batch-size", "4", "--no-progress"]
    code, out = _run(*args)
    assert code == 0, out
    assert "wrote labels of 64 features" in out and (cli_dicts / "labels" / MANIFEST_FILE).is_file()
    code, out = _run(*args)
    assert code == 2 and "error:" in out and "--force" in out
    code, out = _run(*args, "--force", "--contexts-per-feature", "3")
    assert code == 0, out
    labels = FeatureLabels.load(cli_dicts)
    assert labels.manifest.settings.contexts_per_feature == 3
    labels.check_matches(fingerprint(load_dictionaries(cli_dicts, dtype=torch.float32)))  # what trace will load
    layer, index = next((layer, f) for layer in range(4) for f in range(16)
                        if labels.layer(layer)["context"][f, 0] >= 0)
    code, out = _run("features", "show", str(cli_dicts), str(layer), str(index))
    assert code == 0, out
    summary = labels.summary(layer, index)
    assert f"feature {layer}:{index}" in out and summary.label in out and "[[" in out and "promotes" in out
    code, out = _run("features", "show", str(cli_dicts), str(layer), str(index), "--json")
    assert code == 0 and FeatureSummary.model_validate_json(out) == summary


@pytest.mark.parametrize("args, words", [
    (["show", "{missing}", "0", "0"], "no such file or directory"),
    (["show", "{bare}", "0", "0"], "features annotate"),
    (["show", "{labelled}", "7", "0"], "layer 7 does not exist"),
    (["show", "{labelled}", "0", "99"], "feature 99 does not exist"),
    (["annotate", "{missing}"], "no such file or directory"),
    (["annotate", "{labelled}", "--tokens", "0"], "--tokens"),
    (["annotate", "{labelled}", "--contexts-per-feature", "0"], "contexts-per-feature"),
])
def test_cli_user_errors_exit_2(tmp_path, labelled, args, words):
    bare = save_native(random_dictionary_set(2, 8, 4), tmp_path / "bare")
    paths = {"missing": str(tmp_path / "nowhere"), "bare": str(bare), "labelled": str(labelled)}
    code, out = _run("features", *[a.format(**paths) for a in args])
    assert code == 2, out
    assert out.startswith("error:") and words in out and "Traceback" not in out
