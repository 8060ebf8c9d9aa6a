"""Graph files: write, load and ``query node`` on synthetic graphs of 100k, 784k, 1M and 5M edges (issue 14).
Prints its figures.

Setting: graphs shaped like a trace's: 18 layers, 33 positions, one node per 30 edges (a 784k-edge graph has
26k nodes), every feature labelled with three 12-token top contexts in ``feature_info``, float32 weights. For each
size and layout (compact ``.safetensors``, the plain-JSON export), in a fresh process so that its memory is its own:
``load`` (read the file into an AttributionGraph), ``query`` (``node_report`` of the busiest node with its 15
strongest inputs and outputs, and its text table), ``networkx`` (building the networkx graph, which the node query
does not need and which paths, subgraphs and drawings do), peak RSS and RssAnon. Then the whole command a user runs,
``circuitscope query GRAPH node ID``, under ``/usr/bin/time``.

    python benchmarks/graph_io.py                      # 100k, 784k, 1M, 5M; JSON up to 1M
    python benchmarks/graph_io.py --edges 784000 --json-up-to 784000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_LAYERS, POSITIONS, EDGES_PER_NODE, TOP = 18, 33, 30, 15


def synthetic_graph(n_edges: int, seed: int = 0):
    """A trace-shaped AttributionGraph with ``n_edges`` distinct edges (built from columns, no networkx)."""
    import numpy as np

    from circuits.graph.attribution_graph import AttributionGraph
    from circuits.graph.graph_table import EdgeColumns, GraphTable
    from circuits.graph.schema import (
        DictionaryInfo,
        FeatureContext,
        FeatureInfo,
        GraphMetadata,
        NodeData,
        Scores,
    )
    from circuits.settings import TraceSettings

    rng = np.random.default_rng(seed)
    n_nodes = max(n_edges // EDGES_PER_NODE, 200)
    words = [f"w{i}" for i in range(5000)]
    nodes: dict[str, dict] = {}
    info: dict[str, FeatureInfo] = {}
    for p in range(POSITIONS):
        nodes[f"token@{p}"] = NodeData(id="x", kind="token", layer=-1, position=p, token=words[p], token_id=p,
                                       influence=float(rng.random())).model_dump(exclude={"id"})
    n_features = n_nodes - POSITIONS - 10
    for i in range(n_features):
        layer, position, index = i % N_LAYERS, int(rng.integers(POSITIONS)), int(rng.integers(16384))
        key = f"{layer}:{index}"
        node_id = f"feature:{key}@{position}"
        if node_id in nodes:
            continue
        label = f"{words[index % 5000]}·{words[(index * 7) % 5000]} | → {words[(index * 3) % 5000]}"
        nodes[node_id] = NodeData(id="x", kind="feature", layer=layer, position=position, feature=index,
                                  feature_key=key, activation=float(rng.random() * 10), label=label,
                                  influence=float(rng.random() * 1e-2)).model_dump(exclude={"id"})
        info.setdefault(key, FeatureInfo(label=label, frequency=1e-3, mean_activation=3.0, contexts=[
            FeatureContext(tokens=[words[(index + j) % 5000] for j in range(12)], activations=[0.5] * 12, peak=6)
            for _ in range(3)], promoted=words[:5], suppressed=words[5:10]))
    for t in range(10):
        nodes[f"logit:{t}@{POSITIONS - 1}"] = NodeData(
            id="x", kind="logit", layer=N_LAYERS, position=POSITIONS - 1, token=words[t], token_id=t,
            probability=0.1, value=1.0).model_dump(exclude={"id"})
    n = len(nodes)
    pairs = np.unique(rng.integers(0, n, size=(int(n_edges * 1.05), 2)), axis=0)  # distinct, sorted
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs = pairs[rng.permutation(len(pairs))[:n_edges]]
    edges = EdgeColumns(pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32),
                        rng.standard_normal(len(pairs)).astype(np.float32))
    metadata = GraphMetadata(
        prompt=" ".join(words[:POSITIONS]), tokens=words[:POSITIONS], token_ids=list(range(POSITIONS)),
        target_position=POSITIONS - 1, model="synthetic", n_layers=N_LAYERS,
        dictionaries=DictionaryInfo(kind="transcoder", n_layers=N_LAYERS, d_model=640, widths=[16384] * N_LAYERS,
                                    activation="jumprelu"),
        settings=TraceSettings(), scores=Scores(replacement=0.9, completeness=0.8, replacement_unpruned=0.9,
                                                completeness_unpruned=0.8),
        n_active_features=n_features, n_expanded_features=n_features, feature_info=info)
    return AttributionGraph(GraphTable(nodes, edges), metadata)


def _status_mb(field: str) -> float:
    """A /proc/self/status figure in MB: RssAnon, or VmHWM (peak RSS of this program; ru_maxrss would carry the
    parent's peak over fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str, node: str) -> dict:
    """In this process: load, query one node, then build networkx."""
    start = time.perf_counter()
    from circuits.graph.attribution_graph import AttributionGraph
    from circuits.graph.queries import node_report
    from viz.tables import node_text

    imported = time.perf_counter()
    graph = AttributionGraph.load(path)
    loaded = time.perf_counter()
    text = node_text(graph, node_report(graph, node, TOP))
    queried = time.perf_counter()
    anon, peak = _status_mb("RssAnon"), _status_mb("VmHWM")
    n_edges = graph.graph.number_of_edges()
    built = time.perf_counter()
    return {"import_s": imported - start, "load_s": loaded - imported, "query_s": queried - loaded,
            "load_and_query_s": queried - imported, "peak_rss_mb": peak, "rss_anon_mb": anon,
            "networkx_s": built - queried, "networkx_peak_rss_mb": _status_mb("VmHWM"), "edges": n_edges,
            "lines": len(text.splitlines())}


def _child(path: Path, node: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), node], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cli(path: Path, node: str) -> str:
    exe = Path(sys.executable).with_name("circuitscope")
    out = subprocess.run(["/usr/bin/time", "-f", "%e s %M KB", str(exe), "query", str(path), "node", node],
                         capture_output=True, text=True, check=True)
    return out.stderr.strip().splitlines()[-1]


