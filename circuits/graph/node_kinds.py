"""Every kind of node a graph can hold, described in one table: what it is called, how it is ranked, matched
across graphs, exported to Neuronpedia, named on screen and drawn.

The graph, its queries, comparisons and exports, the drawings (:mod:`viz`) and the CLI's ``--kind`` choices all
read this table, so a new kind of graph node is one :func:`register_node_kind` call (a kind the attribution
engine computes also needs its rows there: see docs/design.md, "A new node kind").

Kinds today::

    token      an input token's embedding                  always kept and drawn
    feature    an active dictionary feature at a position  ranked by influence
    error      a layer's reconstruction error at a position  drawn as a small mark (when influential)
    remainder  the unexpanded features of a (layer, position), folded into one node (ranked)
    logit      an output token's logit (or a logit difference); always kept and drawn
    supernode  a named group of nodes merged by the user (ranked)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Shape = Literal["box", "ellipse", "diamond", "octagon", "hexagon"]  # graphviz names; the page draws them alike


def show_token(text: str | None, limit: int = 14) -> str:
    """A token as it is shown: quoted, whitespace made visible, cut to ``limit`` characters."""
    text = (text or "").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"“{text}”"


# label(node id, node data, the token at the node's position as shown) -> two lines: what the node is (in full;
# drawings wrap it) and where
Label = Callable[[str, dict, str], tuple[str, str]]
# identity(node id, node data) -> the key under which the node is matched across graphs (when it has no feature_key)
Identity = Callable[[str, dict], str]


@dataclass(frozen=True)
class NodeKindInfo:
    name: str
    ranked: bool  # chosen among by influence thresholds (pruning, subgraphs); other kinds are always kept
    always_drawn: bool  # drawn whatever the drawing's node limit
    identity: Identity
    label: Label
    neuronpedia_type: str  # the ``feature_type`` of Neuronpedia's graph JSON
    shape: Shape
    fill: str  # CSS colour
    mark: bool = False  # drawn as a small unlabelled mark, one per (layer, position), and only when influential


_KINDS: dict[str, NodeKindInfo] = {}


def register_node_kind(info: NodeKindInfo) -> NodeKindInfo:
    """Add (or replace) a kind; graphs may then hold nodes of it."""
    _KINDS[info.name] = info
    return info


def node_kind(name: str) -> NodeKindInfo:
    """The registered kind ``name``, or ValueError listing the known ones."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown node kind {name!r}; known kinds: {', '.join(_KINDS)}") from None


def node_kind_names() -> list[str]:
    return list(_KINDS)


def _by_token(node: str, data: dict) -> str:
    return f"{data['kind']}:{data.get('token')}"


def _by_layer(node: str, data: dict) -> str:
    return f"{data['kind']}:{data['layer']}"


def _by_label(node: str, data: dict) -> str:
    return f"{data['kind']}:{data.get('label') or node}"


register_node_kind(NodeKindInfo(
    "token", ranked=False, always_drawn=True, identity=_by_token,
    label=lambda node, data, here: (show_token(data.get("token")), f"@{data['position']}"),
    neuronpedia_type="embedding", shape="box", fill="#e2e8f0"))
register_node_kind(NodeKindInfo(
    "feature", ranked=True, always_drawn=False, identity=_by_label,
    label=lambda node, data, here: (data.get("label") or f"L{data['layer']} #{data.get('feature')}", here),
    neuronpedia_type="cross layer transcoder", shape="ellipse", fill="#feebc8"))
register_node_kind(NodeKindInfo(
    "error", ranked=False, always_drawn=False, identity=_by_layer,
    label=lambda node, data, here: (f"error L{data['layer']}", here),
    neuronpedia_type="mlp reconstruction error", shape="diamond", fill="#e2e2e2", mark=True))
register_node_kind(NodeKindInfo(
    "remainder", ranked=True, always_drawn=False, identity=_by_layer,
    label=lambda node, data, here: (f"rest L{data['layer']} ({data.get('members')})", here),
    neuronpedia_type="unexplored node", shape="octagon", fill="#edf2f7"))
register_node_kind(NodeKindInfo(
    "logit", ranked=False, always_drawn=True, identity=_by_token,
    label=lambda node, data, here: (f"logit {show_token(data.get('token'))}", f"p={data.get('probability') or 0:.3f}"),
    neuronpedia_type="logit", shape="box", fill="#c6f6d5"))
register_node_kind(NodeKindInfo(
    "supernode", ranked=True, always_drawn=False, identity=_by_label,
    label=lambda node, data, here: (data.get("label") or node, f"{len(data.get('children') or [])} nodes"),
    neuronpedia_type="supernode", shape="hexagon", fill="#e9d8fd"))
