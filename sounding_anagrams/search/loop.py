"""The search loop: ask K trials, render all their seeds in one batched call, score, tell Optuna, log MLflow.

- A trial is one knob set rendered on ``seeds_per_trial`` seeds that the study derives (never the Optuna
  sampler); its value is the ``aggregate`` of the per-seed objective values (docs/METHOD.md §5). Trial 0 is
  the study's hand-tuned ``render:`` values, then its ``start_points``.
- Previews: at a few fractions of the steps each render's predicted clean latent is decoded and scored; the
  aggregate over the trial's seeds is reported to Optuna and a pruned trial stops all its seeds.
- A trial that fails (NaN on any seed, out of memory, a decoding error, an invalid combination of knobs)
  becomes a FAIL trial with its reason; the study goes on.
- Every told trial is in the Optuna storage at once: Ctrl-C or a kill loses no finished trial, and running the
  same command again resumes the same study (the trial budget counts the study's finished trials).
- In-flight trials send heartbeats; a killed worker's trials are failed as stale by the next run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from filelock import FileLock
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import (
    ConfigError,
    DiskFullError,
    SoundingAnagramsError,
    database_reason,
    is_disk_full,
    one_line,
    shown_url,
)
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers
from sounding_anagrams.render import RenderResult, decode_candidate, render
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.sampler.pipeline import StepState
from sounding_anagrams.search.samplers import AskTellGridSampler, make_pruner, make_sampler
from sounding_anagrams.search.stores import check_sqlite_file
from sounding_anagrams.search.study import ParamSpec, StudyConfig, trial_seeds
from sounding_anagrams.search.tracking import Tracker, default_tracking_uri, objective_metrics
from sounding_anagrams.search.workers import this_worker, worker_is_dead

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
INTERRUPTED = "interrupted"
WORKER_DIED = "its worker died"
DISK_FULL = "disk full"
ROOM_FOR_STORES = 16 * 2**20  # bytes kept free for the Optuna and MLflow databases beside the renders
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 300
AGGREGATORS: dict[str, Callable[[np.ndarray], Any]] = {
    "mean": np.mean,
    "median": np.median,
    "min": np.min,
    "max": np.max,
}


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

    def user_attrs(self) -> dict[str, Any]:
        """What Optuna keeps of the trial beside its values (JSON)."""
        attrs: dict[str, Any] = {"seeds": self.seeds}
        if self.folder is not None:
            attrs["trial_folder"] = str(self.folder.resolve())
            attrs["render_folders"] = [
                str((self.folder / f"seed-{k}").resolve()) for k in range(len(self.seeds))
            ]
        if self.scores:
            attrs["scores"] = self.scores
        if self.seed_values:
            attrs["seed_values"] = self.seed_values
            attrs["seed_scores"] = self.seed_scores
        if self.best_seed is not None:
            attrs["best_seed"] = self.best_seed
            attrs["render_folder"] = attrs["render_folders"][self.best_seed]
        if self.reason:
            attrs["fail_reason"] = self.reason
        return attrs


@dataclass
class TrialPlan:
    """One asked trial: its knob set and the M configs (one per seed) rendered for it."""

    trial: Trial
    config: RenderConfig
    seeds: list[int]
    configs: list[RenderConfig]

    def knob_set(self) -> dict[str, Any]:
        """The config without its seed, plus the seeds (MLflow params)."""
        knobs = self.config.to_dict()
        knobs.pop("seed")
        return {**knobs, "seeds": self.seeds}


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    outcomes: list[TrialOutcome]
    unet_samples: int
    parent_run_id: str | None


def storage_url(settings: SearchSettings) -> str:
    return settings.storage or f"sqlite:///{settings.runs_dir.resolve() / 'optuna.db'}"


def check_stores(settings: SearchSettings) -> None:
    """Open the Optuna storage and reach the MLflow store before any model loads; refuse to start if not.

    The search refuses rather than running with Optuna alone: MLflow is where a person looks and listens, and
    a trial logged nowhere browsable would have to be logged again by hand.
    """
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(settings.runs_dir / ".optuna.lock")):
        check_sqlite_file(storage_url(settings))
        open_storage(storage_url(settings))
    uri = settings.tracking_uri or default_tracking_uri(settings.runs_dir)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                "MLFLOW_TRACKING_URI",
                uri,
                f"no MLflow server answers there ({type(error).__name__}); start it (mlflow server ...) or "
                "unset MLFLOW_TRACKING_URI for the local store under --runs",
            ) from None


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
        raise ConfigError(
            "--storage", shown_url(url), f"cannot open this Optuna storage: {database_reason(error)}"
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
        # Creating the tables and the study is done by one process at a time (workers start together). The
        # process that creates the study samples from the study's seed; a resumed run or a second worker
        # gets its own stream, else it would propose the very same candidates again.
        with FileLock(str(settings.runs_dir / ".optuna.lock")):
            self.rdb = open_storage(self.storage)
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
            if self.study_name not in existing and study.sampler != "grid":
                # Trial 0 is the hand-tuned baseline, then the study's start points: the search starts from
                # what a person would try first and can only improve on it. (A grid visits its own points.)
                for index, point in enumerate(study.start_points):
                    label = "baseline" if study.baseline and index == 0 else f"start point {index}"
                    self.optuna_study.enqueue_trial(dict(point), user_attrs={"start_point": label})
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
        self.check_definition()
        self.optuna_study.set_user_attr("study_file", study.source)
        self.optuna_study.set_user_attr("runs_dir", str(settings.runs_dir.resolve()))
        self.optuna_study.set_user_attr("objectives", [o.spec for o in study.objectives])
        self.optuna_study.set_user_attr("seeds_per_trial", study.seeds_per_trial)
        self.optuna_study.set_user_attr("aggregate", study.aggregate)
        self.render_root = claim_render_root(settings.runs_dir, self.study_name, self.optuna_study)
        self.tracker = Tracker(settings.runs_dir, self.study_name, tracking_uri=settings.tracking_uri)
        self.unet_samples = 0
        self._last_heartbeat = 0.0
        # What a trial takes on the disk under --runs (measured per batch) and the free space before the last.
        self._bytes_per_trial: int | None = None
        self._free_before: int | None = None
        self._last_batch = 1

    # -- budget ----------------------------------------------------------------------------------------

    def finished_count(self) -> int:
        """Finished trials that count against the budget: a trial cut short by Ctrl-C, or whose worker died,
        judged nothing and is done again."""
        return sum(not is_cut_short(t) for t in self.optuna_study.get_trials(deepcopy=False, states=FINISHED))

    def target_trials(self) -> int | None:
        return self.settings.trials if self.settings.trials is not None else self.study.budget.trials

    def run(self) -> SearchSummary:
        minutes = self.settings.minutes if self.settings.minutes is not None else self.study.budget.minutes
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        target = self.target_trials()
        batch = self.settings.batch or self.study.batch  # renders per sampler call
        per_call = max(1, batch // self.study.seeds_per_trial)  # trials per sampler call
        self.tracker.start_parent(
            f"search {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {
                "study_file": self.study.source,
                "objectives": [o.spec for o in self.study.objectives],
                "sampler": self.study.sampler,
                "pruner": self.study.pruner.type,
                "batch": batch,
                "seeds_per_trial": self.study.seeds_per_trial,
                "aggregate": self.study.aggregate,
                "trials_target": target,
                "space": [p.name for p in self.study.space],
                **self.study.render.to_dict(),
            },
            {
                "study": self.study_name,
                "storage": self.storage,
                **{k: str(v) for k, v in this_worker().items()},
            },
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
                remaining = (target - self.finished_count()) if target is not None else per_call
                if remaining <= 0:
                    break
                if isinstance(self.optuna_study.sampler, AskTellGridSampler):
                    remaining = min(remaining, self.optuna_study.sampler.unvisited(self.optuna_study))
                    if remaining <= 0:
                        break
                self.check_room(min(per_call, remaining))
                new = self.run_batch(min(per_call, remaining))
                outcomes.extend(new)
                bar.update(len(new))
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            if is_disk_full(error) and not isinstance(error, SoundingAnagramsError):
                # The database under --runs could not grow: a transaction is whole or not at all in it, so
                # what was told before is kept.
                raise DiskFullError(
                    f"the disk under {self.settings.runs_dir} is full ({one_line(error)}); the trials "
                    f"finished before are kept in {shown_url(self.storage)}: free some space and run the "
                    "same command to resume"
                ) from None
            raise
        finally:
            bar.close()
            try:
                self.fail_stale_trials()  # a rerun that completes the budget leaves nothing of the dead alive
                self.finish(status)
            except Exception as error:  # e.g. the disk is full: say the first error, not this one
                logger.warning("could not close the search cleanly: %s", one_line(error))
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

    def check_room(self, trials: int) -> None:
        """Stop before a batch that the disk under --runs has no room for: the GPU work would be lost, and the
        databases beside the renders need room to record what is finished.

        The need is measured, not guessed: the most disk space one trial took in this run (its render folder,
        its MLflow copy and records), or before any, the largest trial folder of this study.
        """
        free = shutil.disk_usage(self.render_root).free
        if self._bytes_per_trial is None:
            folders = [p for p in self.render_root.glob("trial-*") if p.is_dir()]
            self._bytes_per_trial = max((folder_bytes(p) for p in folders), default=0)
        elif self._free_before is not None:
            self._bytes_per_trial = max(self._bytes_per_trial, (self._free_before - free) // self._last_batch)
        self._free_before, self._last_batch = free, trials
        need = trials * self._bytes_per_trial + ROOM_FOR_STORES
        if free < need:
            stores = f"{ROOM_FOR_STORES // 2**20} MiB for the stores"
            what = (
                f"{self._bytes_per_trial / 2**20:.1f} MiB a trial, as measured, and {stores}"
                if self._bytes_per_trial
                else stores
            )
            raise DiskFullError(
                f"only {free / 2**20:.0f} MiB are free under {self.render_root}; the next batch of "
                f"{trials} trial(s) needs about {need / 2**20:.0f} MiB ({what}): the trials finished are "
                f"kept in {shown_url(self.storage)}; free some space and run the same command to resume"
            )

    # -- one batch -------------------------------------------------------------------------------------

    def check_definition(self) -> None:
        """Refuse to add this study file's trials to a stored study of the same name defined otherwise.

        What defines a study (the fixed render fields, objectives, space, seeds and aggregate) is recorded
        when it is created; budget, batch, sampler and pruner may change between runs.
        """
        definition = study_definition(self.study)
        stored = self.optuna_study.user_attrs.get("definition")
        if stored is None:
            self.optuna_study.set_user_attr("definition", definition)
            return
        differs = sorted(key for key in {*stored, *definition} if stored.get(key) != definition.get(key))
        if differs:
            shown = "; ".join(
                f"{key}: {stored.get(key)!r} there, {definition.get(key)!r} here" for key in differs
            )
            raise ConfigError(
                "name",
                self.study_name,
                f"a study of this name in {self.storage} was made from another study file ({shown}); its "
                "trials would mix two experiments: give this study another name, or use another --runs or "
                "--storage",
                source=self.study.source,
            )

    def trial_folder(self, number: int) -> Path:
        return self.render_root / f"trial-{number:04d}"

    def render_folder(self, number: int, seed_index: int) -> Path:
        """One render of a trial: ``<runs>/renders/<study>/trial-0007/seed-2`` (its seed in config.yaml)."""
        return self.trial_folder(number) / f"seed-{seed_index}"

    def plan_trial(self, trial: Trial) -> TrialPlan:
        """The trial's knob set and its seeds (from the study seed, never proposed: docs/METHOD.md §5)."""
        params = {param.name: suggest(trial, param) for param in self.study.space}
        config = self.study.candidate_config(params)
        # Only the benchmark's single-seed baseline design searches "seed" itself; study files cannot.
        seeds = (
            [config.seed]
            if "seed" in params
            else trial_seeds(self.study.seed, trial.number, self.study.seeds_per_trial)
        )
        trial.set_user_attr("seeds", seeds)
        return TrialPlan(trial, config, seeds, [config.replace(seed=seed) for seed in seeds])

    def run_batch(self, k: int) -> list[TrialOutcome]:
        """Ask k trials, render all their seeds in one batched call, score, tell and log every one."""
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for study.optimize; we send them ourselves.
            warnings.simplefilter("ignore", UserWarning)
            trials = [self.optuna_study.ask() for _ in range(k)]
        self.heartbeat(trials, force=True)
        for trial in trials:
            trial.set_user_attr("worker", this_worker())
        outcomes: dict[int, TrialOutcome] = {}
        plans: list[TrialPlan] = []
        for trial in trials:
            try:
                plans.append(self.plan_trial(trial))
            except ConfigError as error:
                outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.FAIL, reason=f"invalid knobs: {error}"
                )
        previews: dict[int, list[tuple[int, dict[str, float]]]] = {t.number: [] for t in trials}
        try:
            results = self.render_trials(plans, previews) if plans else []
            self.score_and_judge(results, plans, outcomes)
        except KeyboardInterrupt:
            for trial in trials:
                outcomes.setdefault(
                    trial.number, TrialOutcome(trial.number, TrialState.FAIL, reason=INTERRUPTED)
                )
            self.tell_and_log(trials, outcomes, previews, plans)
            raise
        except (
            Exception
        ) as error:  # out of memory, a disk full, a judge refusing input: the batch fails, not the study
            logger.exception("batch of trials %s failed", [t.number for t in trials])
            for plan in plans:
                outcomes.setdefault(
                    plan.trial.number,
                    TrialOutcome(
                        plan.trial.number,
                        TrialState.FAIL,
                        reason=f"batch failed: {type(error).__name__}: {error}",
                        seeds=plan.seeds,
                    ),
                )
        self.tell_and_log(trials, outcomes, previews, plans)
        full = [o for o in outcomes.values() if o.reason and o.reason.startswith(DISK_FULL)]
        if full:
            # Every later trial would fail the same way: stop, with what was finished kept.
            raise DiskFullError(
                f"the disk under {self.render_root} is full (trial {full[0].number}: {full[0].reason}); the "
                f"trials finished before are kept in {self.storage}, and the cut-short ones are done again: "
                "free some space and run the same command to resume"
            )
        return [outcomes[t.number] for t in trials]

    def render_trials(
        self,
        plans: list[TrialPlan],
        previews: dict[int, list[tuple[int, dict[str, float]]]],
    ) -> list[list[RenderResult]]:
        """Every seed of every trial in one batched sampler call; returns the renders per trial.

        Previews: at a preview step all seeds of a trial are at the same stage (one knob set, one schedule);
        their objective values are aggregated like the final ones and reported once per trial, and a pruned
        trial stops all of its seeds.
        """
        configs = [config for plan in plans for config in plan.configs]
        owner = [p for p, plan in enumerate(plans) for _ in plan.configs]  # render -> its trial's plan
        steps = [preview_steps(plan.config, self.study.previews) for plan in plans]
        single = len(self.study.objectives) == 1

        def on_step(state: StepState) -> list[int]:
            self.heartbeat(
                list({plans[owner[c]].trial.number: plans[owner[c]].trial for c in state.candidates}.values())
            )
            rendering: dict[int, list[tuple[int, int]]] = {}  # plan -> (row, render) of its seeds still going
            for row, c in enumerate(state.candidates):
                rendering.setdefault(owner[c], []).append((row, c))
            # The seeds of one trial share one schedule, so a seed missing here has failed (NaN): the knob set
            # fails as a whole, and its other seeds stop now instead of rendering for nothing.
            stop = [c for p, rows in rendering.items() if len(rows) < len(plans[p].configs) for _, c in rows]
            due = {
                p: rows
                for p, rows in rendering.items()
                if state.step + 1 in steps[p]
                and len(rows) == len(plans[p].configs)
                and all(bool(torch.isfinite(state.pred_x0[row]).all()) for row, _ in rows)
            }
            if not due:
                return stop
            flat = [(p, row, c) for p, rows in due.items() for row, c in rows]
            decoded = [
                decode_candidate(state.pred_x0[row], configs[c], self.models, with_transition=False)
                for _, row, c in flat
            ]
            records = self.scorers.score(
                [
                    self.candidate(configs[c], d.pictures, d.waves)
                    for (_, _, c), d in zip(flat, decoded, strict=True)
                ]
            )
            for p, rows in due.items():
                trial = plans[p].trial
                percent = steps[p][state.step + 1]
                seed_records = [records[i] for i, (q, _, _) in enumerate(flat) if q == p]
                record = mean_record(seed_records)
                value = aggregate(
                    [self.study.objectives[0].value(r) for r in seed_records], self.study.aggregate
                )
                previews[trial.number].append((percent, {**record, "objective": value}))
                if single and math.isfinite(value):
                    trial.report(value, percent)
                    if trial.should_prune():
                        stop += [c for _, c in rows]
            return stop

        folders = [
            self.render_folder(plan.trial.number, k) for plan in plans for k in range(len(plan.configs))
        ]
        batch = render(
            configs,
            self.models,
            folders,
            callback=on_step,  # always: it also sends the heartbeats
            progress=self.settings.progress,
            max_unet_batch=self.settings.max_unet_batch,
        )
        self.unet_samples += sum(batch.unet_samples.values())
        per_trial: list[list[RenderResult]] = [[] for _ in plans]
        for c, result in enumerate(batch.results):
            per_trial[owner[c]].append(result)
        return per_trial

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
        """Trials of workers that died become FAIL, so nothing of a dead process stays RUNNING.

        Two ways, both safe with live workers: a worker on this machine whose process is gone (its pid and
        boot id are recorded on each trial) is dead at once; a worker elsewhere is dead when its heartbeats
        stop for the grace period (Optuna's stale-trial check).
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.optuna_study)
        for trial in self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")
            if not worker or not worker_is_dead(worker):
                continue
            try:
                self.rdb.set_trial_user_attr(
                    trial._trial_id,
                    "fail_reason",
                    f"{WORKER_DIED} (pid {worker['pid']} on {worker['host']})",
                )
                self.rdb.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
                logger.warning("trial %d: its worker (pid %s) died; failed", trial.number, worker["pid"])
            except (RuntimeError, ValueError):  # finished meanwhile by another live worker
                continue
        self.tracker.end_dead_parents()

    def score_and_judge(
        self,
        results: list[list[RenderResult]],
        plans: list[TrialPlan],
        outcomes: dict[int, TrialOutcome],
    ) -> None:
        """Per trial: FAIL if any seed failed (the knob set is not reliable), PRUNED if stopped, else the
        aggregate of its seeds' objective values (the per-seed values and scores are kept)."""
        done: list[tuple[TrialPlan, list[RenderResult]]] = []
        for plan, renders in zip(plans, results, strict=True):
            number = plan.trial.number
            folder = self.trial_folder(number)
            failed = [(k, r) for k, r in enumerate(renders) if r.failure]
            if failed:
                reason = "; ".join(f"seed {k} (seed={r.config.seed}): {r.failure}" for k, r in failed)
                if any(r.write_error is not None and is_disk_full(r.write_error) for _, r in failed):
                    # Judged nothing: like an interrupted trial it is done again once there is room.
                    reason = f"{DISK_FULL}: {reason}"
                outcomes[number] = TrialOutcome(
                    number, TrialState.FAIL, reason=reason, folder=folder, seeds=plan.seeds
                )
            elif any(r.stopped for r in renders):
                outcomes[number] = TrialOutcome(number, TrialState.PRUNED, folder=folder, seeds=plan.seeds)
            else:
                done.append((plan, renders))
        candidates = [
            self.candidate(r.config, r.decoded.pictures, r.decoded.waves)
            for _, renders in done
            for r in renders
            if r.decoded is not None
        ]
        records = iter(self.scorers.score(candidates))
        for plan, renders in done:
            number = plan.trial.number
            seed_scores = [next(records) for _ in renders]
            seed_values = [[o.value(record) for o in self.study.objectives] for record in seed_scores]
            values = [
                aggregate([v[j] for v in seed_values], self.study.aggregate)
                for j in range(len(self.study.objectives))
            ]
            outcome = TrialOutcome(
                number,
                TrialState.COMPLETE,
                values,
                mean_record(seed_scores),
                folder=self.trial_folder(number),
                seeds=plan.seeds,
                seed_values=seed_values,
                seed_scores=seed_scores,
                best_seed=best_seed_index(seed_values),
            )
            if not all(math.isfinite(v) for v in values):
                missing = [
                    o.spec for o, v in zip(self.study.objectives, values, strict=True) if not math.isfinite(v)
                ]
                outcome.state, outcome.values = TrialState.FAIL, []
                outcome.reason = f"objective not finite: {missing}"
            outcomes[number] = outcome

    def tell_and_log(
        self,
        trials: Sequence[Trial],
        outcomes: Mapping[int, TrialOutcome],
        previews: Mapping[int, list[tuple[int, dict[str, float]]]],
        plans: Sequence[TrialPlan],
    ) -> None:
        """Tell Optuna every trial of the batch first (the storage is the record), then log them to MLflow."""
        for trial in trials:
            outcome = outcomes[trial.number]
            if outcome.reason:
                logger.warning("trial %d failed: %s", trial.number, outcome.reason)
            try:
                for key, value in outcome.user_attrs().items():
                    trial.set_user_attr(key, value)
                if outcome.state == TrialState.COMPLETE:
                    self.optuna_study.tell(trial, outcome.values)
                else:
                    self.optuna_study.tell(trial, state=outcome.state)
            except (RuntimeError, ValueError) as error:  # e.g. failed as stale meanwhile by another worker
                logger.warning(
                    "trial %d could not be told (%s); the storage keeps its state", trial.number, error
                )
        by_number = {plan.trial.number: plan for plan in plans}
        for trial in trials:
            outcome = outcomes[trial.number]
            plan = by_number.get(trial.number)
            try:
                self.tracker.log_trial(
                    trial_number=trial.number,
                    state=self.rdb.get_trial(trial._trial_id).state.name,
                    study=self.study_name,
                    config=plan.knob_set() if plan else trial.params,
                    scores=outcome.scores,
                    objectives=objective_metrics(outcome.values),
                    previews=previews.get(trial.number, []),
                    folder=outcome.folder,
                    reason=outcome.reason,
                    seeds=outcome.seeds,
                    seed_scores=outcome.seed_scores,
                    seed_objectives=[objective_metrics(v) for v in outcome.seed_values],
                    best_seed=outcome.best_seed,
                )
            except Exception as error:  # MLflow is the browsable copy; Optuna already has the trial
                logger.warning("trial %d was not logged to MLflow: %s", trial.number, error)


