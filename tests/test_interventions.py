"""Interventions on features (circuits.interventions.feature_interventions), steered generation
(circuits.interventions.steering) and graph validation (circuits.interventions.validation) on the tiny model, plus
the ``intervene`` and ``validate`` commands.

Ground truth for interventions is a replacement forward written here by hand with plain MLP-output hooks
(:func:`dictionaries.models.hook_sites.replace_mlp_outputs`): dense encode and decode of every layer, the clean
errors added back, the edit applied to the features of one layer. Validation is exact in the graph's own
model (frozen attention and norms, linear features) and is checked to 1e-4 there.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import PROMPT
from test_attribution_edges import make_dictionaries

from circuits.graph.attribution_graph import AttributionGraph
from circuits.interventions.feature_interventions import (
    FeatureIntervention,
    InterventionSettings,
    intervene,
    resolve_interventions,
)
from circuits.interventions.steering import GenerationSettings, generate
from circuits.interventions.validation import predicted_removal_effects, validate_graph
from circuits.settings import TraceSettings
from circuits.tracing import trace
from cli import main
from cli.feature_specs import parse_intervention
from dictionaries.errors import CircuitscopeError
from dictionaries.formats.native import save_native
from dictionaries.models.hook_sites import record_mlp_io, replace_mlp_outputs

KINDS = {"transcoder": ("per-layer", False), "skip-transcoder": ("per-layer", True), "clt-skip": ("cross-layer", True)}
FROZEN_LINEAR = InterventionSettings(freeze_attention=True, freeze_norms=True, features="linear")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dict_sets(tiny_lm):
    return {name: make_dictionaries(tiny_lm, arch, skip, seed=10 + i) for i, (name, (arch, skip)) in
            enumerate(KINDS.items())}


def model_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids[None], use_cache=False).logits[0].float()


def hand_forward(lm, dicts, ids: torch.Tensor, edit=None) -> torch.Tensor:
    """Logits [P, V] of the replacement model with clean errors, written out densely; ``edit(layer, acts)``
    changes the activations [P, d_sae] of a layer in place. BOS keeps the model's own MLP output."""
    clean = record_mlp_io(lm, ids[None], with_logits=False)
    x_clean, y_clean = clean.inputs[:, 0].float(), clean.outputs[:, 0].float()
    acts_clean = [dicts.encode(layer, x_clean[layer]).float() for layer in range(lm.n_layers)]
    for acts in acts_clean:
        acts[0] = 0
    recon = dicts.decode(acts_clean, list(x_clean))
    errors = [y_clean[layer] - recon[layer] for layer in range(lm.n_layers)]
    acts_live: dict[int, torch.Tensor] = {}

    def fn(layer, x, y):
        x = x[0].float()
        acts = dicts.encode(layer, x).float()
        acts[0] = 0
        if edit is not None:
            edit(layer, acts)
        acts_live[layer] = acts
        out = dicts.decoder_bias(layer).float() + errors[layer]
        for source in range(layer + 1):
            if layer in dicts.decoder_targets(source):
                out = out + acts_live[source] @ dicts.decoder_weight(source, layer).float()
        if dicts.has_skip:
            out = out + x @ dicts.skip_weight(layer).float()
        out[0] = y[0, 0].float()
        return out[None]

    with replace_mlp_outputs(lm, fn):
        return model_logits(lm, ids)


def strongest_active(result, layer: int, position: int) -> int:
    f = result.clean_features
    hit = ((f.layer == layer) & (f.position == position)).nonzero().flatten()
    return int(f.index[hit[f.activation[hit].argmax()]])


def inactive(result, layer: int, position: int) -> int:
    f = result.clean_features
    active = set(f.index[(f.layer == layer) & (f.position == position)].tolist())
    return min(set(range(16)) - active)


