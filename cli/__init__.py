"""The ``circuitscope`` command: one module per group of commands, registered on :data:`main` here.

Every error a user can cause ends in one line on stderr (``error: ...`` naming the fix) and exit code 2;
a traceback means a bug in circuitscope.
"""

from . import (  # noqa: F401  (importing a module registers its commands)
    dictionaries_commands,
    features_commands,
    intervene_command,
    many_commands,
    query_commands,
    trace_commands,
)
from .app import main

__all__ = ["main"]
