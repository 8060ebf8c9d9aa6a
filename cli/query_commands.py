"""``circuitscope query GRAPH paths|node|top|search|compare|supernodes|heads|qk|attention``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from circuits.graph.node_kinds import node_kind_names
from circuits.graph.supernodes import GROUPINGS

from .app import Group, main
from .feature_specs import parse_feature_search
from .options import device_option, json_option


@main.group("query", cls=Group)
@click.argument("graph_path", metavar="GRAPH")
@click.pass_context
def query(ctx: click.Context, graph_path: str) -> None:
    """Ask a graph file (compact or JSON) questions: paths, node, top, search, compare, supernodes, heads, qk, attention
    (tables, or --json)."""
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

    return [NodeData(id=n, **graph.nodes[n]).model_dump() for n in nodes]


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


def _check_before_loading(graph, nodes=(), layer=None, positions=()) -> None:
    """What can be checked from the graph file alone, before the model is loaded and the prompt rerun."""
    from circuits.attention.state import check_node_id
    from dictionaries.errors import CircuitscopeError

    meta = graph.metadata
    for node in nodes:
        check_node_id(node, len(meta.tokens))
    if layer is not None and not 0 <= layer < meta.n_layers:
        raise CircuitscopeError(f"layer {layer} is outside 0..{meta.n_layers - 1}")
    for position in positions:
        if not 0 <= position < len(meta.tokens):
            raise CircuitscopeError(f"position {position} is outside the prompt's {len(meta.tokens)} tokens")


def _trace_state(graph, device):
    """The frozen model of the graph's trace, with the model and dictionaries the graph names."""
    from circuits.attention.state import state_from_graph

    from .loading import load_model_and_dictionaries

    meta = graph.metadata
    if meta.dictionaries.source is None:
        raise click.UsageError("the graph does not name its dictionaries, so its trace cannot be rebuilt")
    loaded = load_model_and_dictionaries(meta.model, meta.dictionaries.source, meta.settings.dtype, device)
    return state_from_graph(graph, loaded.lm, loaded.dicts)


@query.command("heads")
@click.argument("source")
@click.argument("target")
@click.option("--layer", type=int, default=None, help="Split at this attention layer only (default: every layer "
                                                      "between the two nodes).")
@device_option
@json_option
@click.pass_obj
def query_heads(graph, source, target, layer, device, as_json) -> None:
    """Which attention heads carry the edge SOURCE -> TARGET: at each layer between them, the edge split into the
    residual route and one route per head (signed; they sum to the edge). Reruns the graph's prompt."""
    from circuits.attention.heads import head_shares

    _check_before_loading(graph, (source, target), layer)
    shares = head_shares(_trace_state(graph, device), source, target, layer)
    lines = [f"edge          {source} -> {target}: {shares[0].edge:+.5g} (recomputed; the graph stores "
             f"{graph.graph.edges[source, target]['weight']:+.5g})" if graph.graph.has_edge(source, target) else
             f"edge          {source} -> {target}: {shares[0].edge:+.5g} (not kept in the graph)",
             f"  {'layer':>5} {'above':>9} {'residual':>9}  heads"]
    for share in shares:
        heads = " ".join(f"{h}:{v:+.4g}" for h, v in sorted(enumerate(share.heads), key=lambda x: -abs(x[1])))
        lines.append(f"  {share.layer:>5} {share.above:+9.4g} {share.residual:+9.4g}  {heads}")
    lines.append("note          above: the source's writes to layers at or above the split (cross-layer "
                 "dictionaries); edge = above + residual + sum of heads")
    _emit(as_json, shares, "\n".join(lines))


@query.command("qk")
@click.option("--layer", type=int, required=True, help="Attention layer.")
@click.option("--head", type=int, required=True, help="Query head.")
@click.option("--query", "query_position", type=int, default=None, help="Query position.")
@click.option("--key", "key_position", type=int, default=None, help="Key position.")
@click.option("--edge", nargs=2, default=None, metavar="SOURCE TARGET",
              help="Instead of --query/--key: the target's position attends to the source's.")
