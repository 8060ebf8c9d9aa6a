"""Annotate a dictionary set: run a corpus through the model once, keep every feature's top contexts and
activation frequency, score its decoder through the unembedding, and write the labels directory
(format: :mod:`dictionaries.labels.format`) atomically.

Cost: one forward pass of the model per batch of contexts (stopped after the last MLP, so the 262k
unembedding never runs on the corpus), one encoder matmul per layer, and one [F, d_model] x [d_model, V]
product per layer for the logit lens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic_output import atomic_directory, write_text_atomic
from ..dictionary_set import DictionarySet
from ..errors import CircuitscopeError
from ..evaluation import corpus_contexts, dictionary_layers
from ..models.hook_sites import record_mlp_io
from ..models.loading import LoadedModel
from ..safetensors_io import write_tensors
from .format import (
    CORPUS_FILE,
    MANIFEST_FILE,
    TOKENS_FILE,
    AnnotationSettings,
    CorpusInfo,
    LabelledDictionaries,
    LabelsManifest,
    layer_file,
)
from .logit_lens import decoder_directions, excluded_tokens, logit_lens, unembedding
from .top_contexts import TopContexts

DEFAULT_TOKENS = 65_536


def fingerprint(dicts: DictionarySet) -> str:
    """A short hash of the set's shape and a few weights of every layer (first encoder columns, biases,
    first decoder rows), rounded to bfloat16 so that a float32 set and its bfloat16 copy match: labels made
    for other weights do not. Reads a few pages per layer."""
    digest = hashlib.sha256(json.dumps([dicts.kind, dicts.d_model, dicts.widths]).encode())
    for layer in range(dicts.n_layers):
        first_target = dicts.decoder_targets(layer)[0]
        for part in (dicts.encoder_weight(layer)[:, :4], dicts.encoder_bias(layer)[:16],
                     dicts.decoder_weight(layer, first_target)[:2]):
            digest.update(part.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def activation_statistics(dicts: DictionarySet, lm: LoadedModel, contexts: torch.Tensor,
                          settings: AnnotationSettings, progress: bool = False) -> list[TopContexts]:
    """Top contexts and frequencies of every dictionary layer over ``contexts`` [C, T] (BOS first)."""
    layers = dictionary_layers(dicts, lm)
    stats = [TopContexts(width, settings) for width in dicts.widths]
    device = dicts.encoder_bias(0).device
    bar = tqdm(total=int(contexts.shape[0]), desc="annotating", unit="ctx", disable=not progress)
    for start in range(0, contexts.shape[0], settings.batch_size):
        ids = contexts[start:start + settings.batch_size]
        recording = record_mlp_io(lm, ids, with_logits=False)
        for i, layer in enumerate(layers):
            stats[i].update(dicts.encode(i, recording.inputs[layer].to(device)), start)
        bar.update(ids.shape[0])
    bar.close()
    return stats


@torch.no_grad()
def logit_statistics(dicts: DictionarySet, lm: LoadedModel, settings: AnnotationSettings,
                     progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per dictionary layer: promoted/suppressed token ids [F, m] and scores [F, m] (float16)."""
    w_u, gain = unembedding(lm)
    excluded = excluded_tokens(lm.tokenizer, w_u.shape[0])
    out = []
    for layer in tqdm(range(dicts.n_layers), desc="logit lens", unit="layer", disable=not progress):
        lens = logit_lens(decoder_directions(dicts, layer), w_u, gain, excluded, settings.logit_tokens)
        for name in ("promoted_scores", "suppressed_scores"):
            lens[name] = lens[name].half()
        out.append(lens)
    return out


