"""Many prompts: read a JSONL data set, trace each prompt into its own graph (resumable, sharded over torchrun
ranks), aggregate the graphs per feature and compare two groups of prompts."""
