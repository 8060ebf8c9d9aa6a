"""Attribution graphs: the tracing engine, the graph and its queries, and interventions on the real model.

Five sub-packages and two modules, with one import rule (checked by ``tests/test_architecture.py``):

- :mod:`circuits.engine` computes: clean run, replacement model, node layout, linear backward pass, edge rows,
  logit targets, influence, attribution, pruning. It imports ``dictionaries`` and :mod:`circuits.settings` only.
- :mod:`circuits.graph` holds and reads the result: the ``networkx`` attribution graph, its file format, labels,
  lookups, paths, queries, subgraphs, supernodes, comparison and exports. It imports ``dictionaries`` and
  :mod:`circuits.settings` only.
- :mod:`circuits.interventions` checks graphs on the real model: frozen model, feature interventions, steering,
  validation. It may import ``engine`` and ``graph``.
- :mod:`circuits.attention` reads attention out of a graph's trace: each head's share of an edge and QK
  attribution. It may import ``engine``, ``graph`` and ``interventions``.
- :mod:`circuits.many` puts the graphs of many prompts together (a trace-many run's prompts, index, aggregates and
  group comparison). It may import ``graph``; the tracing itself is handed in by the caller.
- :mod:`circuits.tracing` is the bridge from the engine's tensors to a graph; :mod:`circuits.settings` is the
  typed settings of a trace, a leaf every part may import.

``engine`` and ``graph`` never import each other, nothing here imports ``viz`` or ``cli``. See docs/design.md.
"""
