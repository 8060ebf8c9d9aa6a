"""What a dictionary format is (:class:`DictionaryFormat`), and the table of the registered ones.

Each format module describes itself once and registers that description at import time
(``NATIVE = register(DictionaryFormat(...))`` at the bottom of :mod:`dictionaries.formats.native`);
:mod:`dictionaries.formats.registry` and the CLI only loop over :func:`registered_formats`.
Adding a format is one new module plus one import line in ``dictionaries/formats/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError


class Loader(Protocol):
    """``load(path, *, verify_values, **selectors)``: the set in ``path``, in the native layout (memory-mapped
    where the files allow). Raises DictionaryFileError for anything wrong with the files."""

    def __call__(self, path: Path, *, verify_values: bool = True, **selectors: Any) -> DictionarySet: ...


class Saver(Protocol):
    """``save(dictionaries, directory, *, overwrite)``: write the set in this format (atomically); returns
    the directory. Raises CircuitscopeError when the format cannot hold the set."""

    def __call__(self, dictionaries: DictionarySet, directory: Path, *, overwrite: bool = False) -> Path: ...


@dataclass(frozen=True)
class Selector:
    """One choice among several variants a directory of some format may hold (Gemma Scope 2's width).

    ``name`` is the keyword of :func:`~dictionaries.formats.registry.load_dictionaries` and the CLI option
    ``--{name} VALUE``, or ``--{name}/--no-{name}`` when ``is_flag``; ``help`` is that option's help text.
    """

    name: str
    help: str
    is_flag: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"selector name {self.name!r} is not a Python identifier")

    def cli_args(self, value: object) -> str:
        """The command-line words that choose ``value``: ``--width 16k``, ``--affine``, ``--no-affine``."""
        if self.is_flag:
            return f"--{self.name}" if value else f"--no-{self.name}"
        return f"--{self.name} {value}"


@dataclass(frozen=True)
class DictionaryFormat:
    """An on-disk layout of dictionaries that circuitscope reads into, and writes from, the native layout.

    - ``name``: canonical name, lowercase words joined by hyphens (``gemma-scope-2``); users may write it
      with underscores or capitals (:func:`normalize_format`).
    - ``layout``: one line naming its files, shown when a directory is in no known format
      (``config.json + layer_{L}.safetensors``).
    - ``detect(path)``: whether the existing directory ``path`` is in this format (no tensor is read).
    - ``load`` and ``save``: see :class:`Loader` and :class:`Saver`.
    - ``selectors``: the keywords ``load`` accepts to choose among variants in one directory, and
      ``variants``: what they choose among, for messages (``Gemma Scope 2 folders``).
    - ``priority``: the order of detection and of every list of formats, higher first, ties in
      registration order. A format whose ``detect`` would also accept another format's directories
      (circuit-tracer's ``layer_{L}.safetensors`` also appear in native directories) gets a lower one.
    """

    name: str
    layout: str
    detect: Callable[[Path], bool]
    load: Loader
    save: Saver
    selectors: tuple[Selector, ...] = ()
    variants: str = ""
    priority: int = 0

    def __post_init__(self) -> None:
        if not self.name or _canonical(self.name) != self.name:
            raise ValueError(f"format name {self.name!r} must be lowercase words joined by hyphens")
        if self.selectors and not self.variants:
            raise ValueError(f"format {self.name!r} has selectors, so it must say what they select (variants=)")

    @property
    def selector_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.selectors)


_REGISTERED: dict[str, DictionaryFormat] = {}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(fmt: DictionaryFormat) -> DictionaryFormat:
    """Add ``fmt`` to the table (ValueError when its name is taken or a selector of the same name means
    something else elsewhere); returns it, so a module can write ``NATIVE = register(...)``."""
    if fmt.name in _REGISTERED:
        raise ValueError(f"a dictionary format named {fmt.name!r} is already registered")
    known = {s.name: s for s in registered_selectors()}
    for selector in fmt.selectors:
        if selector.name in known and known[selector.name].is_flag != selector.is_flag:
            raise ValueError(f"selector {selector.name!r} of {fmt.name!r} is a flag in one format and not in another")
    _REGISTERED[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove the format named ``name`` (a no-op when there is none)."""
    _REGISTERED.pop(_canonical(name), None)


@contextmanager
def registered(fmt: DictionaryFormat) -> Iterator[DictionaryFormat]:
    """Register ``fmt`` for the ``with`` block only (tests, experiments)."""
    register(fmt)
    try:
        yield fmt
    finally:
        unregister(fmt.name)


def registered_formats() -> tuple[DictionaryFormat, ...]:
    """Every registered format, highest priority first (ties in registration order)."""
    return tuple(sorted(_REGISTERED.values(), key=lambda fmt: -fmt.priority))


def format_names() -> tuple[str, ...]:
    """The registered names in that order: ``("native", "gemma-scope-2", "circuit-tracer")``."""
    return tuple(fmt.name for fmt in registered_formats())


def registered_selectors() -> tuple[Selector, ...]:
    """The selectors of every registered format, each name once (first registration wins)."""
    unique: dict[str, Selector] = {}
    for fmt in registered_formats():
        for selector in fmt.selectors:
            unique.setdefault(selector.name, selector)
    return tuple(unique.values())


def get_format(name: str) -> DictionaryFormat:
    """The format called ``name`` (``"gemma_scope_2"`` and ``"Gemma-Scope-2"`` find ``gemma-scope-2``);
    CircuitscopeError listing the registered names when there is none."""
    fmt = _REGISTERED.get(_canonical(name))
    if fmt is None:
        raise CircuitscopeError(f"unknown dictionary format {name!r}; choose one of {', '.join(format_names())}")
    return fmt


def normalize_format(name: str) -> str:
    """The canonical name of a registered format: ``"gemma_scope_2"`` -> ``"gemma-scope-2"``."""
    return get_format(name).name
