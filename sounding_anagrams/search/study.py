"""Studies as files: ``studies/*.yaml`` say what to make, which knobs to search, what to optimise, how long.

    name: rotate                       # Optuna study and MLflow experiment
    render: {views: [...], image_prompts: [...], audio_prompts: [...], num_inference_steps: 50}
    space:                             # per-candidate RenderConfig fields, view_balance, audio_view_balance
      audio_weight: {type: float, low: 0.2, high: 0.8}
      scheduler: {type: categorical, choices: [ddim, dpmsolver++]}
    objectives: ["min(clip/alignment, clap/audio0)"]   # several -> multi-objective
    seeds_per_trial: 4                 # M: each trial is one knob set rendered on M seeds (never searched)
    aggregate: mean                    # how the M values become the trial's: mean | median | min | max
    seeds: paired                      # paired: every trial renders the same M seeds | independent
    start_points: [{audio_weight: 0.3}]  # knob sets tried right after the baseline (render: values, trial 0)
    sampler: tpe                       # tpe | gp | nsga2 | random | grid, or {type: gp, n_startup_trials: 8}
    pruner: {type: median, n_startup_trials: 4}        # none | median | successive_halving | wilcoxon
    seeds_per_round: 2                 # racing (pruner: wilcoxon): seeds a trial renders per round
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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

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
from sounding_anagrams.search.space import (
    BALANCE_PARAMS,
    ParamSpec,
    Space,
    check_balances,
    some_knob,
)
from sounding_anagrams.validation import NULL_IS_DEFAULT, Rule, StrictModel

SamplerKind = Literal["tpe", "gp", "nsga2", "random", "grid"]
PrunerKind = Literal["none", "median", "successive_halving", "wilcoxon"]
# Pruners that judge x0 previews (steps = percent of the schedule); wilcoxon races on seeds instead.
PREVIEW_PRUNERS = ("median", "successive_halving")
Aggregate = Literal["mean", "median", "min", "max"]
SeedPairing = Literal["paired", "independent"]
SAMPLERS, PRUNERS, AGGREGATES = (get_args(kind) for kind in (SamplerKind, PrunerKind, Aggregate))
# A study name becomes folder names under --runs (renders, reports, exports): nothing that could leave it.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
NAME_RULE = "give the study a name (it names the Optuna study and MLflow experiment)"


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)


# -- the study file, as written: pydantic models (studies/study.schema.json is their JSON Schema) ----------


def _kind_with_options(
    section: str, default: str, kinds: tuple[str, ...], plain_field: str
) -> tuple[BeforeValidator, WithJsonSchema]:
    """``section: kind`` or ``section: {type: kind, option: value}`` -> ``{type: kind, **options}``, and the
    JSON Schema of both forms. The options go to Optuna's own constructor, which checks them. A bad kind is
    named by ``plain_field`` when given as a plain string, else by ``section.type``."""

    def normalise(value: Any) -> dict[str, Any]:
        plain = isinstance(value, str)
        if plain:
            value = {"type": value}
        if not isinstance(value, Mapping):
            raise ConfigError(section, value, f"must be one of {', '.join(kinds)}, or a mapping with a type")
        options = dict(value)
        kind = options.pop("type", default)
        if kind not in kinds:
            name = plain_field if plain else f"{section}.type"
            raise ConfigError(name, kind, unknown_name_message(section, str(kind), kinds))
        if "seed" in options:
            raise ConfigError(f"{section}.seed", options["seed"], "the study's own seed: field seeds it")
        return {"type": kind, **options}

    schema = {
        "anyOf": [
            {"enum": list(kinds)},
            {
                "type": "object",
                "properties": {"type": {"enum": list(kinds), "default": default}},
                "additionalProperties": True,
            },
        ],
        "default": default,
    }
    return BeforeValidator(normalise), WithJsonSchema(schema)


_SAMPLER_FORMS = _kind_with_options("sampler", "tpe", SAMPLERS, plain_field="sampler")
_PRUNER_FORMS = _kind_with_options("pruner", "none", PRUNERS, plain_field="pruner.type")
SamplerSpec = Annotated[dict[str, Any], _SAMPLER_FORMS[0], _SAMPLER_FORMS[1]]
PrunerChoice = Annotated[dict[str, Any], _PRUNER_FORMS[0], _PRUNER_FORMS[1]]
Previews = Annotated[
    list[Annotated[float, Field(gt=0, lt=1)]],
    Rule("give a list of fractions of the steps in (0, 1), e.g. [0.5, 0.75]"),
]
SeedsPerTrial = Annotated[
    int, Field(ge=1, le=64), Rule("must be an integer from 1 to 64 (seeds each knob set is rendered on)")
]
SeedsPerRound = Annotated[
    int | None,
    Field(ge=1, le=64),
    NULL_IS_DEFAULT,
    Rule("must be an integer from 1 to 64 (seeds a racing trial renders per round)"),
]
Batch = Annotated[int | None, Field(ge=1), NULL_IS_DEFAULT]


class Budget(StrictModel):
    """When the search stops: after this many trials (knob sets), renders or minutes, whichever is first."""

    trials: Annotated[int | None, Field(ge=1)] = None
    renders: Annotated[int | None, Field(ge=1)] = Field(
        default=None,
        description=(
            "Renders (seeds rendered) in all, confirmation included: a raced-out trial's unrendered seeds "
            "go to further trials."
        ),
    )
    minutes: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = None

    @model_validator(mode="before")
    @classmethod
    def _some_limit(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and all(data.get(k) is None for k in ("trials", "renders", "minutes")):
            raise ConfigError("", dict(data), "give trials, renders and/or minutes")
        return data


class Confirm(StrictModel):
    """The confirmation stage: the ``top`` knob sets rendered again on ``seeds`` held-out seeds (seeds no
    trial renders) once the search ends, so the winner is named on seeds the search never saw."""

    top: Annotated[int, Field(ge=1, le=64)] = Field(default=3, description="Knob sets confirmed, best first.")
    seeds: Annotated[int, Field(ge=2, le=256)] = Field(
        default=8, description="Held-out seeds each is rendered on (at least 2, for an interval)."
    )


class Terminate(StrictModel):
    """Stop asking new trials once Optuna's terminator finds the improvement left below the seed noise."""

    min_trials: Annotated[int, Field(ge=2, le=10_000)] = Field(
        default=8, description="Complete trials before the terminator may stop the search."
    )


