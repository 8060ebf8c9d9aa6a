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
def trace_command(prompt, model, dictionaries_path, output, max_logits, logit_prob, targets, logit_diff, position,
                  max_features, batch_size, node_threshold, edge_threshold, dtype, device, chat) -> None:
    """Trace PROMPT: write its attribution graph as JSON and print a summary."""
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
            edge_threshold=edge_threshold, dtype=dtype, chat=chat,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not prompt.strip():
        raise CircuitscopeError("The prompt is empty; pass some text to trace.")
    lm = load_model(model, dtype=dtype, device=device)
    dicts = load_dictionaries(resolve_dictionary_path(dictionaries_path))
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    graph = trace(lm, dicts, prompt, settings, progress=True, dictionaries_source=dictionaries_path)
    graph.save(output)
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


if __name__ == "__main__":  # pragma: no cover
    main()