def annotate_contexts(
    dicts: DictionarySet, lm: LoadedModel, contexts: torch.Tensor, settings: AnnotationSettings | None = None,
    progress: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Every dictionary layer's stored tensors (see :mod:`dictionaries.labels.format`) over ``contexts``."""
    settings = settings or AnnotationSettings()
    stats = activation_statistics(dicts, lm, contexts, settings, progress)
    lens = logit_statistics(dicts, lm, settings, progress)
    return [{**s.tensors(), **lens_layer} for s, lens_layer in zip(stats, lens, strict=True)]


def mentioned_tokens(
    contexts: torch.Tensor, layers: list[dict[str, torch.Tensor]], settings: AnnotationSettings
) -> list[int]:
    """Every token id that a top-context window or a promoted/suppressed list holds, ascending."""
    ids: set[int] = set()
    length = contexts.shape[1]
    offsets = torch.arange(-settings.before, settings.after + 1)
    for tensors in layers:
        filled = tensors["context"] >= 0
        rows, positions = tensors["context"][filled].long(), tensors["position"][filled].long()
        index = (positions[:, None] + offsets).clamp(0, length - 1)
        ids.update(contexts[rows[:, None], index].unique().tolist())
        ids.update(tensors["promoted_ids"].unique().tolist())
        ids.update(tensors["suppressed_ids"].unique().tolist())
    return sorted(ids)


def write_labels(destination: str | Path, manifest: LabelsManifest, contexts: torch.Tensor,
                 layers: list[dict[str, torch.Tensor]], tokenizer, overwrite: bool = False) -> Path:
    """Write the labels directory (atomically: it appears whole or not at all)."""
    ids = mentioned_tokens(contexts, layers, manifest.settings)
    text = tokenizer.batch_decode([[i] for i in ids]) if ids else []
    meta = {"format": manifest.format, "format_version": str(manifest.format_version)}
    with atomic_directory(destination, overwrite=overwrite) as tmp:
        write_tensors(tmp / CORPUS_FILE, {"token_ids": contexts.int()}, metadata=meta)
        for layer, tensors in enumerate(layers):
            write_tensors(tmp / layer_file(layer), tensors, metadata={**meta, "layer": str(layer)})
        write_text_atomic(tmp / TOKENS_FILE, json.dumps({"ids": ids, "text": text}, ensure_ascii=False))
        write_text_atomic(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")
    return Path(destination)


def annotate(dicts: DictionarySet, lm: LoadedModel, destination: str | Path, *, data: str | None = None,
             tokens: int = DEFAULT_TOKENS, context_length: int | None = None, split: str = "train",
             settings: AnnotationSettings | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Annotate ``dicts`` on ``tokens`` non-BOS tokens of ``data`` (default: the set's training text when it
    is on this machine, else model samples) and write the labels to ``destination``; returns it.

    An existing non-empty ``destination`` is an error unless ``overwrite`` (checked before any work)."""
    settings = settings or AnnotationSettings()
    destination = Path(destination)
    if tokens < 1:
        raise CircuitscopeError("--tokens must be at least 1")
    if split not in ("train", "heldout"):
        raise CircuitscopeError(f"split {split!r}: choose train or heldout")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise CircuitscopeError(f"{destination} already holds feature labels; pass --force to replace them")
    layers = dictionary_layers(dicts, lm)
    corpus = corpus_contexts(dicts, lm, data, tokens, split, context_length)
    contexts = corpus.contexts
    tensors = annotate_contexts(dicts, lm, contexts, settings, progress)
    manifest = LabelsManifest(
        model=lm.name,
        dictionaries=LabelledDictionaries(kind=dicts.kind, n_layers=dicts.n_layers, d_model=dicts.d_model,
                                          widths=dicts.widths, layers=layers, fingerprint=fingerprint(dicts)),
        corpus=CorpusInfo(data=corpus.data, split=split, seed=corpus.seed, contexts=int(contexts.shape[0]),
                          context_length=int(contexts.shape[1]),
                          tokens=int(contexts.shape[0] * (contexts.shape[1] - 1))),
        settings=settings,
    )
    return write_labels(destination, manifest, contexts, tensors, lm.tokenizer, overwrite=overwrite)
