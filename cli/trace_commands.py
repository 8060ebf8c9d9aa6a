"""``circuitscope trace`` (prompt -> graph file and its drawings) and ``circuitscope render``."""

from __future__ import annotations

from pathlib import Path

import click

from circuits.graph.graph_files import COMPACT_NAME, GRAPH_SUFFIXES
from circuits.graph.supernodes import GROUPINGS
from dictionaries.errors import CircuitscopeError
from viz.selection import DrawLimits

from .app import main
from .loading import load_model_and_dictionaries
from .options import (
    device_option,
    dictionaries_options,
    dtype_option,
    model_option,
    threads_option,
    trace_default,
)


@main.command("trace")
@click.argument("prompt")
@model_option()
@dictionaries_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for graph.safetensors, graph.svg and graph.html.")
@click.option("-o", "--output", default=None,
              help="Name the graph file instead: X.safetensors (compact) or X.json (the plain-JSON export); "
                   "drawings go next to it (X.svg, X.html).")
@click.option("--no-drawings", is_flag=True, help="Write only the graph file (no SVG, no HTML).")
@click.option("--no-labels", is_flag=True,
              help="Leave feature nodes unlabelled even when the dictionaries have labels.")
@click.option("--max-logits", default=trace_default("max_logits"), show_default=True,
              help="At most this many logit targets.")
@click.option("--logit-prob", default=trace_default("logit_prob"), show_default=True,
              help="Cumulative probability of the logit targets.")
@click.option("--target", "targets", multiple=True, help="Attribute this token's logit (repeatable), e.g. ' Paris'.")
@click.option("--logit-diff", nargs=2, default=None, help="Attribute logit(A) - logit(B) of two tokens.")
@click.option("--position", type=int, default=None, help="Token position whose next-token logits are attributed.")
@click.option("--max-features", type=int, default=None, help="Feature budget (default: expand every active feature).")
@click.option("--batch-size", default=trace_default("batch_size"), show_default=True,
              help="Targets per backward batch.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Memory the whole trace may use, e.g. 8GB (default: what is free). A trace that would not fit "
                   "is refused before any work, with its estimate and the flag that fixes it.")
@click.option("--adjacency", type=click.Choice(["auto", "float32", "bfloat16"]), default=trace_default("adjacency"),
              show_default=True, help="Precision of the adjacency rows (computed and stored): auto is float32 "
                                       "unless only bfloat16 fits, or float32 would take over a minute and "
                                       "bfloat16 is 1.5x faster here. The graph's edges are recomputed exactly in "
                                       "float32 either way; influence and pruning use the rows.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the plan (active features, rows, estimated peak memory and time, batch size) and stop.")
@click.option("--node-threshold", default=trace_default("node_threshold"), show_default=True,
              help="Cumulative node influence kept by pruning.")
@click.option("--edge-threshold", default=trace_default("edge_threshold"), show_default=True,
              help="Cumulative edge influence kept by pruning.")
