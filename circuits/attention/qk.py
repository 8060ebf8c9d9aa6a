"""Why a head attended: its attention score split into pairs of sources at the query and the key (docs/design.md §3.11).

In the frozen model the query of head h at layer L and position q is linear in the residual x_q entering L:

    query(x_q) = c * R_q (g_q * r_q[h, q] * (W_Q[h] (x_q * s_in[q]) + b_Q[h]))       c = query_pre_attn_scalar^-1/2
    key(x_k)   =     R_k (g_k * r_k[kv, k] * (W_K[kv] (x_k * s_in[k]) + b_K[kv]))     kv = h's key/value group

(R_p: the rotary embedding at p; g: the q/k norm gain, r: its RMS factor frozen at the clean value; s_in: the frozen
input norm). The residual is the sum of every source's total (all-routes) effect plus the constants (biases, the
outputs at constant positions): x_q = sum_i c_i(q) + x0_q. So query = sum_i a_i + a_0 with ``a_i = M_q c_i(q)``,
the rows of M_q [hd, d] carried down through the linear backward read off at every source, and ``a_0`` the
frozen model's residual with every source removed, mapped (plus the projection bias). Likewise key = sum_j b_j + b_0,
and the score ``query . key`` is

    sum_{i,j} a_i . b_j   +   sum_i a_i . b_0   +   a_0 . sum_j b_j   +   a_0 . b_0        (pairs, then bias terms)

exactly. The pre-softmax scores and the patterns of the clean run come from the same maps (:func:`attention_scores`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property

import torch

from dictionaries.errors import CircuitscopeError
from dictionaries.models.architecture import submodule

from ..interventions.frozen_model import run_frozen
from .state import TraceState


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R [hd, hd] with ``R v = v * cos + rotate_half(v) * sin`` for cos, sin [hd] (one position)."""
    eye = torch.eye(cos.shape[-1], device=cos.device)
    return (eye * cos + rotate_half(eye) * sin).T


@dataclass
class AttentionInputs:
    """What the clean run feeds each layer's attention: ``residual`` [n_layers, P, d] (the residual entering the
    layer), the q/k norms' RMS factors ``r_query`` [n_layers, H, P] and ``r_key`` [n_layers, n_kv, P] (None
    without q/k norms), and the rotary ``cos``, ``sin`` [n_layers, P, hd] (sliding and global layers differ)."""

    residual: torch.Tensor
    r_query: torch.Tensor | None
    r_key: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor


