"""Studies as files: ``studies/*.yaml`` say what to make, which knobs to search, what to optimise, how long.

    name: rotate                       # Optuna study and MLflow experiment
    render: {views: [...], image_prompts: [...], audio_prompts: [...], num_inference_steps: 50}
    space:                             # per-candidate RenderConfig fields, view_balance, audio_view_balance
      audio_weight: {type: float, low: 0.2, high: 0.8}
      scheduler: {type: categorical, choices: [ddim, dpmsolver++]}
    objectives: ["min(clip/alignment, clap/audio0)"]   # several -> multi-objective
    seeds_per_trial: 4                 # M: each trial is one knob set rendered on M seeds (never searched)
    aggregate: mean                    # how the M values become the trial's: mean | median | min | max
    start_points: [{audio_weight: 0.3}]  # knob sets tried right after the baseline (render: values, trial 0)
    sampler: tpe                       # tpe | gp | nsga2 | random | grid, or {type: gp, n_startup_trials: 8}
    pruner: {type: median, n_startup_trials: 4}        # none | median | successive_halving
    previews: [0.5, 0.75]              # fractions of the steps where x0 previews are scored (for pruning)
    batch: 8                           # renders per batched sampler call (batch / M trials); GPU memory
    budget: {trials: 32, minutes: 120} # trials = knob sets (each M renders)
    seed: 0                            # seeds the sampler and the trials' render seeds
    tiny: {render: {num_inference_steps: 8}, seeds_per_trial: 2, batch: 4, budget: {trials: 6}}

Every error names the file, the field and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, unknown_name_message
from sounding_anagrams.evaluation.objectives import (
    MAXIMIZE,
    MINIMIZE,
    Objective,
    metric_names,
    parse_objectives,
)
from sounding_anagrams.files import read_yaml_mapping
from sounding_anagrams.sampler.views import PERMUTATION

SAMPLERS = ("tpe", "gp", "nsga2", "random", "grid")
AGGREGATES = ("mean", "median", "min", "max")
# A study name becomes folder names under --runs (renders, reports, exports): nothing that could leave it.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PRUNERS = ("none", "median", "successive_halving")
PARAM_TYPES = ("float", "int", "categorical")
BALANCE_PARAMS = ("view_balance", "audio_view_balance")
SEARCHABLE = (
    # Not the seed: each trial renders on seeds_per_trial seeds of its own (see trial_seeds).
    tuple(
        f.name
        for f in dataclasses.fields(RenderConfig)
        if f.name not in RenderConfig.SHARED_FIELDS and f.name != "seed"
    )
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
    "seeds_per_trial",
    "aggregate",
    "baseline",
    "start_points",
    "tiny",
)
_TINY_KEYS = ("render", "space", "batch", "budget", "previews", "pruner", "seeds_per_trial", "sampler")


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
    """A validated study file (with the ``tiny`` section applied when asked).

    ``batch`` counts renders per batched sampler call; each trial takes ``seeds_per_trial`` of them, so a call
    holds ``trials_per_call`` trials. ``start_points`` begin with the baseline (the ``render:`` values).
    """

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
    seeds_per_trial: int = 1
    aggregate: str = "mean"
    start_points: tuple[Mapping[str, Any], ...] = ()
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = True

    @property
    def trials_per_call(self) -> int:
        return max(1, self.batch // self.seeds_per_trial)

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
    data = read_yaml_mapping(path, "study", hint="; studies live in studies/*.yaml")
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
    if name == "seed":
        raise ConfigError(
            field_name,
            spec,
            "seeds are not searched: a seed has no structure for the sampler to learn, so each trial renders "
            "its knob set on seeds_per_trial seeds drawn from the study seed; remove space.seed and set "
            "seeds_per_trial (e.g. 4) to judge every knob set on several seeds",
            source=source,
        )
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{field_name}.{key}", value, "must be a finite number", source=source)
    assert isinstance(low, (int, float)) and isinstance(high, (int, float))
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{field_name}.low", low, "int parameters need integer low and high", source=source)
    if not low < high:
        raise ConfigError(f"{field_name}.high", high, f"must be greater than low={low}", source=source)
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{field_name}.low", low, "must be positive for a log scale", source=source)
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0
    ):
        raise ConfigError(f"{field_name}.step", step, "must be a finite positive number", source=source)
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
        # The main section must be valid on its own too: a tiny run must not hide an error of the real one.
        parse_study(data, source=source, tiny=False)
        data = _merge_tiny(data, source)
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            "name",
            name,
            "give the study a name (it names the Optuna study and MLflow experiment)",
            source=source,
        )
    if not STUDY_NAME.fullmatch(name.strip()):
        raise ConfigError(
            "name",
            name,
            "must be letters, digits, '.', '_' or '-', starting with a letter or digit (it names folders "
            "under --runs, so no '/' and no '..')",
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

    sampler, sampler_options = _parse_sampler(data.get("sampler", "tpe"), source)
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
    seeds_per_trial = data.get("seeds_per_trial", 1)
    if (
        isinstance(seeds_per_trial, bool)
        or not isinstance(seeds_per_trial, int)
        or not 1 <= seeds_per_trial <= 64
    ):
        raise ConfigError(
            "seeds_per_trial",
            seeds_per_trial,
            "must be an integer from 1 to 64 (seeds each knob set is rendered on)",
            source=source,
        )
    aggregate = data.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        raise ConfigError(
            "aggregate",
            aggregate,
            unknown_name_message("aggregate", str(aggregate), AGGREGATES),
            source=source,
        )
    batch = data.get("batch", seeds_per_trial)
    check_batch(batch, seeds_per_trial, field="batch", source=source)
    budget = _parse_budget(data.get("budget") or {}, source)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError("seed", seed, "must be an integer in [0, 2**32)", source=source)

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
        seeds_per_trial,
        aggregate,
        sampler_options=sampler_options,
    )
    _check_space_extremes(study)
    baseline = data.get("baseline", True)
    if not isinstance(baseline, bool):
        raise ConfigError("baseline", baseline, "must be true or false", source=source)
    points = [baseline_params(study)] if baseline else []
    points += _parse_start_points(data.get("start_points", []), study)
    study = dataclasses.replace(study, start_points=tuple(points), baseline=baseline)
    # The sampler's options are checked now (Optuna's own constructor), not at the first trial.
    from sounding_anagrams.search.samplers import make_sampler

    make_sampler(study)
    return study


def check_batch(batch: Any, seeds_per_trial: int, *, field: str, source: str | None = None) -> None:
    """``batch`` counts renders per sampler call: whole trials of ``seeds_per_trial`` renders each."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(field, batch, "must be an integer of at least 1", source=source)
    if batch % seeds_per_trial:
        raise ConfigError(
            field,
            batch,
            f"counts renders per sampler call and must be a multiple of seeds_per_trial={seeds_per_trial} "
            f"(a trial renders its {seeds_per_trial} seeds in the same call), e.g. "
            f"{max(seeds_per_trial, batch // seeds_per_trial * seeds_per_trial)} or "
            f"{(batch // seeds_per_trial + 1) * seeds_per_trial}",
            source=source,
        )