# --- interventions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_intervention_reproduces_the_model(tiny_lm, dict_sets, kind):
    ids = tiny_lm.tokenize(PROMPT)[0]
    result = intervene(tiny_lm, dict_sets[kind], PROMPT, [])
    expected = model_logits(tiny_lm, ids)
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.clean_logits, expected, atol=1e-4, rtol=1e-4)
    f, g = result.features, result.clean_features
    assert torch.equal(f.layer, g.layer) and torch.equal(f.position, g.position) and torch.equal(f.index, g.index)
    torch.testing.assert_close(f.activation, g.activation, atol=1e-5, rtol=1e-5)
    assert not (g.position == 0).any()  # BOS is constant: no features there
    for settings in (FROZEN_LINEAR, InterventionSettings(freeze_attention=True, features="frozen")):
        torch.testing.assert_close(intervene(tiny_lm, dict_sets[kind], PROMPT, [], settings).logits, expected,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_zeroing_a_feature_matches_a_hand_written_forward(tiny_lm, dict_sets, kind):
    dicts = dict_sets[kind]
    ids = tiny_lm.tokenize(PROMPT)[0]
    clean = intervene(tiny_lm, dicts, PROMPT, [])
    layer, position = 1, 5
    feature = strongest_active(clean, layer, position)
    result = intervene(tiny_lm, dicts, PROMPT, [FeatureIntervention.ablate(layer, feature, position)])

    def edit(at, acts):
        if at == layer:
            acts[position, feature] = 0

    expected = hand_forward(tiny_lm, dicts, ids, edit)
    change = (expected - model_logits(tiny_lm, ids)).abs().max()
    assert change > 1e-2, "the ablation must change the logits for this test to mean anything"
    torch.testing.assert_close(result.logits, expected, atol=1e-4 * float(change), rtol=1e-4)
    assert result.activation(layer, feature, position) == 0
    assert result.activation(layer, feature, position, clean=True) > 0
    torch.testing.assert_close(result.logits[:position], result.clean_logits[:position], atol=1e-5, rtol=1e-5)
    # later layers' features were re-encoded: some downstream activation at or after the position moved
    f, g = result.features, result.clean_features
    moved = [abs(result.activation(int(L), int(i), int(p)) - float(a)) for L, p, i, a in
             zip(g.layer, g.position, g.index, g.activation, strict=True) if L > layer and p >= position]
    assert max(moved) > 1e-3 and len(f) > 0


@pytest.mark.parametrize("kind", ["transcoder", "clt-skip"])
def test_set_and_scale_match_the_hand_written_forward(tiny_lm, dict_sets, kind):
    dicts = dict_sets[kind]
    ids = tiny_lm.tokenize(PROMPT)[0]
    clean = intervene(tiny_lm, dicts, PROMPT, [])
    off = inactive(clean, 2, 7)
    scaled = strongest_active(clean, 0, 3)
    interventions = [parse_intervention(f"2:{off}=2.5@7", "set"), parse_intervention(f"0:{scaled}=3", "scale")]
    result = intervene(tiny_lm, dicts, PROMPT, interventions)

    def edit(layer, acts):
        if layer == 2:
            acts[7, off] = 2.5
        if layer == 0:
            acts[1:, scaled] *= 3

    torch.testing.assert_close(result.logits, hand_forward(tiny_lm, dicts, ids, edit), atol=1e-4, rtol=1e-4)
    assert result.activation(2, off, 7) == pytest.approx(2.5)
    for position in range(1, len(ids)):  # layer 0 reads the clean input: its scaled activations are 3x the clean
        assert result.activation(0, scaled, position) == pytest.approx(
            3 * result.activation(0, scaled, position, clean=True), rel=1e-5, abs=1e-6)
    assert result.positions(interventions[1]) == list(range(1, len(ids)))
    # setting a feature to its clean value, or scaling it by 1, changes nothing
    value = clean.activation(1, strongest_active(clean, 1, 4), 4, clean=True)
    same = [FeatureIntervention(layer=1, feature=strongest_active(clean, 1, 4), position=4, value=value),
            FeatureIntervention(layer=3, feature=scaled, mode="scale", value=1.0)]
    torch.testing.assert_close(intervene(tiny_lm, dicts, PROMPT, same).logits, clean.logits, atol=1e-4, rtol=1e-4)


def test_frozen_attention_keeps_the_clean_pattern(tiny_lm, dict_sets):
    """With --freeze-attention every attention output is the clean pattern (from the model's own eager
    attention weights) applied to this run's values; without it the patterns move with the intervention."""
    lm, dicts = tiny_lm, dict_sets["transcoder"]
    ids = lm.tokenize(PROMPT)[0]
    with torch.no_grad():
        clean_patterns = [a[0].float() for a in lm.model(input_ids=ids[None], output_attentions=True).attentions]
    clean = intervene(lm, dicts, PROMPT, [])
    ablation = [FeatureIntervention.ablate(0, strongest_active(clean, 0, p), p) for p in range(1, len(ids))]

    def attention_io(settings, interventions):
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for index, layer in enumerate(lm.layers):
            def save_input(module, args, kwargs, index=index):
                seen[index] = (kwargs["hidden_states"][0].float(), None)

            def save_output(module, args, index=index):  # post_attention_layernorm reads the attention output
                seen[index] = (seen[index][0], args[0][0].float())

            handles.append(layer.self_attn.register_forward_pre_hook(save_input, with_kwargs=True))
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(save_output))
        try:
            intervene(lm, dicts, PROMPT, interventions, settings)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def with_clean_pattern(index, hidden):
        attn = lm.layers[index].self_attn
        P = hidden.shape[0]
        values = attn.v_proj(hidden).view(P, -1, attn.head_dim).transpose(0, 1)
        values = values.repeat_interleave(attn.num_key_value_groups, dim=0)  # [H, P, hd]
        mixed = (clean_patterns[index] @ values).transpose(0, 1).reshape(P, -1)
        return attn.o_proj(mixed)

    unchanged = attention_io(InterventionSettings(), [])
    frozen = attention_io(InterventionSettings(freeze_attention=True), ablation)
    live = attention_io(InterventionSettings(), ablation)
    with torch.no_grad():
        for index in range(1, lm.n_layers):
            hidden, output = frozen[index]
            torch.testing.assert_close(output, with_clean_pattern(index, hidden), atol=1e-5, rtol=1e-4)
            # the intervention reached this layer's attention input
            assert float((hidden - unchanged[index][0]).abs().max()) > 1e-3
        # without freezing, the patterns moved with the intervention
        off_pattern = max(float((live[i][1] - with_clean_pattern(i, live[i][0])).abs().max())
                          for i in range(1, lm.n_layers))
        assert off_pattern > 1e-3


