"""The tracing engine: from a prompt, a model and dictionaries to the attribution adjacency, and its pruning.

Imports ``dictionaries`` and :mod:`circuits.settings` only; never :mod:`circuits.graph` or
:mod:`circuits.interventions` (see :mod:`circuits` and docs/design.md).
"""

from .heap import bound_onednn_caches

bound_onednn_caches()  # before any bfloat16 matmul of the process: oneDNN reads its cache sizes once
