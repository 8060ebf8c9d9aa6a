"""Reading feature labels: :class:`FeatureLabels` maps the files of a labels directory into memory (a
feature's summary touches a few rows of each) and answers :meth:`~FeatureLabels.summary` and
:meth:`~FeatureLabels.short_label` per (layer, index).

Short label rule (:func:`short_label`): ``WORDS | → OUT1/OUT2``. WORDS are the two best context words
of the feature's top contexts (the tokens it fires on and the words around them, scored by a tf-idf against
the corpus so that the most common tokens do not win every label; rule in
:mod:`dictionaries.labels.context_words`), joined by ``·``; OUT1, OUT2 are the two tokens its decoder
promotes most (the logit lens). Tokens are shown stripped of surrounding spaces (a token that is only
whitespace shows as ␣ or ⏎). A summary without context words (none is word-like) falls back to the token
at the maximum that occurs most often among the top contexts (ties: the one of the strongest context). A
feature that was never active on the corpus reads ``(inactive) | → OUT1/OUT2``.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cached_property
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError

from ..errors import CircuitscopeError, DictionaryFileError
from ..safetensors_io import read_tensors
from .context_words import CorpusCounts, context_word_scores
from .format import (
    CORPUS_FILE,
    LABELS_DIRECTORY,
    LABELS_FORMAT,
    LABELS_FORMAT_VERSION,
    LAYER_TENSORS,
    MANIFEST_FILE,
    TOKENS_FILE,
    LabelsManifest,
    layer_file,
)
from .top_contexts import dequantize_window

_REANNOTATE = "Annotate the dictionaries again: circuitscope features annotate DICT --force"


class TokenScore(BaseModel):
    token_id: int
    token: str
    score: float


class TopContext(BaseModel):
    """One top-activating context: the window of ``tokens`` around the maximum (cut at the context's ends)
    with the feature's ``activations`` on them; ``peak`` indexes the maximum in ``tokens``."""

    context: int
    position: int
    max_activation: float
    token_ids: list[int]
    tokens: list[str]
    activations: list[float]
    peak: int


class FeatureSummary(BaseModel):
    layer: int
    index: int
    label: str
    frequency: float
    mean_activation: float
    contexts: list[TopContext]
    promoted: list[TokenScore]
    suppressed: list[TokenScore]
    context_words: list[TokenScore] = []  # best first; see dictionaries.labels.context_words


def labels_directory(dictionary_dir: str | Path) -> Path:
    """Where a dictionary set's labels live by default: ``DICT/labels``."""
    return Path(dictionary_dir) / LABELS_DIRECTORY


def _visible(token: str) -> str:
    stripped = token.strip()
    if stripped:
        return stripped
    return "⏎" if "\n" in token else "␣"


LABEL_WORDS = 2


def short_label(summary: FeatureSummary) -> str:
    """The one-line label of a feature (rule in the module docstring)."""
    peaks = [c.tokens[c.peak] for c in summary.contexts]
    if summary.context_words:
        words = list(dict.fromkeys(_visible(t.token) for t in summary.context_words))  # " Sur" and "Sur" once
        fires_on = "·".join(words[:LABEL_WORDS])
    elif peaks:
        counts = Counter(peaks)
        best = max(counts.values())
        fires_on = _visible(next(t for t in peaks if counts[t] == best))
    else:
        fires_on = "(inactive)"
    promoted = "/".join(_visible(t.token) for t in summary.promoted[:2])
    return f"{fires_on} | → {promoted}" if promoted else fires_on


class FeatureLabels:
    """The labels in one directory (see :mod:`dictionaries.labels.format`); files are memory-mapped on
    first use. Raises DictionaryFileError for a missing, damaged or newer-format directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory / MANIFEST_FILE)
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def load(cls, dictionary_dir: str | Path, labels_dir: str | Path | None = None) -> FeatureLabels | None:
        """The labels of the dictionaries at ``dictionary_dir`` (in ``labels_dir``, default ``DICT/labels``),
        or None when there are none."""
        directory = Path(labels_dir) if labels_dir is not None else labels_directory(dictionary_dir)
        if not (directory / MANIFEST_FILE).is_file():
            return None
        return cls(directory)

    # --- shape ---------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.manifest.dictionaries.n_layers

    @property
    def widths(self) -> list[int]:
        return self.manifest.dictionaries.widths

    def check_feature(self, layer: int, index: int) -> None:
        """CircuitscopeError unless (layer, index) is a feature of the labelled set."""
        if not 0 <= layer < self.n_layers:
            raise CircuitscopeError(f"layer {layer} does not exist: the labelled dictionaries have layers "
                                    f"0..{self.n_layers - 1}")
        if not 0 <= index < self.widths[layer]:
            raise CircuitscopeError(f"feature {index} does not exist: layer {layer} has features "
                                    f"0..{self.widths[layer] - 1}")

    def check_matches(self, fingerprint: str, where: str = "the dictionaries") -> None:
        """CircuitscopeError when the labels were made for other weights than ``fingerprint``'s."""
        if fingerprint != self.manifest.dictionaries.fingerprint:
            raise CircuitscopeError(f"the feature labels in {self.directory} were made for other dictionaries "
                                    f"than {where}. {_REANNOTATE}")

    # --- files ---------------------------------------------------------------------------------------
    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """The memory-mapped tensors of one dictionary layer (names in ``format.LAYER_TENSORS``)."""
        if layer not in self._layers:
            path = self.directory / layer_file(layer)
            tensors = read_tensors(path, list(LAYER_TENSORS))
            width, settings = self.widths[layer], self.manifest.settings
            n = settings.contexts_per_feature
            expected = {"context": (width, n), "position": (width, n), "max_act": (width, n),
                        "window_acts": (width, n, settings.window), "frequency": (width,), "mean_active": (width,)}
            for name, shape in expected.items():
                if tuple(tensors[name].shape) != shape:
                    raise DictionaryFileError(path, f"tensor {name!r} has shape {list(tensors[name].shape)}, "
                                                    f"expected {list(shape)}", _REANNOTATE)
            self._layers[layer] = tensors
        return self._layers[layer]

    @cached_property
    def corpus(self) -> torch.Tensor:
        """[C, T] int32 token ids of the annotated contexts (memory-mapped)."""
        return read_tensors(self.directory / CORPUS_FILE, ["token_ids"])["token_ids"]

    @cached_property
    def token_text(self) -> dict[int, str]:
        """Token id -> decoded text, for every id the labels mention."""
        path = self.directory / TOKENS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return dict(zip(map(int, raw["ids"]), raw["text"], strict=True))
        except FileNotFoundError:
            raise DictionaryFileError(path, "missing", _REANNOTATE) from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise DictionaryFileError(path, "damaged (not the expected JSON)", _REANNOTATE) from None

    @cached_property
    def corpus_counts(self) -> CorpusCounts:
        """How often each token id occurs among the corpus's non-BOS tokens (for the context words' idf)."""
        return CorpusCounts.of(self.corpus)

    def _text(self, token_id: int) -> str:
        return self.token_text.get(token_id, f"<{token_id}>")

    # --- answers -------------------------------------------------------------------------------------
    def summary(self, layer: int, index: int) -> FeatureSummary:
        """Everything stored about feature ``index`` of dictionary layer ``layer``."""
        self.check_feature(layer, index)
        t = self.layer(layer)
        settings = self.manifest.settings
        contexts = []
        length = self.corpus.shape[1]
        for slot in range(settings.contexts_per_feature):
            row, position = int(t["context"][index, slot]), int(t["position"][index, slot])
            if row < 0:
                break
            lo, hi = max(position - settings.before, 0), min(position + settings.after + 1, length)
            ids = self.corpus[row, lo:hi].tolist()
            window = t["window_acts"][index, slot, lo - position + settings.before: hi - position + settings.before]
            acts = dequantize_window(window, t["max_act"][index, slot])
            contexts.append(TopContext(context=row, position=position, max_activation=float(t["max_act"][index, slot]),
                                       token_ids=ids, tokens=[self._text(i) for i in ids],
                                       activations=acts.tolist(), peak=position - lo))

        def scored(ids: str, scores: str) -> list[TokenScore]:
            return [TokenScore(token_id=i, token=self._text(i), score=s)
                    for i, s in zip(t[ids][index].tolist(), t[scores][index].float().tolist(), strict=True)]

        summary = FeatureSummary(layer=layer, index=index, label="", frequency=float(t["frequency"][index]),
                                 mean_activation=float(t["mean_active"][index]), contexts=contexts,
                                 promoted=scored("promoted_ids", "promoted_scores"),
                                 suppressed=scored("suppressed_ids", "suppressed_scores"),
                                 context_words=[TokenScore(token_id=i, token=text, score=score) for i, text, score
                                                in context_word_scores(contexts, self.corpus_counts)])
        summary.label = short_label(summary)
        return summary

    def short_label(self, layer: int, index: int) -> str:
        """The feature's one-line label (rule in the module docstring)."""
        return self.summary(layer, index).label


def _read_manifest(path: Path) -> LabelsManifest:
    if not path.is_file():
        raise DictionaryFileError(path, "not found: there are no feature labels here",
                                  "Make them with: circuitscope features annotate DICT")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DictionaryFileError(path, f"corrupt JSON ({exc})", _REANNOTATE) from None
    if not isinstance(raw, dict) or raw.get("format") != LABELS_FORMAT:
        raise DictionaryFileError(path, f"not a {LABELS_FORMAT} manifest", _REANNOTATE)
    version = raw.get("format_version")
    if isinstance(version, int) and version > LABELS_FORMAT_VERSION:
        raise DictionaryFileError(path, f"written by a newer circuitscope (labels format {version}; this one reads "
                                        f"up to {LABELS_FORMAT_VERSION})", "Upgrade circuitscope")
    try:
        return LabelsManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DictionaryFileError(path, f"invalid manifest ({'.'.join(map(str, first['loc']))}: {first['msg']})",
                                  _REANNOTATE) from None
