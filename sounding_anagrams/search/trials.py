"""What travels through the search pipeline: a batch of asked trials, each trial's plan, previews and outcome.

Plain records and pure functions, no I/O: every stage module reads and writes these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import Trial, TrialState

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import debugging, one_line, raise_if_connection_lost
from sounding_anagrams.render import Decoded, RenderResult
from sounding_anagrams.sampler.pipeline import SamplerOutput
from sounding_anagrams.search.stores import trial_record

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
AGGREGATORS: dict[str, Callable[[np.ndarray], Any]] = {
    "mean": np.mean,
    "median": np.median,
    "min": np.min,
    "max": np.max,
}


@dataclass
class TrialOutcome:
    """What became of one trial: its aggregate values and mean scores, and per seed the values and scores."""

    number: int
    state: TrialState
    values: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    folder: Path | None = None  # the trial folder, holding seed-0, seed-1, ...
    seeds: list[int] = field(default_factory=list)
    seed_values: list[list[float]] = field(default_factory=list)
    seed_scores: list[dict[str, float]] = field(default_factory=list)
    best_seed: int | None = None
    # Raced out: significantly worse than the leader on its first seeds; its value is their aggregate.
    raced: bool = False
    # Its MLflow run, opened when it is told: where its files are shared, whatever machine rendered it.
    run_id: str | None = None
    artifact_uri: str | None = None

    def user_attrs(self) -> dict[str, Any]:
        """What Optuna keeps of the trial beside its values (JSON), short facts a person reads in any client.
        The folder is the rendering machine's (a hint there; its seeds are ``seed-0``, ``seed-1``, ...); the
        MLflow run is what any machine reads the files from."""
        attrs: dict[str, Any] = {"seeds": self.seeds}
        if self.run_id is not None:
            attrs["mlflow_run_id"] = self.run_id
        if self.folder is not None:
            attrs["trial_folder"] = str(self.folder.resolve())
        if self.raced:
            attrs["raced"] = True
        if self.best_seed is not None:
            attrs["best_seed"] = self.best_seed
        if self.reason:
            attrs["fail_reason"] = self.reason
        return attrs

    def records(self) -> dict[str, Any]:
        """The trial's long records (:data:`~sounding_anagrams.search.stores.TRIAL_RECORDS`): its mean scores,
        and every seed's values and scores, kept where no client lists them."""
        records: dict[str, Any] = {}
        if self.artifact_uri is not None:
            records["artifact_uri"] = self.artifact_uri
        if self.scores:
            records["scores"] = self.scores
        if self.seed_values:
            records["seed_values"] = self.seed_values
            records["seed_scores"] = self.seed_scores
        return records


@dataclass
class Judged:
    """What the earlier rounds of a racing trial judged: per seed, in seed order, its values and scores, and
    the best render so far (its clip is made once the trial is told)."""

    seed_values: list[list[float]] = field(default_factory=list)
    seed_scores: list[dict[str, float]] = field(default_factory=list)
    best: RenderResult | None = None


@dataclass
class TrialPlan:
    """One asked trial: its knob set and the M configs (one per seed) it renders, in rounds when it races.

    A round is ``round_size`` seeds from seed ``first`` (one round of all M seeds without racing); each
    round is one entry of a batch, and the next round of a trial that races on is a new plan
    (:meth:`next_round`) sharing ``judged``.
    """

    trial: Trial
    config: RenderConfig
    seeds: list[int]
    configs: list[RenderConfig]
    round_size: int = 0  # 0: all seeds in one round
    first: int = 0
    judged: Judged = field(default_factory=Judged)

    def __post_init__(self) -> None:
        if not self.round_size:
            self.round_size = len(self.configs)

    @property
    def round_configs(self) -> list[RenderConfig]:
        """The configs this round renders (seed indices ``first`` ... ``first + round_size - 1``)."""
        return self.configs[self.first : self.first + self.round_size]

    @property
    def round(self) -> int:
        return self.first // self.round_size if self.round_size else 0

    @property
    def last_round(self) -> bool:
        return self.first + self.round_size >= len(self.configs)

    def next_round(self) -> TrialPlan:
        return TrialPlan(
            self.trial,
            self.config,
            self.seeds,
            self.configs,
            self.round_size,
            self.first + self.round_size,
            self.judged,
        )

    def knob_set(self) -> dict[str, Any]:
        """The config without its seed, plus the seeds and the searched knobs under their study-file names
        (``view_balance`` beside the ``view_weights`` it sets): the trial run's MLflow params."""
        knobs = self.config.to_dict()
        knobs.pop("seed")
        return {**knobs, **self.trial.params, "seeds": self.seeds}


