"""Which heads carry an edge: the direct effect of a source on a target, split at one attention layer into the
residual route and one route per head (docs/design.md §3.11).

In the frozen linear model the gradient row of target t crossing layer L's attention (on the residual before L's
MLP, ``G_mid``) goes down as ``G_in = G_mid + sum_h T_h(G_mid)`` with head h's term

    T_h(G) = ((Pattern_h^T (G * s_post) W_O[:, h]) W_V[kv(h)]) * s_in          (kv(h): h's key/value group)

(:mod:`circuits.engine.linear_backward`, before the GQA sum). Below L every row is carried through all routes.
So the edge from source s splits, at any layer L, exactly into

    edge = above_L + residual_L + sum_h head_{L,h}

``above_L``: read off the unsplit row at layers >= L (a cross-layer transcoder's writes to layers >= L, which
reach t without crossing L's attention; zero when s is written below L, which is every per-layer source);
``residual_L``: the row ``G_mid`` carried down from L's input; ``head_{L,h}``: the row ``T_h(G_mid)`` carried
down. One pass serves a target and all its sources: the target's row is seeded once, split into H + 1 rows at
every requested layer, and every row is read off at every source below (shapes: H heads, S sources, P' positions).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from dictionaries.errors import CircuitscopeError

from ..engine.linear_backward import FrozenLinearBackward
from ..graph.attribution_graph import AttributionGraph
from .state import Node, TraceState


def head_terms(backward: FrozenLinearBackward, layer: int, grad_mid: torch.Tensor) -> torch.Tensor:
    """Each head's term T_h [H, B, P', d] of the attention VJP at ``layer`` for rows ``grad_mid`` [B, P', d]
    (their sum over h is ``backward.attention(layer, G) - G``); see :meth:`FrozenLinearBackward.head_terms`."""
    return backward.head_terms(layer, grad_mid)


@dataclass
class HeadShares:
    """The edges from ``sources`` (graph ids) into ``target``, each split at every layer of ``layers``:
    ``edge`` [S] = ``above`` [n_L, S] + ``residual`` [n_L, S] + ``heads`` [n_L, H, S].sum(1) (see the module
    docstring), float32 on the CPU."""

    target: str
    sources: list[str]
    layers: list[int]
    edge: torch.Tensor
    above: torch.Tensor
    residual: torch.Tensor
    heads: torch.Tensor

    def layer_row(self, layer: int) -> int:
        return self.layers.index(layer)


def _top_layer(state: TraceState, target: Node) -> int:
    """The highest attention layer a target's row crosses: its own layer (a feature reads after the attention)."""
    return state.n_layers - 1 if target.layer >= state.n_layers else target.layer


def edge_heads(state: TraceState, target: str, sources: list[str] | None = None,
               layers: list[int] | None = None) -> HeadShares:
    """Split the edges into ``target`` from ``sources`` (default: every source of the layout; graph ids) at each
    layer of ``layers`` (default: every layer the target's row crosses), in one backward pass."""
    target_node = state.node(target)
    top = _top_layer(state, target_node)
    layers = sorted(set(range(top + 1) if layers is None else layers), reverse=True)
    if any(not 0 <= layer <= top for layer in layers):
        raise CircuitscopeError(f"{target} reads the residual below layer {top}'s MLP: name layers 0..{top}")
    source_nodes = ([state.node(s) for s in sources] if sources is not None
                    else [state.node(state.name(i)) for i in range(state.layout.n_sources)])
    columns = torch.tensor([s.index for s in source_nodes], dtype=torch.long)
    out, above = _split_pass(state, target_node, layers)
    H = state.n_heads
    split = out[1:].view(len(layers), H + 1, -1)[:, :, columns]  # per layer: residual, then each head
    return HeadShares(
        target=target, sources=[s.id for s in source_nodes], layers=layers,
        edge=out[0, columns].clone(), above=above[:, columns], residual=split[:, 0].clone(), heads=split[:, 1:].clone(),
    )


@torch.no_grad()
def _split_pass(state: TraceState, target: Node, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [1 + n_L (H + 1), n_sources], above [n_L, n_sources]): row 0 is the target's whole row (its edges),
    then for each layer of ``layers`` (descending) the residual route and each head's route."""
    backward, groups, lay = state.backward, state.rows.groups, state.layout
    top, seed, on_output = state.target_seed(target)
    device = state.clean.embeddings.device
    H = state.n_heads
    out = torch.zeros(1 + len(layers) * (H + 1), lay.n_sources, device=device)
    above = torch.zeros(len(layers), lay.n_sources, device=device)
    splits = {layer: i for i, layer in enumerate(layers)}
    grad = seed if on_output else None
    for layer in range(top, -1, -1):
        if grad is not None:
            groups[layer].read(grad.to(device), out[: len(grad)])
            grad = backward.skip(layer, grad)
        if not on_output and layer == top:
            grad = seed
        if layer in splits:
            above[splits[layer]] = out[0]
            terms = head_terms(backward, layer, grad[:1])[:, 0]  # [H, P', d]
            grad = torch.cat([backward.attention(layer, grad), grad[:1].to(terms.device), terms])
        else:
            grad = backward.attention(layer, grad)
    n = grad.shape[1]
    out[:, :n] += torch.einsum("bpd,pd->bp", grad.to(device), state.clean.embeddings.to(device)[:n])
    return out.cpu(), above.cpu()


@dataclass
class LayerShare:
    """At ``layer``: ``edge`` = ``above`` + ``residual`` + sum(``heads``) (signed; ``heads`` [H])."""

    layer: int
    edge: float
    above: float
    residual: float
    heads: list[float]


def head_shares(state: TraceState, source: str, target: str, layer: int | None = None) -> list[LayerShare]:
    """The edge ``source -> target`` split at ``layer``, or at every layer between them (above the source's
    layer, up to the target's), highest first."""
    source_node, target_node = state.node(source), state.node(target)
    top = _top_layer(state, target_node)
    if source_node.position > target_node.position or source_node.layer >= min(target_node.layer, state.n_layers):
        raise CircuitscopeError(f"{source} cannot reach {target}: no edge between them")
    layers = list(range(source_node.layer + 1, top + 1)) if layer is None else [layer]
    shares = edge_heads(state, target, [source], layers)
    return [LayerShare(layer=L, edge=float(shares.edge[0]), above=float(shares.above[i, 0]),
                       residual=float(shares.residual[i, 0]), heads=shares.heads[i, :, 0].tolist())
            for i, L in enumerate(shares.layers)]


@dataclass
class EdgeHeadRoutes:
    """A graph edge with its strongest head routes: ``heads`` [(layer, head, share)], largest |share| first,
    over the layers between its ends; ``weight`` as the graph stores it, ``recomputed`` from the state."""

    source: str
    target: str
    weight: float
    recomputed: float
    heads: list[tuple[int, int, float]]


def annotate_edges(state: TraceState, graph: AttributionGraph, top: int = 500, n_heads: int = 3,
                   cross_position: bool = True) -> list[EdgeHeadRoutes]:
    """The ``top`` strongest edges of ``graph`` (|weight|; only between positions with ``cross_position``) whose
    ends are tokens, features, errors or logits, each with its ``n_heads`` strongest head routes. One backward
    pass per distinct target."""
    kinds = {"token", "feature", "error", "logit"}
    nodes = graph.graph.nodes
    edges = [(s, t, float(w)) for s, t, w in graph.graph.edges(data="weight")
             if nodes[s]["kind"] in kinds and nodes[t]["kind"] in kinds
             and (not cross_position or nodes[s]["position"] != nodes[t]["position"])]
    edges = sorted(edges, key=lambda e: -abs(e[2]))[:top]
    by_target: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for s, t, w in edges:
        by_target[t].append((s, w))
    routes: dict[tuple[str, str], EdgeHeadRoutes] = {}
    for target, inputs in by_target.items():
        sources = [s for s, _ in inputs]
        lowest = min(state.node(s).layer for s in sources)
        top_layer = _top_layer(state, state.node(target))
        shares = edge_heads(state, target, sources, list(range(lowest + 1, top_layer + 1)))
        for j, (source, weight) in enumerate(inputs):
            source_layer = state.node(source).layer
            found = [(L, h, float(shares.heads[i, h, j])) for i, L in enumerate(shares.layers) if L > source_layer
                     for h in range(state.n_heads)]
            found.sort(key=lambda x: -abs(x[2]))
            routes[(source, target)] = EdgeHeadRoutes(source, target, weight, float(shares.edge[j]), found[:n_heads])
    return [routes[(s, t)] for s, t, _ in edges]
