"""Steered generation: feature interventions stay on while the model generates tokens.

Each new token comes from the last position's logits of a run of the whole sequence so far (prompt plus the
tokens generated so far) through the intervened replacement model
(:func:`circuits.interventions.feature_interventions.run_replacement`). The error terms, and the attention patterns
and norm scales when they are frozen, come from a clean run of that same sequence, so every step is exactly what
:func:`~circuits.interventions.feature_interventions.intervene` gives for the sequence. An intervention with a
position acts at that prompt position (negative: counted from the end of the prompt); one without acts at every
non-constant position, generated tokens included. Greedy by default (deterministic); ``temperature > 0`` samples
with a seeded generator. Without interventions the plain model generates (the replacement with its errors
reproduces it). Prompts are short, so each step re-runs the sequence (no key/value cache): two forward passes per
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel
from dictionaries.models.tokenization import tokenize_prompt

from .feature_interventions import (
    FeatureIntervention,
    InterventionSettings,
    prepare_clean_state,
    resolve_interventions,
    run_replacement,
    unembed,
)


class GenerationSettings(BaseModel):
    """``max_new_tokens`` tokens at most; ``temperature`` 0 is greedy, above 0 samples with ``seed``;
    ``stop_at_eos`` ends at the end-of-sequence token (kept in the output)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=20, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]  # the generated token ids
    tokens: list[str]  # each generated token, decoded alone
    text: str  # the generated tokens decoded together


def _stop_ids(lm: LoadedModel) -> set[int]:
    ids = {lm.tokenizer.eos_token_id}
    configured = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return {i for i in ids if i is not None}


@torch.no_grad()
def next_token_logits(lm: LoadedModel, dicts: DictionarySet, input_ids: torch.Tensor, constant: torch.Tensor,
                      interventions: Sequence[FeatureIntervention], settings: InterventionSettings) -> torch.Tensor:
    """Logits [V] float32 after the last of ``input_ids`` [P] with ``interventions`` (resolved) applied."""
    if not interventions:
        hidden = lm.text_model(input_ids=input_ids[None].to(lm.device), use_cache=False).last_hidden_state[0, -1]
        return unembed(lm, hidden)
    state = prepare_clean_state(lm, dicts, input_ids, constant)
    return unembed(lm, run_replacement(lm, dicts, state, interventions, settings).final_hidden[-1])


def generate(lm: LoadedModel, dicts: DictionarySet, prompt: str | torch.Tensor,
             interventions: Sequence[FeatureIntervention] = (), settings: InterventionSettings | None = None,
             generation: GenerationSettings | None = None, *, chat: bool = False) -> Generation:
    """Continue ``prompt`` (text, or token ids [P]) with ``interventions`` kept on at every step."""
    settings = settings or InterventionSettings()
    generation = generation or GenerationSettings()
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    tokens = tokenize_prompt(lm, prompt, chat)
    ids, constant = tokens.ids.to(lm.device), tokens.constant.to(lm.device)
    resolved = resolve_interventions(interventions, dicts, len(ids), constant)
    limit = int(lm.config.max_position_embeddings)
    if len(ids) + generation.max_new_tokens > limit:
        raise CircuitscopeError(f"{len(ids)} prompt tokens + {generation.max_new_tokens} new ones exceed "
                                f"{lm.name}'s {limit} positions; generate fewer tokens")
    sampler = torch.Generator().manual_seed(generation.seed)
    stop = _stop_ids(lm)
    new: list[int] = []
    for _ in range(generation.max_new_tokens):
        logits = next_token_logits(lm, dicts, ids, constant, resolved, settings)
        if generation.temperature > 0:
            probs = torch.softmax(logits.cpu() / generation.temperature, -1)
            token = int(torch.multinomial(probs, 1, generator=sampler))
        else:
            token = int(logits.argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([token], device=ids.device)])
        constant = torch.cat([constant, torch.zeros(1, dtype=torch.bool, device=constant.device)])
        if generation.stop_at_eos and token in stop:
            break
    prompt_list = ids[: len(ids) - len(new)].tolist()
    return Generation(prompt_list, new, [lm.tokenizer.decode([t]) for t in new], lm.tokenizer.decode(new))
