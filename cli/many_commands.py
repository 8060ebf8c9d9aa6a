"""``circuitscope trace-many`` (a JSONL of prompts -> one graph each, resumable, torchrun-sharded) and
``circuitscope aggregate`` (the graphs of a folder put together; ``--compare A B`` for two groups)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dictionaries.errors import CircuitscopeError

from .app import main
from .loading import load_model_and_dictionaries
from .options import device_option, dictionaries_options, dtype_option, model_option, threads_option, trace_default


@main.command("trace-many")
@click.argument("prompts_path", metavar="PROMPTS.jsonl")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Folder for graphs/ID.safetensors, index.json and the aggregate.")
@model_option()
@dictionaries_options()
@click.option("--no-labels", is_flag=True, help="Leave feature nodes unlabelled.")
@click.option("--max-logits", default=trace_default("max_logits"), show_default=True)
@click.option("--logit-prob", default=trace_default("logit_prob"), show_default=True)
@click.option("--max-features", type=int, default=None, help="Feature budget (default: every active feature).")
@click.option("--batch-size", default=trace_default("batch_size"), show_default=True)
@click.option("--memory-limit", default=None, metavar="SIZE", help="Memory one trace may use, e.g. 8GB.")
@click.option("--adjacency", type=click.Choice(["auto", "float32", "bfloat16"]), default=trace_default("adjacency"),
              show_default=True)
@click.option("--node-threshold", default=trace_default("node_threshold"), show_default=True)
@click.option("--edge-threshold", default=trace_default("edge_threshold"), show_default=True)
@dtype_option()
@device_option
@threads_option
@click.option("--chat", is_flag=True, help="Chat template for every prompt (a line's `chat` overrides it).")
@click.option("--no-aggregate", is_flag=True, help="Do not aggregate at the end.")
def trace_many_command(prompts_path, out_dir, model, dictionaries_path, selectors, no_labels, max_logits, logit_prob,
                       max_features, batch_size, memory_limit, adjacency, node_threshold, edge_threshold, dtype,
                       device, threads, chat, no_aggregate) -> None:
    """Trace every prompt of PROMPTS.jsonl (one JSON object a line: prompt, and optionally id, target, logit_diff,
    position, chat, group) into OUT/graphs/, loading the model once. Run again to resume. Under
    ``torchrun --nproc-per-node N`` the prompts are shared across the processes."""
    from pydantic import ValidationError

    from circuits.engine.plan import parse_bytes
    from circuits.many.aggregate import aggregate
    from circuits.many.prompts import read_prompts
    from circuits.many.runner import trace_share, write_index
    from circuits.settings import TraceSettings
    from circuits.tracing import trace
    from dictionaries.labels import FeatureLabels
    from dictionaries.training.distributed import DistributedContext
    from viz.many_report import write_report

    specs = read_prompts(prompts_path)  # the whole file, before any work
    try:
        base = TraceSettings(max_logits=max_logits, logit_prob=logit_prob, max_features=max_features,
                             batch_size=batch_size, node_threshold=node_threshold, edge_threshold=edge_threshold,
                             dtype=dtype, chat=chat, adjacency=adjacency,
                             memory_limit=None if memory_limit is None else parse_bytes(memory_limit))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CircuitscopeError(f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    out = Path(out_dir)
    context = DistributedContext.from_environment("data")
    if device is None and context.world_size > 1:
        import torch

        if torch.cuda.is_available():  # one device per rank
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        loaded = load_model_and_dictionaries(model, dictionaries_path, dtype, device, selectors)
        labels = None if no_labels else FeatureLabels.load(loaded.local)

        def trace_one(prompt, settings):
            return trace(loaded.lm, loaded.dicts, prompt, settings, dictionaries_source=loaded.source, labels=labels)

        trace_share(specs, out, base, trace_one, context.rank, context.world_size)
        context.barrier()
        if context.is_main:
            index = write_index(specs, out, base, context.world_size)
            failed = [row for row in index["prompts"] if row["status"] != "done"]
            click.echo(f"traced     {len(specs) - len(failed)} of {len(specs)} prompts -> {out / 'index.json'}")
            for row in failed:
                click.echo(f"failed     {row['id']}: {row['error']}", err=True)
            if not no_aggregate:
                summary = aggregate(out)
                write_report(out, index, summary)
                click.echo(f"aggregate  {summary['n_done']} graphs -> {out / 'features.csv'}, {out / 'report.html'}")
        context.barrier()
    finally:
        context.close()


@main.command("aggregate")
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False, exists=True))
@click.option("--compare", nargs=2, default=None, metavar="GROUP_A GROUP_B",
              help="Rank features by the difference of mean influence between two groups.")
@click.option("--permutations", default=1000, show_default=True, help="Permutations of the permutation test.")
@click.option("--seed", default=0, show_default=True, help="Seed of the permutations.")
@click.option("--top", default=20, show_default=True, help="Features shown per group / in the comparison.")
@click.option("--pages", is_flag=True, help="Also render each graph's HTML page (linked from report.html).")
def aggregate_command(out_dir, compare, permutations, seed, top, pages) -> None:
    """Aggregate the graphs of DIR (written by trace-many): features.csv, edges.csv, prompts.csv, summary.json,
    report.html; with --compare A B also compare-A-B.csv."""
    from circuits.many.aggregate import aggregate, csv_text, load_reduced
    from circuits.many.compare import compare_groups
    from dictionaries.atomic_output import write_text_atomic
    from viz.many_report import write_report

    out = Path(out_dir)
    index, reduced = load_reduced(out)  # every graph read once, for the tables and the comparison
    summary = aggregate(out, top=top, loaded=(index, reduced))
    write_report(out, index, summary, pages)
    click.echo(f"aggregate  {summary['n_done']} of {summary['n_prompts']} graphs -> {out / 'features.csv'}, "
               f"{out / 'report.html'}")
    if compare is None:
        return
    group_a, group_b = compare
    rows = [vars(r) for r in compare_groups(reduced, group_a, group_b, permutations, seed)]
    columns = ["feature_key", "mean_a", "mean_b", "difference", "effect_size", "p_value", "label"]
    path = out / f"compare-{group_a}-{group_b}.csv"
    write_text_atomic(path, csv_text(rows, columns))
    click.echo(f"compare    {group_a} vs {group_b}: mean influence A, B, difference, Cohen's d, p "
               f"({permutations} permutations) -> {path}")
    for r in rows[:top]:
        click.echo(f"  {r['feature_key']:>10} {r['mean_a']:9.4f} {r['mean_b']:9.4f} {r['difference']:+9.4f} "
                   f"d={r['effect_size']:+6.2f} p={r['p_value']:.4f} {r['label']}")