@torch.no_grad()
def record_attention_inputs(state: TraceState) -> AttentionInputs:
    lm, arch = state.lm, state.lm.architecture
    store: dict[tuple[str, int], torch.Tensor] = {}

    def keep_input(key):
        def hook(module, args):
            store[key] = args[0][0].float()
        return hook

    def keep_rsqrt(key):
        def hook(module, args, output):
            store[key] = arch.norm.rsqrt(module, args[0])[0]
        return hook

    def keep_rotary(layer):
        def hook(module, args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            store[("cos", layer)], store[("sin", layer)] = cos[0].float(), sin[0].float()
        return hook

    with ExitStack() as stack:
        for layer in range(state.n_layers):
            attention = lm.attention_module(layer)
            norm = lm.layer_module(layer, arch.attention_norm)
            stack.callback(norm.register_forward_pre_hook(keep_input(("residual", layer))).remove)
            stack.callback(attention.register_forward_pre_hook(keep_rotary(layer), with_kwargs=True).remove)
            for name, key in ((arch.query_norm, "r_query"), (arch.key_norm, "r_key")):
                module = submodule(attention, name)
                if module is not None:
                    stack.callback(module.register_forward_hook(keep_rsqrt((key, layer))).remove)
        lm.text_model(input_ids=state.input_ids[None], use_cache=False)

    def stacked(key):
        return None if (key, 0) not in store else torch.stack([store[(key, i)] for i in range(state.n_layers)])

    return AttentionInputs(stacked("residual"), stacked("r_query"), stacked("r_key"), stacked("cos"), stacked("sin"))


@dataclass
class QKPair:
    query_source: str
    key_source: str
    weight: float


@dataclass
class QKAttribution:
    """Head ``head`` of ``layer``, query position ``query``, key position ``key``: ``score`` (pre-softmax, with the
    query scaling) = sum of every pair + ``bias_terms`` (``query_sources*key_bias``, ``query_bias*key_sources``,
    ``bias*bias``); ``pattern``: the clean run's attention probability (0 where ``masked``: the key is outside the
    layer's sliding window, and the score does not enter the softmax). ``pairs``, ``query_marginals`` (a_i . key)
    and ``key_marginals`` (query . b_j): the largest |weight| first; the marginals plus their side's bias term
    (``query_bias*key`` = a_0 . key, ``query*key_bias`` = query . b_0) sum to the score too."""

    layer: int
    head: int
    query: int
    key: int
    score: float
    clean_score: float
    pattern: float
    pairs: list[QKPair]
    query_marginals: list[tuple[str, float]]
    key_marginals: list[tuple[str, float]]
    bias_terms: dict[str, float] = field(default_factory=dict)
    masked: bool = False


class AttentionQueries:
    """QK attribution and clean attention scores for one trace state (see the module docstring)."""

    def __init__(self, state: TraceState):
        self.state = state
        self.attention_modules = [state.lm.attention_module(i) for i in range(state.n_layers)]

    @cached_property
    def inputs(self) -> AttentionInputs:
        return record_attention_inputs(self.state)

    @cached_property
    def constant_residual(self) -> torch.Tensor:
        """[n_layers, P, d]: the residual entering each layer with every source removed (biases, constant positions)."""
        state = self.state
        lm, arch = state.lm, state.lm.architecture
        store: dict[int, torch.Tensor] = {}

        def keep(layer):
            def hook(module, args):
                store[layer] = args[0][0].float()
            return hook

        P = state.clean.n_positions
        device = state.clean.embeddings.device
        with ExitStack() as stack:
            for layer in range(state.n_layers):
                norm = lm.layer_module(layer, arch.attention_norm)
                stack.callback(norm.register_forward_pre_hook(keep(layer)).remove)
            run_frozen(lm, state.clean, state.replacement, state.dicts, torch.zeros(P, device=device),
                       torch.zeros(len(state.replacement.features), device=device),
                       torch.zeros(state.n_layers, P, device=device))
        return torch.stack([store[i] for i in range(state.n_layers)])

    def _check(self, layer: int, head: int, query: int, key: int | None = None) -> None:
        state = self.state
        if not 0 <= layer < state.n_layers:
            raise CircuitscopeError(f"layer {layer} is outside 0..{state.n_layers - 1}")
        if not 0 <= head < state.n_heads:
            raise CircuitscopeError(f"head {head} is outside 0..{state.n_heads - 1}")
        P = state.clean.n_positions
        if not 0 <= query < P:
            raise CircuitscopeError(f"query position {query} is outside 0..{P - 1}")
        if key is not None and not 0 <= key <= query:
            raise CircuitscopeError(f"key position {key} must be in 0..{query} (attention is causal)")

    def _map(self, layer: int, head: int, position: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [hd, d], bias [hd]): the frozen query (``side`` "query", head ``head``) or key (of head's group) at
        ``position`` as an affine map of the residual entering ``layer``."""
        state, arch = self.state, self.state.lm.architecture
        attention = self.attention_modules[layer]
        hd = state.head_dim
        group = head if side == "query" else head // (state.n_heads // state.n_kv)
        projection = submodule(attention, arch.query_projection if side == "query" else arch.key_projection)
        weight = projection.weight.detach().float().view(-1, hd, projection.weight.shape[1])[group]  # [hd, d]
        device = weight.device
        bias = (torch.zeros(hd, device=device) if projection.bias is None
                else projection.bias.detach().float().view(-1, hd)[group])
        s_in = state.backward.layers[layer].s_in[position].to(device)
        norm = submodule(attention, arch.query_norm if side == "query" else arch.key_norm)
        r = self.inputs.r_query if side == "query" else self.inputs.r_key
        factor = (torch.ones(hd, device=device) if norm is None
                  else arch.norm.gain(norm, device) * r[layer, group, position].to(device))
        rope = rope_matrix(self.inputs.cos[layer, position].to(device), self.inputs.sin[layer, position].to(device))
        scale = float(attention.scaling) if side == "query" else 1.0
        linear = scale * rope @ (factor[:, None] * weight * s_in[None, :])
        return linear, scale * rope @ (factor * bias)

    def _contributions(self, layer: int, head: int, position: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(per source [n_sources, hd], constant part [hd]) of the frozen query or key at ``position``."""
        state = self.state
        linear, bias = self._map(layer, head, position, side)
        seeds = torch.zeros(state.head_dim, position + 1, linear.shape[1], device=state.clean.embeddings.device)
        seeds[:, position] = linear.to(seeds.device)
        per_source = state.rows.source_rows(layer - 1, seeds).T.cpu()  # [n_sources, hd]
        constant = linear @ self.constant_residual[layer, position].to(linear.device) + bias
        return per_source, constant.cpu()

    def vectors(self, layer: int, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [H, P, hd], keys [n_kv, P, hd]) of ``layer`` for a residual [P, d] entering it (frozen norms)."""
        state = self.state
        P = residual.shape[0]
        queries = torch.stack([torch.stack([self._apply(layer, h, p, "query", residual[p]) for p in range(P)])
                               for h in range(state.n_heads)])
        group = state.n_heads // state.n_kv
        keys = torch.stack([torch.stack([self._apply(layer, g * group, p, "key", residual[p]) for p in range(P)])
                            for g in range(state.n_kv)])
        return queries, keys

    def _apply(self, layer: int, head: int, position: int, side: str, x: torch.Tensor) -> torch.Tensor:
        linear, bias = self._map(layer, head, position, side)
        return (linear @ x.to(linear.device) + bias).cpu()

    @torch.no_grad()
    def attention_scores(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [H, P, P], pattern [H, P, P]) of the clean run at ``layer``: the pre-softmax scores (query
        scaling included, -inf where the mask hides a key) from the frozen maps, and the recorded pattern."""
        state = self.state
        queries, keys = self.vectors(layer, self.inputs.residual[layer])
        keys = keys.repeat_interleave(state.n_heads // state.n_kv, dim=0)
        scores = queries @ keys.transpose(1, 2)  # [H, P, P]
        P = scores.shape[-1]
        q_pos, k_pos = torch.arange(P)[:, None], torch.arange(P)[None, :]
        hidden = self._hidden(layer, q_pos, k_pos)
        cap = getattr(state.lm.config, "attn_logit_softcapping", None)
        if cap:
            scores = cap * torch.tanh(scores / cap)
        return scores.masked_fill(hidden, float("-inf")), state.clean.layers[layer].pattern.float().cpu()

    def _hidden(self, layer: int, query, key):
        """Whether the mask hides ``key`` from ``query`` (ints or broadcasting tensors): causal, and the sliding
        window of a sliding layer."""
        hidden = key > query
        window = getattr(self.attention_modules[layer], "sliding_window", None)
        if window:
            hidden = hidden | (query - key >= window)
        return hidden

    @torch.no_grad()
    def attribute(self, layer: int, head: int, query: int, key: int, top: int = 20) -> QKAttribution:
        """Split head ``head``'s score at ``layer`` for ``query`` attending to ``key`` (module docstring)."""
        self._check(layer, head, query, key)
        state = self.state
        a, a0 = self._contributions(layer, head, query, "query")
        b, b0 = self._contributions(layer, head, key, "key")
        query_vector, key_vector = a.sum(0) + a0, b.sum(0) + b0
        q_live = (a.abs().sum(1) > 0).nonzero().flatten()
        k_live = (b.abs().sum(1) > 0).nonzero().flatten()
        pairs = a[q_live] @ b[k_live].T  # [n_q, n_k]
        bias_terms = {"query_sources*key_bias": float(a.sum(0) @ b0), "query_bias*key_sources": float(a0 @ b.sum(0)),
                      "bias*bias": float(a0 @ b0)}
        score = float(pairs.sum(dtype=torch.float64)) + sum(bias_terms.values())
        bias_terms["query_bias*key"] = float(a0 @ key_vector)
        bias_terms["query*key_bias"] = float(query_vector @ b0)
        flat = pairs.flatten()
        order = flat.abs().argsort(descending=True)[:top]
        n_k = len(k_live)
        top_pairs = [QKPair(state.name(int(q_live[i // n_k])), state.name(int(k_live[i % n_k])), float(flat[i]))
                     for i in order.tolist()]
        clean_q = self._apply(layer, head, query, "query", self.inputs.residual[layer, query])
        clean_k = self._apply(layer, head, key, "key", self.inputs.residual[layer, key])
        return QKAttribution(
            layer=layer, head=head, query=query, key=key, score=score, clean_score=float(clean_q @ clean_k),
            pattern=float(state.clean.layers[layer].pattern[head, query, key]), pairs=top_pairs,
            query_marginals=self._top(q_live, a[q_live] @ key_vector, top),
            key_marginals=self._top(k_live, b[k_live] @ query_vector, top),
            bias_terms=bias_terms, masked=bool(self._hidden(layer, query, key)),
        )

    def _top(self, nodes: torch.Tensor, values: torch.Tensor, top: int) -> list[tuple[str, float]]:
        order = values.abs().argsort(descending=True)[:top]
        return [(self.state.name(int(nodes[i])), float(values[i])) for i in order.tolist()]
