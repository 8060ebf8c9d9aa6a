"""``circuitscope intervene`` (set, scale or zero features; steered generation) and ``circuitscope validate``
(a graph's predicted removal effects against measured ones)."""

from __future__ import annotations

import json

import click

from dictionaries.errors import CircuitscopeError

from .app import main
from .feature_specs import parse_intervention
from .loading import load_model_and_dictionaries
from .options import (
    device_option,
    dictionaries_options,
    dtype_option,
    json_option,
    model_option,
    threads_option,
)


@main.command("intervene")
@click.argument("prompt")
@model_option()
@dictionaries_options()
@click.option("--ablate", "ablations", multiple=True, metavar="L:F[@POS]",
              help="Zero feature F of layer L at token position POS (default: every position). Repeatable.")
@click.option("--set", "assignments", multiple=True, metavar="L:F=VALUE[@POS]",
              help="Set a feature's activation. Repeatable.")
@click.option("--scale", "scalings", multiple=True, metavar="L:F=FACTOR[@POS]",
              help="Multiply a feature's activation. Repeatable.")
@click.option("--freeze-attention", is_flag=True, help="Keep every attention pattern at the clean run's.")
@click.option("--freeze-norms", is_flag=True, help="Keep every normalisation scale at the clean run's.")
@click.option("--features", "feature_mode", type=click.Choice(["recompute", "linear", "frozen"]), default="recompute",
              show_default=True,
              help="Downstream features: re-encoded, linear in their input, or held at clean values.")
@click.option("--position", default=-1, show_default=True, help="Token position whose next-token logits are shown.")
@click.option("--top", default=10, show_default=True, help="List the TOP most likely tokens before and after.")
@click.option("--generate", "n_generate", default=0, show_default=True,
              help="Also generate N tokens without and with the interventions.")
@click.option("--temperature", default=0.0, show_default=True, help="--generate: 0 is greedy, above 0 samples.")
@click.option("--seed", default=0, show_default=True, help="--generate: the sampling seed.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (for -it models).")
@dtype_option()
@device_option
@threads_option
@json_option
def intervene_command(prompt, model, dictionaries_path, selectors, ablations, assignments, scalings, freeze_attention,
                      freeze_norms, feature_mode, position, top, n_generate, temperature, seed, chat, dtype, device,
                      as_json) -> None:
    """Run PROMPT with features set, scaled or zeroed and show how the next-token logits change.

    Features are named L:F (layer, index), optionally @POS (a token position; negative counts from the
    end). Interventions apply in the order ablate, set, scale; the effect propagates through later layers,
    whose features are re-encoded, while the dictionaries' error terms stay at their clean values.
    """
    from pydantic import ValidationError

    from circuits.interventions.feature_interventions import (
        InterventionSettings,
        intervene,
    )
    from circuits.interventions.steering import GenerationSettings, generate

    interventions = ([parse_intervention(s, "ablate") for s in ablations]
                     + [parse_intervention(s, "set") for s in assignments]
                     + [parse_intervention(s, "scale") for s in scalings])
    if not interventions:
        raise CircuitscopeError("name at least one feature with --ablate L:F, --set L:F=VALUE or --scale L:F=FACTOR")
    if top < 1 or n_generate < 0:
        raise CircuitscopeError("--top must be at least 1 and --generate at least 0")
    settings = InterventionSettings(freeze_attention=freeze_attention, freeze_norms=freeze_norms, features=feature_mode)
    try:
        generation = GenerationSettings(max_new_tokens=max(n_generate, 1), temperature=temperature, seed=seed)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not prompt.strip():
        raise CircuitscopeError("The prompt is empty; pass some text.")
    loaded = load_model_and_dictionaries(model, dictionaries_path, dtype, device, selectors)
    lm, dicts = loaded.lm, loaded.dicts
    result = intervene(lm, dicts, prompt, interventions, settings, chat=chat, position=position, top_k=top)
    for warning in result.inactive():
        click.echo(f"warning: {warning}", err=True)
    generations = None
    if n_generate:
        generations = {"clean": generate(lm, dicts, prompt, (), settings, generation, chat=chat),
                       "steered": generate(lm, dicts, prompt, interventions, settings, generation, chat=chat)}
    if as_json:
        click.echo(json.dumps(_intervention_json(result, generations)))
    else:
        click.echo(_intervention_text(result, generations))


def _feature_rows(result) -> list[dict]:
    """Each intervened feature's clean and new activation (the mean over the positions it acts at)."""
    rows = []
    for iv in result.interventions:
        positions = result.positions(iv)
        clean = sum(result.activation(iv.layer, iv.feature, p, clean=True) for p in positions) / len(positions)
        new = sum(result.activation(iv.layer, iv.feature, p) for p in positions) / len(positions)
        rows.append({"intervention": iv.describe(), "layer": iv.layer, "feature": iv.feature, "position": iv.position,
                     "clean": clean, "new": new})
    return rows


