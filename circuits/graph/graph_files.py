"""Graph files on disk: the compact layout (the package's own, schema 5) and the plain-JSON export.

**Compact** (any name not ending in ``.json``; ``trace`` writes ``graph.safetensors``): one safetensors file, so
any safetensors reader opens it. It holds the tensors

- ``graph``: uint8 (B,), the UTF-8 JSON of a :class:`~circuits.graph.schema.GraphFile` whose ``edges`` list,
  unpruned section's columns and ``metadata.feature_info`` are empty: nodes, metadata, the unpruned nodes and
  endpoints, ``content_hash``;
- ``feature_info``: uint8, the JSON of ``metadata.feature_info`` (the features' top contexts: most of a labelled
  graph's bytes), parsed only when something asks for it (a drawing, not a query about a node);
- ``edges.sources``, ``edges.targets``: int32 (E,), indices into that JSON's ``nodes``;
  ``edges.weights``: (E,) float32, or float64 when a weight is not a float32 exactly (a merged graph's sums);
- with an unpruned section, ``unpruned.sources``/``unpruned.targets`` (int32, indices into its ``endpoints``)
  and ``unpruned.weights``;

and, in the safetensors header's string metadata, one key, ``circuitscope.graph`` (which says what the file is),
whose value is the JSON ``{"schema_version": 5, "run": ...}``, the run being the run's
:class:`~circuits.graph.schema.RunSection` (timings, the plan's estimate). One key, because safetensors writes the
metadata of several in no fixed order. The run lives only there, so two traces of the same prompt give files whose
tensor bytes are identical and whose headers differ only in that key's run.
A labelled 784k-edge graph is 33 MB here against 91 MB of JSON (benchmarks/graph_io.py), and reads without
building any Python object per edge.

**JSON** (a name ending in ``.json``): the whole :class:`~circuits.graph.schema.GraphFile`, edges as a list of
``{source, target, weight}``; schemas 1-4 wrote only this layout, and every one of them still loads.

``content_hash`` (schema 5) is the sha256 of the content's canonical bytes: the JSON of metadata, nodes and the
unpruned nodes and endpoints (without format, schema version, hash and run), then each edge column as
little-endian int32/float64 (:meth:`~circuits.graph.graph_table.EdgeColumns.canonical_bytes`). Both layouts of
one graph record the same hash. Files of schema 4 keep the hash they recorded (a sha256 of their JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from dictionaries.atomic_output import write_bytes_atomic, write_text_atomic
from dictionaries.errors import CircuitscopeError

from .graph_table import EdgeColumns
from .schema import GRAPH_FORMAT, GRAPH_SCHEMA_VERSION, EdgeData, FeatureInfo, GraphFile, RunSection

JSON_SUFFIX = ".json"
COMPACT_NAME = "graph.safetensors"  # what `trace` writes by default
GRAPH_SUFFIXES = (JSON_SUFFIX, ".safetensors")  # the names a graph file is written under by choice
_COLUMNS = ("sources", "targets", "weights")
_FEATURE_INFO = TypeAdapter(dict[str, FeatureInfo])
_NOT_CONTENT = {"format": True, "schema_version": True, "content_hash": True, "run": True, "edges": True,
                "unpruned": set(_COLUMNS)}


@dataclass(frozen=True)
class StoredGraph:
    """What a graph file holds: ``content`` (a :class:`GraphFile` with ``edges`` empty and the unpruned section's
    columns filled), the edges as columns over ``content.nodes``, and the run section (None when not recorded).
    When ``feature_info`` is set, ``content.metadata.feature_info`` is empty and calling it reads the real one."""

    content: GraphFile
    edges: EdgeColumns
    run: RunSection | None
    feature_info: Callable[[], dict[str, FeatureInfo]] | None = None


def is_json_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == JSON_SUFFIX


def unpruned_columns(content: GraphFile) -> EdgeColumns | None:
    section = content.unpruned
    return None if section is None else EdgeColumns.of(section.sources, section.targets, section.weights)


def content_hash(content: GraphFile, edges: EdgeColumns) -> str:
    """sha256 of the graph's content: everything but format, schema version, hash and run (see the module)."""
    digest = hashlib.sha256(content.model_dump_json(exclude=_NOT_CONTENT).encode())
    for columns in (edges, unpruned_columns(content)):
        for chunk in columns.canonical_bytes() if columns is not None else ():
            digest.update(chunk)
    return digest.hexdigest()