def test_parse_and_check_interventions(tiny_lm, dict_sets):
    assert parse_intervention("3:7", "ablate") == FeatureIntervention(layer=3, feature=7)
    assert parse_intervention(" 1:2@-1 ", "ablate") == FeatureIntervention(layer=1, feature=2, position=-1)
    assert parse_intervention("1:2=-0.5e1@4", "set") == FeatureIntervention(layer=1, feature=2, position=4, value=-5)
    assert parse_intervention("0:0=2", "scale").mode == "scale"
    for spec, kind, words in [("3", "ablate", "L:F[@POS]"), ("3:7=1", "ablate", "L:F[@POS]"),
                              ("3:7", "set", "L:F=VALUE"), ("3:7=abc", "set", "not a number"),
                              ("3:7=nan", "scale", "finite"), ("-1:7", "ablate", "from 0"), ("1:2@x", "ablate", "L:F")]:
        with pytest.raises(CircuitscopeError, match=words.replace("[", r"\[")):
            parse_intervention(spec, kind)
    dicts = dict_sets["transcoder"]
    constant = torch.tensor([True] + [False] * 12)
    resolved = resolve_interventions([FeatureIntervention(layer=3, feature=15, position=-1)], dicts, 13, constant)
    assert resolved[0].position == 12
    for iv, words in [(FeatureIntervention(layer=4, feature=0), "layer 4 is out of range; .* layers 0..3"),
                      (FeatureIntervention(layer=0, feature=16), "feature 16 is out of range; .* features 0..15"),
                      (FeatureIntervention(layer=0, feature=0, position=13), "outside the prompt's 13 tokens"),
                      (FeatureIntervention(layer=0, feature=0, position=-14), "outside"),
                      (FeatureIntervention(layer=0, feature=0, position=0), "BOS")]:
        with pytest.raises(CircuitscopeError, match=words):
            resolve_interventions([iv], dicts, 13, constant)


# --- steered generation -----------------------------------------------------------------------------------


