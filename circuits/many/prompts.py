"""The prompts file of ``trace-many``: one JSON object per line, validated whole before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from dictionaries.errors import CircuitscopeError


class PromptSpec(BaseModel):
    """One line: ``prompt`` (required) and what overrides the shared trace options for it. ``id`` defaults to
    ``prompt-NNNN`` (its line's 1-based number); ``group`` is any label used by ``aggregate --compare``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    id: str | None = None
    target: str | list[str] | None = None
    logit_diff: tuple[str, str] | None = None
    position: int | None = None
    chat: bool | None = None
    group: str | None = None

    @property
    def targets(self) -> list[str] | None:
        return [self.target] if isinstance(self.target, str) else self.target

    @property
    def graph_name(self) -> str:
        """The graph file's name in the output folder's ``graphs/``."""
        return f"{self.id}.safetensors"


_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """Every line of ``path`` as a :class:`PromptSpec` (blank lines skipped); the first bad line is named."""
    path = Path(path)
    if not path.is_file():
        raise CircuitscopeError(f"{path}: no such prompts file")
    specs: list[PromptSpec] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            spec = PromptSpec.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CircuitscopeError(f"{where}: not JSON ({exc.msg})") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(map(str, first["loc"])) or "line"
            raise CircuitscopeError(f"{where}: {field}: {first['msg']}") from None
        if not spec.prompt.strip():
            raise CircuitscopeError(f"{where}: the prompt is empty")
        if spec.target is not None and spec.logit_diff is not None:
            raise CircuitscopeError(f"{where}: give target or logit_diff, not both")
        if spec.id is None:
            spec = spec.model_copy(update={"id": f"prompt-{number:04d}"})
        elif not _SAFE_ID.match(spec.id):
            raise CircuitscopeError(f"{where}: id {spec.id!r} must be letters, digits, '.', '_' or '-' "
                                    "(it names the graph file)")
        if spec.id in seen:
            raise CircuitscopeError(f"{where}: id {spec.id!r} already used on line {seen[spec.id]}")
        seen[spec.id] = number
        specs.append(spec)
    if not specs:
        raise CircuitscopeError(f"{path}: no prompts")
    return specs