def trial_seeds(study_seed: int, trial_number: int, count: int) -> list[int]:
    """The render seeds of one trial: 32-bit draws of ``SeedSequence(study_seed, spawn_key=(trial, k))``.

    Never proposed by the Optuna sampler (a seed has no structure to model): the same study seed and trial
    number give the same seeds on every machine, and an export re-renders them exactly (docs/METHOD.md §5).
    """
    return [
        int(np.random.SeedSequence(study_seed, spawn_key=(trial_number, k)).generate_state(1)[0])
        for k in range(count)
    ]


def baseline_params(study: StudyConfig) -> dict[str, Any]:
    """The ``render:`` values of every searched knob: the hand-tuned settings, enqueued as trial 0."""
    render = study.render
    params: dict[str, Any] = {}
    for param in study.space:
        if param.name == "view_balance":
            assert render.view_weights is not None
            value: Any = render.view_weights[1]
        elif param.name == "audio_view_balance":
            assert render.audio_view_weights is not None
            value = render.audio_view_weights[1]
        elif param.name == "image_start_step":
            value = render.image_start
        else:
            value = getattr(render, param.name)
        if not param.allows(value):
            raise ConfigError(
                f"render.{param.name}",
                value,
                f"is the baseline (trial 0: the render: values) but space.{param.name} is "
                f"{param.describe()}; widen the space, change the render value, or set baseline: false",
                source=study.source,
            )
        params[param.name] = value
    return params


