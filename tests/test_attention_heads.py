"""Head shares of an edge (docs/design.md §3.11) against the engine's edges and real perturbations of the frozen model.

The frozen model (:func:`circuits.interventions.frozen_model.run_frozen`) is run with every source present, plus a
change at one attention layer L that carries the source's removal through one route only:

- head h: head h's mixed values (the output projection's input slice) change by what removing the source changes
  them by, every other head and the residual stream at L keep their values with the source;
- residual: the residual after L's attention changes by what removing the source changes the residual entering L
  by (added through the output projection, divided by the frozen attention output norm's scale), no head changes.

Above L everything is the frozen linear model with all sources present, so the target's change is exactly that
route's share (with the sign of an edge: value with everything minus value with the route's removal).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from conftest import PROMPT
from test_attribution_edges import KINDS, Frozen, dense_rows, make_dictionaries

from circuits.attention.heads import annotate_edges, edge_heads, head_shares
from circuits.attention.state import state_for_prompt
from circuits.engine.attribution import attribute
from circuits.engine.node_layout import FEATURE
from circuits.settings import TraceSettings
from dictionaries.models.architecture import submodule

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
SETTINGS = TraceSettings(batch_size=16)


@pytest.fixture(scope="module")
def cases(tiny_lm):
    out = {}
    for i, (name, (arch, skip)) in enumerate(KINDS.items()):
        if name == "clt-skip":
            continue
        dicts = make_dictionaries(tiny_lm, arch, skip, seed=i)
        out[name] = (dicts, attribute(tiny_lm, dicts, PROMPT, SETTINGS), state_for_prompt(tiny_lm, dicts, PROMPT,
                                                                                          SETTINGS))
    return out


class RouteProbe:
    """Frozen runs with one route of layer ``layer`` carrying a source's removal (module docstring)."""

    def __init__(self, lm, dicts, att, layer: int):
        self.lm, self.frozen, self.layer = lm, Frozen(lm, dicts, att), layer
        arch = lm.architecture
        self.attention = lm.attention_module(layer)
        self.o_proj = submodule(self.attention, arch.output_projection)
        self.norm_in = lm.layer_module(layer, arch.attention_norm)
        output_norm = lm.layer_module(layer, arch.attention_output_norm)
        self.s_post = arch.norm.scale(output_norm, att.clean.layers[layer].r_post_attention, torch.device("cpu"))

    def record(self, scales: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, residual entering the layer [P, d], mixed values [P, H * hd]) of a frozen run."""
        seen = {}
        with ExitStack() as stack:
            stack.callback(self.norm_in.register_forward_pre_hook(
                lambda m, a: seen.__setitem__("residual", a[0][0].float())).remove)
            stack.callback(self.o_proj.register_forward_pre_hook(
                lambda m, a: seen.__setitem__("mixed", a[0][0].float())).remove)  # the frozen call comes last
            values = self.frozen(scales)
        return values, seen["residual"], seen["mixed"]

    def through(self, add_mixed: torch.Tensor | None = None, add_residual: torch.Tensor | None = None):
        """Target values of the frozen run with every source present and the given changes at the layer."""
        with ExitStack() as stack:
            if add_mixed is not None:
                stack.callback(self.o_proj.register_forward_pre_hook(
                    lambda m, a: (a[0] + add_mixed[None].to(a[0].dtype),)).remove)
            if add_residual is not None:
                stack.callback(self.o_proj.register_forward_hook(
                    lambda m, a, out: out + (add_residual / self.s_post)[None].to(out.dtype)).remove)
            return self.frozen({})


def _pick_edges(att, A, n=3):
    """Strong cross-position edges into the logit and into a top-layer feature: (source node, target row)."""
    lay = att.layout
    f = att.replacement.features
    rows = [att.n_features, int(((f.layer == 3) & (f.position == att.position)).nonzero()[0, 0])]
    picked = []
    for row in rows:
        t_pos = int(lay.position[lay.target_nodes[row]])
        cross = (lay.position[: A.shape[1]] < t_pos) & (lay.position[: A.shape[1]] > 0)
        order = (A[row].abs() * cross).argsort(descending=True)
        kinds_seen = set()
        for s in order.tolist():
            kind = int(lay.kind[s])
            if kind not in kinds_seen and (kind != FEATURE or int(lay.layer[s]) < 2):
                kinds_seen.add(kind)
                picked.append((s, row))
            if len(kinds_seen) == n:
                break
    return picked


@pytest.mark.parametrize("kind", ["transcoder", "skip-transcoder", "clt"])
def test_head_shares_sum_to_the_edge_and_each_equals_its_route_perturbation(tiny_lm, cases, kind):
    dicts, att, state = cases[kind]
    A, _ = dense_rows(att)
    lay = att.layout
    checked, biggest, above = 0, 0.0, 0.0
    for source, row in _pick_edges(att, A):
        target_id = (f"logit:{att.logits.token_ids[0]}@{att.position}" if row >= att.n_features else
                     f"feature:3:{int(att.replacement.features.index[row])}@{int(lay.position[lay.target_nodes[row]])}")
        source_id = state.name(source)
        shares = head_shares(state, source_id, target_id)
        edge = float(A[row, source])
        scale = float(A[row].abs().max())
        for share in shares:
            total = share.above + share.residual + sum(share.heads)
            assert total == pytest.approx(edge, rel=1e-5, abs=1e-6 * scale)
            assert share.edge == pytest.approx(edge, rel=1e-5, abs=1e-6 * scale)
            if kind != "clt":
                assert share.above == pytest.approx(0.0, abs=1e-6 * scale)
            above = max(above, abs(share.above) / scale)
        # every route of one layer between the ends against a perturbation
        source_layer = int(lay.layer[source])
        layer = shares[len(shares) // 2].layer
        share = next(s for s in shares if s.layer == layer)
        assert layer > source_layer
        probe = RouteProbe(tiny_lm, dicts, att, layer)
        base, residual_a, mixed_a = probe.record({})
        _, residual_b, mixed_b = probe.record({source: 0.0})
        hd = state.head_dim
        for h in range(state.n_heads):
            delta = torch.zeros_like(mixed_a)
            delta[:, h * hd:(h + 1) * hd] = (mixed_b - mixed_a)[:, h * hd:(h + 1) * hd]
            measured = float(base[row] - probe.through(add_mixed=delta)[row])
            assert share.heads[h] == pytest.approx(measured, rel=1e-4, abs=1e-5 * scale), (source_id, layer, h)
        measured = float(base[row] - probe.through(add_residual=residual_b - residual_a)[row])
        assert share.residual == pytest.approx(measured, rel=1e-4, abs=1e-5 * scale)
        biggest = max(biggest, max(abs(x) for x in share.heads) / scale)
        checked += 1
    assert checked >= 4
    assert biggest > 1e-2, "some checked head carries a real part of its edge"
    assert (above > 1e-3) == (kind == "clt"), "a CLT feature's writes to layers above the split bypass it"


@pytest.mark.parametrize("kind", ["skip-transcoder", "clt"])
def test_batched_shares_of_every_source_sum_to_the_rows(tiny_lm, cases, kind):
    dicts, att, state = cases[kind]
    A, _ = dense_rows(att)
    f = att.replacement.features
    row = int(((f.layer == 2) & (f.position == 9)).nonzero()[0, 0])
    target = f"feature:2:{int(f.index[row])}@9"
    shares = edge_heads(state, target)
    assert shares.layers == [2, 1, 0]
    columns = torch.tensor([state.node(s).index for s in shares.sources])
    scale = float(A[row].abs().max())
    torch.testing.assert_close(shares.edge, A[row, columns], rtol=1e-5, atol=1e-6 * scale)
    total = shares.above + shares.residual + shares.heads.sum(1)
    torch.testing.assert_close(total, shares.edge.expand_as(total), rtol=1e-5, atol=1e-6 * scale)
    # a source at a later position than the target, or above it, has nothing
    later = [j for j, s in enumerate(shares.sources) if state.node(s).position > 9]
    assert later and not shares.heads[:, :, later].any()


def test_annotating_a_graph_lists_heads_whose_shares_are_the_edge_parts(tiny_lm, cases):
    from circuits.tracing import trace

    dicts, att, state = cases["transcoder"]
    graph = trace(tiny_lm, dicts, PROMPT, SETTINGS)
    routes = annotate_edges(state, graph, top=20, n_heads=2)
    assert 0 < len(routes) <= 20
    for route in routes:
        assert route.recomputed == pytest.approx(route.weight, rel=1e-3, abs=1e-5)
        assert state.node(route.source).position != state.node(route.target).position
        assert len(route.heads) == 2 and abs(route.heads[0][2]) >= abs(route.heads[1][2])
        layer, head, value = route.heads[0]
        share = head_shares(state, route.source, route.target, layer)[0]
        assert share.heads[head] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_cli_heads_and_qk_on_a_traced_graph(tmp_path, tiny_checkpoint_dir):
    import json

    from click.testing import CliRunner

    from circuits.graph.attribution_graph import AttributionGraph
    from cli import main
    from dictionaries.assembly import random_dictionary_set
    from dictionaries.formats.native import save_native

    folder = str(save_native(random_dictionary_set(4, 32, 16, seed=0), tmp_path / "dicts"))
    out = tmp_path / "graph.json"
    result = CliRunner().invoke(main, ["trace", PROMPT, "--model", str(tiny_checkpoint_dir), "--dictionaries", folder,
                                       "-o", str(out), "--batch-size", "16", "--no-drawings"])
    assert result.exit_code == 0, (result.output, result.exception)
    graph = AttributionGraph.load(out)
    nodes = graph.graph.nodes
    source, target, weight = max(((s, t, w) for s, t, w in graph.graph.edges(data="weight")
                                  if nodes[s]["position"] < nodes[t]["position"] and nodes[s]["kind"] != "remainder"),
                                 key=lambda e: abs(e[2]))
    result = CliRunner().invoke(main, ["query", str(out), "heads", source, target, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    shares = json.loads(result.stdout)
    assert len(shares) >= 1
    for share in shares:
        assert share["above"] + share["residual"] + sum(share["heads"]) == pytest.approx(weight, rel=1e-3, abs=1e-5)
    layer, head = shares[0]["layer"], max(range(4), key=lambda h: abs(shares[0]["heads"][h]))
    text = CliRunner().invoke(main, ["query", str(out), "heads", source, target, "--layer", str(layer)])
    assert text.exit_code == 0 and f"{source} -> {target}" in text.stdout
    result = CliRunner().invoke(main, ["query", str(out), "qk", "--edge", source, target, "--layer", str(layer),
                                       "--head", str(head), "--top", "5", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    qk = json.loads(result.stdout)
    assert (qk["query"], qk["key"]) == (nodes[target]["position"], nodes[source]["position"])
    assert 1 <= len(qk["pairs"]) <= 5 and qk["score"] == pytest.approx(qk["clean_score"], rel=1e-5, abs=1e-6)
    text = CliRunner().invoke(main, ["query", str(out), "qk", "--layer", str(layer), "--head", "9", "--query", "3",
                                     "--key", "1"])
    assert text.exit_code == 2 and "head 9" in text.stderr
    np_path = tmp_path / "g.np.json"
    result = CliRunner().invoke(main, ["query", str(out), "attention", "--top-edges", "10", "--heads", "2",
                                       "--neuronpedia", str(np_path), "--qk-nodes", "2", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    routes = json.loads(result.stdout)
    assert len(routes) == 10 and all(len(r["heads"]) == 2 for r in routes)
    exported = json.loads(np_path.read_text())["nodes"]
    assert sum(n["qk_tracing_results"] is not None for n in exported) == 2
    for args, words in [(["heads", "remainder:1@3", target], "not a token"),
                        (["heads", "token@99", target], "position"),
                        (["qk", "--layer", "7", "--head", "0", "--query", "3", "--key", "1"], "layer 7"),
                        (["qk", "--layer", "1", "--head", "0", "--query", "3", "--key", "5"], "causal")]:
        result = CliRunner().invoke(main, ["query", str(out), *args])
        assert result.exit_code == 2 and words in result.stderr, (args, result.output)
