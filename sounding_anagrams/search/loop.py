"""The search loop: ask K trials, render them in one batched call, score them, tell Optuna, log MLflow.

- Previews: at a few fractions of the steps each candidate's predicted clean latent is decoded and scored;
  the objective is reported to Optuna and pruned candidates stop rendering (the batch shrinks).
- A candidate that fails (NaN, out of memory, a decoding error, an invalid combination of knobs) becomes a
  FAIL trial with its reason; the study goes on.
- Every told trial is in the Optuna storage at once: Ctrl-C or a kill loses no finished trial, and running the
  same command again resumes the same study (the trial budget counts the study's finished trials).
- In-flight trials send heartbeats; a killed worker's trials are failed as stale by the next run.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from filelock import FileLock
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers
from sounding_anagrams.render import RenderResult, decode_candidate, render
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.sampler.pipeline import StepState
from sounding_anagrams.search.study import ParamSpec, StudyConfig
from sounding_anagrams.search.tracking import Tracker, objective_metrics

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 300


@dataclass
class SearchSettings:
    runs_dir: Path
    storage: str | None = None
    trials: int | None = None
    minutes: float | None = None
    batch: int | None = None
    progress: bool = True
    tracking_uri: str | None = None
    max_unet_batch: int | None = None


@dataclass
class TrialOutcome:
    number: int
    state: TrialState
    values: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    folder: Path | None = None


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    outcomes: list[TrialOutcome]
    unet_samples: int
    parent_run_id: str | None


def storage_url(settings: SearchSettings) -> str:
    return settings.storage or f"sqlite:///{settings.runs_dir.resolve() / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage (sqlite for one machine, PostgreSQL for many) with heartbeats for killed workers."""
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        warnings.simplefilter(
            "ignore", optuna.exceptions.ExperimentalWarning
        )  # heartbeats are "experimental"
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
        )
    except Exception as error:  # sqlalchemy raises many kinds; the user needs the URL and the reason
        raise ConfigError("--storage", url, f"cannot open this Optuna storage: {error}") from None


