"""The ``circuitscope`` command: one module per group of commands, registered on :data:`main` here.

Every error a user can cause ends in one line on stderr (``error: ...`` naming the fix) and exit code 2;
a traceback means a bug in circuitscope.
"""

from . import dictionaries_commands, query_commands, trace_commands  # noqa: F401  (they register their commands)
from .app import main

__all__ = ["main"]
from . import intervene_command  # noqa: E402,F401