def _intervention_json(result, generations) -> dict:
    import dataclasses

    return {
        "prompt_tokens": result.tokens,
        "position": result.position,
        "interventions": [iv.model_dump() for iv in result.interventions],
        "settings": result.settings.model_dump(),
        "features": _feature_rows(result),
        "warnings": result.inactive(),
        "logits": [dataclasses.asdict(row) for row in result.top_changes],
        "generation": None if generations is None else {k: dataclasses.asdict(g) for k, g in generations.items()},
    }


def _intervention_text(result, generations) -> str:
    s = result.settings
    lines = [
        f"prompt        {result.tokens}",
        (f"settings      features {s.features}, attention {'frozen' if s.freeze_attention else 'live'}, "
         f"norms {'frozen' if s.freeze_norms else 'live'}"),
        "features      intervention                      clean -> new activation (mean over positions)",
    ]
    lines += [f"              {row['intervention']:<32} {row['clean']:9.4g} -> {row['new']:.4g}"
              for row in _feature_rows(result)]
    lines += [f"next token    after position {result.position} ({result.tokens[result.position]!r})",
              f"  {'token':<20} {'clean p':>8} {'new p':>8} {'clean logit':>12} {'new logit':>10} {'change':>8}"]
    lines += [f"  {row.token!r:<20} {row.clean_probability:8.4f} {row.probability:8.4f} {row.clean_logit:12.3f} "
              f"{row.logit:10.3f} {row.change:+8.3f}" for row in result.top_changes]
    if generations:
        lines.append(f"generation    {len(generations['steered'].new_ids)} tokens")
        lines += [f"  {name:<10}{g.text!r}" for name, g in generations.items()]
    return "\n".join(lines)


@main.command("validate")
@click.argument("graph_path", metavar="GRAPH")
@click.option("--top", default=20, show_default=True, help="Validate the TOP most influential feature nodes.")
@click.option("--target", default=None, help="Logit node id (default: the most likely logit).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(["linear", "frozen", "free"]),
              help="Measure in these modes (repeatable; default all): linear = the graph's own frozen linear model, "
                   "frozen = attention and norms frozen, free = nothing frozen.")
@model_option(None, help="Model (default: the one the graph names).")
@dictionaries_options(help="Dictionary set (default: the one the graph names).")
@dtype_option(None, help="Model dtype (default: the trace's).")
@device_option
@threads_option
@json_option
def validate_command(graph_path, top, target, modes, model, dictionaries_path, selectors, dtype, device,
                     as_json) -> None:
    """Zero each top feature of a graph in the model and compare the measured change of the target logit with
    the change the graph predicts (correlation, sign agreement and a table)."""
    import dataclasses

    from circuits.graph.attribution_graph import AttributionGraph
    from circuits.interventions.validation import MODES, validate_graph

    graph = AttributionGraph.load(graph_path)
    meta = graph.metadata
    model = model or meta.model
    dictionaries_path = dictionaries_path or meta.dictionaries.source
    loaded = load_model_and_dictionaries(model, dictionaries_path, dtype or meta.settings.dtype, device, selectors)
    lm, dicts = loaded.lm, loaded.dicts
    report = validate_graph(lm, dicts, graph, top=top, target=target, modes=list(modes) or list(MODES))
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report)))
        return
    lines = [f"target        {report.target_label!r} ({report.target}); predictions from the {report.graph_part} graph",
             f"  {'mode':<8} {'pearson':>8} {'signs':>7} {'max |diff|':>11}"]
    for mode, a in report.agreement.items():
        r = "-" if a.pearson is None else f"{a.pearson:.3f}"
        lines.append(f"  {mode:<8} {r:>8} {a.sign_agreement:7.0%} {a.max_abs_difference:11.4g}")
    lines.append(f"  {'node':<28} {'act':>8} {'predicted':>10}   measured: "
                 + " ".join(f"{m:>9}" for m in report.modes))
    for row in report.rows:
        lines.append(f"  {row.node:<28} {row.activation:8.3g} {row.predicted:+10.4f}             "
                     + " ".join(f"{row.measured[m]:+9.4f}" for m in report.modes))
    if report.graph_part == "pruned":
        lines.append("note          predictions miss the paths through pruned nodes; trace with --keep-unpruned "
                     "for predictions that the linear mode matches exactly")
    mismatched = [r.node for r in report.rows if abs(r.model_activation - r.activation) > 0.05 * abs(r.activation)]
    if mismatched:
        lines.append(f"warning       {len(mismatched)} feature(s) have other activations than in the graph "
                     f"(e.g. {mismatched[0]}): other dictionaries or dtype than the trace's?")
    click.echo("\n".join(lines))
