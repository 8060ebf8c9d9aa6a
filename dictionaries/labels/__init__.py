"""Feature labels for a dictionary set: each feature's top-activating contexts over a corpus, its activation
frequency, and the tokens its decoder promotes and suppresses through the unembedding.

``annotate(dicts, lm, labels_directory(DICT))`` writes them (:mod:`.annotate`; on-disk format in
:mod:`.format`); ``FeatureLabels.load(DICT)`` reads them memory-mapped (:mod:`.store`), with
``.summary(layer, index)`` and ``.short_label(layer, index)``. :mod:`.top_contexts` is the streaming
top-k, :mod:`.logit_lens` the promoted/suppressed tokens.
"""

from .annotate import DEFAULT_TOKENS, annotate, annotate_contexts, fingerprint
from .format import (
    LABELS_FORMAT,
    LABELS_FORMAT_VERSION,
    AnnotationSettings,
    LabelsManifest,
)
from .store import (
    FeatureLabels,
    FeatureSummary,
    TokenScore,
    TopContext,
    labels_directory,
    short_label,
)

__all__ = [
    "DEFAULT_TOKENS", "LABELS_FORMAT", "LABELS_FORMAT_VERSION", "AnnotationSettings", "FeatureLabels",
    "FeatureSummary", "LabelsManifest", "TokenScore", "TopContext", "annotate", "annotate_contexts",
    "fingerprint", "labels_directory", "short_label",
]
