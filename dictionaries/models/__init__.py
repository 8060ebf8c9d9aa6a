"""The model-family seam: the registry of families (sizes, hub ids, architecture descriptions, hook sites),
loading, the default model, tokenization and the MLP hooks.

Everything that knows how a family's modules are named or how its norms apply their gain reads
:class:`~dictionaries.models.registry.Architecture`; see docs/design.md ("A new model family").
"""