def _false_is_none(value: Any) -> Any:
    if value is None or value is True:  # `confirm:` left empty (or true) keeps the defaults
        return {}
    return None if value is False else value


# `confirm: false` skips the stage; in the schema, false stands where the model is null.
ConfirmChoice = Annotated[Confirm | None, BeforeValidator(_false_is_none)]
TerminateChoice = Annotated[Terminate | None, BeforeValidator(_false_is_none)]


class TinySection(StrictModel):
    """What changes with ``--models tiny``: render, space and budget entries replace the main ones key by
    key; the rest replace them whole."""

    # render and budget are partial: merged into the main sections, which are validated then.
    render: dict[str, Any] = Field(default_factory=dict)
    space: Space = Field(default_factory=dict)
    batch: Batch = None
    budget: dict[str, Any] = Field(default_factory=dict)
    previews: Previews = Field(default_factory=list)
    pruner: PrunerChoice = Field(default_factory=dict)
    seeds_per_trial: SeedsPerTrial = 1
    seeds_per_round: SeedsPerRound = None
    sampler: SamplerSpec = Field(default_factory=dict)
    confirm: ConfirmChoice = Field(default_factory=Confirm)


# Sections that may be left empty (null in YAML): they keep their defaults.
_SECTIONS = ("render", "tiny")