def test_steered_generation_differs_and_equals_a_manual_loop(tiny_lm, dict_sets):
    lm, dicts = tiny_lm, dict_sets["skip-transcoder"]
    clean = intervene(lm, dicts, PROMPT, [])
    steer = [FeatureIntervention(layer=2, feature=inactive(clean, 2, 12), value=40.0),
             FeatureIntervention.ablate(1, strongest_active(clean, 1, 12), -1)]
    settings = GenerationSettings(max_new_tokens=4, stop_at_eos=False)
    plain = generate(lm, dicts, PROMPT, [], generation=settings)
    steered = generate(lm, dicts, PROMPT, steer, generation=settings)
    assert plain.new_ids != steered.new_ids
    ids = lm.tokenize(PROMPT)[0]
    P = len(ids)
    manual_plain, manual_steered = ids.clone(), ids.clone()
    for _ in range(4):
        manual_plain = torch.cat([manual_plain, model_logits(lm, manual_plain)[-1].argmax()[None]])
        # the position-specific ablation stays at the last prompt token; the other acts everywhere
        fixed = [steer[0], steer[1].model_copy(update={"position": P - 1})]
        logits = intervene(lm, dicts, manual_steered, fixed).logits[-1]
        manual_steered = torch.cat([manual_steered, logits.argmax()[None]])
    assert plain.new_ids == manual_plain[P:].tolist()
    assert steered.new_ids == manual_steered[P:].tolist()
    assert steered.prompt_ids == ids.tolist() and steered.text == lm.tokenizer.decode(steered.new_ids)
    sampled = GenerationSettings(max_new_tokens=4, temperature=1.0, seed=3, stop_at_eos=False)
    assert generate(lm, dicts, PROMPT, steer, generation=sampled) == generate(lm, dicts, PROMPT, steer,
                                                                              generation=sampled)


# --- validation -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(tiny_lm, dict_sets):
    settings = TraceSettings(batch_size=32, keep_unpruned=True, max_logits=3)
    return {kind: trace(tiny_lm, dict_sets[kind], PROMPT, settings, dictionaries_source=kind)
            for kind in ("transcoder", "clt-skip")}


@pytest.mark.parametrize("kind", ["transcoder", "clt-skip"])
def test_validation_is_exact_in_the_graphs_linear_model(tiny_lm, dict_sets, graphs, kind):
    """Predicted removal effects (all paths through the unpruned graph) equal the changes measured with frozen
    attention and norms and linear features; with features held fixed the change is the direct edge."""
    graph = graphs[kind]
    report = validate_graph(tiny_lm, dict_sets[kind], graph, top=12)
    assert report.graph_part == "unpruned" and len(report.rows) == 12
    assert report.modes == ["linear", "frozen", "free"]
    assert report.clean_value == pytest.approx(report.graph_value, abs=1e-4)
    scale = max(abs(r.predicted) for r in report.rows)
    for row in report.rows:
        assert row.model_activation == pytest.approx(row.activation, rel=1e-5)
        assert row.measured["linear"] == pytest.approx(row.predicted, rel=1e-3, abs=1e-4 * scale), row
    assert report.agreement["linear"].pearson == pytest.approx(1.0, abs=1e-6)
    assert report.agreement["linear"].sign_agreement == 1.0
    # the prediction is more than the direct edge: paths through other features count
    assert max(abs(r.predicted - r.direct) for r in report.rows) > 1e-2 * scale
    fixed = InterventionSettings(freeze_attention=True, freeze_norms=True, features="frozen")
    position, token = graph.metadata.target_position, graph.graph.nodes[report.target]["token_id"]
    base = intervene(tiny_lm, dict_sets[kind], PROMPT, [], fixed).logits[position]
    for row in report.rows[:4]:
        logits = intervene(tiny_lm, dict_sets[kind], PROMPT,
                           [FeatureIntervention.ablate(row.layer, row.feature, row.position)], fixed).logits[position]
        change = float((logits[token] - logits.mean()) - (base[token] - base.mean()))
        assert change == pytest.approx(row.direct, rel=1e-3, abs=1e-4 * scale)
    for mode in ("frozen", "free"):
        agreement = report.agreement[mode]
        assert agreement.pearson is None or -1 <= agreement.pearson <= 1
        assert 0 <= agreement.sign_agreement <= 1