def _finished(stored: StoredGraph) -> GraphFile:
    """The content as this schema writes it: format, version and content hash set; no edges, no run."""
    return stored.content.model_copy(update={"format": GRAPH_FORMAT, "schema_version": GRAPH_SCHEMA_VERSION,
                                             "content_hash": content_hash(stored.content, stored.edges),
                                             "edges": [], "run": None})


def json_file(stored: StoredGraph) -> GraphFile:
    """The whole file of the JSON layout: content, edges as a list, and the run."""
    content = _finished(stored)
    ids = [node.id for node in content.nodes]
    edges = [EdgeData.model_construct(source=ids[s], target=ids[t], weight=w) for s, t, w in zip(
        stored.edges.sources.tolist(), stored.edges.targets.tolist(), stored.edges.weights.tolist(), strict=True)]
    return content.model_copy(update={"edges": edges, "run": stored.run})


def stored_from_file(data: GraphFile) -> StoredGraph:
    """A JSON layout's :class:`GraphFile` as content, edge columns and run."""
    index = {node.id: i for i, node in enumerate(data.nodes)}
    edges = EdgeColumns.of((index[e.source] for e in data.edges), (index[e.target] for e in data.edges),
                           [e.weight for e in data.edges])
    return StoredGraph(data.model_copy(update={"edges": [], "run": None}), edges, data.run)


def write_graph(path: str | Path, stored: StoredGraph) -> Path:
    """Write ``stored`` atomically, compact unless ``path`` ends in ``.json``; records its content hash."""
    if is_json_path(path):
        write_text_atomic(path, json_file(stored).model_dump_json())
        return Path(path)
    content = _finished(stored)
    info = _FEATURE_INFO.dump_json(content.metadata.feature_info)
    content = content.model_copy(update={"metadata": content.metadata.model_copy(update={"feature_info": {}})})
    tensors = {"graph": np.frombuffer(_without_columns(content).model_dump_json().encode(), dtype=np.uint8),
               "feature_info": np.frombuffer(info, dtype=np.uint8)}
    columns = {"edges": stored.edges, "unpruned": unpruned_columns(content)}
    for prefix, column_set in columns.items():
        if column_set is not None:
            tensors |= {f"{prefix}.{name}": getattr(column_set, name) for name in _COLUMNS}
    about = {"schema_version": GRAPH_SCHEMA_VERSION, "run": (stored.run or RunSection()).model_dump(mode="json")}
    metadata = {GRAPH_FORMAT: json.dumps(about, sort_keys=True)}
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))
    return Path(path)


def _without_columns(content: GraphFile) -> GraphFile:
    if content.unpruned is None:
        return content
    return content.model_copy(update={"unpruned": content.unpruned.model_copy(
        update={name: [] for name in _COLUMNS})})