class StudyFile(StrictModel):
    """A study file (studies/*.yaml): what to make, which knobs to search, what to optimise, how long."""

    # What a study cannot do without, for editors (the tool says the same, in its own words).
    model_config = StrictModel.model_config | {
        "title": "sounding-anagrams study",
        "json_schema_extra": {"required": ["name", "space", "objectives", "budget"]},
    }
    SECTIONS = ("render",)

    name: Annotated[str, Rule(NAME_RULE)] = Field(
        description="Names the Optuna study, the MLflow experiment and the folders under --runs: letters, "
        "digits, '.', '_' and '-', starting with a letter or digit.",
        # What _folder_safe accepts (surrounding blanks are stripped): an editor flags what the tool refuses.
        json_schema_extra={"pattern": rf"^\s*{STUDY_NAME.pattern}\s*$"},
    )
    render: RenderConfig = Field(
        default_factory=RenderConfig,
        description="The fixed part of every candidate; its knob values are trial 0, the baseline.",
    )
    space: Annotated[Space, BeforeValidator(some_knob)] = Field(
        default_factory=dict,
        validate_default=True,
        description="Knobs searched: per-candidate RenderConfig fields, view_balance, audio_view_balance.",
    )
    # Each objective is read by parse_objectives, which names what is wrong with it.
    objectives: Annotated[
        list[Any],
        BeforeValidator(lambda value: [value] if isinstance(value, str) else value),
        Rule('give at least one objective, e.g. ["min(clip/alignment, clap/audio0)"]'),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ]
            }
        ),
    ] = Field(
        description='What to optimise, e.g. ["min(clip/alignment, clap/audio0)"]; several: multi-objective.'
    )
    sampler: SamplerSpec = Field(
        default_factory=lambda: {"type": "tpe"},
        description="tpe | gp | nsga2 | random | grid, or {type: gp, n_startup_trials: 8}.",
    )
    pruner: PrunerChoice = Field(
        default_factory=lambda: {"type": "none"},
        description=(
            "none | median | successive_halving (on x0 previews) | wilcoxon (racing on seeds), or "
            "{type: median, n_startup_trials: 4}, {type: wilcoxon, p_threshold: 0.1}."
        ),
    )
    previews: Previews = Field(
        default_factory=list, description="Fractions of the steps where x0 previews are scored, for pruning."
    )
    batch: Batch = Field(
        default=None,
        description=(
            "Renders per batched sampler call: whole trials of seeds_per_trial renders (default 1 trial)."
        ),
    )
    budget: Annotated[Budget, Rule("give trials and/or minutes, e.g. {trials: 32, minutes: 120}")] = Field(
        description="When the search stops."
    )
    seed: Annotated[int, Field(ge=0, lt=2**32)] = Field(
        default=0, description="Seeds the sampler and the trials' render seeds."
    )
    seeds_per_trial: SeedsPerTrial = Field(
        default=1, description="M: each trial is one knob set rendered on M seeds (never searched)."
    )
    seeds_per_round: SeedsPerRound = Field(
        default=None,
        description=(
            "Racing (pruner: wilcoxon): a trial renders its seeds this many at a time and stops once it is "
            "significantly worse than the leader on the seeds so far (default 2; without racing, all at "
            "once)."
        ),
    )
    aggregate: Aggregate = Field(default="mean", description="How a trial's M values become its value.")
    seeds: SeedPairing = Field(
        default="paired",
        description=(
            "paired: every trial renders the same M seeds (seed k is one value for the whole study), so knob "
            "sets are compared on the same noise; independent: each trial draws M seeds of its own."
        ),
    )
    confirm: ConfirmChoice = Field(
        default_factory=Confirm,
        description=(
            "Once the budget ends: the top knob sets rendered on held-out seeds, {top: 3, seeds: 8}; false "
            "skips it."
        ),
    )
    terminate: TerminateChoice = Field(
        default=None,
        description=(
            "Stop early once Optuna's terminator (a Gaussian-process bound on the improvement left) is below "
            "the seed noise of a trial's value: {min_trials: 8}, or true; off by default "
            "(docs/PERFORMANCE.md)."
        ),
    )
    baseline: bool = Field(
        default=True, description="Trial 0 renders the render: values of the searched knobs."
    )
    start_points: Annotated[
        list[dict[str, Any]], Rule("give a list of knob sets, e.g. [{audio_weight: 0.3}]")
    ] = Field(default_factory=list, description="Knob sets tried right after the baseline.")
    tiny: TinySection = Field(
        default_factory=TinySection,
        description="The study made small for --models tiny (offline, on a CPU).",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_mean_defaults(cls, data: Any) -> Any:
        # A section with every line commented out reads as null in YAML.
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if not (key in _SECTIONS and value is None)}
        return data

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, name: str) -> str:
        if not name.strip():
            raise ValueError(NAME_RULE)
        if not STUDY_NAME.fullmatch(name.strip()):
            raise ValueError(
                "must be letters, digits, '.', '_' or '-', starting with a letter or digit (it names folders "
                "under --runs, so no '/' and no '..')"
            )
        return name.strip()

    @model_validator(mode="after")
    def _check_together(self) -> StudyFile:
        check_balances(self.space, self.render)
        if self.sampler["type"] == "grid":
            for name, distribution in self.space.items():
                if distribution.type != "categorical" and distribution.step is None:
                    raise ConfigError(f"space.{name}.step", None, "a grid search needs a step (or choices)")
        if self.pruner["type"] != "none" and len(self.objectives) > 1:
            raise ConfigError(
                "pruner", self.pruner["type"], "pruning needs a single objective (Optuna prunes on one value)"
            )
        if self.terminate is not None and len(self.objectives) > 1:
            raise ConfigError(
                "terminate", True, "the terminator needs a single objective (it bounds one value's regret)"
            )
        if self.pruner["type"] in PREVIEW_PRUNERS and not self.previews:
            raise ConfigError(
                "previews", self.previews, "a pruner needs preview steps to judge candidates early"
            )
        if self.pruner["type"] == "wilcoxon":
            _check_race(self.seeds_per_trial, self.round_size, self.pruner.get("p_threshold", 0.1))
        elif self.seeds_per_round is not None:
            raise ConfigError(
                "seeds_per_round",
                self.seeds_per_round,
                "rounds of seeds are for racing: set pruner: {type: wilcoxon} too, or remove it",
            )
        confirming = self.confirm.top * self.confirm.seeds if self.confirm else 0
        if self.budget.renders is not None and self.budget.renders < confirming + self.seeds_per_trial:
            raise ConfigError(
                "budget.renders",
                self.budget.renders,
                f"must leave room for one trial ({self.seeds_per_trial} seeds) beside the confirmation "
                f"stage's {confirming} renders: at least {confirming + self.seeds_per_trial}",
            )
        unit = "seeds_per_round" if self.pruner["type"] == "wilcoxon" else "seeds_per_trial"
        check_batch(self.batch_size, self.round_size, field="batch", unit=unit)
        return self

    @property
    def round_size(self) -> int:
        """Seeds a trial renders per sampler call: a round of a race (default 2), else all of them."""
        if self.pruner["type"] != "wilcoxon":
            return self.seeds_per_trial
        return self.seeds_per_round or min(RACE_ROUND, self.seeds_per_trial)

    @property
    def batch_size(self) -> int:
        return self.batch if self.batch is not None else self.seeds_per_trial


