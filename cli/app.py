"""The command group every ``circuitscope`` command hangs from, and the error handling they share."""

from __future__ import annotations

import sys

import click

from dictionaries.errors import CircuitscopeError


class Group(click.Group):
    """A click group that turns CircuitscopeError into a clear message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CircuitscopeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="circuitscope")
def main() -> None:
    """Circuit tracing on the Gemma 3 family with transcoders."""
