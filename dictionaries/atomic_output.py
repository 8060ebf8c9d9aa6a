"""Outputs that are never half-written: a directory or text file appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed into place."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` one after another to ``path`` through a temporary file renamed into place (a large file
    made piece by piece, never whole in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        readable_by_others(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path) -> bool:
    """Check, before any long work, that a file can be written at ``path``: its folder is created if missing
    (returns True when it was) and must accept a new file, and ``path`` must not be a directory. Raises
    CircuitscopeError with one clear sentence otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CircuitscopeError(f"{path} is a directory; name a file to write")
    folder = path.parent
    created = False
    if not folder.is_dir():
        if folder.exists():
            raise CircuitscopeError(f"cannot write {path}: {folder} is not a directory")
        try:
            folder.mkdir(parents=True)
            created = True
        except OSError as exc:
            raise CircuitscopeError(f"cannot create the folder {folder} for {path.name}: {exc.strerror}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise CircuitscopeError(f"cannot write {path}: {folder} is not writable ({exc.strerror})") from None
    return created
