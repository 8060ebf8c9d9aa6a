"""Outputs that are never half-written: a directory or text file appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CircuitscopeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_others(path: str | Path, directory: bool = False) -> None:
    """Give a temporary file (0600) or directory (0700) the permissions a plain open() would, so that
    outputs meant for sharing are not private to their writer."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``destination``; on success it replaces ``destination``.

    On any error the temporary directory is removed and ``destination`` is left as it was. An existing
    non-empty ``destination`` is an error unless ``overwrite`` is set.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise CircuitscopeError(f"{destination} exists and is not a directory; choose another output path")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise CircuitscopeError(
            f"{destination} already exists and is not empty; remove it or pass overwrite=True (CLI: --force)"
        )
    parent = destination.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=parent))
        readable_by_others(tmp, directory=True)
    except OSError as exc:
        raise CircuitscopeError(f"cannot write to {parent}: {exc.strerror}; choose a writable output path") from None
    try:
        yield tmp
        if destination.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=parent))
            os.replace(destination, old / "d")
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        readable_by_others(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
