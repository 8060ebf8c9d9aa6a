"""``circuitscope dictionaries info|convert|train|eval``."""

from __future__ import annotations

import json
import sys

import click

from dictionaries.errors import CircuitscopeError
from dictionaries.formats import format_names

from .app import Group, main
from .options import (
    MODEL_OF_DICTIONARIES_HELP,
    json_option,
    model_of_dictionaries,
    model_option,
    selector_options,
    threads_option,
)


class FormatChoice(click.Choice):
    """The registered dictionary formats, read when a command runs (so a format registered after this
    module was imported is a choice too)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return format_names()

    @choices.setter
    def choices(self, _: object) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


@main.group(cls=Group)
def dictionaries() -> None:
    """Inspect and convert dictionary sets (transcoders, skip transcoders, CLTs)."""


def _check_model(dicts, model: str | None) -> None:
    """With --model: the set must cover that model's layers and d_model (read from its config only)."""
    if model is not None:
        from dictionaries.models.loading import model_dimensions

        dicts.check_fits(*model_dimensions(model), model_name=model)


_model_option = model_option(None, help="Check that the dictionaries fit this model (name, directory or hub id).")


@dictionaries.command("info")
@click.argument("path")
@click.option("--format", "fmt", type=FormatChoice(), default=None, help="On-disk format (detected if omitted).")
@json_option
@click.option("--no-verify", is_flag=True, help="Skip the scan for NaN/inf values (reads every weight once).")
@_model_option
@selector_options
def dictionaries_info(path: str, fmt: str | None, as_json: bool, no_verify: bool, model, selectors) -> None:
    """Describe the dictionary set at PATH (a directory or a hub id with subfolder)."""
    from dictionaries.formats.registry import detect_format, load_dictionaries
    from dictionaries.hub import resolve_dictionary_path

    local = resolve_dictionary_path(path, **selectors)
    fmt = fmt or detect_format(local)
    dicts = load_dictionaries(local, fmt, verify_values=not no_verify, **selectors)
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
@click.option("--from", "from_format", type=FormatChoice(), required=True, help="Format of SRC.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@_model_option
@selector_options
def dictionaries_convert(src: str, dst: str, from_format: str, force: bool, model, selectors) -> None:
    """Convert the dictionary set at SRC into the native format at DST (checked against --model first)."""
    from dictionaries.formats.registry import convert, load_dictionaries
    from dictionaries.hub import resolve_dictionary_path

    local = resolve_dictionary_path(src, **selectors)
    if model is not None:
        _check_model(load_dictionaries(local, from_format, verify_values=False, **selectors), model)
    dicts = convert(local, dst, from_format, overwrite=force, **selectors)
    click.echo(f"wrote {dicts.kind} ({dicts.n_layers} layers, d_model {dicts.d_model}) to {dst}")


@dictionaries.command("train")
@model_option()
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
@click.option("--data", default="model", show_default=True,
              help="A .txt/.jsonl file or directory, hf://dataset, or model.")
@click.option("--out", type=click.Path(), required=True, help="Output directory (native format).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--force", is_flag=True, help="Delete the run in --out and start over.")
@click.option("--context-length", type=int, default=128, show_default=True)
@click.option("--batch-tokens", type=int, default=4096, show_default=True)
@click.option("--buffer-batches", type=int, default=4, show_default=True, help="Batches per shuffled block.")
@click.option("--harvest-batch", type=int, default=16, show_default=True, help="Contexts per forward pass.")
@click.option("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 * sqrt(16384 / width)).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--aux-k", type=int, default=None,
              help="AuxK: dead features per token (default min(d_model / 2, 4 x L0)).")
@click.option("--dead-after-tokens", type=int, default=None, help="A feature idle this many tokens is dead.")
@click.option("--cache", "cache_dir", type=click.Path(), default=None, help="Activation cache directory (reused).")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--stop-after-steps", type=int, default=None, help="Stop with a checkpoint after this step.")
@click.option("--distributed", type=click.Choice(["data", "layers"]), default="data", show_default=True,
              help="Under torchrun: data parallel, or layers sharded across processes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@threads_option
def dictionaries_train(matryoshka, layers, no_progress, **settings) -> None:
    """Train transcoders, skip transcoders or a CLT on MODEL's MLPs; writes the native format to --out."""
    import os

    from dictionaries.training import make_config, train
    from dictionaries.training.trainer_config import parse_int_list

    config = make_config(matryoshka=parse_int_list(matryoshka, "--matryoshka"),
                         layers=parse_int_list(layers, "--layers"),
                         progress=not no_progress, **{k: v for k, v in settings.items() if v is not None})
    result = train(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not result.finished:
        click.echo(f"stopped at step {result.step} of {config.total_steps}; "
                   "continue with the same command and --resume")
        sys.exit(130 if result.metrics is not None and result.metrics.stop else 0)
    click.echo(f"wrote {config.kind} ({result.dictionaries.n_layers} layers, width {config.width}) to {config.out}")


@dictionaries.command("eval")
@click.argument("path")
@model_option(None, help=MODEL_OF_DICTIONARIES_HELP)
@selector_options
@click.option("--data", default=None, help="Held-out text: the training data by default, else model samples.")
@click.option("--tokens", type=int, default=4096, show_default=True, help="Evaluation tokens (BOS excluded).")
@click.option("--batch-size", type=int, default=2, show_default=True, help="Contexts per forward pass.")
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@threads_option
def dictionaries_eval(path, model, selectors, data, tokens, batch_size, as_json, no_progress) -> None:
    """Held-out FVU, L0 and dead features per layer, and the CE/KL change with every layer spliced in."""
    from dictionaries.evaluation import evaluate, format_report, held_out_contexts
    from dictionaries.formats.registry import load_dictionaries
    from dictionaries.hub import resolve_dictionary_path
    from dictionaries.models.loading import load_model

    if tokens < 1 or batch_size < 1:
        raise CircuitscopeError("--tokens and --batch-size must be at least 1")
    dicts = load_dictionaries(resolve_dictionary_path(path, **selectors), **selectors)
    lm = load_model(model_of_dictionaries(model, dicts))
    contexts, label = held_out_contexts(dicts, lm, data, tokens)
    report = evaluate(dicts, lm, contexts, batch_size=batch_size, data=label, progress=not no_progress)
    click.echo(report.model_dump_json() if as_json else format_report(report))
