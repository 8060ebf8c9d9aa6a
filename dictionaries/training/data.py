"""Text for training and evaluation, packed into fixed-length contexts that start with BOS.

A ``--data`` value names one source (:func:`parse_data_spec`):

- a local file or directory: ``.txt`` (documents separated by blank lines), ``.jsonl`` / ``.json``
  (one JSON object per line with a ``"text"`` field), or a directory of such files (sorted by name);
- a Hugging Face dataset, ``hf://owner/name[:config][@split]`` or ``owner/name``, streamed (needs the
  ``datasets`` package and a reachable hub; imported only when used);
- ``model``: text sampled from the model itself (ancestral sampling at temperature 1 from BOS), the
  offline default.

Packing: documents are tokenized without special tokens, each followed by EOS, concatenated and cut
into pieces of ``context_length - 1`` tokens; each context is BOS + one piece, so every context is
[context_length] ids with BOS at position 0 (which training and metrics leave out).

Splits: of the packed text contexts, every :data:`HELDOUT_EVERY`-th is held out for evaluation and
never trained on; model samples use a separate random stream for the held-out split. Context ``i`` of
a split is always the same tokens, so a run can restart at any position (``--resume``); text sources
cycle through their documents again (another epoch) when a run needs more contexts than they hold.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import CircuitscopeError
from ..models.loading import LoadedModel

Split = Literal["train", "heldout"]
HELDOUT_EVERY = 20
SAMPLE_BATCH = 32  # model samples are drawn SAMPLE_BATCH contexts at a time, each batch from its own seed
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?(@[\w.\[\]:%-]+)?$")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value. ``location`` is a path (file) or dataset name (hub); empty for the model."""

    kind: Literal["file", "hub", "model"]
    location: str = ""
    config_name: str | None = None
    split: str = "train"


def parse_data_spec(value: str) -> DataSpec:
    """``"model"``, an existing path, or a hub dataset; CircuitscopeError for a missing path."""
    value = str(value).strip()
    if value == "model":
        return DataSpec("model")
    path = Path(value).expanduser()
    if path.exists():
        if path.is_dir() and not _text_files(path):
            raise CircuitscopeError(f"--data {value}: the directory holds no {'/'.join(TEXT_SUFFIXES)} files")
        return DataSpec("file", str(path))
    hub = value.removeprefix("hf://")
    looks_like_path = value.startswith((".", "/", "~")) or path.suffix.lower() in TEXT_SUFFIXES
    if value.startswith("hf://") or (not looks_like_path and "/" in hub and _HUB_NAME.match(hub)):
        name, _, split = hub.partition("@")
        name, _, config_name = name.partition(":")
        return DataSpec("hub", name, config_name or None, split or "train")
    raise CircuitscopeError(
        f"--data {value}: no such file or directory; pass a .txt/.jsonl file or directory, a Hugging Face "
        "dataset (hf://owner/name), or 'model' for text sampled from the model"
    )


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ContextSource(ABC):
    """Contexts of one split. ``contexts(start, count)`` -> [count, context_length] int64, BOS at position 0."""

    context_length: int

    @abstractmethod
    def contexts(self, start: int, count: int) -> torch.Tensor: ...


# --- text --------------------------------------------------------------------------------------------
def _text_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def file_documents(path: Path) -> Iterator[str]:
    """The documents of a file (or of every text file in a directory, in name order)."""
    for file in _text_files(path) if path.is_dir() else [path]:
        if file.suffix.lower() in (".jsonl", ".json"):
            with file.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        yield _jsonl_text(file, number, line)
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            yield from (doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip())


