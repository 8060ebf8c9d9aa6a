"""Interventions on dictionary features, run on the real network: set, scale or zero any feature at chosen
layers and positions and let the effect propagate through the rest of the model.

The model runs with the dictionary set spliced in at every MLP (docs/design.md, "The attribution math"). At layer t
and every position that is not constant (BOS, chat-template tokens), the MLP contribution becomes

    y_t = sum over sources s <= t of a_s @ W_dec[s -> t] + b_dec_t (+ x_t @ W_skip_t) + e_t

with x_t the transcoder input of *this* run, the features a_s = act(x_s @ W_enc + b_enc) encoded from this run's
inputs (so an intervention upstream changes the features downstream), every intervention applied to its
feature after encoding, and the error e_t = (true MLP output) - (reconstruction) held at its value in the
clean run, as in circuit-tracer's ``feature_intervention``. With no intervention the run reproduces the
model's logits exactly (up to float rounding). At constant positions the MLP output stays the clean one and
no feature can be intervened on (the graphs have no features there either).

Options (:class:`InterventionSettings`):

- ``freeze_attention``: every attention output is the clean run's pattern applied to this run's values.
- ``freeze_norms``: every residual-stream RMSNorm scale stays at its clean value.
- ``features``: ``"recompute"`` (default, the above); ``"linear"``: a feature active in the clean run follows
  its pre-activation with slope 1 (a_s = a_clean + pre - pre_clean, no threshold) and inactive ones stay off;
  ``"frozen"``: every feature not intervened on keeps its clean activation (only direct effects remain).
  With both freezes, ``"frozen"`` is the frozen replacement model whose edges the attribution graph holds,
  and ``"linear"`` is the linear model whose path sums the graph describes
  (see :mod:`circuits.interventions.validation`).

Logits are read from the final-norm output through the unembedding, before any softcap (Gemma 3 has none);
probabilities are taken after the family's softcap, as the model's own output has them.
Shapes: P = sequence length, d = d_model, V = vocabulary size, d_sae = a layer's dictionary width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.hook_sites import replace_mlp_outputs
from dictionaries.models.loading import LoadedModel
from dictionaries.models.tokenization import tokenize_prompt
from dictionaries.replacement_mlp import ReplacementMlp

from ..engine.clean_run import CleanRun, eager_attention, record_clean_run
from ..engine.replacement import ActiveFeatures, Replacement, build_replacement
from .frozen_model import add_freezing_hooks

InterventionMode = Literal["set", "scale"]
FeatureMode = Literal["recompute", "linear", "frozen"]


class FeatureIntervention(BaseModel):
    """Set (``mode="set"``, to ``value``) or scale (``mode="scale"``, by ``value``) feature ``feature`` of layer
    ``layer`` at ``position`` (negative counts from the end of the prompt; None: every non-constant position,
    generated tokens included). Zeroing (ablation) is ``set`` to 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=0)
    feature: int = Field(ge=0)
    position: int | None = None
    mode: InterventionMode = "set"
    value: float = 0.0

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("the value must be a finite number")
        return value

    @classmethod
    def ablate(cls, layer: int, feature: int, position: int | None = None) -> FeatureIntervention:
        return cls(layer=layer, feature=feature, position=position, mode="set", value=0.0)

    @property
    def key(self) -> str:
        """The position-independent feature identity ``"layer:feature"`` (as in graph node attributes)."""
        return f"{self.layer}:{self.feature}"

    def describe(self) -> str:
        """``ablate 3:17@5``, ``set 3:17=2.5 (all positions)``, ``scale 3:17 x0.5@-1``."""
        where = " (all positions)" if self.position is None else f"@{self.position}"
        if self.mode == "set" and self.value == 0.0:
            return f"ablate {self.key}{where}"
        if self.mode == "set":
            return f"set {self.key}={self.value:g}{where}"
        return f"scale {self.key} x{self.value:g}{where}"