def _parse_start_points(value: Any, study: StudyConfig) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(
            "start_points", value, "give a list of knob sets, e.g. [{audio_weight: 0.3}]", source=study.source
        )
    space = {param.name: param for param in study.space}
    points = []
    for index, point in enumerate(value):
        field_name = f"start_points[{index}]"
        point = _require_mapping(point, field_name, study.source)
        for key, knob in point.items():
            if key not in space:
                raise ConfigError(
                    f"{field_name}.{key}",
                    knob,
                    unknown_name_message("searched parameter", str(key), list(space)),
                    source=study.source,
                )
            if not space[key].allows(knob):
                raise ConfigError(
                    f"{field_name}.{key}", knob, f"must be {space[key].describe()}", source=study.source
                )
        try:
            study.candidate_config(point)
        except ConfigError as error:
            raise ConfigError(
                field_name, dict(point), f"gives an invalid render config: {error}", source=study.source
            ) from None
        points.append(dict(point))
    return points


def _parse_kind(
    value: Any, name: str, default: str, allowed: tuple[str, ...], source: str, *, plain_field: str
) -> tuple[str, dict[str, Any]]:
    """``name: kind`` or ``name: {type: kind, option: value}`` -> (kind, options); a bad kind is named by
    ``plain_field`` when given as a plain string, else by ``name.type``."""
    field_name = plain_field if isinstance(value, str) else f"{name}.type"
    if isinstance(value, str):
        value = {"type": value}
    options = dict(_require_mapping(value, name, source))
    kind = options.pop("type", default)
    if kind not in allowed:
        raise ConfigError(field_name, kind, unknown_name_message(name, str(kind), allowed), source=source)
    return kind, options


def _parse_sampler(value: Any, source: str) -> tuple[str, dict[str, Any]]:
    kind, options = _parse_kind(value, "sampler", "tpe", SAMPLERS, source, plain_field="sampler")
    if "seed" in options:
        raise ConfigError(
            "sampler.seed", options["seed"], "the study's own seed: field seeds the sampler", source=source
        )
    return kind, options


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
    return PrunerSpec(*_parse_kind(value, "pruner", "none", PRUNERS, source, plain_field="pruner.type"))


def _parse_budget(value: Any, source: str) -> Budget:
    value = _require_mapping(value, "budget", source)
    _check_keys(value, ("trials", "minutes"), "budget.", source)
    trials, minutes = value.get("trials"), value.get("minutes")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ConfigError("budget.trials", trials, "must be an integer of at least 1", source=source)
    if minutes is not None and (
        isinstance(minutes, bool)
        or not isinstance(minutes, (int, float))
        or not math.isfinite(minutes)
        or minutes <= 0
    ):
        raise ConfigError("budget.minutes", minutes, "must be a finite positive number", source=source)
    if trials is None and minutes is None:
        raise ConfigError("budget", dict(value), "give trials and/or minutes", source=source)
    return Budget(trials, float(minutes) if minutes is not None else None)
