"""Checking graphs on the real model: the frozen replacement model, feature interventions, steered generation
and graph validation.

May import :mod:`circuits.engine` and :mod:`circuits.graph` (see :mod:`circuits` and docs/design.md).
"""
