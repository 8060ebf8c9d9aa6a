"""Attribution: from a prompt, a model and a dictionary set to the adjacency of the attribution graph.

Steps: one clean forward pass (:mod:`circuits.engine.clean_run`), the replacement model's features and errors
(:mod:`circuits.engine.replacement`), the node numbering (:mod:`circuits.engine.node_layout`), then adjacency rows for
the logit targets and the features (:mod:`circuits.engine.edge_rows`). With a feature budget, features are
expanded in order of their current influence on the logits (recomputed after every batch); the rest
keep their outgoing edges but get no rows, and the graph folds them into remainder nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dictionaries.dictionary_set import DictionarySet
from dictionaries.errors import CircuitscopeError
from dictionaries.models.loading import LoadedModel
from dictionaries.models.tokenization import tokenize_prompt

from ..settings import TraceSettings
from .clean_run import CleanRun, record_clean_run
from .edge_rows import EdgeRowComputer, RowBlock
from .heap import return_freed_memory
from .influence import node_influence
from .linear_backward import FrozenLinearBackward
from .node_layout import NodeLayout, build_layout
from .plan import (
    STORAGE_DTYPES,
    Calibration,
    TraceDoesNotFit,
    TracePlan,
    bfloat16_speedup,
    check_forward_fits,
    make_plan,
    measure_bandwidth,
)
from .replacement import ActiveFeatures, Replacement, build_replacement
from .targets import LogitTargets, select_logit_targets


@dataclass
class Attribution:
    """Everything one attribution computed. Rows of the adjacency are indexed by target number: active
    feature k is row k, logit target j is row n_features + j (see ``layout.target_nodes``)."""

    prompt: str
    input_ids: torch.Tensor  # [P]
    tokens: list[str]
    position: int
    clean: CleanRun
    replacement: Replacement
    layout: NodeLayout
    logits: LogitTargets
    blocks: list[RowBlock]
    expanded: torch.Tensor  # [n_features] bool: features whose rows were computed
    settings: TraceSettings
    timings: dict[str, float] = field(default_factory=dict)
    plan: TracePlan | None = None  # what was estimated before the rows were computed
    rows: EdgeRowComputer | None = None  # computes rows again (exact edges when the stored rows are rounded)

    @property
    def n_features(self) -> int:
        return len(self.replacement.features)

    @property
    def rounded(self) -> bool:
        """Whether the stored rows are rounded (bfloat16); see :mod:`circuits.engine.exact_edges`."""
        return bool(self.blocks) and self.blocks[0].values.dtype != torch.float32

    def recompute_rows(self, row_ids: torch.Tensor) -> list[RowBlock]:
        """Rows ``row_ids`` [k] (feature k, or n_features + logit target j) computed again, in float32."""
        if self.rows is None:
            raise ValueError("this attribution kept no row computer")
        device = self.logits.directions.device
        row_ids = row_ids.to(device)
        features, logit_rows = row_ids[row_ids < self.n_features], row_ids[row_ids >= self.n_features]
        blocks = self.rows.feature_rows(features) if len(features) else []
        if len(logit_rows):
            directions = self.logits.directions.to(device)[logit_rows - self.n_features]
            blocks.append(self.rows.logit_rows(directions, self.position, logit_rows))
        return blocks


class EncoderVectors:
    """``vectors[ids]`` -> [k, d] float32: the encoder direction W_enc[:, i] of active features ``ids``, read from
    the dictionaries when asked (only the rows being computed), not kept for every active feature."""

    def __init__(self, dicts: DictionarySet, features: ActiveFeatures, device: torch.device):
        self.dicts, self.features, self.device = dicts, features, device

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(ids), self.dicts.d_model, device=self.device)
        layers = self.features.layer[ids]
        for layer in layers.unique().tolist():
            here = (layers == layer).nonzero().flatten()
            columns = self.dicts.encoder_columns(layer, self.features.index[ids[here]])
            out[here] = columns.T.float().to(self.device)
        return out


@dataclass
class _Prepared:
    """A prompt run forward and encoded, ready for its rows: everything before the plan."""

    input_ids: torch.Tensor
    position: int
    clean: CleanRun
    replacement: Replacement
    layout: NodeLayout
    logits: LogitTargets
    rows: EdgeRowComputer
    timings: dict[str, float]
    logit_rows: RowBlock | None = None  # float32, once computed (a budgeted plan ranks the features with them)

    def logit_block(self) -> RowBlock:
        """The logit targets' rows (float32), computed once."""
        if self.logit_rows is None:
            n_features = len(self.replacement.features)
            device = self.rows.embeddings.device
            self.logit_rows = self.rows.logit_rows(
                self.logits.directions.to(device), self.position,
                torch.arange(n_features, n_features + len(self.logits.labels), device=device))
        return self.logit_rows