@dataclass
class ScoredPreview:
    """A trial's x0 preview, decoded and scored: per seed its decoded pictures and sounds and its scores."""

    decoded: list[Decoded]
    records: list[dict[str, float]]


@dataclass
class Preview:
    """One trial's x0 preview, scored in the background and decided at loop index ``decide_at``."""

    plan: int  # index of the trial in its batch
    percent: int  # of the schedule: what Optuna and MLflow see as the step
    renders: list[int]  # the trial's renders in the sampler call: stopped together if pruned
    decide_at: int
    job: Future[dict[int, ScoredPreview | None]]


@dataclass
class Batch:
    """The trials of one sampler call on their way through the pipeline: asked, sampled, judged, published."""

    trials: list[Trial]
    # The trials finished when this batch was asked: all its pruning decisions see these and no others.
    visible: frozenset[int] = frozenset()
    plans: list[TrialPlan] = field(default_factory=list)
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)
    previews: dict[int, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)
    output: SamplerOutput | None = None  # the sampler's latents, until judged
    # A pruned trial's last preview (percent, one Decoded per seed): the judge writes its pictures and sounds.
    pruned_previews: dict[int, tuple[int, list[Decoded]]] = field(default_factory=dict)
    results: list[list[RenderResult]] = field(default_factory=list)  # per trial, per seed, until published
    # Each complete trial's best render (of this round or an earlier one): its clip and media.
    best_renders: dict[int, RenderResult] = field(default_factory=dict)
    going_on: list[TrialPlan] = field(default_factory=list)  # next rounds of the trials racing on

    def numbers(self) -> list[int]:
        return [trial.number for trial in self.trials]

    def rounds(self) -> dict[int, int]:
        """Trial number -> the round of it this batch renders (0 for a trial that failed when asked)."""
        rounds = dict.fromkeys(self.numbers(), 0)
        rounds.update({plan.trial.number: plan.round for plan in self.plans})
        return rounds

    def fail(self, error: Exception) -> None:
        """Out of memory, a judge refusing input: every trial of the batch not yet judged fails, not the
        study. A lost storage is no trial's failure: it is raised again (the search stops on it)."""
        raise_if_connection_lost(error)
        logger.warning("batch of trials %s failed: %s", self.numbers(), one_line(error), exc_info=debugging())
        for plan in self.plans:
            self.outcomes.setdefault(
                plan.trial.number,
                TrialOutcome(
                    plan.trial.number,
                    TrialState.FAIL,
                    reason=f"batch failed: {type(error).__name__}: {error}",
                    seeds=plan.seeds,
                ),
            )


def outcome_of(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    """A told trial's outcome as its Optuna record keeps it (to complete what a stopped search left)."""
    attrs = trial.user_attrs
    folder = attrs.get("trial_folder")
    return TrialOutcome(
        trial.number,
        trial.state,
        list(trial.values or []),
        dict(trial_record(trial, "scores") or {}),
        reason=attrs.get("fail_reason"),
        folder=Path(folder) if folder else None,
        seeds=list(attrs.get("seeds", [])),
        seed_values=list(trial_record(trial, "seed_values") or []),
        seed_scores=list(trial_record(trial, "seed_scores") or []),
        best_seed=attrs.get("best_seed"),
        raced=bool(attrs.get("raced", False)),
        run_id=attrs.get("mlflow_run_id"),
        artifact_uri=trial_record(trial, "artifact_uri"),
    )


def aggregate(values: Sequence[float], how: str) -> float:
    """The M per-seed values of one objective as the trial's value (``mean``, ``median``, ``min``, ``max``).

    Any non-finite seed makes the aggregate NaN: a knob set is judged on all of its seeds.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 or not np.isfinite(array).all():
        return float("nan")
    return float(AGGREGATORS[how](array))


def mean_record(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each score's mean over the seeds of a trial (the leaderboard's and MLflow's score columns)."""
    names = [name for name in records[0] if all(name in r for r in records)] if records else []
    return {name: float(np.mean([r[name] for r in records])) for name in names}


def best_seed_index(seed_values: Sequence[Sequence[float]]) -> int:
    """The seed whose render is best: the highest value (all objectives are maximised), or for several
    objectives the highest sum."""
    return int(np.argmax([sum(values) for values in seed_values]))