def read_graph(path: str | Path) -> StoredGraph:
    """Read a graph file of either layout (told apart by its first bytes, not its name: a safetensors file opens
    with 8 bytes of header length and then its JSON header); a missing, damaged or newer file gets one clear
    message."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            start = fh.read(9)
    except FileNotFoundError:
        raise CircuitscopeError(f"{path}: no such graph file") from None
    except OSError as exc:  # a directory, no permission, ...
        raise CircuitscopeError(f"{path}: cannot read it ({exc.strerror}); name a graph file") from None
    compact = len(start) == 9 and start[8:9] == b"{" and start[:1] not in (b"{", b"[")
    return _read_compact(path) if compact else _read_json(path)


def _damaged(path: Path, why: str) -> CircuitscopeError:
    return CircuitscopeError(f"{path}: damaged graph file ({why}); trace the prompt again")


def _check_version(path: Path, version: Any) -> None:
    if type(version) is not int:
        raise _damaged(path, f"schema_version {version!r} is not a whole number")
    if version > GRAPH_SCHEMA_VERSION:
        raise CircuitscopeError(
            f"{path}: written by a newer circuitscope (graph schema {version}; this one reads up to "
            f"{GRAPH_SCHEMA_VERSION}); upgrade circuitscope"
        )


def _validated(path: Path, raw: Any) -> GraphFile:
    try:
        return GraphFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _damaged(path, f"{'.'.join(map(str, first['loc'])) or 'file'}: {first['msg']}") from None


def _read_json(path: Path) -> StoredGraph:
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CircuitscopeError(f"{path}: not a graph JSON file ({exc}); trace the prompt again") from None
    if not isinstance(raw, dict) or raw.get("format") != GRAPH_FORMAT:
        raise CircuitscopeError(f"{path}: not a circuitscope graph file; trace the prompt again")
    _check_version(path, raw.get("schema_version"))
    return stored_from_file(_validated(path, raw))


def _read_compact(path: Path) -> StoredGraph:
    try:
        with safe_open(str(path), framework="np") as fh:
            about_text = (fh.metadata() or {}).get(GRAPH_FORMAT)
            if about_text is None:
                raise CircuitscopeError(f"{path}: not a circuitscope graph file; trace the prompt again")
            about = _parsed(path, about_text)
            _check_version(path, about.get("schema_version") if isinstance(about, dict) else None)
            names = set(fh.keys())
            missing = {"graph", *(f"edges.{name}" for name in _COLUMNS)} - names
            if missing:
                raise _damaged(path, f"no {', '.join(sorted(missing))} tensor")
            tensors = {name: fh.get_tensor(name) for name in names}
    except SafetensorError as exc:
        raise CircuitscopeError(f"{path}: not a graph file ({exc}); trace the prompt again") from None
    try:
        run = RunSection.model_validate(about["run"]) if about.get("run") is not None else None
    except ValidationError as exc:
        raise _damaged(path, f"run: {exc.errors()[0]['msg']}") from None
    content = _validated(path, _parsed(path, tensors["graph"].tobytes()))
    edges = _columns(path, tensors, "edges", len(content.nodes))
    if content.unpruned is not None:
        section = content.unpruned
        columns = _columns(path, tensors, "unpruned", len(section.endpoints))
        content = content.model_copy(update={"unpruned": section.model_copy(update={
            "sources": columns.sources.tolist(), "targets": columns.targets.tolist(),
            "weights": columns.weights.tolist()})})
    if "feature_info" not in tensors:
        return StoredGraph(content, edges, run)
    info = tensors["feature_info"].tobytes()

    def feature_info() -> dict[str, FeatureInfo]:
        try:
            return _FEATURE_INFO.validate_json(info)
        except ValidationError as exc:
            raise _damaged(path, f"feature_info: {exc.errors()[0]['msg']}") from None

    return StoredGraph(content, edges, run, feature_info)


def _parsed(path: Path, text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"its JSON does not parse: {exc}") from None


def _columns(path: Path, tensors: dict[str, np.ndarray], prefix: str, n_nodes: int) -> EdgeColumns:
    try:
        columns = EdgeColumns(*(tensors[f"{prefix}.{name}"] for name in _COLUMNS))
        if columns.sources.dtype != np.int32 or columns.targets.dtype != np.int32:
            raise ValueError("an index column is not int32")
        if columns.weights.dtype not in (np.float32, np.float64):
            raise ValueError("the weight column is not float32 or float64")
        columns.check(n_nodes)
    except (KeyError, ValueError) as exc:
        raise _damaged(path, f"{prefix}: {exc}") from None
    return columns
