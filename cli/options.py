"""The click options several commands share, each declared once, with its default read from the code's own
single source: the model (:data:`~dictionaries.models.registry.DEFAULT_MODEL`), the dictionaries and their
Gemma Scope 2 selectors, dtype, device, ``--threads`` and ``--json``; :func:`trace_default` reads a trace
setting's default from :class:`~circuits.settings.TraceSettings`.

Nothing here imports transformers or torch: ``circuitscope --help`` and ``query`` must not pay for them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

import click

from circuits.settings import TraceSettings
from dictionaries.models.registry import DEFAULT_MODEL

from .threads import ThreadSettings, use_threads

if TYPE_CHECKING:
    from dictionaries.dictionary_set import DictionarySet
    from dictionaries.formats import Selector

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def trace_default(field: str) -> Any:
    """The default of :class:`TraceSettings` field ``field``, for the option that sets it."""
    return TraceSettings.model_fields[field].default


# --- model -----------------------------------------------------------------------------------------------
MODEL_HELP = "Model name, checkpoint directory or hub id."
MODEL_OF_DICTIONARIES_HELP = f"Model (default: the one the dictionaries name, else {DEFAULT_MODEL})."


def model_option(default: str | None = DEFAULT_MODEL, help: str = MODEL_HELP) -> Decorator:
    """``--model``; with ``default=None`` the command picks the model itself (``help`` says how)."""
    return click.option("--model", default=default, show_default=default is not None, help=help)


def model_of_dictionaries(model: str | None, dicts: DictionarySet) -> str:
    """The model a command that reads a dictionary set runs: ``--model``, else the one the set names, else the
    default model (see :data:`MODEL_OF_DICTIONARIES_HELP`)."""
    return model or dicts.config.model or DEFAULT_MODEL


# --- dtype, device, --json -------------------------------------------------------------------------------
DTYPES: tuple[str, ...] = get_args(TraceSettings.model_fields["dtype"].annotation)


def dtype_option(default: str | None = trace_default("dtype"), help: str = "Model dtype.") -> Decorator:
    return click.option("--dtype", type=click.Choice(DTYPES), default=default, show_default=default is not None,
                        help=help)


device_option = click.option("--device", default=None, help="cpu (default) or cuda.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


# --- threads ---------------------------------------------------------------------------------------------
THREADS_HELP = ("Torch threads; 0 chooses from the cores this process may use (CPU affinity, cgroup quota) less "
                "the machine's load from other processes. OMP_NUM_THREADS, when set, replaces that choice; "
                "--threads N > 0 overrides both.")


def threads_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--threads N`` (:class:`~cli.threads.ThreadSettings`): the command runs with the chosen torch thread count
    (:func:`cli.threads.use_threads`), set before its work starts. A command with a ``threads`` parameter
    receives the :class:`~cli.threads.ThreadChoice` (to report it); others do not see the option."""
    wants_choice = "threads" in inspect.signature(command).parameters

    @functools.wraps(command)
    def with_threads(*args: Any, threads: int, **kwargs: Any) -> Any:
        with use_threads(ThreadSettings(threads=threads)) as choice:
            return command(*args, **({"threads": choice} if wants_choice else {}), **kwargs)

    default = ThreadSettings.model_fields["threads"].default
    return click.option("--threads", type=click.IntRange(min=0), default=default, show_default=True,
                        help=THREADS_HELP)(with_threads)


# --- dictionaries ----------------------------------------------------------------------------------------
DICTIONARIES_HELP = ("Dictionary set: a directory in any format circuitscope reads, or hub id/subfolder "
                     "(default: the set shipped for --model).")


def _selector_option(selector: Selector) -> Decorator:
    flags = f"--{selector.name}/--no-{selector.name}" if selector.is_flag else f"--{selector.name}"
    return click.option(flags, default=None, help=selector.help)


def selector_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add an option for every selector of the registered dictionary formats (Gemma Scope 2: ``--width``,
    ``--l0``, ``--affine/--no-affine``: which variant of each layer to load from a folder that holds several,
    and for a hub id the only one to download). ``command`` receives the ones given as one argument
    ``selectors``, a dict of keyword arguments for ``load_dictionaries`` and ``resolve_dictionary_path``."""
    from dictionaries.formats import registered_selectors  # the formats import torch: only commands that load

    names = [s.name for s in registered_selectors()]

    @functools.wraps(command)  # carries the options declared below this decorator
    def with_selectors(*args: Any, **kwargs: Any) -> Any:
        chosen = {name: kwargs.pop(name) for name in names}
        return command(*args, selectors={k: v for k, v in chosen.items() if v is not None}, **kwargs)

    for selector in reversed(registered_selectors()):
        with_selectors = _selector_option(selector)(with_selectors)
    return with_selectors


def dictionaries_options(help: str = DICTIONARIES_HELP) -> Decorator:
    """``--dictionaries`` (argument ``dictionaries_path``) and the selectors (argument ``selectors``)."""
    path_option = click.option("--dictionaries", "dictionaries_path", default=None, help=help)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        return path_option(selector_options(command))

    return decorate
