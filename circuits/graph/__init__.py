"""The attribution graph (a ``networkx.DiGraph`` with typed nodes and metadata), its files, queries and exports.

Imports ``dictionaries`` and :mod:`circuits.settings` only; never :mod:`circuits.engine` or
:mod:`circuits.interventions` (see :mod:`circuits` and docs/design.md).
"""

from .attribution_graph import AttributionGraph, GraphMetadata, NodeData

__all__ = ["AttributionGraph", "GraphMetadata", "NodeData"]
