"""Labels from top contexts: the tf-idf frequency filter of :mod:`dictionaries.labels.context_words` demotes a
token common in the corpus below a rarer token specific to the feature (hand-made corpus, known counts); the
short label holds both parts (context words | → logit lens); version-1 label directories still read; a known
feature of the shipped set is labelled by its context word."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dictionaries.labels import FeatureLabels, FeatureSummary, TokenScore, TopContext, short_label
from dictionaries.labels.context_words import NEAR, CorpusCounts, context_word_scores
from dictionaries.labels.format import MANIFEST_FILE

SHIPPED = Path(__file__).resolve().parents[1] / "dictionaries/bundled_sets/gemma-3-270m-skip-transcoders/labels"
THE, CAPITAL, PARIS, FILLER = 1, 2, 3, 4


def _ctx(ids, texts, acts, peak):
    return TopContext(context=0, position=peak, max_activation=max(acts), token_ids=ids, tokens=texts,
                      activations=acts, peak=peak)


def test_frequency_filter_demotes_a_common_token_below_a_specific_one():
    # corpus: 2 contexts of BOS + 10 tokens; " the" occurs 12 times, " capital" twice, " Paris" never
    corpus = torch.tensor([[0, THE, THE, THE, THE, THE, THE, CAPITAL, FILLER, FILLER, FILLER],
                           [0, THE, THE, THE, THE, THE, THE, CAPITAL, FILLER, FILLER, FILLER]])
    counts = CorpusCounts.of(corpus)
    assert counts.tokens == 20 and counts.count(THE) == 12 and counts.count(CAPITAL) == 2
    # the feature fires on " the" (activation 1) and, weaker, on " capital" (0.5) in both top contexts
    contexts = [_ctx([THE, CAPITAL], [" the", " capital"], [1.0, 0.5], 0),
                _ctx([CAPITAL, THE], [" capital", " the"], [0.5, 1.0], 1)]
    scored = context_word_scores(contexts, counts)
    # weights: " the" 2 * (1 + NEAR), " capital" 2 * (0.5 + NEAR / 2); idf ln(21/13) and ln(21/3)
    total = 2 * (1 + NEAR) + 2 * (0.5 + NEAR / 2)
    expected = {" the": 2 * (1 + NEAR) / total * math.log(21 / 13),
                " capital": 2 * (0.5 + NEAR / 2) / total * math.log(21 / 3)}
    assert [s[1] for s in scored] == [" capital", " the"]  # without the idf " the" (larger share) would win
    for _, text, score in scored:
        assert score == pytest.approx(expected[text])
    # punctuation and whitespace never become context words; a token in every corpus position scores 0
    contexts = [_ctx([5, 6, PARIS], [".", " ", " Paris"], [1.0, 1.0, 0.2], 0)]
    assert [s[1] for s in context_word_scores(contexts, counts)] == [" Paris"]
    # BOS at the start of a window (corpus position 0) is not a word, though it never occurs in the body
    bos_first = TopContext(context=0, position=1, max_activation=1.0, token_ids=[0, CAPITAL],
                           tokens=["<bos>", " capital"],
                           activations=[0.0, 1.0], peak=1)
    assert [s[1] for s in context_word_scores([bos_first], counts)] == [" capital"]


def test_short_label_holds_context_words_and_the_logit_lens():
    promoted = [TokenScore(token_id=i, token=t, score=1.0) for i, t in enumerate([" Paris", " Rome", " Berlin"])]
    words = [TokenScore(token_id=10 + i, token=t, score=1.0) for i, t in enumerate([" capital", "capital", " France"])]
    summary = FeatureSummary(layer=0, index=0, label="", frequency=0.1, mean_activation=1.0, promoted=promoted,
                             suppressed=[], contexts=[], context_words=words)
    assert short_label(summary) == "capital·France | → Paris/Rome"  # same visible word once


def test_label_files_of_version_1_still_read(tmp_path):
    for f in SHIPPED.iterdir():
        (tmp_path / f.name).symlink_to(f)
    manifest = json.loads((SHIPPED / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 2 and "label_rule" in manifest
    del manifest["label_rule"]
    (tmp_path / MANIFEST_FILE).unlink()
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    old, new = FeatureLabels(tmp_path), FeatureLabels(SHIPPED)
    assert old.manifest.format_version == 1
    assert old.short_label(12, 242) == new.short_label(12, 242)


def test_shipped_feature_is_labelled_by_its_context_word():
    labels = FeatureLabels(SHIPPED)
    summary = labels.summary(12, 242)  # fires on titles of people: " Jr", " Mrs", " Mr" in its top contexts
    assert [t.token for t in summary.context_words[:2]] == [" Jr", " Mrs"]
    assert summary.label.startswith("Jr·Mrs | → ")
    assert labels.summary(2, 251).label.startswith("do·doing | → ")  # " do" and " doing", not " the" or "."
