"""Feature labels into a graph: each feature node's ``label`` (its short label ``context words | → logit lens``,
see :func:`dictionaries.labels.short_label`) and, per feature key, a
:class:`~circuits.graph.attribution_graph.FeatureInfo` in ``metadata.feature_info`` (top contexts, frequency,
promoted and suppressed tokens) for the features of the pruned graph, so that exports and the HTML page can
show them without the dictionaries.
"""

from __future__ import annotations

from dictionaries.errors import CircuitscopeError
from dictionaries.labels import FeatureLabels, FeatureSummary

from .attribution_graph import AttributionGraph, FeatureContext, FeatureInfo


def _short(x: float) -> float:
    return float(f"{x:.4g}")


def feature_info(summary: FeatureSummary, max_contexts: int | None = None) -> FeatureInfo:
    """The graph's record of one feature (activations rounded to 4 significant digits)."""
    contexts = summary.contexts[:max_contexts] if max_contexts is not None else summary.contexts
    return FeatureInfo(
        label=summary.label, frequency=summary.frequency, mean_activation=_short(summary.mean_activation),
        contexts=[FeatureContext(tokens=c.tokens, activations=[_short(a) for a in c.activations], peak=c.peak)
                  for c in contexts],
        promoted=[t.token for t in summary.promoted], suppressed=[t.token for t in summary.suppressed],
    )


def label_graph(graph: AttributionGraph, labels: FeatureLabels, max_contexts: int | None = None) -> AttributionGraph:
    """Label ``graph``'s feature nodes (pruned ones too, when kept) in place and record the
    :class:`FeatureInfo` of the pruned graph's features; returns ``graph``.

    Raises CircuitscopeError when the labels describe dictionaries of another shape."""
    meta = graph.metadata.dictionaries
    if labels.n_layers != meta.n_layers or labels.widths != meta.widths:
        raise CircuitscopeError(
            f"the feature labels in {labels.directory} describe {labels.n_layers} layers of widths "
            f"{sorted(set(labels.widths))}, the graph's dictionaries {meta.n_layers} layers of widths "
            f"{sorted(set(meta.widths))}; use the labels of the dictionaries the graph was traced with"
        )
    summaries: dict[str, FeatureSummary] = {}

    def summary(key: str) -> FeatureSummary:
        if key not in summaries:
            layer, index = map(int, key.split(":"))
            summaries[key] = labels.summary(layer, index)
        return summaries[key]

    info = dict(graph.metadata.feature_info)
    for _, data in graph.nodes.items():
        if data["kind"] == "feature" and data.get("feature_key"):
            found = summary(data["feature_key"])
            data["label"] = found.label
            info[data["feature_key"]] = feature_info(found, max_contexts)
    if graph.unpruned is not None:
        for node in graph.unpruned.nodes:
            if node.kind == "feature" and node.feature_key:
                node.label = summary(node.feature_key).label
    graph.metadata.feature_info = info
    return graph