def _jsonl_text(file: Path, number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise CircuitscopeError(f"{file}:{number}: not a JSON object; write one JSON object per line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise CircuitscopeError(f'{file}:{number}: no "text" field; each line needs {{"text": "..."}}')
    return row["text"]


def hub_documents(spec: DataSpec) -> Iterator[str]:
    """Stream the ``text`` field of a Hugging Face dataset; one clear message when that cannot work."""
    try:
        import datasets
    except ImportError:
        raise CircuitscopeError(
            f"--data {spec.location}: reading a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets); or pass a local .txt/.jsonl file, or --data model (no network needed)"
        ) from None
    try:
        stream = iter(datasets.load_dataset(spec.location, spec.config_name, split=spec.split, streaming=True))
        first = next(stream, None)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad config: one message
        raise CircuitscopeError(
            f"--data {spec.location}: cannot open the dataset on the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Check the name, or download the text where the hub is reachable and pass the file"
        ) from None
    for row in itertools.chain([] if first is None else [first], stream):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CircuitscopeError(f"--data {spec.location}: rows have no 'text' column; use a text dataset")
        yield text


class PackedTextContexts(ContextSource):
    """Contexts packed from documents (see the module docstring); cycles through the documents forever."""

    def __init__(self, documents: Callable[[], Iterator[str]], tokenizer, context_length: int, split: Split, name: str):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise CircuitscopeError(f"the tokenizer has no BOS or EOS token; it cannot pack --data {name}")
        self.documents, self.tokenizer, self.context_length = documents, tokenizer, context_length
        self.split, self.name = split, name
        self._iterator: Iterator[list[int]] | None = None
        self._next = 0

    def contexts(self, start: int, count: int) -> torch.Tensor:
        if self._iterator is None or start < self._next:
            self._iterator, self._next = self._cycle(), 0
        for _ in range(start - self._next):
            next(self._iterator)
        rows = [next(self._iterator) for _ in range(count)]
        self._next = start + count
        return torch.tensor(rows, dtype=torch.long).reshape(count, self.context_length)

    def _cycle(self) -> Iterator[list[int]]:
        while True:
            produced = 0
            for index, context in enumerate(self._packed()):
                if (index % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (self.split == "heldout"):
                    produced += 1
                    yield context
            if produced == 0:
                raise CircuitscopeError(
                    f"--data {self.name} is too short: it packs into fewer than {HELDOUT_EVERY} contexts of "
                    f"{self.context_length} tokens, so its {self.split} split is empty; use more text"
                )

    def _packed(self) -> Iterator[list[int]]:
        bos, eos, piece = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.context_length - 1
        buffer: list[int] = []
        batch: list[str] = []
        for document in _then_none(self.documents()):
            if document is not None:
                batch.append(document)
                if len(batch) < 64:
                    continue
            if batch:
                for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    buffer.extend(ids)
                    buffer.append(eos)
                batch = []
            start = 0
            while len(buffer) - start >= piece:
                yield [bos] + buffer[start : start + piece]
                start += piece
            buffer = buffer[start:]


def _then_none(items: Iterator[str]) -> Iterator[str | None]:
    yield from items
    yield None


# --- the model's own samples -------------------------------------------------------------------------
class ModelSampledContexts(ContextSource):
    """Contexts sampled from the model: BOS, then ``context_length - 1`` tokens drawn at temperature 1
    (never BOS or padding). Batch ``j`` of :data:`SAMPLE_BATCH` contexts uses its own generator seeded
    from (seed, split, j), so any context can be re-drawn alone."""

    def __init__(self, lm: LoadedModel, context_length: int, split: Split, seed: int):
        self.lm, self.context_length, self.split, self.seed = lm, context_length, split, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def contexts(self, start: int, count: int) -> torch.Tensor:
        rows = []
        for batch in range(start // SAMPLE_BATCH, (start + count - 1) // SAMPLE_BATCH + 1):
            ids = self._batch(batch)
            lo = max(start, batch * SAMPLE_BATCH) - batch * SAMPLE_BATCH
            hi = min(start + count, (batch + 1) * SAMPLE_BATCH) - batch * SAMPLE_BATCH
            rows.append(ids[lo:hi])
        return torch.cat(rows)

    def _batch(self, batch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != batch:
            self._cache = (batch, sample_from_model(self.lm, SAMPLE_BATCH, self.context_length,
                                                    derive_seed("model-samples", self.seed, self.split, batch)))
        return self._cache[1]


@torch.no_grad()
def sample_from_model(lm: LoadedModel, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] ids: BOS then ancestral samples (temperature 1) with a KV cache; BOS/pad never drawn."""
    tokenizer = lm.tokenizer
    generator = torch.Generator().manual_seed(seed)
    banned = [t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None]
    ids = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long, device=lm.device)
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache_name = kv_cache_name(lm.model)
    for _ in range(length - 1):
        logits = out.logits[:, -1, :].float().cpu()
        logits[:, banned] = float("-inf")
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).to(lm.device)
        ids = torch.cat([ids, token], dim=1)
        if ids.shape[1] < length:
            out = lm.model(input_ids=token, **{cache_name: getattr(out, cache_name)}, use_cache=True, logits_to_keep=1)
    return ids.cpu()


def kv_cache_name(model: torch.nn.Module) -> str:
    """The name of the KV cache in ``model``'s forward arguments and outputs.

    transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40); the
    package's pin spans both, so the name is read from the forward signature.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def open_context_source(spec: DataSpec, lm: LoadedModel, context_length: int, split: Split, seed: int) -> ContextSource:
    """The contexts of ``split`` from ``spec`` (see the module docstring)."""
    if spec.kind == "model":
        return ModelSampledContexts(lm, context_length, split, seed)
    if spec.kind == "file":
        path = Path(spec.location)
        return PackedTextContexts(lambda: file_documents(path), lm.tokenizer, context_length, split, spec.location)
    return PackedTextContexts(lambda: hub_documents(spec), lm.tokenizer, context_length, split, spec.location)
