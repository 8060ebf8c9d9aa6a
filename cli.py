"""The ``circuitscope`` command.

Every error a user can cause ends in one line on stderr (``error: ...`` naming the fix) and exit code 2;
a traceback means a bug in circuitscope.
"""

from __future__ import annotations

import json
import sys

import click

from dictionaries.errors import CircuitscopeError

FORMATS = ("gemma-scope-2", "circuit-tracer", "native")


class _Group(click.Group):
    """A click group that turns CircuitscopeError into a clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CircuitscopeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="circuitscope")
def main() -> None:
    """Circuit tracing on the Gemma 3 family with transcoders."""


@main.group(cls=_Group)
def dictionaries() -> None:
    """Inspect and convert dictionary sets (transcoders, skip transcoders, CLTs)."""


def _selectors(width: str | None, l0: str | None, affine: bool | None) -> dict:
    return {k: v for k, v in {"width": width, "l0": l0, "affine": affine}.items() if v is not None}


_selector_options = [
    click.option("--width", default=None, help="Gemma Scope 2: width folder label to pick, e.g. 16k."),
    click.option("--l0", default=None, help="Gemma Scope 2: l0 folder label to pick, e.g. small."),
    click.option("--affine/--no-affine", default=None, help="Gemma Scope 2: pick the affine (skip) folders or not."),
]


def _check_model(dicts, model: str | None) -> None:
    """With --model: the set must cover that model's layers and d_model (read from its config only)."""
    if model is not None:
        from dictionaries.model_loading import model_dimensions

        dicts.check_fits(*model_dimensions(model), model_name=model)


_model_option = click.option(
    "--model", default=None, help="Check that the dictionaries fit this model (name, directory or hub id)."
)


def _with_selectors(fn):
    for option in reversed(_selector_options):
        fn = option(fn)
    return fn


@dictionaries.command("info")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, help="On-disk format (detected if omitted).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-verify", is_flag=True, help="Skip the scan for NaN/inf values (reads every weight once).")
@_model_option
@_with_selectors
def dictionaries_info(path: str, fmt: str | None, as_json: bool, no_verify: bool, model, width, l0, affine) -> None:
    """Describe the dictionary set at PATH (a directory or a hub id with subfolder)."""
    from dictionaries.formats import detect_format, load_dictionaries
    from dictionaries.hub import resolve_dictionary_path

    local = resolve_dictionary_path(path)
    fmt = fmt or detect_format(local)
    dicts = load_dictionaries(local, fmt, verify_values=not no_verify, **_selectors(width, l0, affine))
    _check_model(dicts, model)
    widths = dicts.widths
    info = {
        "kind": dicts.kind,
        "n_layers": dicts.n_layers,
        "d_model": dicts.d_model,
        "width": widths[0] if len(set(widths)) == 1 else widths,
        "activation": dicts.config.activation.describe(),
        "skip": dicts.has_skip,
        "format": fmt,
        "source_format": dicts.config.source_format,
        "dtype": dicts.config.dtype,
        "model": dicts.config.model,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key:<14}{value}")


@dictionaries.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--from", "from_format", type=click.Choice(FORMATS), required=True, help="Format of SRC.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@_model_option
@_with_selectors
def dictionaries_convert(src: str, dst: str, from_format: str, force: bool, model, width, l0, affine) -> None:
    """Convert the dictionary set at SRC into the native format at DST (checked against --model first)."""
    from dictionaries.formats import convert, load_dictionaries
    from dictionaries.hub import resolve_dictionary_path

    local = resolve_dictionary_path(src)
    if model is not None:
        _check_model(load_dictionaries(local, from_format, verify_values=False, **_selectors(width, l0, affine)), model)
    dicts = convert(local, dst, from_format, overwrite=force, **_selectors(width, l0, affine))
    click.echo(f"wrote {dicts.kind} ({dicts.n_layers} layers, d_model {dicts.d_model}) to {dst}")