def resolve_interventions(interventions: Sequence[FeatureIntervention], dicts: DictionarySet, n_positions: int,
                          constant: torch.Tensor) -> list[FeatureIntervention]:
    """Check every intervention against the dictionaries and a prompt of ``n_positions`` tokens (``constant``
    [P] bool marks BOS and chat-template positions) and return them with negative positions made absolute.
    Raises CircuitscopeError for a layer, feature or position out of range, or a constant position."""
    resolved = []
    for iv in interventions:
        if iv.layer >= dicts.n_layers:
            raise CircuitscopeError(f"{iv.describe()}: layer {iv.layer} is out of range; the dictionaries cover "
                                    f"layers 0..{dicts.n_layers - 1}")
        width = dicts.widths[iv.layer]
        if iv.feature >= width:
            raise CircuitscopeError(f"{iv.describe()}: feature {iv.feature} is out of range; layer {iv.layer} has "
                                    f"features 0..{width - 1}")
        position = iv.position
        if position is not None:
            if not -n_positions <= position < n_positions:
                raise CircuitscopeError(f"{iv.describe()}: position {position} is outside the prompt's {n_positions} "
                                        f"tokens; pass 0..{n_positions - 1} (or -{n_positions}..-1 from the end)")
            position %= n_positions
            if bool(constant[position]):
                what = "the BOS token" if position == 0 else "a chat-template token"
                raise CircuitscopeError(f"{iv.describe()}: position {position} is {what}, whose MLP output is a "
                                        "constant of the replacement model; intervene at a position of the text")
        resolved.append(iv.model_copy(update={"position": position}))
    return resolved


class InterventionSettings(BaseModel):
    """How the intervened run treats what is not intervened on (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    freeze_attention: bool = False
    freeze_norms: bool = False
    features: FeatureMode = "recompute"


@dataclass
class CleanState:
    """The clean run of one token sequence and the replacement model's fixed parts (errors, clean features)."""

    input_ids: torch.Tensor  # [P] long
    constant: torch.Tensor  # [P] bool: BOS and chat-template positions
    clean: CleanRun
    replacement: Replacement

    @property
    def n_positions(self) -> int:
        return int(self.input_ids.shape[0])


def prepare_clean_state(lm: LoadedModel, dicts: DictionarySet, input_ids: torch.Tensor,
                        constant: torch.Tensor) -> CleanState:
    """Run ``input_ids`` [P] (or [1, P]) once and encode it: what every intervened run of these tokens reuses."""
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    ids = input_ids.reshape(-1).to(lm.device)
    clean = record_clean_run(lm, ids[None])
    constant = constant.to(clean.embeddings.device)
    return CleanState(ids, constant, clean, build_replacement(clean, dicts, constant))


@dataclass
class ReplacementRun:
    final_hidden: torch.Tensor  # [P, d] float32 final-norm output (what the unembedding reads)
    features: ActiveFeatures  # every non-zero feature activation of the run (interventions applied)


def _sparse(per_layer: list[torch.Tensor]) -> ActiveFeatures:
    """Dense activations [P, d_sae] per layer -> the non-zero (layer, position, feature, activation)."""
    parts = []
    for layer, acts in enumerate(per_layer):
        pos, idx = acts.nonzero(as_tuple=True)
        parts.append((torch.full_like(pos, layer), pos, idx, acts[pos, idx].float()))
    return ActiveFeatures(*(torch.cat([p[k] for p in parts]) for k in range(4)))


