"""From a prompt to token ids and the positions whose MLP output the replacement model holds constant.

At the BOS position, and with a chat template at every template token around the user's text, the MLP output
is a constant of the replacement model: no features, no error node, no skip path (see docs/design.md). Tokens
and that mask are made together, here, for tracing, interventions, steering and validation alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CircuitscopeError

if TYPE_CHECKING:
    from .loading import LoadedModel


@dataclass(frozen=True)
class TokenizedPrompt:
    """``ids`` [P] long (on the model's input device) and ``constant`` [P] bool (BOS and chat-template tokens)."""

    ids: torch.Tensor
    constant: torch.Tensor

    @property
    def n_positions(self) -> int:
        return int(self.ids.shape[0])


def token_ids(lm: LoadedModel, prompt: str, chat: bool = False) -> torch.Tensor:
    """Token ids [1, P] of ``prompt`` on the model's device, starting with BOS.

    ``chat=True`` wraps the prompt as one user turn of the tokenizer's chat template followed by the generation
    prompt (the family's chat format, e.g. Gemma 3's ``<start_of_turn>user ... <start_of_turn>model\\n``, is used
    when the tokenizer has no template). Raises CircuitscopeError for an empty prompt or one longer than the
    model's context.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise CircuitscopeError("The prompt is empty; pass some text to trace.")
    tok = lm.tokenizer
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            chat_template=None if tok.chat_template else lm.family.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    bos = tok.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    limit = int(lm.config.max_position_embeddings)
    if len(ids) > limit:
        raise CircuitscopeError(
            f"The prompt is {len(ids)} tokens long but {lm.name} takes at most {limit}; shorten it."
        )
    return torch.tensor([ids], dtype=torch.long, device=lm.device)


def tokenize_prompt(lm: LoadedModel, prompt: str | torch.Tensor, chat: bool = False) -> TokenizedPrompt:
    """Token ids and constant positions of a prompt string, or of token ids [P] / [1, P] (then only a leading
    BOS is constant)."""
    if isinstance(prompt, str):
        ids = token_ids(lm, prompt, chat)[0]
        return TokenizedPrompt(ids, constant_positions(lm, ids, prompt, chat))
    ids = prompt.reshape(-1).long()
    if ids.numel() == 0:
        raise CircuitscopeError("The prompt is empty; pass some text.")
    constant = torch.zeros(len(ids), dtype=torch.bool)
    constant[0] = int(ids[0]) == lm.tokenizer.bos_token_id
    return TokenizedPrompt(ids.to(lm.device), constant)


def constant_positions(lm: LoadedModel, ids: torch.Tensor, prompt: str, chat: bool) -> torch.Tensor:
    """[P] bool for token ids [P] of ``prompt``: BOS, and with ``chat`` every chat-template token around the
    user's text."""
    ids = ids.reshape(-1).tolist()
    constant = torch.zeros(len(ids), dtype=torch.bool)
    if ids and ids[0] == lm.tokenizer.bos_token_id:
        constant[0] = True
    if chat:
        content = list(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        start = next((i for i in range(len(ids) - len(content) + 1) if ids[i:i + len(content)] == content), None)
        if start is None:  # the template merged tokens with the text: keep only special tokens constant
            special = set(lm.tokenizer.all_special_ids)
            constant |= torch.tensor([i in special for i in ids])
        else:
            constant[:start] = True
            constant[start + len(content):] = True
    return constant
