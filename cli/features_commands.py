"""``circuitscope features annotate|show``: feature labels of a dictionary set."""

from __future__ import annotations

import click

from dictionaries.errors import CircuitscopeError

from .app import Group, main
from .options import (
    MODEL_OF_DICTIONARIES_HELP,
    json_option,
    model_of_dictionaries,
    model_option,
    selector_options,
    threads_option,
)


@main.group(cls=Group)
def features() -> None:
    """Feature labels: top-activating contexts, activation frequency, promoted and suppressed tokens."""


_labels_option = click.option("--labels", "labels_dir", default=None,
                              help="Labels directory (default: DICT/labels, next to the dictionaries).")


@features.command("annotate")
@click.argument("path", metavar="DICT")
@model_option(None, help=MODEL_OF_DICTIONARIES_HELP)
@selector_options
@click.option("--data", default=None,
              help="Corpus: a .txt/.jsonl file or directory, hf://dataset, or model (default: the training text "
                   "when it is on this machine, else model samples).")
@click.option("--tokens", type=int, default=65_536, show_default=True, help="Corpus tokens (BOS excluded).")
@click.option("--context-length", type=int, default=None,
              help="Tokens per context (default: the training run's, else 128).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Contexts per forward pass.")
@click.option("--contexts-per-feature", type=int, default=8, show_default=True, help="Top contexts kept per feature.")
@_labels_option
@click.option("--force", is_flag=True, help="Replace existing labels.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@threads_option
def features_annotate(path, model, selectors, data, tokens, context_length, batch_size, contexts_per_feature,
                      labels_dir, force, no_progress, threads) -> None:
    """Annotate every feature of the dictionary set at DICT and store the labels next to it."""
    import time
    from pathlib import Path

    from pydantic import ValidationError

    from dictionaries.formats.registry import load_dictionaries
    from dictionaries.hub import resolve_dictionary_path
    from dictionaries.labels import AnnotationSettings, annotate, labels_directory
    from dictionaries.models.loading import load_model

    start = time.perf_counter()
    try:
        settings = AnnotationSettings(contexts_per_feature=contexts_per_feature, batch_size=batch_size)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    if tokens < 1:
        raise CircuitscopeError("--tokens must be at least 1")
    local = resolve_dictionary_path(path, **selectors)
    destination = Path(labels_dir) if labels_dir else labels_directory(local)
    if destination.is_dir() and any(destination.iterdir()) and not force:  # before loading anything
        raise CircuitscopeError(f"{destination} already holds feature labels; pass --force to replace them")
    dicts = load_dictionaries(local, **selectors)
    lm = load_model(model_of_dictionaries(model, dicts))
    if dicts.dtype != lm.dtype:  # e.g. a bfloat16 set with a float32 model: encode in the model's dtype
        dicts = load_dictionaries(local, dtype=lm.dtype, verify_values=False, **selectors)
    annotate(dicts, lm, destination, data=data, tokens=tokens, context_length=context_length, settings=settings,
             overwrite=force, progress=not no_progress)
    click.echo(f"wrote labels of {sum(dicts.widths)} features ({dicts.n_layers} layers) to {destination} "
               f"in {time.perf_counter() - start:.1f} s with {threads.describe()}")


@features.command("show")
@click.argument("path", metavar="DICT")
@click.argument("layer", type=int)
@click.argument("index", type=int)
@_labels_option
@json_option
def features_show(path, layer, index, labels_dir, as_json) -> None:
    """Show feature INDEX of LAYER: label, frequency, top contexts, promoted and suppressed tokens."""
    from pathlib import Path

    from dictionaries.labels import FeatureLabels, labels_directory

    local = Path(labels_dir) if labels_dir else None
    if local is None:
        from dictionaries.hub import resolve_dictionary_path

        local = labels_directory(resolve_dictionary_path(path))
    labels = FeatureLabels.load(path, local)
    if labels is None:
        raise CircuitscopeError(f"{path} has no feature labels (looked in {local}); make them with: "
                                f"circuitscope features annotate {path}")
    summary = labels.summary(layer, index)
    click.echo(summary.model_dump_json() if as_json else format_summary(summary))


def format_summary(summary) -> str:
    """A feature summary as text; the maximum of each context is marked [[like this]]."""
    def token(text: str) -> str:
        return text.replace("\n", "⏎")

    lines = [f"feature {summary.layer}:{summary.index}   {summary.label}",
             f"frequency {summary.frequency:.5f} of tokens, mean activation when active {summary.mean_activation:.4g}",
             "context    " + (", ".join(f"{t.token!r} {t.score:.3g}" for t in summary.context_words) or "-"),
             "promotes   " + ", ".join(f"{t.token!r} {t.score:+.3g}" for t in summary.promoted),
             "suppresses " + ", ".join(f"{t.token!r} {t.score:+.3g}" for t in summary.suppressed),
             f"top contexts ({len(summary.contexts)})" if summary.contexts else "top contexts: never active"]
    for rank, ctx in enumerate(summary.contexts, 1):
        text = "".join(f"[[{token(t)}]]" if i == ctx.peak else token(t) for i, t in enumerate(ctx.tokens))
        lines.append(f"{rank:>3}. {ctx.max_activation:>9.4g}  {text}")
    return "\n".join(lines)
