"""Speed and size of ``features annotate`` on the real Gemma 3 270M (issue 7's labels). Prints its figures.

Setting: the default set's shape, random skip transcoders of width 1024 with TopK k=64 on all 18 layers;
``--tokens`` tokens of model-free random text (ids drawn uniformly from the first 50,000 vocabulary entries;
the cost does not depend on the text) in contexts of 128 tokens. Prints the time of the corpus pass (per
token, and extrapolated to 65,536 tokens), of the logit lens (the whole set), of writing, and the size
of the labels directory.

    python benchmarks/feature_labels.py --tokens 2048 --threads 2

``--compare N`` (no model needed) prints instead N features of the shipped set picked at random (``--seed``)
with their label before issue 14 (the most common peak token → logit lens) and after (context words scored
by tf-idf against the corpus | → logit lens), and the time to label them.

    python benchmarks/feature_labels.py --compare 20 --seed 14
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--skip-logit-lens", action="store_true")
    parser.add_argument("--compare", type=int, default=0, metavar="N")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    if args.compare:
        compare_labels(args.compare, args.seed)
        return

    import torch

    torch.set_num_threads(args.threads)
    from dictionaries.assembly import random_dictionary_set
    from dictionaries.config import ActivationConfig
    from dictionaries.labels import AnnotationSettings
    from dictionaries.labels.annotate import (
        LabelledDictionaries,
        LabelsManifest,
        activation_statistics,
        fingerprint,
        logit_statistics,
        write_labels,
    )
    from dictionaries.labels.format import CorpusInfo
    from dictionaries.models.loading import load_model

    lm = load_model(args.model)
    dicts = random_dictionary_set(lm.n_layers, lm.d_model, 1024, activation=ActivationConfig(type="topk", k=64),
                                  skip=True)
    settings = AnnotationSettings()
    n_contexts = max(1, args.tokens // 127)
    contexts = torch.randint(10, 50_000, (n_contexts, 128), generator=torch.Generator().manual_seed(0))
    contexts[:, 0] = lm.tokenizer.bos_token_id
    tokens = n_contexts * 127

    start = time.perf_counter()
    stats = activation_statistics(dicts, lm, contexts, settings)
    corpus_s = time.perf_counter() - start
    print(f"corpus pass   {corpus_s:.1f} s for {tokens} tokens ({1e3 * corpus_s / tokens:.2f} ms/token; "
          f"65,536 tokens: ~{corpus_s / tokens * 65_536 / 60:.1f} min)")
    if args.skip_logit_lens:
        return
    start = time.perf_counter()
    lens = logit_statistics(dicts, lm, settings)
    print(f"logit lens    {time.perf_counter() - start:.1f} s for {sum(dicts.widths)} features")
    layers = [{**s.tensors(), **lens_layer} for s, lens_layer in zip(stats, lens, strict=True)]
    manifest = LabelsManifest(
        model=lm.name,
        dictionaries=LabelledDictionaries(kind=dicts.kind, n_layers=dicts.n_layers, d_model=dicts.d_model,
                                          widths=dicts.widths, layers=list(range(dicts.n_layers)),
                                          fingerprint=fingerprint(dicts)),
        corpus=CorpusInfo(data="random", split="train", seed=0, contexts=n_contexts, context_length=128,
                          tokens=tokens),
        settings=settings,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = write_labels(Path(tmp) / "labels", manifest, contexts, layers, lm.tokenizer)
        size = sum(f.stat().st_size for f in out.iterdir())
        print("files        ", {f.name: f.stat().st_size for f in sorted(out.iterdir())})
        print(f"writing       {time.perf_counter() - start:.1f} s; labels {size / 1e6:.2f} MB "
              f"({n_contexts} contexts in corpus.safetensors)")


SHIPPED = Path(__file__).resolve().parents[1] / "dictionaries/bundled_sets/gemma-3-270m-skip-transcoders/labels"


def compare_labels(n: int, seed: int) -> None:
    """Before/after labels of ``n`` random features of the shipped set (random.Random(seed))."""
    import random

    from dictionaries.labels import FeatureLabels, short_label

    labels = FeatureLabels(SHIPPED)
    rng = random.Random(seed)
    picks = [(layer, rng.randrange(labels.widths[layer])) for layer in
             (rng.randrange(labels.n_layers) for _ in range(n))]
    start = time.perf_counter()
    summaries = [labels.summary(layer, index) for layer, index in picks]
    elapsed = time.perf_counter() - start
    print(f"{'feature':>8}  {'before (peak token → logit lens)':<36}  after (context words | → logit lens)")
    for s in summaries:
        before = short_label(s.model_copy(update={"context_words": []})).replace(" | → ", " → ")
        print(f"{s.layer:>4}:{s.index:<4}  {before:<36}  {s.label}")
    print(f"labelled {n} features in {elapsed:.2f} s (corpus counts included; shipped set, seed {seed})")


if __name__ == "__main__":
    main()
