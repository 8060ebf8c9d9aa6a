"""The command group every ``circuitscope`` command hangs from, and the error handling they share."""

from __future__ import annotations

import importlib
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


# command -> the module whose import registers it on ``main``: a command's module (and torch, which most of them
# need) is imported only when that command runs, so ``circuitscope query`` starts without loading torch.
COMMAND_MODULES = {
    "trace": "trace_commands", "render": "trace_commands", "query": "query_commands",
    "intervene": "intervene_command", "validate": "intervene_command", "trace-many": "many_commands",
    "aggregate": "many_commands", "features": "features_commands", "dictionaries": "dictionaries_commands",
}


class LazyGroup(Group):
    """The top group: it lists every command of :data:`COMMAND_MODULES` and imports a command's module when the
    command is looked up (click's documented pattern for lazily loaded subcommands)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"{__package__}.{COMMAND_MODULES[cmd_name]}")
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="circuitscope")
def main() -> None:
    """Circuit tracing on the Gemma 3 family with transcoders."""