RACE_ROUND = 2  # seeds per round of a race, unless seeds_per_round says otherwise


def _check_race(seeds_per_trial: int, round_size: int, p_threshold: Any) -> None:
    """A race that could never stop a trial is refused: after n paired seeds the signed-rank test's smallest
    p-value is 2**-n (docs/METHOD.md §5), so some round must end with n < seeds_per_trial seeds and
    2**-n < p_threshold."""
    if seeds_per_trial % round_size:
        raise ConfigError(
            "seeds_per_round",
            round_size,
            f"must divide seeds_per_trial={seeds_per_trial} (a trial renders its seeds in whole rounds)",
        )
    if not isinstance(p_threshold, (int, float)) or isinstance(p_threshold, bool):
        return  # Optuna's constructor names the bad option when the pruner is built
    decisions = range(round_size, seeds_per_trial, round_size)
    if not any(0.5**n < p_threshold for n in decisions):
        fewest = next(n for n in range(1, 65) if 0.5**n < p_threshold) if p_threshold > 0 else None
        need = f"at least {fewest + round_size} seeds per trial" if fewest else "a p_threshold above 0"
        raise ConfigError(
            "seeds_per_trial",
            seeds_per_trial,
            f"racing at p_threshold={p_threshold} can never stop a trial: the signed-rank test on n paired "
            f"seeds cannot reach a p-value below 2**-n, and the rounds end at {list(decisions) or 'no seed'} "
            f"seeds before the last; give {need} (rounds of {round_size})",
        )