@dtype_option()
@device_option
@threads_option
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (for -it models).")
@click.option("--keep-unpruned", is_flag=True, help="Also store what pruning removed (big for real models).")
@click.option("--svg", "svg_path", default=None, help="Write the SVG here instead (needs graphviz).")
@click.option("--html", "html_path", default=None, help="Write the interactive HTML page here instead.")
@click.option("--neuronpedia", "np_path", default=None, help="Also export JSON for the Neuronpedia graph frontend.")
def trace_command(prompt, model, dictionaries_path, selectors, out_dir, output, no_drawings, no_labels, max_logits,
                  logit_prob, targets, logit_diff, position, max_features, batch_size, memory_limit, adjacency,
                  plan_only, node_threshold, edge_threshold, dtype, device, threads, chat, keep_unpruned, svg_path,
                  html_path, np_path) -> None:
    """Trace PROMPT: write its attribution graph as graph.safetensors, graph.svg and graph.html.

    With no options: the default model (the real Gemma 3 270M) and the dictionaries shipped for it.
    """
    import time

    from pydantic import ValidationError

    from circuits.engine.attribution import plan_attribution
    from circuits.engine.plan import format_bytes, parse_bytes
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.labels import FeatureLabels

    start = time.perf_counter()
    try:
        settings = TraceSettings(
            max_logits=max_logits, logit_prob=logit_prob, targets=list(targets) or None, logit_diff=logit_diff,
            position=position, max_features=max_features, batch_size=batch_size, node_threshold=node_threshold,
            edge_threshold=edge_threshold, dtype=dtype, chat=chat, keep_unpruned=keep_unpruned,
            memory_limit=None if memory_limit is None else parse_bytes(memory_limit), adjacency=adjacency,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not prompt.strip():
        raise CircuitscopeError("The prompt is empty; pass some text to trace.")
    if plan_only:  # writes nothing
        loaded = load_model_and_dictionaries(model, dictionaries_path, dtype, device, selectors)
        click.echo(plan_attribution(loaded.lm, loaded.dicts, prompt, settings).describe())
        click.echo(f"threads         {threads.describe()}")
        return
    output, svg_path, html_path = _output_paths(Path(out_dir), output, svg_path, html_path, no_drawings, np_path)
    loaded = load_model_and_dictionaries(model, dictionaries_path, dtype, device, selectors)
    lm, dicts = loaded.lm, loaded.dicts
    labels = None if no_labels else FeatureLabels.load(loaded.local)  # DICT/labels/ when `features annotate` made them
    loading = time.perf_counter() - start
    graph = trace(lm, dicts, prompt, settings, progress=True, dictionaries_source=loaded.source, labels=labels)
    traced = time.perf_counter()
    graph.save(output)
    _write_exports(graph, svg_path=svg_path, html_path=html_path, np_path=np_path)
    meta = graph.metadata
    phases = {"loading": loading, **{name: meta.timings.get(name, 0.0) for name in ("forward", "plan", "attribution")},
              "pruning": meta.timings.get("prune", 0.0),
              "building the graph": traced - start - loading - meta.timings.get("total", 0.0),
              "writing files": time.perf_counter() - traced}
    click.echo(f"prompt     {meta.tokens}")
    click.echo(f"graph      {len(graph.nodes)} nodes, {len(graph.table.edges)} edges "
               f"({meta.n_active_features} active features, {meta.n_expanded_features} expanded) -> {output}")
    click.echo(f"scores     replacement {meta.scores.replacement:.3f}, completeness {meta.scores.completeness:.3f} "
               f"(unpruned {meta.scores.replacement_unpruned:.3f}, {meta.scores.completeness_unpruned:.3f})")
    logits = sorted(graph.logit_nodes, key=lambda n: -(graph.nodes[n]["probability"] or 0))
    shown = ", ".join(f"{graph.nodes[n]['token']!r} {graph.nodes[n]['probability']:.3f}" for n in logits)
    click.echo(f"logits     {shown}")
    click.echo(f"time       {time.perf_counter() - start:.1f} s: "
               + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items()) + f"; {threads.describe()}")
    if meta.plan is not None:
        click.echo(f"plan       estimated peak {format_bytes(meta.plan.peak_bytes)}, "
                   f"{meta.plan.seconds:.1f} s, batch size {meta.plan.batch_size}"
                   + (f", recompute at most {meta.plan.recompute_seconds:.1f} s" if meta.plan.recompute_seconds
                      else ""))


def _output_paths(out_dir: Path, output: str | None, svg_path: str | None, html_path: str | None,
                  no_drawings: bool, np_path: str | None = None) -> tuple[str, str | None, str | None]:
    """Where the graph file, SVG and HTML go. Drawings asked for by name must be possible (graphviz is checked now,
    before the long work); the default SVG is left out with a note when graphviz is not installed."""
    from dictionaries.atomic_output import check_writable
    from viz.svg import require_graphviz

    json_path = Path(output) if output else out_dir / COMPACT_NAME
    stem = json_path.with_suffix("") if json_path.suffix.lower() in GRAPH_SUFFIXES else json_path
    if svg_path:
        require_graphviz()
    elif not no_drawings:
        try:
            require_graphviz()
            svg_path = str(stem.with_name(stem.name + ".svg"))
        except CircuitscopeError as missing:
            click.echo(f"note: no SVG ({missing})", err=True)
    if not html_path and not no_drawings:
        html_path = str(stem.with_name(stem.name + ".html"))
    for path in (json_path, svg_path, html_path, np_path):  # before the long work, not after it
        if path is not None and check_writable(path):
            click.echo(f"note: created the folder {Path(path).parent}", err=True)
    return str(json_path), svg_path, html_path


