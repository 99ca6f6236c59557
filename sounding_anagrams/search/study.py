"""Studies as files: ``studies/*.yaml`` say what to make, which knobs to search, what to optimise, how long.

    name: rotate                       # Optuna study and MLflow experiment
    render: {views: [...], image_prompts: [...], audio_prompts: [...], num_inference_steps: 50}
    space:                             # per-candidate RenderConfig fields, view_balance, audio_view_balance
      audio_weight: {type: float, low: 0.2, high: 0.8}
      scheduler: {type: categorical, choices: [ddim, dpmsolver++]}
    objectives: ["min(clip/alignment, clap/audio0)"]   # several -> multi-objective (NSGA-II by default)
    sampler: tpe                       # tpe | nsga2 | random | grid
    pruner: {type: median, n_startup_trials: 4}        # none | median | successive_halving
    previews: [0.5, 0.75]              # fractions of the steps where x0 previews are scored (for pruning)
    batch: 4                           # candidates per batched sampler call
    budget: {trials: 32, minutes: 120}
    seed: 0
    tiny: {render: {num_inference_steps: 8}, batch: 2, budget: {trials: 6}}  # used with --models tiny

Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, unknown_name_message
from sounding_anagrams.evaluation.objectives import (
    MAXIMIZE,
    MINIMIZE,
    Objective,
    metric_names,
    parse_objectives,
)
from sounding_anagrams.sampler.views import PERMUTATION

SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "successive_halving")
PARAM_TYPES = ("float", "int", "categorical")
BALANCE_PARAMS = ("view_balance", "audio_view_balance")
SEARCHABLE = (
    tuple(name for name in RenderConfig.__dataclass_fields__ if name not in RenderConfig.SHARED_FIELDS)
    + BALANCE_PARAMS
)
_STUDY_KEYS = (
    "name",
    "render",
    "space",
    "objectives",
    "sampler",
    "pruner",
    "previews",
    "batch",
    "budget",
    "seed",
    "tiny",
)
_TINY_KEYS = ("render", "space", "batch", "budget", "previews", "pruner")


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


@dataclass(frozen=True)
class Budget:
    trials: int | None = None
    minutes: float | None = None


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study file (with the ``tiny`` section applied when asked)."""

    name: str
    source: str
    render: RenderConfig
    space: tuple[ParamSpec, ...]
    objectives: tuple[Objective, ...]
    sampler: str
    pruner: PrunerSpec
    previews: tuple[float, ...]
    batch: int
    budget: Budget
    seed: int

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        return [MINIMIZE if objective.direction == MINIMIZE else MAXIMIZE for objective in self.objectives]

    def candidate_config(self, params: Mapping[str, Any]) -> RenderConfig:
        """The render config of one trial: the fixed part with the trial's parameters applied."""
        changes = {name: value for name, value in params.items() if name not in BALANCE_PARAMS}
        if "view_balance" in params:
            changes["view_weights"] = [1.0 - params["view_balance"], params["view_balance"]]
        if "audio_view_balance" in params:
            changes["audio_view_weights"] = [1.0 - params["audio_view_balance"], params["audio_view_balance"]]
        return self.render.replace(**changes)


def load_study(path: str | Path, *, tiny: bool = False) -> StudyConfig:
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("study", source, "no such file; studies live in studies/*.yaml") from None
    except yaml.YAMLError as error:
        raise ConfigError("study", source, f"is not valid YAML: {error}") from None
    return parse_study(data, source=source, tiny=tiny)


def _require_mapping(value: Any, field_name: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(field_name, value, "must be a mapping", source=source)
    return value


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], prefix: str, source: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{prefix}{key}", data[key], unknown_name_message("field", str(key), allowed), source=source
            )


