"""The tokens a feature's decoder promotes and suppresses through the unembedding (the "logit lens").

For feature f of dictionary layer s: direction = sum over target layers t of W_dec[s->t][f] [d_model];
score[v] = (direction * (1 + w_norm)) . W_U[v] with w_norm the final RMSNorm's weight (Gemma scales by
1 + weight) and W_U [V, d_model] the unembedding. See :mod:`dictionaries.labels.format` for what is left
out and why. Features are scored in chunks, so at most ``chunk * V`` scores exist at once.
"""

from __future__ import annotations

import torch

from ..dictionary_set import DictionarySet
from ..models.loading import LoadedModel


def decoder_directions(dicts: DictionarySet, layer: int) -> torch.Tensor:
    """[F, d_model] float32: each feature's decoder rows summed over the layers it writes to."""
    total = None
    for target in dicts.decoder_targets(layer):
        rows = dicts.computed(layer, dicts.decoder_weight(layer, target)).float()
        total = rows.clone() if total is None else total + rows
    assert total is not None
    return total


def excluded_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """[V] bool: special tokens (BOS/EOS/pad, control tokens, ``<unusedN>``), never listed."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[[i for i in ids if 0 <= i < vocab_size]] = True
    return mask


def unembedding(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [V, d_model], final-norm gain 1 + w [d_model]), float32."""
    return lm.lm_head.weight.detach().float(), lm.architecture.norm.gain(lm.final_norm)


@torch.no_grad()
def logit_lens(directions: torch.Tensor, w_u: torch.Tensor, gain: torch.Tensor, excluded: torch.Tensor,
               n: int, chunk: int = 128) -> dict[str, torch.Tensor]:
    """directions [F, d_model] -> promoted_ids/suppressed_ids int32 [F, n] and their scores float32 [F, n]
    (promoted: largest first; suppressed: most negative first)."""
    n = min(n, int((~excluded).sum()))
    excluded = excluded.to(w_u.device)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("promoted_ids", "promoted_scores", "suppressed_ids",
                                                        "suppressed_scores")}
    for start in range(0, directions.shape[0], chunk):
        scores = (directions[start:start + chunk].to(w_u.device) * gain) @ w_u.T  # [c, V]
        top = scores.masked_fill(excluded, float("-inf")).topk(n, dim=1)
        bottom = scores.masked_fill_(excluded, float("inf")).topk(n, dim=1, largest=False)
        out["promoted_ids"].append(top.indices.int().cpu())
        out["promoted_scores"].append(top.values.cpu())
        out["suppressed_ids"].append(bottom.indices.int().cpu())
        out["suppressed_scores"].append(bottom.values.cpu())
    return {k: torch.cat(v) for k, v in out.items()}