def _write_exports(graph, svg_path=None, html_path=None, np_path=None, limits=None) -> None:
    """Write each export that has a path and say where it went."""
    if svg_path:
        from viz.svg import save_svg

        click.echo(f"svg        {save_svg(graph, svg_path, limits)}")
    if html_path:
        from viz.html import save_html

        click.echo(f"html       {save_html(graph, html_path)}")
    if np_path:
        from circuits.graph.neuronpedia import save_neuronpedia

        click.echo(f"neuronpedia {save_neuronpedia(graph, np_path)}")


@main.command("render")
@click.argument("graph_path", metavar="GRAPH")
@click.option("-o", "--output", required=True,
              help="OUT.svg (graphviz drawing), OUT.html (interactive page), OUT.np.json (Neuronpedia frontend), "
                   "OUT.json (the plain-JSON export) or OUT.safetensors (the compact graph file).")
@click.option("--max-nodes", default=DrawLimits().max_nodes, show_default=True,
              help="SVG: features (and other ranked nodes) drawn besides tokens, logits and error marks.")
@click.option("--edges-per-node", default=DrawLimits().edges_per_node, show_default=True,
              help="SVG: each node's strongest inputs drawn (by normalised weight).")
@click.option("--min-edge-share", default=DrawLimits().min_edge_share, show_default=True,
              help="SVG: an edge drawn carries at least this share of its target's input.")
@click.option("--max-edges", default=DrawLimits().max_edges, show_default=True,
              help="SVG: at most this many edges drawn, most important first.")
@click.option("--error-influence", type=float, default=None,
              help="SVG: draw an error mark where the errors of a (layer, position) have at least this influence "
                   "(default: that of the weakest feature drawn).")
@click.option("--supernodes", type=click.Choice(list(GROUPINGS)), default=None,
              help="Draw groups of features as one node each (see `circuitscope query GRAPH supernodes`).")
def render_command(graph_path: str, output: str, max_nodes: int, edges_per_node: int, min_edge_share: float,
                   max_edges: int, error_influence: float | None, supernodes: str | None) -> None:
    """Render a graph file as SVG or interactive HTML, export it for Neuronpedia, or write it in the other layout
    (plain JSON or compact safetensors)."""
    from pydantic import ValidationError

    from circuits.graph.attribution_graph import AttributionGraph
    from circuits.graph.supernodes import merge_by

    name = output.lower()
    kind = next((k for k in (".np.json", ".svg", ".html", ".json", ".safetensors") if name.endswith(k)), None)
    if kind is None:
        raise CircuitscopeError(f"{output}: name the output OUT.svg, OUT.html, OUT.np.json, OUT.json or "
                                "OUT.safetensors")
    try:
        limits = DrawLimits(max_nodes=max_nodes, edges_per_node=edges_per_node, min_edge_share=min_edge_share,
                            max_edges=max_edges, mark_influence=error_influence)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = {"mark_influence": "error_influence"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise CircuitscopeError(f"--{option.replace('_', '-')}: {first['msg']}") from None
    graph = AttributionGraph.load(graph_path)
    if supernodes:
        graph = merge_by(graph, supernodes)
    if kind in GRAPH_SUFFIXES:
        click.echo(f"graph      {graph.save(output)}")
        return
    paths = {".svg": "svg_path", ".html": "html_path", ".np.json": "np_path"}
    _write_exports(graph, limits=limits, **{paths[kind]: output})
