"""Features named on the command line: ``L:F`` (layer, index), with ``=VALUE`` and ``@POS`` where a command
takes them. One grammar for every option that names a feature (``intervene --ablate/--set/--scale``,
``query ... search --feature``); bad input ends in a CircuitscopeError naming the expected form."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Literal, NamedTuple

from dictionaries.errors import CircuitscopeError

if TYPE_CHECKING:  # imported when used: `circuitscope --help` must not pay for torch
    from circuits.interventions.feature_interventions import FeatureIntervention

SpecKind = Literal["ablate", "set", "scale"]

_SPEC = re.compile(r"^\s*(?P<layer>[+-]?\d+)\s*:\s*(?P<feature>[+-]?\d+)\s*(?:=\s*(?P<value>[^@\s]+)\s*)?"
                   r"(?:@\s*(?P<position>[+-]?\d+)\s*)?$")
_FORMS = {"ablate": ("L:F[@POS]", "3:117@5"), "set": ("L:F=VALUE[@POS]", "3:117=20@5"),
          "scale": ("L:F=FACTOR[@POS]", "3:117=0.5")}


class FeatureSpec(NamedTuple):
    """``L:F[=VALUE][@POS]`` read apart; ``value`` is the text after ``=``, None when there is none."""

    layer: int
    feature: int
    value: str | None
    position: int | None


def read_feature_spec(spec: str) -> FeatureSpec | None:
    """``spec`` read apart, or None when it is not of the form ``L:F[=VALUE][@POS]``."""
    match = _SPEC.match(spec)
    if match is None:
        return None
    position = None if match["position"] is None else int(match["position"])
    return FeatureSpec(int(match["layer"]), int(match["feature"]), match["value"], position)


def parse_intervention(spec: str, kind: SpecKind) -> FeatureIntervention:
    """Read ``"L:F[@POS]"`` (``kind="ablate"``), ``"L:F=VALUE[@POS]"`` (``"set"``) or ``"L:F=FACTOR[@POS]"``
    (``"scale"``); POS may be negative (from the end of the prompt) and is every position when left out.
    Raises CircuitscopeError naming the expected form. Ranges are checked by ``resolve_interventions``."""
    from circuits.interventions.feature_interventions import FeatureIntervention

    form, example = _FORMS[kind]
    read = read_feature_spec(spec)
    if read is None or (read.value is None) != (kind == "ablate"):
        raise CircuitscopeError(f"cannot read {kind} {spec!r}: write {form}, e.g. {example}")
    if read.layer < 0 or read.feature < 0:
        raise CircuitscopeError(f"{kind} {spec!r}: layers and features are numbered from 0")
    value = 0.0
    if kind != "ablate":
        try:
            value = float(read.value)
        except ValueError:
            raise CircuitscopeError(f"{kind} {spec!r}: {read.value!r} is not a number; write {form}") from None
        if not math.isfinite(value):
            raise CircuitscopeError(f"{kind} {spec!r}: the value must be a finite number")
    return FeatureIntervention(layer=read.layer, feature=read.feature, position=read.position,
                               mode="scale" if kind == "scale" else "set", value=value)


def parse_feature_search(spec: str, option: str = "--feature") -> int | str:
    """A feature index ``"17"`` (any layer) -> 17, or a feature key ``"3:17"`` -> ``"3:17"`` (the form of graph
    nodes' ``feature_key``); CircuitscopeError naming ``option`` for anything else."""
    if spec.strip().isdigit():
        return int(spec)
    read = read_feature_spec(spec)
    if read is None or read.value is not None or read.position is not None or min(read.layer, read.feature) < 0:
        raise CircuitscopeError(f"{option} {spec!r}: give an index such as 17 or a key such as 3:17")
    return f"{read.layer}:{read.feature}"
