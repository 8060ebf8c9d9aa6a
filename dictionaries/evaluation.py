"""How good a dictionary set is on held-out text: per-layer FVU, L0 and dead features, and what splicing
every layer's dictionary into the model at once does to next-token cross-entropy and KL.

Every number leaves out position 0 (BOS) of each context. With contexts [C, S]:

- ``fvu`` of a layer: :mod:`dictionaries.training.losses` (sum ||y - y_hat||^2 / sum ||y - mean y||^2
  over the C * (S - 1) tokens), features computed from the clean model's transcoder inputs; the total
  pools numerators and denominators over layers.
- ``l0`` of a layer: mean number of non-zero features per token; the total sums over layers (features
  active per token in the whole model).
- ``dead_fraction`` of a layer: share of its features that are zero on every token; the total is over
  all features.
- ``ce_clean`` / ``ce_spliced``: mean of -log p(token[p + 1] | ...) over positions p = 1..S-2, for the
  clean model and for the model whose MLP outputs at every covered layer are replaced, all at once, by
  the dictionaries' outputs (a CLT's layer-t output sums the features of layers s <= t, each computed
  from the spliced model's own input at s). Position 0 keeps its true MLP output. ``delta_ce`` =
  ce_spliced - ce_clean.
- ``kl``: mean over positions p = 1..S-1 of KL(p_clean || p_spliced) of the next-token distributions, nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from .dictionary_set import DictionarySet
from .errors import CircuitscopeError, DictionaryMismatchError
from .models.hook_sites import MlpReplacement, record_mlp_io, replace_mlp_outputs
from .models.loading import LoadedModel
from .replacement_mlp import ReplacementMlp
from .training.losses import FvuSums


class LayerEvaluation(BaseModel):
    layer: int
    fvu: float
    l0: float
    dead_fraction: float


class TotalEvaluation(BaseModel):
    fvu: float
    l0: float
    dead_fraction: float


class EvaluationReport(BaseModel):
    model: str
    data: str
    contexts: int
    tokens: int
    layers: list[LayerEvaluation]
    total: TotalEvaluation
    ce_clean: float
    ce_spliced: float
    delta_ce: float
    kl: float


def dictionary_layers(dicts: DictionarySet, lm: LoadedModel) -> list[int]:
    """The model layer of each dictionary layer: ``metadata["layers"]`` of a partial set, else all layers."""
    named = dicts.config.metadata.get("layers")
    if not named:
        dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
        return list(range(dicts.n_layers))
    layers = [int(v) for v in str(named).split(",")]
    if len(layers) != dicts.n_layers or any(not 0 <= layer < lm.n_layers for layer in layers):
        raise DictionaryMismatchError(
            f"the dictionaries cover layers {layers} but {lm.name} has layers 0..{lm.n_layers - 1}; "
            "evaluate them with the model they were trained on (--model)"
        )
    dicts.check_fits(dicts.n_layers, lm.d_model, lm.name)  # d_model only
    return layers


def splice(dicts: DictionarySet, layers: list[int]) -> MlpReplacement:
    """A fresh :func:`replace_mlp_outputs` function for one forward pass: each covered layer's MLP output becomes
    the replacement formula of :mod:`dictionaries.replacement_mlp` without errors (the dictionaries' own output,
    from the spliced model's own layer inputs), computed in the dictionaries' dtype; position 0 keeps the true
    MLP output."""
    index = {layer: i for i, layer in enumerate(layers)}
    mlp: ReplacementMlp | None = None

    def replace(layer: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal mlp
        if mlp is None:
            constant = torch.zeros(x.shape[1], dtype=torch.bool)
            constant[0] = True
            mlp = ReplacementMlp(dicts, tuple(x.shape[:-1]), x.device, constant, dtype=dicts.dtype)
        i = index[layer]
        mlp.write_dense(i, dicts.encode(i, x))
        return mlp.output(i, x, clean=y)

    return replace


@torch.no_grad()
def evaluate(dicts: DictionarySet, lm: LoadedModel, contexts: torch.Tensor, *, batch_size: int = 2,
             data: str = "", progress: bool = False) -> EvaluationReport:
    """Evaluate ``dicts`` on ``contexts`` [C, S] (BOS at position 0); see the module docstring."""
    layers = dictionary_layers(dicts, lm)
    n = len(layers)
    fvu_sums = FvuSums.zeros(n, lm.d_model)
    active = torch.zeros(n, dtype=torch.float64)
    fired = [torch.zeros(w, dtype=torch.bool) for w in dicts.widths]
    ce = torch.zeros(2, dtype=torch.float64)  # summed -log p: clean, spliced
    kl = torch.zeros((), dtype=torch.float64)
    n_ce = n_kl = 0
    for ids in tqdm(contexts.split(batch_size), desc="evaluating", disable=not progress):
        rec = record_mlp_io(lm, ids, with_logits=True)
        inputs = [rec.inputs[layer][:, 1:] for layer in layers]
        feats, outputs = dicts(inputs)
        fvu_sums.add(torch.stack([rec.outputs[layer][:, 1:].reshape(-1, lm.d_model) for layer in layers]),
                     torch.stack([out.reshape(-1, lm.d_model) for out in outputs]))
        for i in range(n):
            nonzero = feats[i] != 0
            active[i] += nonzero.sum()
            fired[i] |= nonzero.reshape(-1, nonzero.shape[-1]).any(0)
        with replace_mlp_outputs(lm, splice(dicts, layers), layers=layers):
            spliced_logits = lm.model(input_ids=ids.to(lm.device), use_cache=False).logits
        for b in range(ids.shape[0]):  # one context at a time: [S, V] log-probabilities are large
            clean = torch.log_softmax(rec.logits[b, 1:].double(), -1)
            spliced = torch.log_softmax(spliced_logits[b, 1:].double(), -1)
            targets = ids[b, 2:].to(clean.device)
            ce[0] -= clean[:-1].gather(-1, targets[:, None]).sum()
            ce[1] -= spliced[:-1].gather(-1, targets[:, None]).sum()
            kl += (clean.exp() * (clean - spliced)).sum()
            n_ce, n_kl = n_ce + targets.numel(), n_kl + clean.shape[0]
    n_tokens = fvu_sums.n
    per_layer = fvu_sums.per_layer()
    report_layers = [
        LayerEvaluation(layer=layer, fvu=float(per_layer[i]), l0=float(active[i] / n_tokens),
                        dead_fraction=float((~fired[i]).double().mean()))
        for i, layer in enumerate(layers)
    ]
    dead_total = sum(int((~f).sum()) for f in fired) / sum(dicts.widths)
    ce_clean, ce_spliced = (ce / max(n_ce, 1)).tolist()
    return EvaluationReport(
        model=lm.name, data=data, contexts=int(contexts.shape[0]), tokens=n_tokens, layers=report_layers,
        total=TotalEvaluation(fvu=fvu_sums.total(), l0=float(active.sum() / n_tokens), dead_fraction=dead_total),
        ce_clean=ce_clean, ce_spliced=ce_spliced, delta_ce=ce_spliced - ce_clean, kl=float(kl / max(n_kl, 1)),
    )


def format_report(report: EvaluationReport) -> str:
    """The per-layer table and the totals, as text."""
    lines = [f"{'layer':>5}  {'fvu':>8}  {'l0':>8}  {'dead':>6}"]
    lines += [f"{r.layer:>5}  {r.fvu:>8.4f}  {r.l0:>8.1f}  {r.dead_fraction:>6.3f}" for r in report.layers]
    t = report.total
    lines.append(f"{'total':>5}  {t.fvu:>8.4f}  {t.l0:>8.1f}  {t.dead_fraction:>6.3f}")
    lines.append(f"cross-entropy {report.ce_clean:.4f} clean, {report.ce_spliced:.4f} spliced "
                 f"(change {report.delta_ce:+.4f}); KL {report.kl:.4f} nats; {report.tokens} tokens of {report.data}")
    return "\n".join(lines)


def held_out_contexts(dicts: DictionarySet, lm: LoadedModel, data: str | None, tokens: int,
                      context_length: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, str]:
    """(contexts [C, S], data label) of the held-out split: by default of the data the set was trained on
    (its ``metadata``), else of text sampled from the model; enough contexts for ``tokens`` tokens."""
    corpus = corpus_contexts(dicts, lm, data, tokens, "heldout", context_length, seed)
    return corpus.contexts, corpus.data


@dataclass(frozen=True)
class Corpus:
    """``contexts`` [C, S] (BOS at position 0) of ``split`` of ``data``, packed with ``seed``."""

    contexts: torch.Tensor
    data: str
    split: str
    context_length: int
    seed: int


def corpus_contexts(dicts: DictionarySet, lm: LoadedModel, data: str | None, tokens: int, split: str,
                    context_length: int | None = None, seed: int | None = None) -> Corpus:
    """Enough contexts of ``split`` for ``tokens`` non-BOS tokens: by default of the data the set was trained
    on (``metadata["data"]``, when it exists locally), else of text sampled from the model. Context length
    and seed default to the training run's (``metadata``), else 128 and 0."""
    from .training.data import open_context_source, parse_data_spec

    meta = dicts.config.metadata
    if data is None:
        data = str(meta.get("data") or "model")
        try:
            parse_data_spec(data)
        except CircuitscopeError:  # the training text is not on this machine
            data = "model"
    length = int(context_length or meta.get("context_length") or 128)
    seed = int(seed if seed is not None else meta.get("seed") or 0)
    source = open_context_source(parse_data_spec(data), lm, length, split, seed)  # type: ignore[arg-type]
    count = max(1, -(-tokens // (length - 1)))
    return Corpus(source.contexts(0, count), data, split, length, seed)