@click.option("--top", default=20, show_default=True, help="Pairs and contributors listed.")
@device_option
@json_option
@click.pass_obj
def query_qk(graph, layer, head, query_position, key_position, edge, top, device, as_json) -> None:
    """Why a head attended: its pre-softmax score at (query, key) split into pairs of sources present at the query
    and at the key, plus bias terms (they sum to the score), with the top contributors on each side."""
    from circuits.attention.qk import AttentionQueries

    meta = graph.metadata
    if edge is not None:
        ends = []
        for node in edge:
            if node not in graph.graph.nodes:
                raise click.UsageError(f"{node} is not a node of this graph")
            ends.append(graph.nodes[node]["position"])
        key_position, query_position = ends
    if query_position is None or key_position is None:
        raise click.UsageError("give --query and --key, or --edge SOURCE TARGET")
    _check_before_loading(graph, edge or (), layer, (query_position, key_position))
    if key_position > query_position:
        raise click.UsageError(f"key position {key_position} is after query position {query_position} "
                               "(attention is causal)")
    result = AttentionQueries(_trace_state(graph, device)).attribute(layer, head, query_position, key_position, top)
    tokens = meta.tokens
    lines = [f"head          L{layer}.H{head}: query {query_position} {tokens[query_position]!r} -> key "
             f"{key_position} {tokens[key_position]!r}",
             f"score         {result.score:+.5g} (pre-softmax; clean run {result.clean_score:+.5g}), "
             f"pattern {result.pattern:.4f}" + (" (masked: outside the sliding window)" if result.masked else ""),
             "bias terms    " + ", ".join(f"{k} {v:+.4g}" for k, v in result.bias_terms.items()),
             "top pairs     (query source x key source)"]
    lines += [f"  {p.weight:+10.4g}  {p.query_source:<28} x {p.key_source}" for p in result.pairs]
    lines.append("query side    (source . key)")
    lines += [f"  {w:+10.4g}  {name}" for name, w in result.query_marginals]
    lines.append("key side      (query . source)")
    lines += [f"  {w:+10.4g}  {name}" for name, w in result.key_marginals]
    _emit(as_json, result, "\n".join(lines))


@query.command("attention")
@click.option("--top-edges", default=500, show_default=True, help="Annotate this many of the strongest "
                                                                   "cross-position edges.")
@click.option("--heads", "n_heads", default=3, show_default=True, help="Head routes listed per edge.")
@click.option("--neuronpedia", "np_path", default=None, help="Also write the Neuronpedia JSON with QK results "
                                                             "(qk_tracing_results) for the strongest edges' targets.")
@click.option("--qk-nodes", default=10, show_default=True, help="Targets given QK results in the Neuronpedia JSON.")
@click.option("--html", "html_path", default=None, help="Also write the graph's HTML page with these edges' heads: "
                                                        "selecting an input edge shows its heads and their QK.")
@click.option("--qk-edges", default=20, show_default=True, type=click.IntRange(min=0),
              help="Edges (strongest first) whose heads get QK attributions on the HTML page.")
@device_option
@json_option
@click.pass_obj
def query_attention(graph, top_edges, n_heads, np_path, qk_nodes, html_path, qk_edges, device, as_json) -> None:
    """The strongest cross-position edges, each with the attention heads that carry most of it (layer.head and the
    signed share), from one backward pass per target. Reruns the graph's prompt."""
    from circuits.attention.heads import annotate_edges
    from dictionaries.atomic_output import check_writable

    for path in (np_path, html_path):  # before the rerun, not after it
        if path is not None and check_writable(path):
            click.echo(f"note: created the folder {Path(path).parent}", err=True)
    state = _trace_state(graph, device)
    routes = annotate_edges(state, graph, top_edges, n_heads)
    if np_path is not None:
        from circuits.attention.export import neuronpedia_qk
        from circuits.graph.neuronpedia import save_neuronpedia

        save_neuronpedia(graph, np_path, qk_tracing=neuronpedia_qk(state, graph, routes, qk_nodes))
    if html_path is not None:
        from circuits.attention.summary import attention_summary
        from viz.html import save_html

        save_html(graph, html_path, attention=attention_summary(state, routes, qk_edges))
    lines = [f"  {'weight':>9}  {'source':<26} {'target':<26} heads (layer.head share)"]
    for r in routes:
        heads = " ".join(f"L{layer}.H{head} {share:+.3g}" for layer, head, share in r.heads)
        lines.append(f"  {r.weight:+9.4g}  {r.source:<26} {r.target:<26} {heads}")
    if np_path is not None:
        lines.append(f"neuronpedia   {np_path}")
    if html_path is not None:
        lines.append(f"html          {html_path}")
    _emit(as_json, routes, "\n".join(lines))
