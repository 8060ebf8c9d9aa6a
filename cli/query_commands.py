"""``circuitscope query GRAPH paths|node|top|search|compare|supernodes``."""

from __future__ import annotations

import json

import click

from circuits.graph.node_kinds import node_kind_names
from circuits.graph.supernodes import GROUPINGS

from .app import Group, main
from .feature_specs import parse_feature_search
from .options import json_option


@main.group("query", cls=Group)
@click.argument("graph_path", metavar="GRAPH.json")
@click.pass_context
def query(ctx: click.Context, graph_path: str) -> None:
    """Ask a graph JSON file questions: paths, node, top, search, compare, supernodes (tables, or --json)."""
    from circuits.graph.attribution_graph import AttributionGraph

    ctx.obj = AttributionGraph.load(graph_path)


def _emit(as_json: bool, data, text: str) -> None:
    import dataclasses

    if as_json:
        if dataclasses.is_dataclass(data):
            data = dataclasses.asdict(data)
        elif isinstance(data, list):
            data = [dataclasses.asdict(d) if dataclasses.is_dataclass(d) else d for d in data]
        click.echo(json.dumps(data))
    else:
        click.echo(text)


_GROUPINGS = click.Choice(list(GROUPINGS))
_KINDS = click.Choice(node_kind_names())


@query.command("paths")
@click.option("--target", default=None, help="Target node id (default: the most likely logit).")
@click.option("-k", "k", default=5, show_default=True, help="How many paths.")
@click.option("--min-feature-hops", default=0, show_default=True,
              help="At least this many feature (or supernode) nodes between source and target.")
@click.option("--direct/--no-direct", default=False, show_default=True,
              help="Also list one-edge paths (a token straight into the target); hidden by default, they explain "
                   "nothing.")
@click.option("--exclude", "exclude", type=_KINDS, multiple=True,
              help="No intermediate node of this kind (repeat: --exclude error --exclude remainder).")
@click.option("--layers", default=None, metavar="LOW-HIGH", help="Every intermediate node's layer in this range.")
@click.option("--supernodes", type=_GROUPINGS, default=None, help="Merge groups of features first (see `supernodes`).")
@json_option
@click.pass_obj
def query_paths(graph, target, k, min_feature_hops, direct, exclude, layers, supernodes, as_json) -> None:
    """The strongest paths from token nodes to a target (product of normalised edge weights), each node with
    its layer and label. Direct token -> target edges are left out unless --direct."""
    from circuits.graph.paths import PathFilter, parse_layer_range, strongest_paths
    from circuits.graph.supernodes import merge_by
    from viz.tables import paths_table

    only = PathFilter(min_feature_hops=min_feature_hops, direct=direct, exclude_kinds=frozenset(exclude),
                      layers=parse_layer_range(layers) if layers else None)
    if supernodes:
        graph = merge_by(graph, supernodes)
    paths = strongest_paths(graph, target, k, only=only)
    text = paths_table(graph, paths) if paths else "no path satisfies these constraints"
    if not direct:
        text += "\n(one-edge paths from a token straight into the target are hidden; --direct lists them)"
    _emit(as_json, paths, text)


@query.command("supernodes")
@click.option("--method", type=_GROUPINGS, default="auto", show_default=True,
              help="auto: similar features of one layer band and position; label: nodes sharing a label; "
                   "feature: one feature across positions.")
@click.option("--top", default=20, show_default=True, help="Groups listed, most influential first.")
@json_option
@click.pass_obj
def query_supernodes(graph, method, top, as_json) -> None:
    """Groups of features that read as one concept (what `render --supernodes` and `paths --supernodes` merge)."""
    from circuits.graph.supernodes import describe_groups, node_groups
    from viz.tables import groups_table

    groups = describe_groups(graph, node_groups(graph, method))
    text = groups_table(groups[:top], len(groups), sum(len(g.members) for g in groups)) if groups else "no groups"
    _emit(as_json, groups[:top], text)


@query.command("node")
@click.argument("node_id")
@click.option("--top", default=15, show_default=True, help="Inputs and outputs listed on each side.")
@json_option
@click.pass_obj
def query_node(graph, node_id, top, as_json) -> None:
    """A node's attributes, its direct inputs and the nodes it drives, ranked, with signs."""
    from circuits.graph.queries import node_report
    from viz.tables import node_text

    report = node_report(graph, node_id, top)
    _emit(as_json, report, node_text(graph, report))


def _node_rows(graph, nodes) -> list[dict]:
    from circuits.graph.attribution_graph import NodeData

    return [NodeData(id=n, **graph.graph.nodes[n]).model_dump() for n in nodes]


@query.command("top")
@click.option("-n", "n", default=20, show_default=True, help="How many nodes.")
@click.option("--kind", type=_KINDS, default=None, help="Only nodes of this kind.")
@json_option
@click.pass_obj
def query_top(graph, n, kind, as_json) -> None:
    """The most influential nodes."""
    from circuits.graph.queries import top_nodes
    from viz.tables import nodes_table

    nodes = top_nodes(graph, n, kind)
    _emit(as_json, _node_rows(graph, nodes), nodes_table(graph, nodes))


@query.command("search")
@click.option("--label", default=None, help="Label contains this text.")
@click.option("--token", default=None, help="The token at the node's position (or a logit's token) contains this.")
@click.option("--layer", type=int, default=None, help="In this layer.")
@click.option("--feature", default=None, help="Feature index (any layer) or feature key LAYER:INDEX.")
@click.option("--kind", type=_KINDS, default=None, help="Of this kind.")
@json_option
@click.pass_obj
def query_search(graph, label, token, layer, feature, kind, as_json) -> None:
    """Nodes that match every term given, most influential first."""
    from circuits.graph.queries import NodeQuery, search_nodes
    from viz.tables import nodes_table

    if feature is not None:
        feature = parse_feature_search(feature)
    nodes = search_nodes(graph, NodeQuery(label=label, token=token, layer=layer, feature=feature, kind=kind))
    _emit(as_json, _node_rows(graph, nodes), nodes_table(graph, nodes) if nodes else "no node matches")


@query.command("compare")
@click.argument("other_path", metavar="OTHER.json")
@click.option("--top", default=10, show_default=True, help="Entries listed per section.")
@click.option("--by-node", is_flag=True, help="Match node ids (same prompt) instead of position-free identities.")
@json_option
@click.pass_obj
def query_compare(graph, other_path, top, by_node, as_json) -> None:
    """Compare with OTHER.json: shared features, edges that appear, vanish or change most."""
    from circuits.graph.attribution_graph import AttributionGraph
    from circuits.graph.compare import compare_graphs
    from viz.tables import comparison_text

    result = compare_graphs(graph, AttributionGraph.load(other_path), top, "node" if by_node else "feature")
    _emit(as_json, result, comparison_text(result))
