"""Every edge of an attribution equals a real perturbation of the frozen replacement model (docs/design.md §3.4).

Ground truth is :func:`circuits.interventions.frozen_model.run_frozen`: the real Hugging Face network with frozen
attention patterns and norm scales and the MLPs replaced by feature writes + b_dec + errors (+ the live skip
path), with a scale per source. An edge weight A[t, s] must equal target t's value with every source present minus
its value with source s removed (scale 0). Targets are measured independently of the engine: a feature's
target is ``mlp_input[L, p] @ W_enc[:, i]`` read from the frozen run, a logit target is the full-vocabulary
logit of the frozen run's final hidden state minus the mean logit (or logit(a) - logit(b)).

The tiny model (tests/conftest.py) has sliding and global layers with window 4 < prompt length, GQA and
q/k norms. The dictionaries get encoders that are not their decoders' transposes, negative encoder biases
(about 30% of features active), positive JumpReLU thresholds, non-zero b_dec and random (non-symmetric) skips.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import PROMPT

from circuits.engine.attribution import Attribution, attribute
from circuits.engine.node_layout import ERROR, FEATURE, LOGIT, TOKEN
from circuits.interventions.frozen_model import FrozenOutputs, run_frozen
from circuits.settings import TraceSettings
from dictionaries.assembly import random_dictionary_set
from dictionaries.models.hook_sites import record_mlp_io, replace_mlp_outputs

WIDTH = 16
KINDS = {
    "transcoder": ("per-layer", False),
    "skip-transcoder": ("per-layer", True),
    "clt": ("cross-layer", False),
    "clt-skip": ("cross-layer", True),
}


# --- helpers (also imported by test_trace_graph.py) ---------------------------------------------------------


def make_dictionaries(lm, architecture="per-layer", skip=False, seed=0, width=WIDTH, active_fraction=0.3):
    """A random dictionary set for ``lm`` with nothing symmetric or zero that could hide a bug: encoders
    perturbed away from the decoders, b_enc calibrated on PROMPT so that ~``active_fraction`` of the features
    are active per token, positive thresholds, non-zero b_dec, random skips."""
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, width, architecture=architecture, skip=skip, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    inputs = record_mlp_io(lm, lm.tokenize(PROMPT), with_logits=False).inputs[:, 0, 1:].float()
    with torch.no_grad():
        for layer in range(lm.n_layers):
            W = dicts.encoder_weight(layer)
            W.add_(0.5 * W.std() * torch.randn(W.shape, generator=gen))
            pre = inputs[layer] @ W
            b_enc = -torch.quantile(pre, 1 - active_fraction, dim=0) + 0.05 * torch.randn(width, generator=gen)
            dicts.encoder_bias(layer).copy_(b_enc)
            dicts.decoder_bias(layer).copy_(0.1 * torch.randn(lm.d_model, generator=gen))
            dicts.activation(layer).threshold.copy_(0.05 * torch.rand(width, generator=gen))
    return dicts


def dense_rows(att: Attribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [n_targets, n_sources] with the computed rows filled in, computed [n_targets] bool)."""
    n_targets = att.n_features + len(att.logits.labels)
    A = torch.zeros(n_targets, att.layout.n_sources)
    computed = torch.zeros(n_targets, dtype=torch.bool)
    for block in att.blocks:
        rows = block.rows.cpu()
        assert not computed[rows].any(), "a target row was computed twice"
        A[rows, : block.width] = block.values.cpu()
        computed[rows] = True
    return A, computed


def encoder_columns(att: Attribution, dicts) -> torch.Tensor:
    f = att.replacement.features
    return torch.stack([dicts.encoder_weight(int(L))[:, int(i)].float() for L, i in zip(f.layer, f.index, strict=True)])


def logit_readouts(lm, att: Attribution, final_hidden: torch.Tensor) -> torch.Tensor:
    """The logit targets read from a final hidden state [P, d] through the real unembedding."""
    logits = lm.lm_head(final_hidden[att.position].to(lm.lm_head.weight.dtype)).float()
    ids = att.logits.token_ids
    if att.settings.logit_diff is not None:
        return (logits[ids[0]] - logits[ids[1]])[None]
    return logits[ids] - logits.mean()