def study_json_schema() -> dict[str, Any]:
    """The JSON Schema of a study file, for editors (studies/study.schema.json).

    The tiny section's render and budget are checked against the main sections' schemas: every field of those
    has a default, so a part of one is valid there too. ``confirm`` is a mapping or ``false``.
    """
    schema = StudyFile.model_json_schema()
    tiny = schema["$defs"]["TinySection"]["properties"]
    for name, model in (("render", "RenderConfig"), ("budget", "Budget")):
        tiny[name] = {"$ref": f"#/$defs/{model}"}
    # `confirm: false` is how a file skips the stage (None is only the model's way of saying it).
    for properties in (schema["properties"], tiny):
        properties["confirm"]["anyOf"] = [{"$ref": "#/$defs/Confirm"}, {"const": False}, {"type": "null"}]
    schema["properties"]["terminate"]["anyOf"] = [
        {"$ref": "#/$defs/Terminate"},
        {"type": "boolean"},
        {"type": "null"},
    ]
    return schema


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
    seeds: str = "paired"
    round_size: int = 0  # seeds per round of a race; 0: all seeds_per_trial at once (no racing)
    confirm: Confirm | None = field(default_factory=Confirm)  # None: no confirmation stage
    terminate: Terminate | None = None  # None: the budget alone stops the search
    start_points: tuple[Mapping[str, Any], ...] = ()
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = True

    @property
    def trial_budget(self) -> int | None:
        """Knob sets the budget holds: its trials, else (a render budget) its renders less the confirmation
        stage's over seeds_per_trial (racing may fit more); None with only minutes."""
        if self.budget.trials is not None or self.budget.renders is None:
            return self.budget.trials
        confirming = self.confirm.top * self.confirm.seeds if self.confirm else 0
        return (self.budget.renders - confirming) // self.seeds_per_trial

    @property
    def races(self) -> bool:
        """Whether trials race (``pruner: wilcoxon``): seeds in rounds, a loser stops between rounds."""
        return self.pruner.type == "wilcoxon"

    @property
    def seeds_per_round(self) -> int:
        return self.round_size or self.seeds_per_trial

    @property
    def trials_per_call(self) -> int:
        """Trials (rounds of trials, when racing) per batched sampler call."""
        return max(1, self.batch // self.seeds_per_round)

    @property
    def objective_names(self) -> list[str]:
        """The objectives' expressions, their names in Optuna (``set_metric_names``) and MLflow."""
        return [objective.spec for objective in self.objectives]

    @property
    def directions(self) -> list[Literal["minimize", "maximize"]]:
        return [MINIMIZE if objective.direction == MINIMIZE else MAXIMIZE for objective in self.objectives]

    def candidate_config(self, params: Mapping[str, Any]) -> RenderConfig:
        """The render config of one trial: the fixed part with the trial's parameters applied."""
        changes = {name: value for name, value in params.items() if name not in BALANCE_PARAMS}
        if "view_balance" in params:
            changes["view_weights"] = balance_weights(params["view_balance"])
        if "audio_view_balance" in params:
            changes["audio_view_weights"] = balance_weights(params["audio_view_balance"])
        return self.render.replace(**changes)


def balance_weights(balance: float) -> list[float]:
    """The weights ``[1 - b, b]`` a balance sets, ``1 - b`` to 12 decimals: a balance of 0.7 sets
    ``[0.3, 0.7]``, not ``[0.30000000000000004, 0.7]`` (float noise in every config and export)."""
    return [round(1.0 - balance, 12), balance]


def load_study(path: str | Path, *, tiny: bool = False) -> StudyConfig:
    path = Path(path)
    source = str(path)
    data = read_yaml_mapping(path, "study", hint="; studies live in studies/*.yaml")
    return parse_study(data, source=source, tiny=tiny)


def parse_study(data: Any, *, source: str = "<study>", tiny: bool = False) -> StudyConfig:
    """The study of a study file's mapping; with ``tiny``, its tiny section applied on tiny models.

    The main section must be valid on its own too: a tiny run must not hide an error of the real one.
    """
    study = _study_config(StudyFile.validate_data(data, source=source, what="study"), source)
    if tiny:
        try:
            study = _study_config(StudyFile.validate_data(_with_tiny(data), source=source), source)
        except ConfigError as error:
            # An error found only once the tiny section is applied says so.
            if error.source is None or not error.source.startswith(source):
                raise
            where = f"{source}, with its tiny section{error.source[len(source) :]}"
            raise ConfigError(error.field, error.value, error.allowed, source=where) from None
    return study


def _with_tiny(data: Mapping[str, Any]) -> dict[str, Any]:
    """Apply the ``tiny`` section (validated already): its render/space/budget entries replace or extend the
    main ones; on tiny models."""
    merged = copy.deepcopy(dict(data))
    for key, value in (merged.pop("tiny", None) or {}).items():
        merged[key] = {**(merged.get(key) or {}), **value} if key in ("render", "space", "budget") else value
    merged["render"] = {**(merged.get("render") or {}), "image_model": "tiny", "audio_model": "tiny"}
    return merged


def _study_config(file: StudyFile, source: str) -> StudyConfig:
    """The run's view of a validated study file: objectives parsed, the baseline and start points checked
    against the space, and the sampler built once (Optuna checks its options now, not at the first trial)."""
    try:
        objectives = tuple(parse_objectives(file.objectives))
        available = metric_names(len(file.render.views), len(file.render.audio_prompts))
        for objective in objectives:
            objective.check(available, field="objectives")
    except ConfigError as error:
        raise ConfigError(error.field, error.value, error.allowed, source=source) from None
    sampler_options = {key: value for key, value in file.sampler.items() if key != "type"}
    study = StudyConfig(
        file.name,
        source,
        file.render,
        tuple(distribution.spec(name) for name, distribution in file.space.items()),
        objectives,
        file.sampler["type"],
        PrunerSpec(file.pruner["type"], {k: v for k, v in file.pruner.items() if k != "type"}),
        tuple(sorted(file.previews)),
        file.batch_size,
        file.budget,
        file.seed,
        file.seeds_per_trial,
        file.aggregate,
        file.seeds,
        file.round_size if file.pruner["type"] == "wilcoxon" else 0,
        file.confirm or None,
        file.terminate or None,
        sampler_options=sampler_options,
    )
    _check_space_extremes(study)
    points = [baseline_params(study)] if file.baseline else []
    points += _parse_start_points(file.start_points, study)
    study = dataclasses.replace(study, start_points=tuple(points), baseline=file.baseline)
    # Imported here so that reading study.py (schema.py does) does not load Optuna.
    from sounding_anagrams.search.samplers import make_pruner, make_sampler

    make_sampler(study)
    make_pruner(study)
    return study


def check_batch(
    batch: Any, seeds: int, *, field: str, source: str | None = None, unit: str = "seeds_per_trial"
) -> None:
    """``batch`` counts renders per sampler call: whole trials of ``seeds`` renders each (whole rounds of
    ``seeds_per_round`` when trials race)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(field, batch, "must be an integer of at least 1", source=source)
    if batch % seeds:
        what = "a trial renders its" if unit == "seeds_per_trial" else "a racing trial renders a round of"
        raise ConfigError(
            field,
            batch,
            f"counts renders per sampler call and must be a multiple of {unit}={seeds} "
            f"({what} {seeds} seeds in the same call), e.g. "
            f"{max(seeds, batch // seeds * seeds)} or {(batch // seeds + 1) * seeds}",
            source=source,
        )


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


def _parse_start_points(value: list[dict[str, Any]], study: StudyConfig) -> list[dict[str, Any]]:
    space = {param.name: param for param in study.space}
    points = []
    for index, point in enumerate(value):
        field_name = f"start_points[{index}]"
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
