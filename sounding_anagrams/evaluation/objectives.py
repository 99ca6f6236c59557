"""Score records and the objectives a search optimises, defined by name from the record.

A score record is a flat ``{name: value}`` mapping with stable names:

    clip/view0 .. clip/view{V-1}   CLIP score of what view i shows against image prompt i
    clip/alignment                 min over views (Visual Anagrams' alignment)
    clip/concealment               mean diagonal of the row/column softmax of S / tau
    clap/audio0 .. clap/audio{A-1} CLAP score of sound a against audio prompt a, clamped at 0
    clap/alignment, clap/concealment   with two or more audio prompts

Every metric declares its direction (all of these: higher is better). An objective is a metric name or a small
expression over names: ``min(clip/alignment, clap/audio0)``, ``mean(...)``, or a weighted sum
``0.7 * clip/alignment + 0.3 * clap/audio0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from sounding_anagrams.errors import ConfigError, unknown_name_message

MAXIMIZE: Literal["maximize"] = "maximize"
MINIMIZE: Literal["minimize"] = "minimize"
_AGGREGATES = ("min", "mean", "max")
_NAME = r"[A-Za-z_][\w/.-]*"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def metric_names(num_views: int, num_audio_prompts: int) -> list[str]:
    """Every metric a candidate with these counts publishes (what objectives may name)."""
    names = [f"clip/view{i}" for i in range(num_views)] + ["clip/alignment"]
    if num_views > 1:
        names.append("clip/concealment")
    names += [f"clap/audio{a}" for a in range(num_audio_prompts)]
    if num_audio_prompts > 1:
        names += ["clap/alignment", "clap/concealment"]
    return names


def metric_direction(name: str) -> str:
    """All published scores are similarities or softmax masses: higher is better."""
    return MAXIMIZE


@dataclass(frozen=True)
class Objective:
    """A scalar computed from a score record: ``aggregate`` of ``terms`` or the weighted sum of them."""

    spec: str
    aggregate: str  # "sum" (weighted sum, a single metric is a sum of one), "min", "mean" or "max"
    terms: tuple[tuple[str, float], ...]
    direction: str = MAXIMIZE

    @property
    def metrics(self) -> list[str]:
        return [name for name, _ in self.terms]

    def check(self, available: Iterable[str], *, field: str = "objectives") -> None:
        """Every metric named must be one the scorers publish for this study."""
        names = list(available)
        for metric in self.metrics:
            if metric not in names:
                raise ConfigError(field, self.spec, unknown_name_message("metric", metric, names))

    def value(self, record: Mapping[str, float]) -> float:
        """The objective on one record; NaN when a metric is missing or not finite (the trial then fails)."""
        values = []
        for name, weight in self.terms:
            value = record.get(name)
            if value is None or not math.isfinite(value):
                return math.nan
            values.append(weight * value)
        if self.aggregate == "sum":
            return math.fsum(values)
        if self.aggregate == "min":
            return min(values)
        if self.aggregate == "max":
            return max(values)
        return math.fsum(values) / len(values)


def parse_objective(spec: str, *, field: str = "objectives") -> Objective:
    """``"clip/alignment"``, ``"min(a, b)"``, ``"mean(a, b)"``, ``"max(a, b)"`` or ``"0.7*a + 0.3*b"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(field, spec, "an objective is a metric name or an expression such as min(a, b)")
    text = spec.strip()
    call = re.fullmatch(r"(\w+)\s*\((.*)\)", text)
    if call:
        aggregate, inner = call.group(1), call.group(2)
        if aggregate not in _AGGREGATES:
            raise ConfigError(field, spec, unknown_name_message("aggregate", aggregate, _AGGREGATES))
        names = [part.strip() for part in inner.split(",")]
        for name in names:
            if not re.fullmatch(_NAME, name):
                raise ConfigError(
                    field, spec, f"{aggregate}(...) takes metric names separated by commas, got {name!r}"
                )
        return Objective(text, aggregate, tuple((name, 1.0) for name in names))
    terms = []
    for part in re.split(r"\s*\+\s*", text):
        term = re.fullmatch(rf"(?:({_NUMBER})\s*\*\s*)?({_NAME})", part.strip())
        if not term:
            raise ConfigError(
                field,
                spec,
                f"cannot read {part!r}: write a metric name, 'w * name' terms joined by '+', or min(...)",
            )
        terms.append((term.group(2), float(term.group(1)) if term.group(1) else 1.0))
    return Objective(text, "sum", tuple(terms))


def parse_objectives(specs: str | Sequence[str], *, field: str = "objectives") -> list[Objective]:
    """One objective (single-objective search) or several (multi-objective); names must differ."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ConfigError(field, list(specs), "give at least one objective")
    objectives = [parse_objective(spec, field=field) for spec in specs]
    seen = [o.spec for o in objectives]
    if len(set(seen)) != len(seen):
        raise ConfigError(field, seen, "objectives must differ")
    return objectives