def make_sampler(study: StudyConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = study.seed if seed is None else seed
    if study.sampler == "tpe":
        # constant_liar keeps the K trials of one batch (and other workers' running trials) apart.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=True)
    if study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return AskTellGridSampler({p.name: p.grid() for p in study.space}, seed=seed)


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


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    kinds: dict[str, Any] = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    try:
        return kinds[study.pruner.type](**study.pruner.options)
    except TypeError as error:
        raise ConfigError(
            "pruner",
            dict(study.pruner.options),
            f"bad options for {study.pruner.type}: {error}",
            source=study.source,
        ) from None


def suggest(trial: Trial, param: ParamSpec) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.type == "int":
        assert param.low is not None and param.high is not None
        return trial.suggest_int(
            param.name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
    assert param.low is not None and param.high is not None
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def preview_steps(config: RenderConfig, fractions: Sequence[float]) -> dict[int, int]:
    """Step (1-based: after that many steps) -> percent of the schedule, where the x0 preview is scored.

    Previews are reported to Optuna (and MLflow) at the percent, not the step, so a pruner compares candidates
    at the same stage even when the number of steps is one of the searched knobs. Never the last step.
    """
    n = config.num_inference_steps
    steps = {max(1, round(f * n)): round(100 * f) for f in fractions}
    return {step: percent for step, percent in steps.items() if step < n}


class SearchRunner:
    """Runs one study: batches of trials through the sampler, scorers, Optuna and MLflow."""

    def __init__(
        self,
        study: StudyConfig,
        models: ModelBundle,
        scorers: Scorers,
        settings: SearchSettings,
        *,
        study_name: str | None = None,
    ) -> None:
        self.study = study
        self.models = models
        self.scorers = scorers
        self.settings = settings
        self.study_name = study_name or study.name
        self.storage = storage_url(settings)
        settings.runs_dir.mkdir(parents=True, exist_ok=True)
        self.rdb = open_storage(self.storage)
        # Creating the tables and the study is done by one process at a time (workers start together). The
        # process that creates the study samples from the study's seed; a resumed run or a second worker
        # gets its own stream, else it would propose the very same candidates again.
        with FileLock(str(settings.runs_dir / ".optuna.lock")):
            existing = [s.study_name for s in optuna.get_all_study_summaries(self.rdb)]
            seed = (
                study.seed
                if self.study_name not in existing
                else (hash((study.seed, time.time_ns(), os.getpid())) % 2**31)
            )
            self.optuna_study = optuna.create_study(
                study_name=self.study_name,
                storage=self.rdb,
                load_if_exists=True,
                directions=study.directions,
                sampler=make_sampler(study, seed),
                pruner=make_pruner(study),
            )
        if list(self.optuna_study.directions) != [
            optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in study.directions
        ]:
            raise ConfigError(
                "objectives",
                [o.spec for o in study.objectives],
                f"study {self.study_name!r} in {self.storage} was created with "
                f"{len(self.optuna_study.directions)} objective(s) of other directions; give the study a new "
                "name or use another --runs folder",
                source=study.source,
            )
        self.optuna_study.set_user_attr("study_file", study.source)
        self.optuna_study.set_user_attr("runs_dir", str(settings.runs_dir.resolve()))
        self.optuna_study.set_user_attr("objectives", [o.spec for o in study.objectives])
        self.tracker = Tracker(settings.runs_dir, self.study_name, tracking_uri=settings.tracking_uri)
        self.unet_samples = 0
        self._last_heartbeat = 0.0

    # -- budget ----------------------------------------------------------------------------------------

    def finished_count(self) -> int:
        """Finished trials that count against the budget: a trial cut short by Ctrl-C is done again."""
        return sum(
            t.user_attrs.get("fail_reason") != INTERRUPTED
            for t in self.optuna_study.get_trials(deepcopy=False, states=FINISHED)
        )

    def target_trials(self) -> int | None:
        return self.settings.trials if self.settings.trials is not None else self.study.budget.trials

    def run(self) -> SearchSummary:
        minutes = self.settings.minutes if self.settings.minutes is not None else self.study.budget.minutes
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        target = self.target_trials()
        batch = self.settings.batch or self.study.batch
        self.tracker.start_parent(
            f"search {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {
                "study_file": self.study.source,
                "objectives": [o.spec for o in self.study.objectives],
                "sampler": self.study.sampler,
                "pruner": self.study.pruner.type,
                "batch": batch,
                "trials_target": target,
                "space": [p.name for p in self.study.space],
                **self.study.render.to_dict(),
            },
            {"study": self.study_name, "storage": self.storage},
        )
        outcomes: list[TrialOutcome] = []
        done = self.finished_count()
        bar = tqdm(
            total=target,
            initial=min(done, target or done),
            desc=f"trials of {self.study_name}",
            disable=not self.settings.progress,
            unit="trial",
        )
        status = "FINISHED"
        try:
            while time.monotonic() < deadline:
                self.fail_stale_trials()
                remaining = (target - self.finished_count()) if target is not None else batch
                if remaining <= 0:
                    break
                if isinstance(self.optuna_study.sampler, AskTellGridSampler):
                    remaining = min(remaining, self.optuna_study.sampler.unvisited(self.optuna_study))
                    if remaining <= 0:
                        break
                new = self.run_batch(min(batch, remaining))
                outcomes.extend(new)
                bar.update(len(new))
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            bar.close()
            self.finish(status)
        return SearchSummary(
            self.study_name, self.storage, outcomes, self.unet_samples, self.tracker.parent_run_id
        )

    def finish(self, status: str) -> None:
        from sounding_anagrams.search.report import study_pictures

        try:
            folder = self.settings.runs_dir / "reports" / self.study_name / str(self.tracker.parent_run_id)
            files, metrics = study_pictures(self.optuna_study, self.study, folder)
            self.tracker.log_parent_artifacts(files, metrics)
        except Exception as error:  # pictures are a bonus; never lose the run over a plot
            logger.warning("could not draw the study pictures: %s", error)
        self.tracker.end_parent(status)

    # -- one batch -------------------------------------------------------------------------------------

    def render_folder(self, number: int) -> Path:
        return self.settings.runs_dir / "renders" / self.study_name / f"trial-{number:04d}"

    def run_batch(self, k: int) -> list[TrialOutcome]:
        """Ask k trials, render the valid ones in one batched call, score, tell and log every one."""
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for study.optimize; we send them ourselves.
            warnings.simplefilter("ignore", UserWarning)
            trials = [self.optuna_study.ask() for _ in range(k)]
        self.heartbeat(trials, force=True)
        outcomes: dict[int, TrialOutcome] = {}
        configs: list[tuple[Trial, RenderConfig]] = []
        for trial in trials:
            params = {param.name: suggest(trial, param) for param in self.study.space}
            try:
                configs.append((trial, self.study.candidate_config(params)))
            except ConfigError as error:
                outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.FAIL, reason=f"invalid knobs: {error}"
                )
        previews: dict[int, list[tuple[int, dict[str, float]]]] = {t.number: [] for t in trials}
        try:
            results = self.render_trials(configs, previews) if configs else []
            self.score_and_judge(results, configs, outcomes)
        except KeyboardInterrupt:
            for trial in trials:
                outcomes.setdefault(
                    trial.number, TrialOutcome(trial.number, TrialState.FAIL, reason=INTERRUPTED)
                )
            self.tell_and_log(trials, outcomes, previews, configs)
            raise
        except (
            Exception
        ) as error:  # out of memory, a disk full, a judge refusing input: the batch fails, not the study
            logger.exception("batch of trials %s failed", [t.number for t in trials])
            for trial, _ in configs:
                outcomes.setdefault(
                    trial.number,
                    TrialOutcome(
                        trial.number, TrialState.FAIL, reason=f"batch failed: {type(error).__name__}: {error}"
                    ),
                )
        self.tell_and_log(trials, outcomes, previews, configs)
        return [outcomes[t.number] for t in trials]

    def render_trials(
        self,
        configs: list[tuple[Trial, RenderConfig]],
        previews: dict[int, list[tuple[int, dict[str, float]]]],
    ) -> list[RenderResult]:
        steps = [preview_steps(config, self.study.previews) for _, config in configs]
        single = len(self.study.objectives) == 1

        def on_step(state: StepState) -> list[int]:
            self.heartbeat([configs[c][0] for c in state.candidates])
            due = [
                (row, c)
                for row, c in enumerate(state.candidates)
                if state.step + 1 in steps[c] and bool(torch.isfinite(state.pred_x0[row]).all())
            ]
            if not due:
                return []
            decoded = [
                decode_candidate(state.pred_x0[row], configs[c][1], self.models, with_transition=False)
                for row, c in due
            ]
            records = self.scorers.score(
                [
                    self.candidate(configs[c][1], d.pictures, d.waves)
                    for (_, c), d in zip(due, decoded, strict=True)
                ]
            )
            stop = []
            for (_, c), record in zip(due, records, strict=True):
                trial = configs[c][0]
                percent = steps[c][state.step + 1]
                previews[trial.number].append((percent, record))
                value = self.study.objectives[0].value(record)
                if single and math.isfinite(value):
                    trial.report(value, percent)
                    if trial.should_prune():
                        stop.append(c)
            return stop

        batch = render(
            [config for _, config in configs],
            self.models,
            [self.render_folder(trial.number) for trial, _ in configs],
            callback=on_step,  # always: it also sends the heartbeats
            progress=self.settings.progress,
            max_unet_batch=self.settings.max_unet_batch,
        )
        self.unet_samples += sum(batch.unet_samples.values())
        return batch.results

    @staticmethod
    def candidate(config: RenderConfig, pictures: list[Any], waves: list[Any]) -> Candidate:
        return Candidate(pictures, waves, config.image_prompts, config.audio_prompts)

    def heartbeat(self, trials: Sequence[Trial], *, force: bool = False) -> None:
        """Tell the storage these trials are alive (at most every HEARTBEAT_SECONDS unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        self._last_heartbeat = now
        for trial in trials:
            self.rdb.record_heartbeat(trial._trial_id)

    def fail_stale_trials(self) -> None:
        """Trials whose worker stopped sending heartbeats (killed) become FAIL, so nothing stays RUNNING."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.optuna_study)

    def score_and_judge(
        self,
        results: list[RenderResult],
        configs: list[tuple[Trial, RenderConfig]],
        outcomes: dict[int, TrialOutcome],
    ) -> None:
        done = []
        for (trial, _), result in zip(configs, results, strict=True):
            if result.failure:
                outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.FAIL, reason=result.failure, folder=result.folder
                )
            elif result.stopped:
                outcomes[trial.number] = TrialOutcome(trial.number, TrialState.PRUNED, folder=result.folder)
            else:
                done.append((trial, result))
        records = self.scorers.score(
            [
                self.candidate(r.config, r.decoded.pictures, r.decoded.waves)
                for _, r in done
                if r.decoded is not None
            ]
        )
        for (trial, result), record in zip(done, records, strict=True):
            values = [objective.value(record) for objective in self.study.objectives]
            if all(math.isfinite(v) for v in values):
                outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.COMPLETE, values, record, folder=result.folder
                )
            else:
                missing = [
                    o.spec for o, v in zip(self.study.objectives, values, strict=True) if not math.isfinite(v)
                ]
                outcomes[trial.number] = TrialOutcome(
                    trial.number,
                    TrialState.FAIL,
                    [],
                    record,
                    reason=f"objective not finite: {missing}",
                    folder=result.folder,
                )

    def tell_and_log(
        self,
        trials: Sequence[Trial],
        outcomes: Mapping[int, TrialOutcome],
        previews: Mapping[int, list[tuple[int, dict[str, float]]]],
        configs: Sequence[tuple[Trial, RenderConfig]],
    ) -> None:
        """Tell Optuna every trial of the batch first (the storage is the record), then log them to MLflow."""
        for trial in trials:
            outcome = outcomes[trial.number]
            if outcome.reason:
                logger.warning("trial %d failed: %s", trial.number, outcome.reason)
            try:
                if outcome.folder is not None:
                    trial.set_user_attr("render_folder", str(outcome.folder.resolve()))
                if outcome.scores:
                    trial.set_user_attr("scores", outcome.scores)
                if outcome.reason:
                    trial.set_user_attr("fail_reason", outcome.reason)
                if outcome.state == TrialState.COMPLETE:
                    self.optuna_study.tell(trial, outcome.values)
                else:
                    self.optuna_study.tell(trial, state=outcome.state)
            except (RuntimeError, ValueError) as error:  # e.g. failed as stale meanwhile by another worker
                logger.warning(
                    "trial %d could not be told (%s); the storage keeps its state", trial.number, error
                )
        by_number = {trial.number: config for trial, config in configs}
        for trial in trials:
            outcome = outcomes[trial.number]
            config = by_number.get(trial.number)
            try:
                self.tracker.log_trial(
                    trial_number=trial.number,
                    state=self.rdb.get_trial(trial._trial_id).state.name,
                    study=self.study_name,
                    config=config.to_dict() if config else trial.params,
                    scores=outcome.scores,
                    objectives=objective_metrics(outcome.values),
                    previews=previews.get(trial.number, []),
                    folder=outcome.folder,
                    reason=outcome.reason,
                )
            except Exception as error:  # MLflow is the browsable copy; Optuna already has the trial
                logger.warning("trial %d was not logged to MLflow: %s", trial.number, error)