def _prepare(lm: LoadedModel, dicts: DictionarySet, prompt: str, settings: TraceSettings) -> _Prepared:
    dicts.check_fits(lm.n_layers, lm.d_model, lm.name)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    tokenized = tokenize_prompt(lm, prompt, settings.chat)
    input_ids = tokenized.ids[None]
    n_positions = tokenized.n_positions
    position = settings.position if settings.position is not None else n_positions - 1
    if position < 0:
        position += n_positions
    if not 0 <= position < n_positions:
        raise CircuitscopeError(
            f"position {settings.position} is outside the prompt's {n_positions} tokens; pass 0..{n_positions - 1}"
        )
    device = lm.device
    n_heads = lm.architecture.heads(lm.config)[0]
    check_forward_fits(n_positions, lm.n_layers, n_heads, lm.d_model, device, settings.memory_limit)
    clean = record_clean_run(lm, input_ids)
    constant = tokenized.constant.to(device)
    replacement = build_replacement(clean, dicts, constant)
    features = replacement.features
    logits = select_logit_targets(lm, clean, position, settings)
    layout = build_layout(features, lm.n_layers, ~constant.cpu(), len(logits.labels), position)
    timings["forward"] = time.perf_counter() - start

    start = time.perf_counter()
    backward = FrozenLinearBackward(lm, clean, dicts, constant, device)
    encoders = EncoderVectors(dicts, features, device)
    rows = EdgeRowComputer(backward, layout, replacement, clean.embeddings.to(device), encoders)
    replacement.release_writes()  # the position groups hold the decoder writes now
    timings["setup"] = time.perf_counter() - start
    return _Prepared(input_ids, position, clean, replacement, layout, logits, rows, timings)


def prepare_attribution(lm: LoadedModel, dicts: DictionarySet, prompt: str,
                        settings: TraceSettings | None = None) -> _Prepared:
    """The state an attribution starts from (clean run, replacement, layout, logit targets, a row computer),
    without computing any row: what the attention queries (:mod:`circuits.attention`) rebuild from a graph."""
    return _prepare(lm, dicts, prompt, settings or TraceSettings())


_BANDWIDTH: dict[str, float] = {}
_PROBE_ROWS = 16  # rows in the plan's timed probe
# A probe that took under _PROBE_REPEAT_SECONDS is run again (at most _PROBE_REPEATS times in all) and the fastest
# run kept: a first run pays one-off costs (first touch of the dictionaries' pages and of the allocator's memory)
# that measured 1.5-4x a warm run on short prompts; a long probe is dominated by its arithmetic and runs once.
_PROBE_REPEATS = 3
_PROBE_REPEAT_SECONDS = 0.5


def _calibrate(prepared: _Prepared, batch: int, device: torch.device, dtype: torch.dtype) -> Calibration:
    """Time one batch of rows of the top layer's features carried in ``dtype`` (discarded) and a pass over memory
    (see plan.py)."""
    if str(device) not in _BANDWIDTH:
        _BANDWIDTH[str(device)] = measure_bandwidth(device)
    features = prepared.replacement.features
    if len(features) == 0:
        return Calibration(0.0, _BANDWIDTH[str(device)])
    top = int(features.layer.max())
    candidates = (features.layer == top).nonzero().flatten()  # sorted by position: spread over all of them
    probe = candidates[torch.linspace(0, len(candidates) - 1, min(batch, len(candidates))).round().long().unique()]
    span = int(features.position[probe].max()) + 1  # the positions the probe's gradient rows cover
    timed: list[float] = []
    while not timed or (len(timed) < _PROBE_REPEATS and sum(timed) < _PROBE_REPEAT_SECONDS):
        start = time.perf_counter()
        prepared.rows.feature_rows(probe, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append(time.perf_counter() - start)
    return Calibration(min(timed) / (len(probe) * (top + 1) * span), _BANDWIDTH[str(device)])


# "auto" rows: a trace whose float32 rows would take longer than this computes them in bfloat16 where a bfloat16
# matmul is at least BFLOAT16_MATMUL_GAIN times faster (measured, not assumed: CPUs without bfloat16 arithmetic are
# slower in it; with AVX-512 BF16 a matmul is ~3.7x and the rows ~2.2x faster)
FLOAT32_SECONDS_BEFORE_BFLOAT16 = 60.0
BFLOAT16_MATMUL_GAIN = 2.0
_SPEEDUP: dict[str, float] = {}


def _bfloat16_speedup(device: torch.device) -> float:
    if str(device) not in _SPEEDUP:
        _SPEEDUP[str(device)] = bfloat16_speedup(device)
    return _SPEEDUP[str(device)]


def _direct_ranking(prepared: _Prepared) -> torch.Tensor:
    """Feature ids [N] by their direct influence on the logits (from the logit rows): the order a budget starts
    expanding in, which the plan uses to predict the budgeted rows."""
    influence = node_influence([prepared.logit_block()], prepared.layout, prepared.logits.weights)
    return torch.argsort(influence[prepared.layout.feature_node.to(influence.device)], descending=True)


def _plan(lm: LoadedModel, prepared: _Prepared, settings: TraceSettings) -> TracePlan:
    """The plan; with ``settings.adjacency == "auto"`` it also chooses the rows' precision: float32 unless only
    bfloat16 fits, or float32 would take over a minute and bfloat16 matmuls are at least 2x faster here. With a
    budget, the logit rows are computed first and rank the features (see :func:`_direct_ranking`)."""
    start = time.perf_counter()
    device = lm.device
    features = prepared.replacement.features
    n_heads, _, head_dim = lm.architecture.heads(lm.config)
    probe_rows = min(settings.batch_size, _PROBE_ROWS)
    budgeted = settings.max_features is not None and settings.max_features < len(features)
    ranking = _direct_ranking(prepared) if budgeted else None

    calibrations: dict[torch.dtype, Calibration] = {}

    def calibrated(dtype: torch.dtype) -> Calibration:
        if dtype not in calibrations:
            calibrations[dtype] = _calibrate(prepared, probe_rows, device, dtype)
        return calibrations[dtype]

    def plan_for(storage: str) -> TracePlan:
        dtype = torch.bfloat16 if storage == "bfloat16" else torch.float32
        # rounded rows: the kept ones are recomputed in float32 after pruning, so that rate is timed too
        exact = calibrated(torch.float32) if storage == "bfloat16" else None
        return make_plan(prepared.layout, features.layer, features.position, len(prepared.logits.labels),
                         lm.d_model, n_heads * head_dim, settings.batch_size, settings.max_features, device,
                         calibrated(dtype), settings.memory_limit, storage=storage,
                         keep_unpruned=settings.keep_unpruned, ranking=ranking, exact_calibration=exact)

    plan = plan_for(settings.adjacency)
    if settings.adjacency == "auto" and (plan.storage == "bfloat16" or (
            plan.seconds > FLOAT32_SECONDS_BEFORE_BFLOAT16 and _bfloat16_speedup(device) >= BFLOAT16_MATMUL_GAIN)):
        plan = plan_for("bfloat16")  # timed in bfloat16
    prepared.timings["plan"] = time.perf_counter() - start
    return plan


def _window(available: int, done: int, batch_size: int) -> int:
    """How many ranked features are expanded before the next ranking: batches are added until the rows since the
    ranking reach a batch or a quarter of all expanded rows."""
    taken = 0
    while taken < available and (taken == 0 or taken < max(batch_size, (done + taken) // 4)):
        taken = min(taken + batch_size, available)
    return taken


def plan_attribution(
    lm: LoadedModel, dicts: DictionarySet, prompt: str, settings: TraceSettings | None = None
) -> TracePlan:
    """The plan of ``attribute(lm, dicts, prompt, settings)`` (see :mod:`circuits.engine.plan`): runs the forward
    pass, encodes, and times one batch of rows; computes no adjacency."""
    settings = settings or TraceSettings()
    return _plan(lm, _prepare(lm, dicts, prompt, settings), settings)


TRIM_EVERY = 8  # batches of rows between returns of freed heap memory (see circuits.engine.heap)


def attribute(
    lm: LoadedModel,
    dicts: DictionarySet,
    prompt: str,
    settings: TraceSettings | None = None,
    progress: bool = False,
) -> Attribution:
    """Compute the attribution adjacency for ``prompt`` (see the module docstring).

    The plan (:func:`plan_attribution`) is made first: a trace that would not fit in memory raises
    :class:`~circuits.engine.plan.TraceDoesNotFit` before any row is computed, and the batch size is the plan's."""
    settings = settings or TraceSettings()
    prepared = _prepare(lm, dicts, prompt, settings)
    plan = _plan(lm, prepared, settings)
    if not plan.fits:
        raise TraceDoesNotFit(plan.refusal())
    input_ids, position, replacement = prepared.input_ids, prepared.position, prepared.replacement
    layout, logits, rows, timings = prepared.layout, prepared.logits, prepared.rows, prepared.timings
    batch_size = plan.batch_size
    device = lm.device
    features = replacement.features
    start = time.perf_counter()
    n_features = len(features)
    storage = STORAGE_DTYPES[plan.storage]  # feature rows are computed in it too (logit rows: float32, they are few)

    def stored(new: list[RowBlock]) -> list[RowBlock]:
        return [RowBlock(b.rows, b.values.to(storage)) for b in new]

    blocks = stored([prepared.logit_block()])
    budget = n_features if settings.max_features is None else min(settings.max_features, n_features)
    expanded = torch.zeros(n_features, dtype=torch.bool, device=device)
    bar = tqdm(total=budget, desc="attribution", unit="feature", disable=not progress, leave=False)
    if budget == n_features:  # no budget: expand everything, in layer order
        for i, chosen in enumerate(torch.arange(n_features, device=device).split(batch_size)):
            blocks.extend(stored(rows.feature_rows(chosen, storage)))
            bar.update(len(chosen))
            if i % TRIM_EVERY == TRIM_EVERY - 1:
                return_freed_memory()
        expanded[:] = True
    else:
        done = 0
        while done < budget:
            # Re-rank by current influence on the logits whenever the rows added since the last ranking reach a
            # batch or a quarter of all expanded rows: O(log budget) sweeps instead of one per batch.
            influence = node_influence(blocks, layout, logits.weights.to(device))[layout.feature_node.to(device)]
            influence[expanded] = -1.0
            ranking = torch.argsort(influence, descending=True)[: budget - done]
            window = _window(len(ranking), done, batch_size)
            # the window is expanded before the next ranking whatever its order: batches of nearby positions
            # carry shorter gradient rows (a batch spans positions up to its latest target)
            chosen_window = ranking[:window]
            chosen_window = chosen_window[torch.argsort(features.position[chosen_window], stable=True)]
            for i, chosen in enumerate(chosen_window.split(batch_size)):
                blocks.extend(stored(rows.feature_rows(chosen, storage)))
                bar.update(len(chosen))
                if i % TRIM_EVERY == TRIM_EVERY - 1:
                    return_freed_memory()
            return_freed_memory()
            expanded[chosen_window] = True
            done += window
    bar.close()
    timings["attribution"] = time.perf_counter() - start + timings.pop("setup")
    tokens = [lm.tokenizer.decode([i]) for i in input_ids[0].tolist()]
    return Attribution(prompt, input_ids[0], tokens, position, prepared.clean, replacement, layout, logits, blocks,
                       expanded, settings, timings, plan, rows)