@dictionaries.command("train")
@click.option("--model", default="gemma-3-270m", show_default=True, help="Model name, checkpoint directory or hub id.")
@click.option("--kind", type=click.Choice(["transcoder", "skip-transcoder", "clt"]), required=True)
@click.option("--skip", "clt_skip", is_flag=True, help="CLT only: add an affine skip per layer.")
@click.option("--width", type=int, required=True, help="Features per layer.")
@click.option("--activation", type=click.Choice(["topk", "batchtopk", "jumprelu"]), default="topk", show_default=True)
@click.option("--k", type=int, default=None, help="topk/batchtopk: features per token.")
@click.option("--target-l0", type=float, default=None, help="jumprelu: the L0 to steer to.")
@click.option("--l0-coefficient", type=float, default=None, help="jumprelu: weight of the L0 penalty.")
@click.option("--matryoshka", default=None, help="Nested prefix sizes, e.g. 1024,4096.")
@click.option("--layers", default=None, help="Per-layer kinds: train only these layers, e.g. 3,5.")
@click.option("--tokens", type=int, required=True, help="Training tokens.")
@click.option("--data", default="model", show_default=True, help="A .txt/.jsonl file or directory, hf://dataset, or model.")
@click.option("--out", type=click.Path(), required=True, help="Output directory (native format).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--force", is_flag=True, help="Delete the run in --out and start over.")
@click.option("--context-length", type=int, default=128, show_default=True)
@click.option("--batch-tokens", type=int, default=4096, show_default=True)
@click.option("--buffer-batches", type=int, default=4, show_default=True, help="Batches per shuffled block.")
@click.option("--harvest-batch", type=int, default=16, show_default=True, help="Contexts per forward pass.")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 * sqrt(16384 / width)).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--aux-k", type=int, default=None, help="AuxK: dead features per token (default min(d_model / 2, 4 x L0)).")
@click.option("--dead-after-tokens", type=int, default=None, help="A feature idle this many tokens is dead.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None, help="Activation cache directory (reused).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--stop-after-steps", type=int, default=None, help="Stop with a checkpoint after this step.")
@click.option("--distributed", type=click.Choice(["data", "layers"]), default="data", show_default=True,
              help="Under torchrun: data parallel, or layers sharded across processes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def dictionaries_train(matryoshka, layers, no_progress, **settings) -> None:
    """Train transcoders, skip transcoders or a CLT on MODEL's MLPs; writes the native format to --out."""
    import os

    from dictionaries.training import make_config, train
    from dictionaries.training.trainer_config import parse_int_list

    config = make_config(matryoshka=parse_int_list(matryoshka, "--matryoshka"), layers=parse_int_list(layers, "--layers"),
                         progress=not no_progress, **{k: v for k, v in settings.items() if v is not None})
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not result.finished:
        click.echo(f"stopped at step {result.step} of {config.total_steps}; continue with the same command and --resume")
        sys.exit(130 if result.metrics is not None and result.metrics.stop else 0)
    click.echo(f"wrote {config.kind} ({result.dictionaries.n_layers} layers, width {config.width}) to {config.out}")


@dictionaries.command("eval")
@click.argument("path")
@click.option("--model", default=None, help="Model (default: the one the dictionaries name, else gemma-3-270m).")
@click.option("--data", default=None, help="Held-out text: the training data by default, else model samples.")
@click.option("--tokens", type=int, default=4096, show_default=True, help="Evaluation tokens (BOS excluded).")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Contexts per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def dictionaries_eval(path, model, data, tokens, batch_size, as_json, no_progress) -> None:
    """Held-out FVU, L0 and dead features per layer, and the CE/KL change with every layer spliced in."""
    from dictionaries.evaluation import evaluate, format_report, held_out_contexts
    from dictionaries.formats import load_dictionaries
    from dictionaries.hub import resolve_dictionary_path
    from dictionaries.model_loading import load_model

    if tokens < 1 or batch_size < 1:
        raise CircuitscopeError("--tokens and --batch-size must be at least 1")
    dicts = load_dictionaries(resolve_dictionary_path(path))
    lm = load_model(model or dicts.config.model or "gemma-3-270m")
    contexts, label = held_out_contexts(dicts, lm, data, tokens)
    report = evaluate(dicts, lm, contexts, batch_size=batch_size, data=label, progress=not no_progress)
    click.echo(report.model_dump_json() if as_json else format_report(report))


@main.command("trace")
@click.argument("prompt")
@click.option("--model", default="gemma-3-270m", show_default=True, help="Model name, checkpoint directory or hub id.")
@click.option("--dictionaries", "dictionaries_path", required=True,
              help="Dictionary set: a directory (native, Gemma Scope 2 or circuit-tracer) or hub id/subfolder.")
@click.option("-o", "--output", default="graph.json", show_default=True, help="Where to write the graph JSON.")
@click.option("--max-logits", default=10, show_default=True, help="At most this many logit targets.")
@click.option("--logit-prob", default=0.95, show_default=True, help="Cumulative probability of the logit targets.")
@click.option("--target", "targets", multiple=True, help="Attribute this token's logit (repeatable), e.g. ' Paris'.")
@click.option("--logit-diff", nargs=2, default=None, help="Attribute logit(A) - logit(B) of two tokens.")
@click.option("--position", type=int, default=None, help="Token position whose next-token logits are attributed.")
@click.option("--max-features", type=int, default=None, help="Feature budget (default: expand every active feature).")
@click.option("--batch-size", default=64, show_default=True, help="Targets per backward batch.")
@click.option("--node-threshold", default=0.8, show_default=True, help="Cumulative node influence kept by pruning.")
@click.option("--edge-threshold", default=0.98, show_default=True, help="Cumulative edge influence kept by pruning.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", default=None, help="cpu (default) or cuda.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (for -it models).")
@click.option("--keep-unpruned", is_flag=True, help="Also store what pruning removed (big for real models).")
@click.option("--svg", "svg_path", default=None, help="Also draw the graph as SVG (needs graphviz).")
@click.option("--html", "html_path", default=None, help="Also write the interactive HTML page.")
@click.option("--neuronpedia", "np_path", default=None, help="Also export JSON for the Neuronpedia graph frontend.")
def trace_command(prompt, model, dictionaries_path, output, max_logits, logit_prob, targets, logit_diff, position,
                  max_features, batch_size, node_threshold, edge_threshold, dtype, device, chat, keep_unpruned,
                  svg_path, html_path, np_path) -> None:
    """Trace PROMPT: write its attribution graph as JSON (and optionally SVG, HTML, Neuronpedia JSON)."""
    import time

    from pydantic import ValidationError

    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.formats import load_dictionaries
    from dictionaries.hub import resolve_dictionary_path
    from dictionaries.model_loading import load_model

    start = time.perf_counter()
    try:
        settings = TraceSettings(
            max_logits=max_logits, logit_prob=logit_prob, targets=list(targets) or None, logit_diff=logit_diff,
            position=position, max_features=max_features, batch_size=batch_size, node_threshold=node_threshold,
            edge_threshold=edge_threshold, dtype=dtype, chat=chat, keep_unpruned=keep_unpruned,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not prompt.strip():
        raise CircuitscopeError("The prompt is empty; pass some text to trace.")
    if svg_path:  # before the long work, not after it
        from viz.svg import require_graphviz

        require_graphviz()
    lm = load_model(model, dtype=dtype, device=device)
    dicts = load_dictionaries(resolve_dictionary_path(dictionaries_path))
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    graph = trace(lm, dicts, prompt, settings, progress=True, dictionaries_source=dictionaries_path)
    graph.save(output)
    _write_exports(graph, svg_path=svg_path, html_path=html_path, np_path=np_path)
    meta = graph.metadata
    click.echo(f"prompt     {meta.tokens}")
    click.echo(f"graph      {graph.graph.number_of_nodes()} nodes, {graph.graph.number_of_edges()} edges "
               f"({meta.n_active_features} active features, {meta.n_expanded_features} expanded) -> {output}")
    click.echo(f"scores     replacement {meta.scores.replacement:.3f}, completeness {meta.scores.completeness:.3f} "
               f"(unpruned {meta.scores.replacement_unpruned:.3f}, {meta.scores.completeness_unpruned:.3f})")
    logits = sorted(graph.logit_nodes, key=lambda n: -(graph.graph.nodes[n]["probability"] or 0))
    shown = ", ".join(f"{graph.graph.nodes[n]['token']!r} {graph.graph.nodes[n]['probability']:.3f}" for n in logits)
    click.echo(f"logits     {shown}")
    click.echo(f"time       {time.perf_counter() - start:.1f} s (attribution {meta.timings.get('total', 0):.1f} s)")


def _write_exports(graph, svg_path=None, html_path=None, np_path=None, limits=None) -> None:
    """Write each export that has a path and say where it went."""
    if svg_path:
        from viz.svg import save_svg

        click.echo(f"svg        {save_svg(graph, svg_path, limits)}")
    if html_path:
        from viz.html import save_html

        click.echo(f"html       {save_html(graph, html_path)}")
    if np_path:
        from circuits.neuronpedia import save_neuronpedia

        click.echo(f"neuronpedia {save_neuronpedia(graph, np_path)}")


@main.command("render")
@click.argument("graph_path", metavar="GRAPH.json")
@click.option("-o", "--output", required=True,
              help="OUT.svg (graphviz drawing), OUT.html (interactive page) or OUT.np.json (Neuronpedia frontend).")
@click.option("--max-nodes", default=120, show_default=True, help="SVG: nodes drawn besides tokens and logits.")
@click.option("--max-edges", default=400, show_default=True, help="SVG: edges drawn, most important first.")
def render_command(graph_path: str, output: str, max_nodes: int, max_edges: int) -> None:
    """Render a graph JSON file as SVG or interactive HTML, or export it for Neuronpedia."""
    from circuits.graph import AttributionGraph
    from viz.selection import DrawLimits

    name = output.lower()
    kind = next((k for k in (".np.json", ".svg", ".html") if name.endswith(k)), None)
    if kind is None:
        raise CircuitscopeError(f"{output}: name the output OUT.svg, OUT.html or OUT.np.json")
    if max_nodes < 1 or max_edges < 0:
        raise CircuitscopeError("--max-nodes must be >= 1 and --max-edges >= 0")
    graph = AttributionGraph.load(graph_path)
    paths = {".svg": "svg_path", ".html": "html_path", ".np.json": "np_path"}
    _write_exports(graph, limits=DrawLimits(max_nodes=max_nodes, max_edges=max_edges), **{paths[kind]: output})


@main.group("query", cls=_Group)
@click.argument("graph_path", metavar="GRAPH.json")
@click.pass_context
def query(ctx: click.Context, graph_path: str) -> None:
    """Ask a graph JSON file questions: paths, node, top, search, compare (tables, or --json)."""
    from circuits.graph import AttributionGraph

    ctx.obj = AttributionGraph.load(graph_path)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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


@query.command("paths")
@click.option("--target", default=None, help="Target node id (default: the most likely logit).")
@click.option("-k", "k", default=5, show_default=True, help="How many paths.")
@_json_option
@click.pass_obj
def query_paths(graph, target, k, as_json) -> None:
    """The strongest paths from token nodes to a target (product of normalised edge weights)."""
    from circuits.paths import strongest_paths
    from viz.tables import paths_table

    paths = strongest_paths(graph, target, k)
    _emit(as_json, paths, paths_table(graph, paths))


@query.command("node")
@click.argument("node_id")
@click.option("--top", default=15, show_default=True, help="Inputs and outputs listed on each side.")
@_json_option
@click.pass_obj
def query_node(graph, node_id, top, as_json) -> None:
    """A node's attributes, its direct inputs and the nodes it drives, ranked, with signs."""
    from circuits.queries import node_report
    from viz.tables import node_text

    report = node_report(graph, node_id, top)
    _emit(as_json, report, node_text(graph, report))


def _node_rows(graph, nodes) -> list[dict]:
    from circuits.graph import NodeData

    return [NodeData(id=n, **graph.graph.nodes[n]).model_dump() for n in nodes]


_KINDS = click.Choice(["token", "feature", "error", "remainder", "logit", "supernode"])


@query.command("top")
@click.option("-n", "n", default=20, show_default=True, help="How many nodes.")
@click.option("--kind", type=_KINDS, default=None, help="Only nodes of this kind.")
@_json_option
@click.pass_obj
def query_top(graph, n, kind, as_json) -> None:
    """The most influential nodes."""
    from circuits.queries import top_nodes
    from viz.tables import nodes_table

    nodes = top_nodes(graph, n, kind)
    _emit(as_json, _node_rows(graph, nodes), nodes_table(graph, nodes))


@query.command("search")
@click.option("--label", default=None, help="Label contains this text.")
@click.option("--token", default=None, help="The token at the node's position (or a logit's token) contains this.")
@click.option("--layer", type=int, default=None, help="In this layer.")
@click.option("--feature", default=None, help="Feature index (any layer) or feature key LAYER:INDEX.")
@click.option("--kind", type=_KINDS, default=None, help="Of this kind.")
@_json_option
@click.pass_obj
def query_search(graph, label, token, layer, feature, kind, as_json) -> None:
    """Nodes that match every term given, most influential first."""
    from circuits.queries import NodeQuery, search_nodes
    from viz.tables import nodes_table

    if feature is not None and ":" not in feature:
        if not feature.isdigit():
            raise CircuitscopeError(f"--feature {feature!r}: give an index such as 17 or a key such as 3:17")
        feature = int(feature)
    nodes = search_nodes(graph, NodeQuery(label=label, token=token, layer=layer, feature=feature, kind=kind))
    _emit(as_json, _node_rows(graph, nodes), nodes_table(graph, nodes) if nodes else "no node matches")


@query.command("compare")
@click.argument("other_path", metavar="OTHER.json")
@click.option("--top", default=10, show_default=True, help="Entries listed per section.")
@click.option("--by-node", is_flag=True, help="Match node ids (same prompt) instead of position-free identities.")
@_json_option
@click.pass_obj
def query_compare(graph, other_path, top, by_node, as_json) -> None:
    """Compare with OTHER.json: shared features, edges that appear, vanish or change most."""
    from circuits.compare import compare_graphs
    from circuits.graph import AttributionGraph
    from viz.tables import comparison_text

    result = compare_graphs(graph, AttributionGraph.load(other_path), top, "node" if by_node else "feature")
    _emit(as_json, result, comparison_text(result))


if __name__ == "__main__":  # pragma: no cover
    main()