def target_values(lm, att: Attribution, encoders: torch.Tensor, out: FrozenOutputs) -> torch.Tensor:
    """Every target's value [n_targets] in one frozen run: features (without b_enc), then logits."""
    f = att.replacement.features
    feats = (out.mlp_inputs[f.layer, f.position] * encoders).sum(-1)
    return torch.cat([feats, logit_readouts(lm, att, out.final_hidden)])


def source_scales(lm, att: Attribution, scales: dict[int, float], default: float = 1.0):
    """run_frozen's (embedding, feature, error) scales with source node s scaled by ``scales[s]``."""
    lay = att.layout
    P = att.clean.n_positions
    emb = torch.full((P,), default)
    feat = torch.full((att.n_features,), default)
    err = torch.full((lm.n_layers, P), default)
    for node, value in scales.items():
        kind = int(lay.kind[node])
        if kind == TOKEN:
            emb[int(lay.position[node])] = value
        elif kind == FEATURE:
            feat[int((lay.feature_node == node).nonzero()[0, 0])] = value
        elif kind == ERROR:
            err[int(lay.layer[node]), int(lay.position[node])] = value
        else:
            raise AssertionError(f"node {node} is not a source")
    return emb, feat, err


class Frozen:
    """run_frozen for one attribution, returning every target's value."""

    def __init__(self, lm, dicts, att: Attribution):
        self.lm, self.dicts, self.att = lm, dicts, att
        self.encoders = encoder_columns(att, dicts)

    def __call__(self, scales: dict[int, float] | None = None, default: float = 1.0) -> torch.Tensor:
        emb, feat, err = source_scales(self.lm, self.att, scales or {}, default)
        out = run_frozen(self.lm, self.att.clean, self.att.replacement, self.dicts, emb, feat, err)
        return target_values(self.lm, self.att, self.encoders, out)


def sample_sources(att: Attribution, n_features=16, n_errors=10, seed=0, n_tokens=None, layers=None) -> list[int]:
    """Tokens (all, or BOS, the attributed position and ``n_tokens`` others), features from every layer (or from
    ``layers`` only; incl. ones at the attributed position) and errors."""
    lay = att.layout
    rng = random.Random(seed)
    kind = lay.kind[: lay.n_sources]
    features = (kind == FEATURE).nonzero().flatten().tolist()
    errors = (kind == ERROR).nonzero().flatten().tolist()
    tokens = lay.token_node.tolist()
    if n_tokens is None:
        chosen = set(tokens)
    else:
        others = rng.sample(tokens[1:att.position + 1], min(n_tokens, att.position))
        chosen = {tokens[0], tokens[att.position], *others}
    for layer in range(int(lay.layer.max())) if layers is None else layers:
        in_layer = [s for s in features if int(lay.layer[s]) == layer]
        at_position = [s for s in in_layer if int(lay.position[s]) == att.position]
        chosen |= set(rng.sample(in_layer, min(2, len(in_layer))))
        chosen |= set(rng.sample(at_position, min(1, len(at_position))))
    chosen |= set(rng.sample(features, min(n_features, len(features))))
    chosen |= set(rng.sample(errors, min(n_errors, len(errors))))
    return sorted(chosen)


def check_columns(frozen: Frozen, A: torch.Tensor, rows: torch.Tensor, sources: list[int]) -> dict:
    """Assert A[rows, s] == base - frozen(without s) for every s; returns counts of non-zero checked edges
    per (source kind, target kind)."""
    att = frozen.att
    lay = att.layout
    base = frozen()
    scale = float(A[rows].abs().max())
    assert scale > 0
    target_kind = lay.kind[lay.target_nodes[rows]]
    counts: dict[tuple[str, str], int] = {}
    for s in sources:
        delta = base - frozen({s: 0.0})
        torch.testing.assert_close(
            A[rows, s], delta[rows], rtol=1e-4, atol=1e-5 * scale,
            msg=lambda m, s=s: f"source node {s} (kind {int(lay.kind[s])}): {m}",
        )
        nonzero = A[rows, s].abs() > 1e-6 * scale
        for tk in (FEATURE, LOGIT):
            key = (_NAMES[int(lay.kind[s])], _NAMES[tk])
            counts[key] = counts.get(key, 0) + int((nonzero & (target_kind == tk)).sum())
    return counts