def _merge_tiny(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Apply the ``tiny`` section: its render/space/budget entries replace or extend the main ones."""
    merged = copy.deepcopy(dict(data))
    tiny = _require_mapping(merged.pop("tiny", None) or {}, "tiny", source)
    _check_keys(tiny, _TINY_KEYS, "tiny.", source)
    for key, value in tiny.items():
        if key in ("render", "space", "budget"):
            merged[key] = {
                **_require_mapping(merged.get(key) or {}, key, source),
                **_require_mapping(value, f"tiny.{key}", source),
            }
        else:
            merged[key] = value
    return merged


def parse_param(name: str, spec: Any, source: str) -> ParamSpec:
    field_name = f"space.{name}"
    if name not in SEARCHABLE:
        raise ConfigError(
            field_name, spec, unknown_name_message("searchable parameter", name, SEARCHABLE), source=source
        )
    spec = _require_mapping(spec, field_name, source)
    _check_keys(spec, ("type", "low", "high", "step", "log", "choices"), f"{field_name}.", source)
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{field_name}.type", kind, unknown_name_message("type", str(kind), PARAM_TYPES), source=source
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(
                f"{field_name}.choices", choices, "give a non-empty list of values", source=source
            )
        return ParamSpec(name, kind, choices=tuple(choices))
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field_name}.{key}", value, "must be a number", source=source)
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{field_name}.low", low, "int parameters need integer low and high", source=source)
    if not low < high:
        raise ConfigError(f"{field_name}.high", high, f"must be greater than low={low}", source=source)
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{field_name}.low", low, "must be positive for a log scale", source=source)
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise ConfigError(f"{field_name}.step", step, "must be a positive number", source=source)
    return ParamSpec(
        name,
        kind,
        float(low) if kind == "float" else int(low),
        float(high) if kind == "float" else int(high),
        step,
        log,
    )


def parse_study(data: Any, *, source: str = "<study>", tiny: bool = False) -> StudyConfig:
    data = _require_mapping(data, "study", source)
    _check_keys(data, _STUDY_KEYS, "", source)
    if tiny:
        data = _merge_tiny(data, source)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            "name",
            name,
            "give the study a name (it names the Optuna study and MLflow experiment)",
            source=source,
        )
    if tiny:
        render_data = {
            **_require_mapping(data.get("render") or {}, "render", source),
            "image_model": "tiny",
            "audio_model": "tiny",
        }
    else:
        render_data = dict(_require_mapping(data.get("render") or {}, "render", source))
    render = RenderConfig.from_dict(render_data, source=f"{source}: render")

    space_data = _require_mapping(data.get("space") or {}, "space", source)
    if not space_data:
        raise ConfigError("space", {}, "name at least one parameter to search", source=source)
    space = tuple(parse_param(str(key), value, source) for key, value in space_data.items())
    _check_balances(space, render, source)

    objectives = tuple(parse_objectives(data.get("objectives") or [], field=f"{source}: objectives"))
    available = metric_names(len(render.views), len(render.audio_prompts))
    for objective in objectives:
        objective.check(available, field=f"{source}: objectives")

    sampler = data.get("sampler", "tpe" if len(objectives) == 1 else "nsga2")
    if sampler not in SAMPLERS:
        raise ConfigError(
            "sampler", sampler, unknown_name_message("sampler", str(sampler), SAMPLERS), source=source
        )
    if sampler == "grid":
        for param in space:
            if param.type != "categorical" and param.step is None:
                raise ConfigError(
                    f"space.{param.name}.step", None, "a grid search needs a step (or choices)", source=source
                )

    pruner = _parse_pruner(data.get("pruner", "none"), source)
    if pruner.type != "none" and len(objectives) > 1:
        raise ConfigError(
            "pruner",
            pruner.type,
            "pruning needs a single objective (Optuna prunes on one value)",
            source=source,
        )
    previews = data.get("previews", [])
    if not isinstance(previews, list) or not all(
        isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p < 1 for p in previews
    ):
        raise ConfigError(
            "previews",
            previews,
            "give a list of fractions of the steps in (0, 1), e.g. [0.5, 0.75]",
            source=source,
        )
    if pruner.type != "none" and not previews:
        raise ConfigError(
            "previews", previews, "a pruner needs preview steps to judge candidates early", source=source
        )
    batch = data.get("batch", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("batch", batch, "must be an integer of at least 1", source=source)
    budget = _parse_budget(data.get("budget") or {}, source)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", seed, "must be an integer", source=source)

    study = StudyConfig(
        name.strip(),
        source,
        render,
        space,
        objectives,
        sampler,
        pruner,
        tuple(sorted(float(p) for p in previews)),
        batch,
        budget,
        seed,
    )
    _check_space_extremes(study)
    return study


def _check_balances(space: tuple[ParamSpec, ...], render: RenderConfig, source: str) -> None:
    for param in space:
        if param.name not in BALANCE_PARAMS:
            continue
        views = render.parsed_views() if param.name == "view_balance" else render.parsed_audio_views()
        if len(views) != 2 or any(view.kind != PERMUTATION for view in views):
            raise ConfigError(
                f"space.{param.name}",
                param.name,
                "a balance b sets the weights [1 - b, b] of exactly two permutation views "
                "(hybrid parts weigh 1 each; one audio prompt has no balance)",
                source=source,
            )


def _check_space_extremes(study: StudyConfig) -> None:
    """Every corner value of every parameter must give a valid render config (caught now, not mid-search)."""
    for param in study.space:
        for value in param.extremes():
            try:
                study.candidate_config({param.name: value})
            except ConfigError as error:
                raise ConfigError(
                    f"space.{param.name}",
                    value,
                    f"gives an invalid render config: {error}",
                    source=study.source,
                ) from None


def _parse_pruner(value: Any, source: str) -> PrunerSpec:
    if isinstance(value, str):
        value = {"type": value}
    value = dict(_require_mapping(value, "pruner", source))
    kind = value.pop("type", "none")
    if kind not in PRUNERS:
        raise ConfigError(
            "pruner.type", kind, unknown_name_message("pruner", str(kind), PRUNERS), source=source
        )
    return PrunerSpec(kind, value)


def _parse_budget(value: Any, source: str) -> Budget:
    value = _require_mapping(value, "budget", source)
    _check_keys(value, ("trials", "minutes"), "budget.", source)
    trials, minutes = value.get("trials"), value.get("minutes")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError("budget.trials", trials, "must be an integer of at least 1", source=source)
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0
    ):
        raise ConfigError("budget.minutes", minutes, "must be a positive number", source=source)
    if trials is None and minutes is None:
        raise ConfigError("budget", dict(value), "give trials and/or minutes", source=source)
    return Budget(trials, float(minutes) if minutes is not None else None)
