"""Errors a user can cause, each with one clear message that names the fix.

The CLI turns every :class:`CircuitscopeError` into its message on stderr and exit code 2; library users
catch it like any exception. Anything else that escapes is a bug in circuitscope, not a user error.
"""

from __future__ import annotations

from pathlib import Path


class CircuitscopeError(Exception):
    """A problem with the user's input: bad file, unknown model, mismatched shapes, unreachable hub."""


class DictionaryFileError(CircuitscopeError):
    """A dictionary file is missing, truncated, corrupt, has a wrong shape or non-finite values."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{path}: {problem}. {fix}")


class DictionaryMismatchError(CircuitscopeError):
    """A dictionary set does not fit the model it is used with (d_model or layer count)."""


class ModelLoadError(CircuitscopeError):
    """A model name, directory or hub id that cannot be loaded."""
