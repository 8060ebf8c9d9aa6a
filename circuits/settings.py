"""Typed settings of one trace, validated at the edge (CLI and API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TraceSettings(BaseModel):
    """What to attribute and how.

    Logit targets: by default the most likely next tokens until their cumulative probability reaches
    ``logit_prob``, at most ``max_logits``; or the tokens named in ``targets``; or the difference of two
    tokens' logits (``logit_diff``). ``position`` is the token position whose next-token logits are
    attributed (default: the last; negative counts from the end).
    """

    model_config = ConfigDict(extra="forbid")

    max_logits: int = Field(default=10, ge=1)
    logit_prob: float = Field(default=0.95, gt=0.0, le=1.0)
    targets: list[str] | None = None
    logit_diff: tuple[str, str] | None = None
    position: int | None = None
    max_features: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=64, ge=1)
    node_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    edge_threshold: float = Field(default=0.98, gt=0.0, le=1.0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    chat: bool = False
    # the precision feature rows are computed and stored in (kept edges are recomputed in float32 either way); auto:
    # float32, unless only bfloat16 fits or float32 would take over a minute and bfloat16 is 1.5x faster here
    adjacency: Literal["auto", "float32", "bfloat16"] = "auto"
    memory_limit: int | None = Field(default=None, ge=1)  # bytes the whole trace may use (None: what is free)
    keep_unpruned: bool = False  # also keep what pruning removed (AttributionGraph.unpruned); big graphs get big

    @model_validator(mode="after")
    def _one_kind_of_target(self) -> TraceSettings:
        if self.targets is not None and self.logit_diff is not None:
            raise ValueError("name target tokens or a logit difference, not both")
        if self.targets is not None and not self.targets:
            raise ValueError("targets is empty")
        if self.targets is not None and len(set(self.targets)) != len(self.targets):
            raise ValueError("a target token is named twice")
        return self
