"""Plain-text tables for query results (what ``circuitscope query`` prints without ``--json``)."""

from __future__ import annotations

from collections.abc import Sequence

from circuits.graph.attribution_graph import AttributionGraph
from circuits.graph.compare import EdgeChange, FeaturePresence, GraphComparison
from circuits.graph.paths import GraphPath
from circuits.graph.queries import Contribution, NodeReport
from circuits.graph.supernodes import GroupSummary

from .labels import node_description, node_label


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in ``numeric`` right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _name(graph: AttributionGraph, node: str) -> str:
    return " ".join(node_label(graph, node)) if node in graph.nodes else node


def nodes_table(graph: AttributionGraph, nodes: Sequence[str]) -> str:
    rows = []
    for node in nodes:
        data = graph.nodes[node]
        activation = data.get("activation")
        rows.append([node, data["kind"], data["layer"], data["position"], _name(graph, node),
                     f"{data['influence']:.4g}", "" if activation is None else f"{activation:.4g}"])
    return format_table(["id", "kind", "layer", "pos", "shown as", "influence", "activation"], rows, (2, 3, 5, 6))


def paths_table(graph: AttributionGraph, paths: Sequence[GraphPath]) -> str:
    """Each path as a heading (rank, strength, sign) over one row per node: id, layer, label, the weight in."""
    blocks = []
    for i, path in enumerate(paths):
        rows = [[node, graph.nodes[node]["layer"], _name(graph, node), "" if j == 0 else
                 f"{path.weights[j - 1]:+.4g}"] for j, node in enumerate(path.nodes)]
        head = f"#{i + 1}  strength {path.strength:.4g}  sign {'+' if path.sign > 0 else '-'}"
        blocks.append(head + "\n" + _indent(format_table(["node", "layer", "shown as", "weight in"], rows, (1, 3))))
    return "\n\n".join(blocks)


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


def groups_table(groups: Sequence[GroupSummary], n_groups: int, n_members: int) -> str:
    """Supernode groups: name, member count, layers, positions, total influence, the top members' labels."""
    def span(low: int, high: int) -> str:
        return str(low) if low == high else f"{low}-{high}"

    rows = [[g.name, len(g.members), span(*g.layers), ",".join(map(str, g.positions)), f"{g.influence:.4g}",
             " | ".join(g.labels)] for g in groups]
    head = f"{n_groups} groups of {n_members} nodes (shown: the {len(groups)} most influential)"
    return head + "\n" + format_table(["group", "members", "layers", "positions", "influence", "member labels"],
                                       rows, (1, 4))


def _contributions(graph: AttributionGraph, title: str, items: Sequence[Contribution]) -> str:
    rows = [[c.node, _name(graph, c.node), f"{c.weight:+.4g}", f"{100 * c.share:.1f}%"] for c in items]
    return f"{title} ({len(items)})\n" + format_table(["id", "shown as", "weight", "share"], rows, (2, 3))


def node_text(graph: AttributionGraph, report: NodeReport) -> str:
    return "\n\n".join([node_description(graph, report.id), _contributions(graph, "inputs", report.inputs),
                        _contributions(graph, "outputs", report.outputs)])


def _features(title: str, items: Sequence[FeaturePresence]) -> str:
    if not items:
        return f"{title}: none"
    rows = [[f.feature_key, f"{f.influence_a:.4g}", f"{f.influence_b:.4g}", ",".join(map(str, f.positions_a)),
             ",".join(map(str, f.positions_b))] for f in items]
    return f"{title}\n" + format_table(["feature", "influence a", "influence b", "positions a", "positions b"],
                                       rows, (1, 2))


def _edges(title: str, items: Sequence[EdgeChange]) -> str:
    def show(w: float | None) -> str:
        return "-" if w is None else f"{w:+.4g}"

    if not items:
        return f"{title}: none"
    rows = [[c.source, c.target, show(c.weight_a), show(c.weight_b), f"{c.delta:+.4g}"] for c in items]
    return f"{title}\n" + format_table(["source", "target", "weight a", "weight b", "change"], rows, (2, 3, 4))


def comparison_text(result: GraphComparison) -> str:
    head = (f"same prompt: {result.same_prompt}, same dictionaries: {result.same_dictionaries}, "
            f"feature overlap {result.feature_overlap:.3f}, edge overlap {result.edge_overlap:.3f}")
    return "\n\n".join([
        head, _features("shared features", result.shared_features), _features("only in a", result.only_a),
        _features("only in b", result.only_b), _edges("edges that appeared", result.appeared),
        _edges("edges that vanished", result.vanished), _edges("edges that changed most", result.changed),
    ])