_NAMES = {TOKEN: "token", FEATURE: "feature", ERROR: "error", LOGIT: "logit"}
EDGE_KINDS = [(s, t) for s in ("token", "feature", "error") for t in ("feature", "logit")]


# --- fixtures -----------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dict_sets(tiny_lm):
    return {
        name: make_dictionaries(tiny_lm, arch, skip, seed=i) for i, (name, (arch, skip)) in enumerate(KINDS.items())
    }


@pytest.fixture(scope="module")
def attributions(tiny_lm, dict_sets):
    return {name: attribute(tiny_lm, dicts, PROMPT, TraceSettings(batch_size=16)) for name, dicts in dict_sets.items()}


# --- edges equal perturbations ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_edge_equals_a_perturbation_of_the_frozen_model(tiny_lm, dict_sets, attributions, kind):
    att = attributions[kind]
    A, computed = dense_rows(att)
    assert computed.all()
    n_features = att.n_features
    possible = WIDTH * tiny_lm.n_layers * (att.clean.n_positions - 1)
    assert 0.1 * possible < n_features < 0.6 * possible, "only part of the features are active"
    assert set(att.replacement.features.layer.tolist()) == set(range(tiny_lm.n_layers))
    # whole-adjacency counts: every edge kind occurs
    lay = att.layout
    src_kind = lay.kind[: lay.n_sources]
    for s_name, t_name in EDGE_KINDS:
        s_kind = {"token": TOKEN, "feature": FEATURE, "error": ERROR}[s_name]
        rows = slice(0, n_features) if t_name == "feature" else slice(n_features, None)
        assert int((A[rows][:, src_kind == s_kind] != 0).sum()) > 0, (s_name, t_name)

    frozen = Frozen(tiny_lm, dict_sets[kind], att)
    counts = check_columns(frozen, A, torch.arange(A.shape[0]), sample_sources(att))
    for edge_kind in EDGE_KINDS:
        assert counts.get(edge_kind, 0) > 0, f"no {edge_kind} edge was checked: {counts}"


def test_clt_feature_edges_sum_their_writes_to_every_layer_below_the_target(tiny_lm, dict_sets, attributions):
    """A CLT feature of layer 0 writes to layers 0..3; its edge to a layer-3 feature must be the perturbation
    through all three writes below 3 (checked exhaustively over every layer-0 feature at one position)."""
    att = attributions["clt"]
    A, _ = dense_rows(att)
    f = att.replacement.features
    position = int(f.position[f.layer == 0].mode().values)
    sources = att.layout.feature_node[(f.layer == 0) & (f.position == position)].tolist()
    rows = ((f.layer == 3) & (f.position >= position)).nonzero().flatten()
    assert len(sources) > 0 and len(rows) > 0
    check_columns(Frozen(tiny_lm, dict_sets["clt"], att), A, rows, sources)


def test_every_token_and_error_column_on_a_second_model_without_gqa(make_tiny_lm):
    """Other shapes: 3 layers, plain multi-head attention (kv heads = heads), window 3; a skip transcoder.
    Every token and error column and every feature column is checked."""
    lm = make_tiny_lm(seed=7, name="tiny-mha", num_hidden_layers=3, num_key_value_heads=4, sliding_window=3)
    dicts = make_dictionaries(lm, "per-layer", skip=True, seed=11, width=8, active_fraction=0.2)
    prompt = "the cat was in the tree"
    att = attribute(lm, dicts, prompt, TraceSettings(batch_size=5))
    A, computed = dense_rows(att)
    assert computed.all()
    counts = check_columns(Frozen(lm, dicts, att), A, torch.arange(A.shape[0]), list(range(att.layout.n_sources)))
    for edge_kind in EDGE_KINDS:
        assert counts.get(edge_kind, 0) > 0, counts