def test_predicted_effects_equal_the_matrix_formula_on_a_pruned_graph(graphs):
    """On the pruned graph, -v = -(I - A D^-1)^-1 A for the target row, computed densely."""
    whole = graphs["clt-skip"]
    graph = AttributionGraph(whole.graph, whole.metadata)  # pruned only
    target = graph.logit_nodes[0]
    nodes = list(graph.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    A = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for s, t, data in graph.graph.edges(data=True):
        A[index[t], index[s]] = data["weight"]
    per_unit = torch.zeros(len(nodes), dtype=torch.float64)  # D^-1: only features with inputs pass effects on
    for n, data in graph.graph.nodes(data=True):
        if data["kind"] == "feature" and graph.graph.in_degree(n):
            per_unit[index[n]] = 1 / data["activation"]
    total = torch.linalg.solve(torch.eye(len(nodes), dtype=torch.float64) - A * per_unit[None, :], A)
    expected = -total[index[target]]
    effects = predicted_removal_effects(graph, target)
    features = [n for n in nodes if graph.graph.nodes[n]["kind"] in ("feature", "token", "error")]
    got = torch.tensor([effects.get(n, 0.0) for n in features], dtype=torch.float64)
    torch.testing.assert_close(got, expected[[index[n] for n in features]], atol=1e-9, rtol=1e-9)
    assert (got != 0).sum() > 10


def test_validation_errors(tiny_lm, dict_sets, graphs):
    graph = graphs["transcoder"]
    with pytest.raises(CircuitscopeError, match="traced with 4 layers and transcoder dictionaries"):
        validate_graph(tiny_lm, dict_sets["clt-skip"], graph)
    with pytest.raises(CircuitscopeError, match="not a logit node"):
        validate_graph(tiny_lm, dict_sets["transcoder"], graph, target=graph.nodes_of_kind("feature")[0])
    with pytest.raises(CircuitscopeError, match="unknown validation mode"):
        validate_graph(tiny_lm, dict_sets["transcoder"], graph, modes=["exact"])


# --- command line -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_lm, dict_sets, graphs):
    root = tmp_path_factory.mktemp("intervene-cli")
    directory = str(save_native(dict_sets["transcoder"], root / "dicts"))
    graph = trace(tiny_lm, dict_sets["transcoder"], PROMPT, TraceSettings(batch_size=32, max_logits=3),
                  dictionaries_source=directory)
    return {"dicts": directory, "graph": str(graph.save(root / "graph.json"))}


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


def _assert_user_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def test_intervene_command_prints_tables_and_json(tiny_checkpoint_dir, saved):
    common = ["intervene", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", saved["dicts"],
              "--ablate", "1:3@5", "--set", "2:4=6", "--scale", "0:1=2@-1", "--top", "3"]
    result = _invoke(*common, "--generate", "2")
    assert result.exit_code == 0, (result.output, result.exception)
    text = result.stdout
    for words in ("ablate 1:3@5", "set 2:4=6 (all positions)", "scale 0:1 x2@13", "next token", "clean p",
                  "generation", "clean", "steered"):
        assert words in text, text
    result = _invoke(*common, "--json", "--freeze-attention", "--features", "linear")
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert data["settings"] == {"freeze_attention": True, "freeze_norms": False, "features": "linear"}
    assert [iv["position"] for iv in data["interventions"]] == [5, None, 13]
    assert data["features"][0]["new"] == 0 and data["features"][1]["new"] == pytest.approx(6)
    assert data["generation"] is None
    assert {"token", "clean_probability", "probability", "change"} <= set(data["logits"][0])


@pytest.mark.parametrize("args, words", [
    (["--ablate", "1-3"], ["cannot read ablate", "L:F[@POS]"]),
    (["--set", "1:3"], ["L:F=VALUE"]),
    (["--ablate", "9:3"], ["layer 9 is out of range"]),
    (["--ablate", "1:99"], ["feature 99 is out of range"]),
    (["--ablate", "1:3@40"], ["outside the prompt"]),
    ([], ["at least one feature"]),
])
def test_intervene_command_user_errors(tiny_checkpoint_dir, saved, args, words):
    _assert_user_error(_invoke("intervene", PROMPT, "--model", str(tiny_checkpoint_dir),
                               "--dictionaries", saved["dicts"], *args), *words)


def test_intervene_command_without_dictionaries_needs_them_or_a_bundled_set(tiny_checkpoint_dir):
    _assert_user_error(_invoke("intervene", PROMPT, "--model", str(tiny_checkpoint_dir), "--ablate", "1:3"),
                       "dictionaries")


def test_validate_command(tiny_checkpoint_dir, saved):
    result = _invoke("validate", saved["graph"], "--top", "4", "--mode", "linear", "--mode", "free")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "pruned graph" in result.stdout and "pearson" in result.stdout and "linear" in result.stdout
    result = _invoke("validate", saved["graph"], "--top", "4", "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 4 and set(data["agreement"]) == {"linear", "frozen", "free"}
    assert data["graph_part"] == "pruned"
    _assert_user_error(_invoke("validate", saved["graph"], "--target", "token@0"), "not a logit node")
