"""Optuna samplers and pruners of a study, built from its file (imports optuna only, not the models)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Container, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.search.stores import trial_record


class Knob(Protocol):
    """A searched knob as a grid sees it (a study's ``ParamSpec``)."""

    @property
    def name(self) -> str: ...

    def grid(self) -> list[Any]: ...


class PrunerChoice(Protocol):
    """A study's pruner and its options (its ``PrunerSpec``)."""

    @property
    def type(self) -> str: ...

    @property
    def options(self) -> Mapping[str, Any]: ...


class SearchPlan(Protocol):
    """The parts of a study (a ``StudyConfig``) that its sampler and pruner are built from.

    A protocol, not the class: study.py builds the sampler as it loads a study (so that bad options are said
    then), and this module must not import study.py back.
    """

    @property
    def source(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def space(self) -> Sequence[Knob]: ...

    @property
    def sampler(self) -> str: ...

    @property
    def sampler_options(self) -> Mapping[str, Any]: ...

    @property
    def pruner(self) -> PrunerChoice: ...


def make_sampler(study: SearchPlan, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler with its options; bad options are a ``ConfigError`` naming them."""
    seed = study.seed if seed is None else seed
    options = dict(study.sampler_options)
    kinds: dict[str, Any] = {
        # constant_liar keeps the trials of one batch (and other workers' running trials) apart.
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, **{"constant_liar": True, "multivariate": True, **options}
        ),
        # The GP sampler conditions on running trials itself, so the trials of one batch differ.
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, **options),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, **options),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed, **options),
        "grid": lambda: AskTellGridSampler({p.name: p.grid() for p in study.space}, seed=seed, **options),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return kinds[study.sampler]()
    except (TypeError, ValueError) as error:
        raise ConfigError(
            "sampler",
            {"type": study.sampler, **options},
            f"bad options for {study.sampler}: {error}",
            source=study.source,
        ) from None


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler calls ``study.stop()`` once the grid is used up, which only works inside
    ``study.optimize``; with ask-and-tell the loop asks ``exhausted`` before each batch instead."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None

    def unvisited(self, study: optuna.Study) -> int:
        return len(self._get_unvisited_grid_ids(study))


def make_pruner(study: SearchPlan) -> optuna.pruners.BasePruner:
    kinds: dict[str, Any] = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        # Racing on seeds: the step is the seed index (search/judging.py), not a preview's percent.
        "wilcoxon": optuna.pruners.WilcoxonPruner,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return kinds[study.pruner.type](**study.pruner.options)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            "pruner",
            dict(study.pruner.options),
            f"bad options for {study.pruner.type}: {error}",
            source=study.source,
        ) from None


class SettledStudy:
    """A study as the pruner sees it when it judges a trial: only the trials that were finished when that
    trial's batch was asked (and the trial itself).

    Trials finished since then (the batch before, told by the judge while this one samples) are left out,
    so a pruning decision never depends on how far the judge has got: the same study prunes the same trials
    on every run, and the sampler never waits for the judge to decide. Everything else is the study's own.
    """

    def __init__(self, study: optuna.Study, visible: frozenset[int]) -> None:
        self._study = study
        self._visible = visible

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy, states) if t.number in self._visible]

    @property
    def best_trial(self) -> FrozenTrial:
        """The leader a race compares with (Optuna's ``WilcoxonPruner`` reads it): the best of these trials
        complete on all their seeds; a raced-out trial's few seeds never lead. ValueError when there is
        none, as Optuna's own."""
        complete = [
            t
            for t in self.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get("raced")
        ]
        if not complete:
            raise ValueError("no trial is complete on all its seeds yet")
        sign = 1.0 if self._study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        return max(complete, key=lambda t: (sign * float(t.values[0]), -t.number))

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy, states, use_cache)
        return [t for t in trials if t.number in self._visible]


def should_prune(study: optuna.Study, trial: Trial, visible: frozenset[int]) -> bool:
    """``trial.should_prune()``, judged against the trials in ``visible`` alone (:class:`SettledStudy`)."""
    view = SettledStudy(study, visible | {trial.number})
    return study.pruner.prune(view, trial._get_latest_trial())  # type: ignore[arg-type]


def seed_noise(study: optuna.Study) -> float | None:
    """The noise of a trial's value: the median, over the trials complete on all their seeds, of the standard
    error of their mean over seeds (None before any trial has two seeds)."""
    errors = [
        float(np.std(values, ddof=1) / math.sqrt(len(values)))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not trial.user_attrs.get("raced")
        and len(values := [v[0] for v in trial_record(trial, "seed_values") or []]) > 1
    ]
    return float(np.median(errors)) if errors else None


def nothing_left_to_find(study: optuna.Study, min_trials: int, seed: int) -> bool:
    """Optuna's terminator: its Gaussian-process bound on the improvement still possible (the regret bound of
    Makarova et al., 2022) is below the seed noise of a trial's value, once ``min_trials`` trials are
    complete (docs/METHOD.md §5)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    noise = seed_noise(study)
    if len(complete) < min_trials or noise is None:
        return False
    with warnings.catch_warnings():  # experimental in Optuna 4, deprecated in 5 and kept until 6
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from optuna.terminator import RegretBoundEvaluator, StaticErrorEvaluator, Terminator

        terminator = Terminator(
            improvement_evaluator=RegretBoundEvaluator(min_n_trials=min_trials, seed=seed),
            error_evaluator=StaticErrorEvaluator(noise),
            min_n_trials=min_trials,
        )
        return bool(terminator.should_terminate(study))
