"""Refit the decoders (and skip paths) of a trained per-layer set by least squares on its training text, the
encoders untouched (see dictionaries/training/refit.py). Writes a new native directory.

    python tools/refit_decoders.py TRAINED_DIR OUT_DIR [--tokens 131072]
"""

from __future__ import annotations

import argparse

import torch

from dictionaries.evaluation import corpus_contexts
from dictionaries.formats.native import load_native, save_native
from dictionaries.models.loading import load_model
from dictionaries.training.refit import refit_decoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trained")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=131072, help="Training-split tokens to fit on.")
    args = parser.parse_args()
    dicts = load_native(args.trained, dtype=torch.float32)
    lm = load_model(str(dicts.config.model or "gemma-3-270m"))
    corpus = corpus_contexts(dicts, lm, None, args.tokens, "train")
    refit_decoders(dicts, lm, corpus.contexts, progress=True)
    dicts.config.metadata["refit_tokens"] = corpus.contexts.shape[0] * (corpus.context_length - 1)
    save_native(dicts, args.out, overwrite=True)
    print(f"refit {dicts.n_layers} layers on {corpus.contexts.shape[0]} contexts of {corpus.data}; wrote {args.out}")


if __name__ == "__main__":
    main()