def run(sizes: list[int], json_up_to: int, cli_at: set[int]) -> None:
    import numpy as np

    print(f"{'edges':>9} {'layout':>7} {'MB':>7} {'write s':>7} {'load s':>7} {'query s':>7} {'load+q':>7} "
          f"{'peak MB':>8} {'anon MB':>8} {'nx s':>6} {'nx MB':>7}  cli (time, max RSS)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n_edges in sizes:
            graph = synthetic_graph(n_edges)
            table = graph.table
            degree = (np.bincount(table.edges.sources, minlength=len(table.nodes))
                      + np.bincount(table.edges.targets, minlength=len(table.nodes)))
            node = list(table.nodes)[int(degree.argmax())]  # the busiest node
            for suffix in (".safetensors", ".json"):
                if suffix == ".json" and n_edges > json_up_to:
                    continue
                path = Path(tmp) / f"g{n_edges}{suffix}"
                start = time.perf_counter()
                graph.save(path)
                write_s = time.perf_counter() - start
                m = _child(path, node)
                cli = _cli(path, node) if n_edges in cli_at else ""
                print(f"{m['edges']:>9} {suffix[1:5]:>7} {path.stat().st_size / 2**20:>7.1f} {write_s:>7.2f} "
                      f"{m['load_s']:>7.2f} {m['query_s']:>7.3f} {m['load_and_query_s']:>7.2f} "
                      f"{m['peak_rss_mb']:>8.0f} {m['rss_anon_mb']:>8.0f} {m['networkx_s']:>6.1f} "
                      f"{m['networkx_peak_rss_mb']:>7.0f}  {cli}", flush=True)
                path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", type=int, nargs="*", default=[100_000, 784_000, 1_000_000, 5_000_000])
    parser.add_argument("--json-up-to", type=int, default=1_000_000, help="Write and read JSON up to this size.")
    parser.add_argument("--cli-at", type=int, nargs="*", default=[784_000], help="Time the CLI at these sizes.")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "NODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
    else:
        run(args.edges, args.json_up_to, set(args.cli_at))


if __name__ == "__main__":
    main()