def is_cut_short(trial: optuna.trial.FrozenTrial) -> bool:
    """A FAIL that judged nothing (Ctrl-C, a dead worker): it does not count against the budget."""
    reason = str(trial.user_attrs.get("fail_reason", ""))
    return reason == INTERRUPTED or reason.startswith((WORKER_DIED, DISK_FULL))


def study_definition(study: StudyConfig) -> dict[str, Any]:
    """What makes two runs the same experiment (JSON): fixed render fields, objectives, space, seeds."""
    render = study.render.to_dict()
    return {
        **{name: render[name] for name in RenderConfig.SHARED_FIELDS if name not in ("device", "dtype")},
        "objectives": [o.spec for o in study.objectives],
        "space": [
            {
                "name": p.name,
                "type": p.type,
                "low": p.low,
                "high": p.high,
                "step": p.step,
                "log": p.log,
                "choices": list(p.choices),
            }
            for p in study.space
        ],
        "seeds_per_trial": study.seeds_per_trial,
        "aggregate": study.aggregate,
        "seed": study.seed,
    }


def claim_render_root(runs_dir: Path, name: str, study: optuna.Study) -> Path:
    """The folder of this study's render folders under ``runs_dir``: ``renders/<name>``, unless another study
    of that name (another storage sharing this --runs) holds it; then ``renders/<name>-<id>``. A ``.study``
    file in the folder says whose it is, so no finished render of another study is ever written over."""
    uid = study.user_attrs.get("uid")
    if uid is None:
        uid = uuid.uuid4().hex
        study.set_user_attr("uid", uid)
    renders = runs_dir / "renders"
    with FileLock(str(runs_dir / ".renders.lock")):
        for root in (renders / name, renders / f"{name}-{uid[:12]}"):
            marker = root / ".study"
            if marker.exists() and marker.read_text(encoding="utf-8").strip() == uid:
                return root
            if not root.exists() or not any(root.iterdir()):
                root.mkdir(parents=True, exist_ok=True)
                marker.write_text(uid + "\n", encoding="utf-8")
                return root
    raise SoundingAnagramsError(
        f"{renders / name}-{uid[:12]} belongs to another study; remove it or use another --runs"
    )


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def aggregate(values: Sequence[float], how: str) -> float:
    """The M per-seed values of one objective as the trial's value (``mean``, ``median``, ``min``, ``max``).

    Any non-finite seed makes the aggregate NaN: a knob set is judged on all of its seeds.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 or not np.isfinite(array).all():
        return math.nan
    return float(AGGREGATORS[how](array))


def mean_record(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each score's mean over the seeds of a trial (the leaderboard's and MLflow's score columns)."""
    names = [name for name in records[0] if all(name in r for r in records)] if records else []
    return {name: float(np.mean([r[name] for r in records])) for name in names}


def best_seed_index(seed_values: Sequence[Sequence[float]]) -> int:
    """The seed whose render is best: the highest value (all objectives are maximised), or for several
    objectives the highest sum."""
    return int(np.argmax([sum(values) for values in seed_values]))