# --- linearity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["skip-transcoder", "clt-skip"])
def test_perturbations_add_up_and_scale(tiny_lm, dict_sets, attributions, kind):
    att = attributions[kind]
    frozen = Frozen(tiny_lm, dict_sets[kind], att)
    lay = att.layout
    base = frozen()
    kinds = lay.kind[: lay.n_sources]
    feature = int((kinds == FEATURE).nonzero()[3])
    error = int((kinds == ERROR).nonzero()[5])
    token = int(lay.token_node[4])
    scale = float(base.abs().max())
    pairs = [(token, feature), (feature, error), (token, error)]
    for a, b in pairs:
        both = base - frozen({a: 0.0, b: 0.0})
        separate = (base - frozen({a: 0.0})) + (base - frozen({b: 0.0}))
        torch.testing.assert_close(both, separate, rtol=1e-4, atol=1e-5 * scale)
    for s in (token, feature, error):
        once = base - frozen({s: 0.0})
        twice = frozen({s: 2.0}) - base  # scaling a source by 2 adds its effect once more
        torch.testing.assert_close(twice, once, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(frozen({s: 3.0}) - frozen({s: 1.0}), 2 * once, rtol=1e-4, atol=2e-5 * scale)


# --- the replacement reproduces the model -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_model_with_all_sources_is_the_clean_run(tiny_lm, dict_sets, attributions, kind):
    att = attributions[kind]
    out = run_frozen(tiny_lm, att.clean, att.replacement, dict_sets[kind])
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=att.input_ids[None], use_cache=False).logits[0].float()
        recorded = record_mlp_io(tiny_lm, att.input_ids[None], with_logits=False)
    torch.testing.assert_close(out.final_hidden, att.clean.final_hidden.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mlp_inputs, recorded.inputs[:, 0].float(), rtol=1e-5, atol=1e-5)
    frozen_logits = tiny_lm.lm_head(out.final_hidden).float()
    torch.testing.assert_close(frozen_logits, logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_replacement_spliced_into_the_live_model_gives_its_logits(tiny_lm, dict_sets, attributions, kind):
    """Live (un-frozen) model, every MLP replaced by the dictionaries' own encode/decode of the live input plus
    the attribution's error vector: the logits are the model's. At BOS the MLP output is kept (constant)."""
    att, dicts = attributions[kind], dict_sets[kind]
    errors = att.replacement.errors
    constant = att.replacement.constant_positions[None, :, None]
    assert bool(constant[0, 0, 0]) and not bool(constant[0, 1:].any())
    features: dict[int, torch.Tensor] = {}

    def splice(layer, x, y):
        features[layer] = dicts.encode(layer, x[0].float())
        out = dicts.decoder_bias(layer).float().expand(x.shape[1], -1)
        for source in range(layer + 1):
            if layer in dicts.decoder_targets(source):
                out = out + features[source] @ dicts.decoder_weight(source, layer).float()
        if dicts.skip_weight(layer) is not None:
            out = out + x[0].float() @ dicts.skip_weight(layer).float()
        out = out + errors[layer]
        return torch.where(constant, y.float(), out[None])

    with torch.no_grad():
        clean = tiny_lm.model(input_ids=att.input_ids[None], use_cache=False).logits.float()
        with replace_mlp_outputs(tiny_lm, splice):
            spliced = tiny_lm.model(input_ids=att.input_ids[None], use_cache=False).logits.float()
    torch.testing.assert_close(spliced, clean, rtol=1e-5, atol=1e-4)
    # the live features are the attribution's active features
    f = att.replacement.features
    acts = torch.stack([features[layer] for layer in range(tiny_lm.n_layers)])
    acts[:, 0] = 0  # BOS has no features
    torch.testing.assert_close(acts[f.layer, f.position, f.index], f.activation)
    assert int((acts != 0).sum()) == att.n_features
    # without the errors the logits differ: the errors are not trivially zero
    with torch.no_grad(), replace_mlp_outputs(tiny_lm, lambda L, x, y: splice(L, x, y) - errors[L] * (~constant)):
        without = tiny_lm.model(input_ids=att.input_ids[None], use_cache=False).logits.float()
    assert (without - clean).abs().max() > 1e-2


# --- rows add up to the targets' values ----------------------------------------------------------------------


def _clean_target_values(lm, dicts, att: Attribution) -> torch.Tensor:
    """Independent of the engine: features' x @ W_enc[:, i] from a plain recording, logits from the model."""
    with torch.no_grad():
        rec = record_mlp_io(lm, att.input_ids[None], with_logits=True)
    f = att.replacement.features
    x = rec.inputs[:, 0].float()
    feats = (x[f.layer, f.position] * encoder_columns(att, dicts)).sum(-1)
    logits = rec.logits[0, att.position].float()
    ids = att.logits.token_ids
    if att.settings.logit_diff is not None:
        return torch.cat([feats, (logits[ids[0]] - logits[ids[1]])[None]])
    return torch.cat([feats, logits[ids] - logits.mean()])


def _check_rows_sum_to_values(lm, dicts, att: Attribution) -> None:
    A, computed = dense_rows(att)
    frozen = Frozen(lm, dicts, att)
    constant = frozen({}, default=0.0)  # every token, feature and error removed: biases and BOS only
    clean = _clean_target_values(lm, dicts, att)
    torch.testing.assert_close(frozen(), clean, rtol=1e-5, atol=1e-5)
    scale = float(clean.abs().max())
    torch.testing.assert_close(
        A[computed].sum(1) + constant[computed], clean[computed], rtol=1e-4, atol=1e-5 * scale
    )
    # the engine's own record of the values agrees: pre-activations (with b_enc) and logit values
    f = att.replacement.features
    pre = att.replacement.feature_pre_activations
    b_enc = torch.stack([dicts.encoder_bias(int(L))[int(i)] for L, i in zip(f.layer, f.index, strict=True)])
    torch.testing.assert_close(pre - b_enc, clean[: att.n_features], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.logits.values.float(), clean[att.n_features:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_rows_plus_constant_part_give_the_clean_values(tiny_lm, dict_sets, attributions, kind):
    _check_rows_sum_to_values(tiny_lm, dict_sets[kind], attributions[kind])


@pytest.mark.parametrize("kind", ["skip-transcoder", "clt"])
def test_with_a_feature_budget_the_computed_rows_still_sum_exactly(tiny_lm, dict_sets, attributions, kind):
    dicts = dict_sets[kind]
    full = attributions[kind]
    budget = full.n_features // 3
    att = attribute(tiny_lm, dicts, PROMPT, TraceSettings(max_features=budget, batch_size=7))
    A, computed = dense_rows(att)
    assert int(att.expanded.sum()) == budget
    assert computed[: att.n_features].tolist() == att.expanded.cpu().tolist()
    assert computed[att.n_features:].all()
    _check_rows_sum_to_values(tiny_lm, dicts, att)
    # the rows that were computed are exactly those of the unbudgeted attribution
    A_full, _ = dense_rows(full)
    torch.testing.assert_close(A[computed], A_full[computed], rtol=1e-5, atol=1e-6)
    # unexpanded features stay sources: some of them have non-zero edges into computed rows
    unexpanded = full.layout.feature_node[~att.expanded.cpu()]
    assert int((A[computed][:, unexpanded] != 0).sum()) > 0


# --- other positions and logit targets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        TraceSettings(position=5, batch_size=16),
        TraceSettings(position=-4, targets=["the", "cat", "tree"], batch_size=16),
        TraceSettings(logit_diff=("tree", "house"), batch_size=16),
        TraceSettings(position=7, logit_diff=("cat", "dog"), batch_size=16),
    ],
    ids=["position", "targets", "logit-diff", "logit-diff-position"],
)
def test_logit_targets_at_any_position_match_perturbations(tiny_lm, dict_sets, settings):
    dicts = dict_sets["clt-skip"]
    att = attribute(tiny_lm, dicts, PROMPT, settings)
    P = att.clean.n_positions
    expected_position = P - 1 if settings.position is None else settings.position % P
    assert att.position == expected_position
    tok = tiny_lm.tokenizer
    if settings.targets is not None:
        assert att.logits.token_ids == [tok.convert_tokens_to_ids(t) for t in settings.targets]
    if settings.logit_diff is not None:
        assert att.logits.token_ids == [tok.convert_tokens_to_ids(t) for t in settings.logit_diff]
        assert len(att.logits.labels) == 1
    A, computed = dense_rows(att)
    assert computed.all()
    logit_rows = torch.arange(att.n_features, A.shape[0])
    # sources after the attributed position cannot move its logits
    later = att.layout.position[: att.layout.n_sources] > att.position
    assert later.any() == (att.position < P - 1)
    assert not A[logit_rows][:, later].any()
    frozen = Frozen(tiny_lm, dicts, att)
    _check_rows_sum_to_values(tiny_lm, dicts, att)
    sources = sample_sources(att, n_features=8, n_errors=5, seed=3, n_tokens=3)
    counts = check_columns(frozen, A, logit_rows, sources)
    for s_name in ("token", "feature", "error"):
        assert counts.get((s_name, "logit"), 0) > 0, counts


def test_position_out_of_range_is_a_clear_error(tiny_lm, dict_sets):
    from dictionaries.errors import CircuitscopeError

    with pytest.raises(CircuitscopeError, match="position"):
        attribute(tiny_lm, dict_sets["transcoder"], PROMPT, TraceSettings(position=40))


# --- constant positions: BOS and the chat template ------------------------------------------------------------


def test_bos_has_token_nodes_only(tiny_lm, attributions):
    for att in attributions.values():
        lay = att.layout
        at_bos = lay.position[: lay.n_sources] == 0
        assert lay.kind[: lay.n_sources][at_bos].tolist() == [TOKEN]
        assert not (att.replacement.features.position == 0).any()
        assert (lay.error_node[:, 0] == -1).all() and (lay.error_node[:, 1:] >= 0).all()
        assert not att.replacement.errors[:, 0].any()


def test_chat_template_positions_have_token_nodes_only(tiny_lm, dict_sets):
    dicts = dict_sets["skip-transcoder"]
    prompt = "what is the capital of france"
    att = attribute(tiny_lm, dicts, prompt, TraceSettings(chat=True, batch_size=16))
    tokens = [tiny_lm.tokenizer.convert_ids_to_tokens(i) for i in att.input_ids.tolist()]
    # <bos> <start_of_turn> user [prompt] <end_of_turn> <start_of_turn> model
    assert tokens[:3] == ["<bos>", "<start_of_turn>", "user"]
    assert tokens[-3:] == ["<end_of_turn>", "<start_of_turn>", "model"]
    content = set(range(3, len(tokens) - 3))
    assert [tokens[p] for p in sorted(content)] == prompt.split()
    lay = att.layout
    source_positions = lay.position[: lay.n_sources]
    non_token = lay.kind[: lay.n_sources] != TOKEN
    assert set(source_positions[non_token].tolist()) == content
    assert set(att.replacement.features.position.tolist()) <= content
    assert set((lay.error_node[0] >= 0).nonzero().flatten().tolist()) == content
    assert (lay.token_node == torch.arange(len(tokens))).all()
    # the edges still match perturbations (template MLP outputs are constants of the frozen model)
    A, _ = dense_rows(att)
    counts = check_columns(Frozen(tiny_lm, dicts, att), A, torch.arange(A.shape[0]),
                           sample_sources(att, n_features=8, n_errors=4, seed=5, n_tokens=3))
    assert counts.get(("feature", "logit"), 0) > 0 and counts.get(("token", "feature"), 0) > 0


# --- other ways a model can come ------------------------------------------------------------------------------


def test_model_loaded_with_sdpa_attention(tiny_checkpoint_dir):
    """The clean run needs attention patterns: it switches to eager attention and back."""
    from dictionaries.models.loading import load_model

    lm = load_model(tiny_checkpoint_dir, attn_implementation="sdpa")
    assert lm.config._attn_implementation == "sdpa"
    dicts = make_dictionaries(lm, "per-layer", skip=True, seed=21)
    att = attribute(lm, dicts, PROMPT, TraceSettings(batch_size=32))
    assert lm.config._attn_implementation == "sdpa"
    _check_rows_sum_to_values(lm, dicts, att)
    A, _ = dense_rows(att)
    check_columns(Frozen(lm, dicts, att), A, torch.arange(A.shape[0]), sample_sources(att, 6, 4, seed=2))


def test_multimodal_model_text_stack(tiny_mm_lm):
    """4B+ checkpoints load as Gemma3ForConditionalGeneration (text stack under language_model)."""
    lm = tiny_mm_lm
    dicts = make_dictionaries(lm, "cross-layer", skip=True, seed=22)
    att = attribute(lm, dicts, PROMPT, TraceSettings(batch_size=32))
    _check_rows_sum_to_values(lm, dicts, att)
    A, _ = dense_rows(att)
    counts = check_columns(Frozen(lm, dicts, att), A, torch.arange(A.shape[0]), sample_sources(att, 8, 4, seed=3))
    for edge_kind in EDGE_KINDS:
        assert counts.get(edge_kind, 0) > 0, counts
