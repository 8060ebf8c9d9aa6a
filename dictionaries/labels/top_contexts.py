"""Per-feature statistics of one dictionary layer, accumulated over batches of contexts.

:class:`TopContexts` keeps, for each of F features, the n contexts with the largest maximum activation
(one entry per context, at its first maximum) with a window of activations around that maximum, and the
counts behind the activation frequency. Batches are merged with a stable sort over the running entries
followed by the batch's candidates (in context order), so ties go to the earlier context and the result
does not depend on how the contexts were batched.
"""

from __future__ import annotations

import torch

from .format import AnnotationSettings


class TopContexts:
    """Running statistics; shapes as in :mod:`dictionaries.labels.format` (F features, n slots, W window)."""

    def __init__(self, width: int, settings: AnnotationSettings):
        n, w = settings.contexts_per_feature, settings.window
        self.before, self.after = settings.before, settings.after
        self.max_act = torch.zeros(width, n)
        self.context = torch.full((width, n), -1, dtype=torch.long)
        self.position = torch.full((width, n), -1, dtype=torch.long)
        self.window_acts = torch.zeros(width, n, w)
        self.active = torch.zeros(width, dtype=torch.long)
        self.active_sum = torch.zeros(width, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def update(self, acts: torch.Tensor, first_context: int) -> None:
        """Add contexts ``first_context ...`` whose activations are ``acts`` [B, T, F] (>= 0; position 0 is
        BOS and is ignored)."""
        acts = acts.detach().float().cpu()
        batch, length, _ = acts.shape
        body = acts[:, 1:]
        self.active += (body > 0).sum((0, 1))
        self.active_sum += body.sum((0, 1), dtype=torch.float64)
        self.tokens += batch * (length - 1)
        best, where = body.max(dim=1)  # [B, F]; the first maximum of each context
        position = where + 1
        offsets = torch.arange(-self.before, self.after + 1)
        index = position[:, :, None] + offsets  # [B, F, W]
        inside = (index >= 1) & (index < length)
        window = acts.transpose(1, 2).gather(2, index.clamp(0, length - 1)) * inside  # [B, F, W]
        contexts = torch.arange(first_context, first_context + batch).expand(best.shape[1], batch)
        self._merge(best.T, contexts, position.T, window.transpose(0, 1))

    def _merge(
        self, values: torch.Tensor, contexts: torch.Tensor, positions: torch.Tensor, windows: torch.Tensor
    ) -> None:
        """Candidates values/contexts/positions [F, B], windows [F, B, W] -> the best n per feature."""
        n = self.max_act.shape[1]
        all_values = torch.cat([self.max_act, values], dim=1)
        order = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, :n]
        self.max_act = all_values.gather(1, order)
        self.context = torch.cat([self.context, contexts], dim=1).gather(1, order)
        self.position = torch.cat([self.position, positions], dim=1).gather(1, order)
        all_windows = torch.cat([self.window_acts, windows], dim=1)
        self.window_acts = all_windows.gather(1, order[:, :, None].expand(-1, -1, all_windows.shape[2]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics in the stored layout (``context``/``position`` -1 where the slot is empty)."""
        empty = self.max_act <= 0
        frequency = self.active.double() / max(self.tokens, 1)
        mean_active = torch.where(self.active > 0, self.active_sum / self.active.clamp(min=1), 0.0)
        return {
            "context": self.context.masked_fill(empty, -1).int(),
            "position": self.position.masked_fill(empty, -1).int(),
            "max_act": self.max_act.masked_fill(empty, 0.0),
            "window_acts": quantize_window(self.window_acts, self.max_act),
            "frequency": frequency.float(),
            "mean_active": mean_active.float(),
        }


def quantize_window(window: torch.Tensor, max_act: torch.Tensor) -> torch.Tensor:
    """window [F, n, W] (each value in [0, max_act]) -> uint8 round(255 * window / max_act) (0 where max_act is 0)."""
    scale = torch.where(max_act > 0, 255.0 / max_act.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return (window * scale[:, :, None]).round().clamp(0, 255).to(torch.uint8)


def dequantize_window(window: torch.Tensor, max_act: torch.Tensor) -> torch.Tensor:
    """The stored uint8 windows [..., W] back to activations: window / 255 * max_act [...]."""
    return window.float() / 255.0 * max_act.float()[..., None]
