"""The on-disk format of feature labels: a directory (by default ``labels/`` inside the dictionary
directory) written once by :func:`dictionaries.labels.annotate` and read memory-mapped by
:class:`dictionaries.labels.FeatureLabels`.

Files (F = width of a layer, n = ``contexts_per_feature``, W = ``before + 1 + after``, m = ``logit_tokens``,
C contexts of T tokens)::

    labels.json                   LabelsManifest: format name and version, model, dictionaries (and their
                                  fingerprint), corpus, settings
    corpus.safetensors            token_ids         int32   [C, T]   the annotated contexts (BOS at position 0)
    tokens.json                   {"ids": [...], "text": [...]}: the decoded text of every token id that a
                                  top-context window or a promoted/suppressed list holds (ids ascending)
    features_layer_{L}.safetensors, one per dictionary layer L:
        context        int32   [F, n]     row of corpus.token_ids of the k-th top context, -1 for an empty slot
        position       int32   [F, n]     position of the feature's maximum in that context (-1: empty slot)
        max_act        float32 [F, n]     the maximum (descending along n; 0 for an empty slot)
        window_acts    uint8   [F, n, W]  the feature's activations at positions position - before ...
                                          position + after (0 outside the context and at BOS), stored as
                                          round(255 * activation / max_act): activation ~ window_acts / 255 *
                                          max_act, within 0.2% of the maximum (the maximum itself is exact)
        frequency      float32 [F]        fraction of non-BOS corpus tokens where the feature is > 0
        mean_active    float32 [F]        mean activation over those tokens (0 for a feature never active)
        promoted_ids   int32   [F, m]     vocabulary ids with the largest logit-lens score, best first
        promoted_scores float16 [F, m]
        suppressed_ids int32   [F, m]     ids with the smallest (most negative) score, most negative first
        suppressed_scores float16 [F, m]

Definitions. Activations exclude position 0 (BOS) of every context. A feature's top contexts are the n
contexts with the largest per-context maximum activation (one entry per context, at the first position
of its maximum; ties go to the earlier context), strongest first; contexts where the feature never
exceeds 0 are not listed. The logit-lens score of token v for feature f of dictionary layer s is
``((sum over target layers t of W_dec[s->t][f]) * (1 + w_norm)) . W_U[v]``: the feature's total decoder
output (for a per-layer transcoder the one decoder row; for a CLT the sum of its rows to every layer it
writes to, which is what reaches the residual stream) through the final RMSNorm's gain (its 1/rms
factor, one positive number per token, is left out: it scales all scores alike) and the unembedding;
softcapping is monotonic and also left out. Special tokens (control tokens, ``<unusedN>``) are never
listed.

Versions: 2 adds ``label_rule`` to the manifest (the short label reads context words and the logit lens,
:mod:`dictionaries.labels.context_words`); labels are computed when read, from the same tensors, so a
version-1 directory reads unchanged and gets the same labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LABELS_FORMAT = "circuitscope.feature_labels"
LABELS_FORMAT_VERSION = 2  # 2: the manifest names its label_rule (1 still reads; the tensors are the same)
LABELS_DIRECTORY = "labels"
MANIFEST_FILE = "labels.json"
CORPUS_FILE = "corpus.safetensors"
TOKENS_FILE = "tokens.json"
LAYER_TENSORS = ("context", "position", "max_act", "window_acts", "frequency", "mean_active", "promoted_ids",
                 "promoted_scores", "suppressed_ids", "suppressed_scores")


def layer_file(layer: int) -> str:
    return f"features_layer_{layer}.safetensors"


class AnnotationSettings(BaseModel):
    """How much to keep per feature. ``before`` / ``after``: tokens kept on each side of the maximum."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contexts_per_feature: int = Field(default=8, ge=1, le=64)
    before: int = Field(default=8, ge=0, le=64)
    after: int = Field(default=3, ge=0, le=64)
    logit_tokens: int = Field(default=10, ge=1, le=100)
    batch_size: int = Field(default=8, ge=1)

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


class CorpusInfo(BaseModel):
    """``data``: the ``--data`` value annotated (a file, a hub dataset or ``model``); ``tokens``: non-BOS
    tokens seen (contexts * (context_length - 1))."""

    data: str
    split: Literal["train", "heldout"]
    seed: int
    contexts: int
    context_length: int
    tokens: int


class LabelledDictionaries(BaseModel):
    """The dictionary set the labels describe; ``fingerprint`` (see :func:`dictionaries.labels.fingerprint`)
    tells labels made for other weights apart."""

    kind: str
    n_layers: int
    d_model: int
    widths: list[int]
    layers: list[int]  # the model layer of each dictionary layer
    fingerprint: str


class LabelsManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["circuitscope.feature_labels"] = LABELS_FORMAT
    format_version: int = LABELS_FORMAT_VERSION
    model: str
    dictionaries: LabelledDictionaries
    corpus: CorpusInfo
    settings: AnnotationSettings
    decoder_direction: str = "sum over the target layers of the feature's decoder rows"
    logit_score: str = "((sum_t W_dec[s->t][f]) * (1 + final_norm.weight)) @ W_U.T; special tokens excluded"
    label_rule: str = ("two context words | → two promoted tokens; context word score = share of the top "
                       "contexts' activation-weighted tokens * ln((N + 1) / (count + 1)) over the corpus")
