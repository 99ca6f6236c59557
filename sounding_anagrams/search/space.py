"""The searched knobs of a study: their names (any per-candidate config field but the seed, and the two
balances), their ranges as a study file writes them (:class:`Distribution`) and as the search uses them
(:class:`ParamSpec`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, unknown_name_message
from sounding_anagrams.validation import StrictModel
from sounding_anagrams.viewspec import PERMUTATION

ParamType = Literal["float", "int", "categorical"]
BALANCE_PARAMS = ("view_balance", "audio_view_balance")
SEARCHABLE = (
    # Not the seed: each trial renders on seeds_per_trial seeds drawn from the study seed (render_seeds).
    tuple(name for name in RenderConfig.model_fields if name not in (*RenderConfig.SHARED_FIELDS, "seed"))
    + BALANCE_PARAMS
)


@dataclass(frozen=True)
class ParamSpec:
    """One searched knob: ``float``/``int`` over [low, high] (with ``log`` or ``step``) or ``categorical``."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def grid(self) -> list[Any]:
        """Values a grid search visits: the choices, or low..high by step."""
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None and self.step is not None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [round(v) for v in values] if self.type == "int" else values

    def extremes(self) -> list[Any]:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def allows(self, value: Any) -> bool:
        """Whether Optuna's distribution of this parameter holds ``value`` (for enqueued knob sets)."""
        if self.type == "categorical":
            return any(value == choice and type(value) is type(choice) for choice in self.choices) or (
                value in self.choices
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            return True
        offset = (value - self.low) / step
        return abs(offset - round(offset)) < 1e-6

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {list(self.choices)}"
        step = f" in steps of {self.step:g}" if self.step is not None else ""
        return f"{self.type} in [{self.low:g}, {self.high:g}]{step}"


FiniteNumber = Annotated[float | None, Field(allow_inf_nan=False)]


class Distribution(StrictModel):
    """The range of one searched knob: float or int over [low, high] (on a log scale, or by step), or
    categorical choices."""

    type: ParamType
    low: FiniteNumber = None
    high: FiniteNumber = None
    step: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = Field(
        default=None, description="float/int: the grid's step (a grid search needs one)."
    )
    log: bool = Field(default=False, description="float/int: sample on a log scale (low must be positive).")
    choices: list[Any] | None = Field(default=None, description="categorical: the values to choose from.")

    @model_validator(mode="after")
    def _check_range(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError("choices", self.choices, "give a non-empty list of values")
            return self
        if self.low is None or self.high is None:
            name = "low" if self.low is None else "high"
            raise ConfigError(name, None, "must be a finite number")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ConfigError("low", self.low, "int parameters need integer low and high")
        if not self.low < self.high:
            raise ConfigError("high", self.high, f"must be greater than low={self.low:g}")
        if self.log and self.low <= 0:
            raise ConfigError("low", self.low, "must be positive for a log scale")
        return self

    def spec(self, name: str) -> ParamSpec:
        if self.type == "categorical":
            return ParamSpec(name, self.type, choices=tuple(self.choices or ()))
        assert self.low is not None and self.high is not None
        cast: Callable[[float], float] = float if self.type == "float" else int
        return ParamSpec(name, self.type, cast(self.low), cast(self.high), self.step, self.log)


def knob_names(space: Any) -> Any:
    """Searched knobs by name: the seed is never one, and an unknown name gets a did-you-mean."""
    if not isinstance(space, Mapping):
        return space
    for name, spec in space.items():
        if name == "seed":
            raise ConfigError(
                "space.seed",
                spec,
                "seeds are not searched: a seed has no structure for the sampler to learn, so each trial "
                "renders its knob set on seeds_per_trial seeds drawn from the study seed; remove space.seed "
                "and set seeds_per_trial (e.g. 4) to judge every knob set on several seeds",
            )
        if name not in SEARCHABLE:
            raise ConfigError(
                f"space.{name}", spec, unknown_name_message("searchable parameter", str(name), SEARCHABLE)
            )
    return space


def some_knob(space: Any) -> Any:
    if space is None or (isinstance(space, Mapping) and not space):
        raise ConfigError(
            "space",
            {} if space is None else dict(space),
            "name at least one parameter to search, e.g. {audio_weight: {type: float, low: 0.2, high: 0.8}}",
        )
    return space


Space = Annotated[
    dict[str, Distribution],
    BeforeValidator(knob_names),
    Field(json_schema_extra={"propertyNames": {"enum": list(SEARCHABLE)}}),
]


def check_balances(space: Mapping[str, Distribution], render: RenderConfig) -> None:
    for name in space:
        if name not in BALANCE_PARAMS:
            continue
        views = render.view_specs() if name == "view_balance" else render.audio_view_specs()
        if len(views) != 2 or any(view.kind != PERMUTATION for view in views):
            raise ConfigError(
                f"space.{name}",
                name,
                "a balance b sets the weights [1 - b, b] of exactly two permutation views "
                "(hybrid parts weigh 1 each; one audio prompt has no balance)",
            )
