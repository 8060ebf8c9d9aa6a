"""``OUT/report.html``: a self-contained page (no network, inline SVG) with the top features of each group as bar
charts, the prompt table, and a link to each graph's page (``graphs/ID.html``, rendered by ``aggregate --pages``;
without it the table shows the ``circuitscope render`` command that makes the page)."""

from __future__ import annotations

import html
from pathlib import Path

from circuits.graph.attribution_graph import AttributionGraph
from circuits.many.aggregate import prompt_rows
from dictionaries.atomic_output import write_text_atomic

from .html import save_html

BAR_WIDTH = 360


def _bars(rows: list[dict]) -> str:
    """An inline SVG bar chart of ``mean_influence`` x ``n_graphs`` (the feature's share over the group)."""
    if not rows:
        return "<p>no features</p>"
    values = [r["mean_influence"] * r["n_graphs"] for r in rows]
    top = max(max(abs(v) for v in values), 1e-12)
    height = 18
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{BAR_WIDTH + 420}" height="{height * len(rows) + 4}">']
    for i, (row, value) in enumerate(zip(rows, values, strict=True)):
        y = i * height + 2
        width = max(1.0, BAR_WIDTH * abs(value) / top)
        name = f"{row['feature_key']} {row['label']}".strip()
        parts.append(f'<rect x="0" y="{y}" width="{width:.1f}" height="{height - 4}" fill="#4a7bd0">'
                     f'<title>{html.escape(name)}: in {row["n_graphs"]} graph(s), mean influence '
                     f'{row["mean_influence"]:.4f}</title></rect>')
        parts.append(f'<text x="{BAR_WIDTH + 6}" y="{y + height - 6}" font-size="12">'
                     f'{html.escape(name[:60])} ({row["n_graphs"]})</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(summary: dict, prompts: list[dict], out: Path) -> str:
    sections = []
    for group, rows in sorted(summary["top_features"].items()):
        sections.append(f"<h2>{html.escape(group)} ({summary['groups'].get(group, 0)} graphs)</h2>{_bars(rows)}")
    table = ["<table><tr><th>id</th><th>group</th><th>status</th><th>prompt</th><th>top logits</th>"
             "<th>replacement</th><th>completeness</th><th>graph</th></tr>"]
    for row in prompts:
        page = Path(row["graph"]).with_suffix(".html")
        if (out / page).is_file():
            link = f'<a href="{html.escape(str(page))}">page</a>'
        else:
            link = f"<code>circuitscope render {html.escape(row['graph'])} -o {html.escape(str(page))}</code>"
        cells = [row["id"], row["group"], row["status"] + (f": {row['error']}" if row["error"] else ""),
                 row["prompt"], row["top_logits"]]
        scores = [f"{v:.3f}" if isinstance(v, float) else "" for v in (row["replacement"], row["completeness"])]
        table.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells + scores)
                     + f"<td>{link}</td></tr>")
    table.append("</table>")
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>circuitscope: {summary['n_done']} graphs"
            f"</title><style>{style}</style></head><body><h1>{summary['n_done']} of {summary['n_prompts']} prompts "
            f"traced</h1><p>Bars: a feature's mean influence times the number of graphs it is in.</p>"
            + "".join(sections) + "<h2>Prompts</h2>" + "".join(table) + "</body></html>\n")


def save_report(summary: dict, prompts: list[dict], out: Path) -> Path:
    path = out / "report.html"
    write_text_atomic(path, render_report(summary, prompts, out))
    return path


def write_report(out: Path, index: dict, summary: dict, pages: bool = False) -> None:
    """``out/report.html`` from the aggregate ``summary`` and the run's ``index``; with ``pages`` also each done
    graph's own interactive page (``graphs/ID.html``), which the report links."""
    if pages:
        for row in index["prompts"]:
            if row["status"] == "done":
                save_html(AttributionGraph.load(out / row["graph"]), (out / row["graph"]).with_suffix(".html"))
    save_report(summary, prompt_rows(index), out)