class _InterventionMlps:
    """The MLP replacement of one intervened run (see the module docstring): layer by layer, encode the live
    input, apply the interventions, write the features' decoder rows into every layer they reach, and output
    the replacement formula of :mod:`dictionaries.replacement_mlp` with the clean run's errors."""

    def __init__(self, dicts: DictionarySet, state: CleanState, interventions: Sequence[FeatureIntervention],
                 settings: InterventionSettings):
        self.dicts, self.state, self.settings = dicts, state, settings
        self.device = state.clean.embeddings.device
        self.mlp = ReplacementMlp(dicts, (state.n_positions,), self.device, state.constant)
        self.activations: list[torch.Tensor] = []
        self.keep = ~state.constant
        self.by_layer: dict[int, list[FeatureIntervention]] = {}
        for iv in interventions:
            self.by_layer.setdefault(iv.layer, []).append(iv)

    def features(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [P, d] float32 -> this run's activations [P, d_sae] at ``layer``, interventions applied."""
        replacement = self.state.replacement
        clean = replacement.layer_slice(layer)  # the clean run's active features of this layer
        pos, idx = replacement.features.position[clean], replacement.features.index[clean]
        clean_acts = replacement.features.activation[clean]  # [m]
        mode = self.settings.features
        if mode == "frozen":
            acts = x.new_zeros(x.shape[0], self.dicts.widths[layer])
            acts[pos, idx] = clean_acts
        else:
            weight_device = self.dicts.encoder_bias(layer).device
            pre = self.dicts.pre_activations(layer, x.to(weight_device)).float().to(self.device)
            if mode == "recompute":
                acts = self.dicts.activation(layer)(pre)
            else:  # linear: only the clean run's active features, slope 1
                acts = torch.zeros_like(pre)
                acts[pos, idx] = clean_acts + pre[pos, idx] - replacement.feature_pre_activations[clean]
            acts = acts * self.keep[:, None]
        for iv in self.by_layer.get(layer, []):
            rows = self.keep.nonzero().flatten() if iv.position is None else torch.tensor([iv.position])
            rows = rows.to(self.device)
            if iv.mode == "set":
                acts[rows, iv.feature] = iv.value
            else:
                acts[rows, iv.feature] = acts[rows, iv.feature] * iv.value
        return acts

    def __call__(self, layer: int, mlp_input: torch.Tensor, mlp_output: torch.Tensor) -> torch.Tensor:
        """The MLP contribution [1, P, d] of ``layer`` given its live input [1, P, d] (a replace_mlp_outputs fn)."""
        x = mlp_input[0].float().to(self.device)
        acts = self.features(layer, x)
        self.activations.append(acts)
        pos, idx = acts.nonzero(as_tuple=True)
        self.mlp.write(layer, pos, idx, acts[pos, idx])
        state = self.state
        return self.mlp.output(layer, x, state.replacement.errors[layer], state.clean.layers[layer].mlp_output)[None]


@torch.no_grad()
def run_replacement(lm: LoadedModel, dicts: DictionarySet, state: CleanState,
                    interventions: Sequence[FeatureIntervention] = (),
                    settings: InterventionSettings | None = None) -> ReplacementRun:
    """One forward pass of ``state``'s tokens through the replacement model with error terms, with
    ``interventions`` (already resolved: see :func:`resolve_interventions`) and ``settings`` applied."""
    settings = settings or InterventionSettings()
    mlps = _InterventionMlps(dicts, state, interventions, settings)
    with ExitStack() as stack, eager_attention(lm):
        add_freezing_hooks(stack, lm, state.clean, attention=settings.freeze_attention, norms=settings.freeze_norms)
        # after the freezing hooks: the inputs read are the frozen-norm ones
        stack.enter_context(replace_mlp_outputs(lm, mlps))
        hidden = lm.text_model(input_ids=state.input_ids[None], use_cache=False).last_hidden_state[0]
    return ReplacementRun(hidden.float(), _sparse(mlps.activations))


def unembed(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final-norm outputs [..., d] -> logits [..., V] float32 (before any softcap)."""
    with torch.no_grad():
        return lm.lm_head(hidden.to(lm.lm_head.weight.dtype)).float()


@dataclass
class TokenChange:
    """One token's next-token logit and probability in the clean and the intervened run."""

    token: str
    token_id: int
    clean_logit: float
    logit: float
    clean_probability: float
    probability: float
    change: float  # logit - clean_logit


@dataclass
class InterventionResult:
    """An intervened run beside the clean one. ``logits``/``clean_logits`` [P, V] are every position's
    next-token logits; ``features``/``clean_features`` every non-zero feature activation (sparse)."""

    input_ids: torch.Tensor  # [P]
    constant: torch.Tensor  # [P] bool: BOS and chat-template positions (never intervened on)
    tokens: list[str]
    interventions: list[FeatureIntervention]  # positions made absolute
    settings: InterventionSettings
    logits: torch.Tensor  # [P, V] float32
    clean_logits: torch.Tensor  # [P, V] float32
    features: ActiveFeatures
    clean_features: ActiveFeatures
    position: int  # the position ``top_changes`` describes
    top_changes: list[TokenChange]  # the most likely tokens before or after, at ``position``

    def positions(self, intervention: FeatureIntervention) -> list[int]:
        """The positions an intervention acts at."""
        if intervention.position is not None:
            return [intervention.position]
        return (~self.constant).nonzero().flatten().tolist()

    def activation(self, layer: int, feature: int, position: int, clean: bool = False) -> float:
        """One feature's activation in the intervened run (or the clean one); 0 when it is inactive."""
        return activation_at(self.clean_features if clean else self.features, layer, feature, position)

    def inactive(self, top: int = 5) -> list[str]:
        """A warning for each ablation or scaling of a feature that is active at none of its positions in the clean
        run (it changes nothing), naming the ``top`` strongest active features of that layer at its first position.
        Setting an inactive feature is a real change and gets no warning."""
        warnings = []
        for iv in self.interventions:
            positions = self.positions(iv)
            setting = iv.mode == "set" and iv.value != 0.0  # an ablation is a set to 0
            if setting or any(self.activation(iv.layer, iv.feature, p, clean=True) for p in positions):
                continue
            where = f"position {positions[0]}" if len(positions) == 1 else "any position"
            f = self.clean_features
            here = (f.layer == iv.layer) & (f.position == positions[-1])
            strongest = f.activation[here].argsort(descending=True)[:top]
            active = ", ".join(f"{iv.layer}:{int(f.index[here][k])} ({float(f.activation[here][k]):.3g})"
                               for k in strongest.tolist()) or "none"
            warnings.append(f"{iv.describe()} changes nothing: feature {iv.layer}:{iv.feature} is not active at "
                            f"{where}. Active in layer {iv.layer} at position {positions[-1]} "
                            f"({self.tokens[positions[-1]]!r}): {active}")
        return warnings


def activation_at(features: ActiveFeatures, layer: int, feature: int, position: int) -> float:
    hit = (features.layer == layer) & (features.index == feature) & (features.position == position)
    return float(features.activation[hit].sum())


def token_changes(lm: LoadedModel, clean_logits: torch.Tensor, logits: torch.Tensor, k: int = 10) -> list[TokenChange]:
    """The union of the ``k`` most likely tokens before and after (logits [V] each), most likely after first."""
    cap = lm.architecture.softcapped
    clean_probs, probs = (torch.softmax(cap(lm.config, x), -1) for x in (clean_logits, logits))
    ids = dict.fromkeys(torch.cat([probs.topk(k).indices, clean_probs.topk(k).indices]).tolist())
    rows = [TokenChange(lm.tokenizer.decode([i]), i, float(clean_logits[i]), float(logits[i]), float(clean_probs[i]),
                        float(probs[i]), float(logits[i] - clean_logits[i])) for i in ids]
    return sorted(rows, key=lambda row: -row.probability)


def intervene(lm: LoadedModel, dicts: DictionarySet, prompt: str | torch.Tensor,
              interventions: Sequence[FeatureIntervention], settings: InterventionSettings | None = None, *,
              chat: bool = False, position: int = -1, top_k: int = 10) -> InterventionResult:
    """Run ``prompt`` (text, or token ids [P]) with ``interventions`` applied and return the new logits and
    feature activations beside the clean ones; ``top_changes`` describes the next-token logits at ``position``."""
    settings = settings or InterventionSettings()
    tokens = tokenize_prompt(lm, prompt, chat)
    ids, constant = tokens.ids, tokens.constant
    P = len(ids)
    if not -P <= position < P:
        raise CircuitscopeError(f"position {position} is outside the prompt's {P} tokens; pass 0..{P - 1}")
    resolved = resolve_interventions(interventions, dicts, P, constant)
    state = prepare_clean_state(lm, dicts, ids, constant)
    run = run_replacement(lm, dicts, state, resolved, settings)
    logits = unembed(lm, run.final_hidden)
    clean_logits = unembed(lm, state.clean.final_hidden)
    position %= P
    return InterventionResult(
        input_ids=state.input_ids, constant=state.constant,
        tokens=[lm.tokenizer.decode([i]) for i in state.input_ids.tolist()],
        interventions=resolved, settings=settings, logits=logits, clean_logits=clean_logits, features=run.features,
        clean_features=state.replacement.features, position=position,
        top_changes=token_changes(lm, clean_logits[position], logits[position], top_k),
    )
