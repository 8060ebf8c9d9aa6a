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


if __name__ == "__main__":  # pragma: no cover
    main()
