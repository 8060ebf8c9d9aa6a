"""The ``circuitscope`` command: one module per group of commands, each registering its commands on :data:`main`
when the command is first looked up (see :data:`cli.app.COMMAND_MODULES`).

Every error a user can cause ends in one line on stderr (``error: ...`` naming the fix) and exit code 2;
a traceback means a bug in circuitscope.
"""

from .app import main  # its commands' modules are imported when a command runs (cli.app.COMMAND_MODULES)

__all__ = ["main"]
