"""The options several commands share (cli/options.py): defaults come from the code's single sources, and every
command that loads dictionaries takes the Gemma Scope 2 selectors."""

from __future__ import annotations

import json
import subprocess
import sys

import click

from circuits.settings import TraceSettings
from cli import main
from cli.options import DTYPES
from cli.threads import ThreadSettings
from dictionaries.formats import registered_selectors
from dictionaries.models.registry import DEFAULT_MODEL

# commands that load a dictionary set, and so must be able to pick a Gemma Scope 2 variant
LOADS_DICTIONARIES = ["trace", "intervene", "validate", "features annotate", "dictionaries info",
                      "dictionaries convert", "dictionaries eval"]


def _commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    found = {}
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the top group imports a command's module when it is looked up
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found.update(_commands(command, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = command
    return found


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params}


def test_model_defaults_are_the_default_model_or_left_to_the_command():
    models = {name: _params(c)["model"] for name, c in _commands().items() if "model" in _params(c)}
    assert {"trace", "intervene", "validate", "features annotate", "dictionaries train",
            "dictionaries eval"} <= set(models)
    for name, option in models.items():
        assert option.default in (DEFAULT_MODEL, None), name
    assert {models[name].default for name in ("trace", "intervene", "dictionaries train")} == {DEFAULT_MODEL}
    assert DEFAULT_MODEL in models["features annotate"].help and DEFAULT_MODEL in models["dictionaries eval"].help


def test_trace_settings_defaults_come_from_trace_settings():
    params = _params(_commands()["trace"])
    for field in ("max_logits", "logit_prob", "batch_size", "node_threshold", "edge_threshold", "dtype",
                  "max_features", "position"):
        assert params[field].default == TraceSettings.model_fields[field].default, field


def test_every_command_that_runs_a_model_takes_threads_with_the_settings_default():
    runs_a_model = {"trace", "trace-many", "intervene", "validate", "features annotate", "dictionaries eval",
                    "dictionaries train"}
    takes_threads = {name for name, c in _commands().items() if "threads" in _params(c)}
    assert takes_threads == runs_a_model
    for name in runs_a_model:
        option = _params(_commands()[name])["threads"]
        assert option.default == ThreadSettings.model_fields["threads"].default == 0, name
        assert "OMP_NUM_THREADS" in option.help and "load" in option.help, name


def test_dtype_choices_are_the_settings_dtypes():
    assert set(DTYPES) == {"float32", "bfloat16"}
    for name, command in _commands().items():
        dtype = _params(command).get("dtype")
        if dtype is not None:
            assert tuple(dtype.type.choices) == DTYPES, name


def test_every_command_that_loads_dictionaries_takes_every_registered_selector():
    selectors = registered_selectors()
    assert {s.name for s in selectors} >= {"width", "l0", "affine"}  # Gemma Scope 2's
    commands = _commands()
    for name in LOADS_DICTIONARIES:
        params = _params(commands[name])
        for selector in selectors:
            option = params[selector.name]
            assert option.default is None and option.help == selector.help, (name, selector)
            assert option.secondary_opts == ([f"--no-{selector.name}"] if selector.is_flag else []), (name, selector)


def test_json_option_is_one_flag_everywhere():
    flags = [_params(c)["as_json"] for c in _commands().values() if "as_json" in _params(c)]
    assert len(flags) >= 9
    assert all(f.opts == ["--json"] and f.is_flag and f.help == flags[0].help for f in flags)


def test_importing_the_cli_does_not_import_transformers():
    code = "import sys, cli; print(sorted(m for m in ('transformers', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []
