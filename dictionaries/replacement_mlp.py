"""The replacement MLP, written once: what each layer's MLP outputs when the dictionaries stand in for it.

At a position that is not constant, layer t's MLP output in the replacement model is

    y_t = sum over features (s, i) active at that position, s <= t, of a_(s,i) * W_dec[s -> t][i]
          + b_dec_t + x_t @ W_skip_t + e_t

with x_t the layer's transcoder input (the skip path, when the set has one) and e_t the error: the true MLP
output minus the rest on the clean run, which makes the replacement exact there (left out, y_t is the
dictionaries' own reconstruction). At constant positions (BOS, chat-template tokens) y_t is the clean MLP output.
The engine's replacement state, the frozen model, feature interventions and the dictionaries' evaluation all
compute y_t through :class:`ReplacementMlp`; ``DictionarySet.layer_output`` adds b_dec and the skip path.

Decoder rows are read only for active features, so a memory-mapped decoder is never read whole. Shapes:
``...`` = leading batch dimensions (none for a single prompt), P = positions, d = d_model.
"""

from __future__ import annotations

import torch

from .dictionary_set import DictionarySet


def decoder_rows(dicts: DictionarySet, source: int, target: int, index: torch.Tensor, activation: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``activation[k] * W_dec[source -> target][index[k]]`` [m, d] (index, activation [m]), on
    ``activation``'s device in ``dtype`` (rounded to the set's dtype first); only these m rows of the decoder are
    read and converted."""
    weight = dicts.decoder_weight(source, target)
    rows = dicts.computed(source, weight[index.to(weight.device)]).to(device=activation.device, dtype=dtype)
    return rows * activation.to(dtype)[:, None]


class ReplacementMlp:
    """Running sums of decoder writes into every layer (``writes[t]`` [..., P, d]) and the formula above.

    Feed it the features of each source layer (:meth:`write` for sparse features, :meth:`write_dense` for dense
    activations, :meth:`add` for rows computed elsewhere) before asking for a target layer's :meth:`output`.
    ``constant`` [P] bool marks constant positions (None: none)."""

    def __init__(self, dicts: DictionarySet, shape: tuple[int, ...], device: torch.device | str,
                 constant: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        self.dicts = dicts
        self.dtype = dtype
        # positions held at the clean output; None when there are none (decided once, not per layer)
        self.constant = None if constant is None or not bool(constant.any()) else constant.to(device)
        self.writes = [torch.zeros(*shape, dicts.d_model, device=device, dtype=dtype) for _ in range(dicts.n_layers)]

    def add(self, target: int, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Add decoder rows [m, d] at ``positions`` [m] (single prompt: ``writes[t]`` is [P, d]) into ``target``."""
        self.writes[target].index_add_(0, positions.to(rows.device), rows.to(self.dtype))

    def write(self, source: int, positions: torch.Tensor, index: torch.Tensor,
              activation: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Write the active features (``index`` [m] at ``positions`` [m] with ``activation`` [m]) of layer
        ``source`` into every layer they decode to; returns the (target, rows [m, d]) written."""
        written = []
        for target in self.dicts.decoder_targets(source):
            rows = decoder_rows(self.dicts, source, target, index, activation.to(self.writes[target].device),
                                self.dtype)
            self.add(target, positions, rows)
            written.append((target, rows))
        return written

    def write_dense(self, source: int, features: torch.Tensor) -> None:
        """Write dense activations ``features`` [..., P, d_sae] of layer ``source`` (reads whole decoders)."""
        for target in self.dicts.decoder_targets(source):
            weight = self.dicts.decoder_weight(source, target)
            self.writes[target] += self.dicts.project(source, features, weight).to(self.dtype)

    def output(self, layer: int, x: torch.Tensor | None, error: torch.Tensor | None = None,
               clean: torch.Tensor | None = None) -> torch.Tensor:
        """y_t [..., P, d] for ``layer`` given its transcoder input x [..., P, d], the error e_t [..., P, d] (None:
        none) and the clean MLP output [..., P, d] used at constant positions (needed when there are any)."""
        out = self.dicts.layer_output(layer, self.writes[layer], x)
        if error is not None:
            out = out + error.to(device=out.device, dtype=out.dtype)
        if self.constant is None:
            return out
        if clean is None:
            raise ValueError("the output at constant positions is the clean MLP output: pass clean=")
        return torch.where(self.constant[:, None], clean.to(device=out.device, dtype=out.dtype), out)
