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

import contextlib
import copy
import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from filelock import FileLock
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import Trial, TrialState
from tqdm.auto import tqdm

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import (
    ConfigError,
    DiskFullError,
    SoundingAnagramsError,
    is_disk_full,
    one_line,
    shown_url,
)
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers
from sounding_anagrams.render import (
    CLIP_FILE,
    WRITER_THREADS,
    Decoded,
    RenderResult,
    decode_and_write,
    decode_candidates,
    lower_this_thread_priority,
    read_pictures,
    write_clip,
    write_render_folder,
)
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.sampler.pipeline import JointSampler, SamplerOutput, StepState, take_rows
from sounding_anagrams.sampler.transfer import ready_event, side_stream, used_on_this_stream
from sounding_anagrams.search.media import STORE_ATTR, default_location, open_artifact_store, upload_media
from sounding_anagrams.search.samplers import AskTellGridSampler, make_pruner, make_sampler, should_prune
from sounding_anagrams.search.stores import (
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    ask_lock,
    check_sqlite_file,
    default_storage,
    ensure_database,
    has_shared_lock,
    open_storage,
)
from sounding_anagrams.search.study import ParamSpec, StudyConfig, trial_seeds
from sounding_anagrams.search.tracking import Tracker, default_tracking_uri, objective_metrics
from sounding_anagrams.search.workers import (
    DISK_FULL,
    INTERRUPTED,
    ORPHANED,
    WORKER_DIED,
    is_cut_short,
    this_worker,
    worker_is_dead,
)

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
ROOM_FOR_STORES = 16 * 2**20  # bytes kept free for the Optuna and MLflow databases beside the renders
# Score columns of the leaderboard view in MLflow's UI, beside the objective(s) and the searched knobs.
LEADERBOARD_SCORES = ("clip/alignment", "clip/concealment", "clap/audio0")
PREVIEW_LAG = 0.1  # of the steps: how long a preview is scored in the background before its decision
PREVIEW_VAE_BATCH = 4  # x0 previews per VAE call: fewer, larger device calls; GPU memory grows with it
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
    # Optuna's artifact store of the trials' media (optuna-dashboard): default <runs>/optuna-artifacts.
    artifact_store: str | None = None
    max_unet_batch: int | None = None
    # Judge and publish batch k while batch k+1 is sampled; False runs them in series (for measurements).
    overlap: bool = True


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
    # Its MLflow run, opened when it is told: where its files are shared, whatever machine rendered it.
    run_id: str | None = None
    artifact_uri: str | None = None

    def user_attrs(self) -> dict[str, Any]:
        """What Optuna keeps of the trial beside its values (JSON). The folders are the rendering machine's
        (a hint there); the MLflow run and its artifact URI are what any machine reads the files from."""
        attrs: dict[str, Any] = {"seeds": self.seeds}
        if self.run_id is not None:
            attrs["mlflow_run_id"] = self.run_id
            attrs["artifact_uri"] = self.artifact_uri
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


class Stage:
    """One background step of the search pipeline: a daemon thread working through a bounded queue.

    ``put`` blocks while ``depth`` batches wait, so the sampler never runs more than that far ahead and memory
    stays flat. The first error of ``work`` is kept in ``error`` for the main thread to raise; the stage then
    takes no more work. A daemon thread: an abandoned stage never holds the process at exit.
    """

    def __init__(
        self, name: str, work: Callable[[Batch], None], *, depth: int, background: bool = False
    ) -> None:
        self.name = name
        self.work = work
        self.background = background  # only encodes and logs: runs after the threads that feed the device
        self.error: BaseException | None = None
        self._queue: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self._working = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"search-{name}", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        while True:  # in short waits, so Ctrl-C reaches the main thread at once
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(batch, timeout=0.2)
                return
            except queue.Full:
                continue

    def busy(self) -> bool:
        return self._working.is_set() or not self._queue.empty()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self) -> None:
        """Until every batch put so far is done (or the stage stopped on an error)."""
        while self.busy() and self.error is None and self.alive():
            time.sleep(0.05)

    def close(self) -> None:
        """End the thread once its queue is done, and wait for it: a thread still inside torch or FFmpeg when
        the interpreter exits would abort the process. (After an abandon the queue is done at once.)"""
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=0.2)
                break
        self._thread.join()

    def _loop(self) -> None:
        if self.background:
            lower_this_thread_priority()
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self._working.set()
            try:
                if self.error is None:
                    self.work(batch)
            except BaseException as error:
                logger.debug("the %s stage stopped", self.name, exc_info=True)
                self.error = error
            finally:
                self._working.clear()


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
    return settings.storage or default_storage(settings.runs_dir)


def check_stores(settings: SearchSettings) -> None:
    """Open the Optuna storage and reach the MLflow store before any model loads; refuse to start if not.

    The search refuses rather than running with Optuna alone: MLflow is where a person looks and listens, and
    a trial logged nowhere browsable would have to be logged again by hand.
    """
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(settings.runs_dir / ".optuna.lock")):
        check_sqlite_file(storage_url(settings))
        ensure_database(storage_url(settings), field="--storage")
        open_storage(storage_url(settings))
    uri = settings.tracking_uri or default_tracking_uri(settings.runs_dir)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                "--tracking-uri" if settings.tracking_uri else "MLFLOW_TRACKING_URI",
                uri,
                f"no MLflow server answers there ({type(error).__name__}); start it (sounding-anagrams "
                "server) or leave out --tracking-uri and MLFLOW_TRACKING_URI for the store under --runs",
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


def decision_step(taken_at: int, steps: int) -> int:
    """Loop index at which a preview taken at loop index ``taken_at`` prunes or not: PREVIEW_LAG of the
    schedule later (at least one step, never past the last), while its pictures are scored off the device's
    thread. A fixed step, not "when scored", so the same study renders the same steps on every run."""
    return min(taken_at + max(1, round(PREVIEW_LAG * steps)), steps - 1)


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
            self.rdb = open_storage(self.storage, on_stale_trial=self.retry_dead_workers_trial)
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
        self.artifact_store = self.open_artifact_store()
        self.render_root = claim_render_root(settings.runs_dir, self.study_name, self.optuna_study)
        self.tracker = Tracker(settings.runs_dir, self.study_name, tracking_uri=settings.tracking_uri)
        # Where every worker's trials are browsed and downloaded from (leaderboard, export, on any machine).
        self.optuna_study.set_user_attr("tracking_uri", shown_url(self.tracker.tracking_uri))
        self.optuna_study.set_user_attr("mlflow_experiment_id", self.tracker.experiment_id)
        names = list(objective_metrics([0.0] * len(study.objectives)))
        self.tracker.set_leaderboard_view(
            [
                *(f"metrics.`{name}`" for name in names),
                *(f"metrics.`{names[0]}/{end}`" for end in ("min", "max")),
                *(f"metrics.`{score}`" for score in LEADERBOARD_SCORES),
                *(f"params.`{param.name}`" for param in study.space),
                "tags.`state`",
            ],
            order_by=names[0],
        )
        self.sampler = JointSampler(models, max_unet_batch=settings.max_unet_batch)
        self.unet_samples = 0
        self._stop_beating = threading.Event()
        self.outcomes: list[TrialOutcome] = []  # of the trials told by this run
        # Trials asked and not yet told, by number; the lock makes each tell happen once.
        self._untold: dict[int, Trial] = {}
        self._tell_lock = threading.Lock()
        self._told = threading.Condition(self._tell_lock)  # notified at each tell
        self._score_lock = threading.Lock()  # the judges are called by one thread at a time
        self._abandon = threading.Event()
        self._stop_asking = threading.Event()
        # Set by a signal handler (Ctrl-C, SIGTERM): checked at every step and wait of the main thread.
        self.stop_requested = threading.Event()
        self._stopping = False  # the stop is being handled: a second signal abandons the drain instead
        # Optuna warns at each ask that heartbeats are meant for study.optimize; we send them ourselves. A
        # filter set once: catch_warnings() is process-wide, not safe on the asker thread.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed", category=UserWarning)
        self.study_pictures: Future[tuple[list[Path], dict[str, float]]] | None = None
        self._on_told: Callable[[], object] = lambda: None

    # -- budget ----------------------------------------------------------------------------------------

    def finished_count(self) -> int:
        """Finished trials that count against the budget: a trial cut short by Ctrl-C, or whose worker died,
        judged nothing and is done again."""
        return sum(not is_cut_short(t) for t in self.optuna_study.get_trials(deepcopy=False, states=FINISHED))

    def target_trials(self) -> int | None:
        return self.settings.trials if self.settings.trials is not None else self.study.budget.trials

    def run(self) -> SearchSummary:
        """Run the study's budget through the pipeline (see :class:`Stage`); returns what this run did.

        The main thread asks and samples (the device's work); batch k is judged (decoded, scored, written,
        clipped, its media uploaded, told) and published (card, MLflow) in the background while batch k+1 is
        sampled.
        """
        minutes = self.settings.minutes if self.settings.minutes is not None else self.study.budget.minutes
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        target = self.target_trials()
        batch_size = self.settings.batch or self.study.batch  # renders per sampler call
        per_call = max(1, batch_size // self.study.seeds_per_trial)  # trials per sampler call
        self.fail_stale_trials()
        bar = tqdm(
            total=target,
            initial=min(self.finished_count(), target or self.finished_count()),
            desc=f"trials of {self.study_name}",
            disable=not self.settings.progress,
            unit="trial",
        )
        self._on_told = lambda: bar.update(1)
        self.publisher = Stage("publish", self.publish_batch, depth=2, background=True)
        self.judge = Stage("judge", self.judge_batch, depth=1)
        self.previewer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-preview")
        threading.Thread(target=warm_up_study_pictures, name="search-warm-up", daemon=True).start()
        batches: list[Batch] = []  # the last two sampled
        status = "FINISHED"
        # The next batch is asked in the background while this one samples, as soon as the one before is
        # told: the device goes from batch to batch without waiting for Optuna.
        self.asker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-ask")
        self._stop_beating.clear()
        threading.Thread(target=self.beat, name="search-heartbeat", daemon=True).start()
        try:
            # The first batch is asked while the search's MLflow run starts.
            upcoming = self.asker.submit(self.next_batch, None, deadline, target, per_call)
            self.tracker.start_parent(
                f"search {time.strftime('%Y-%m-%d %H:%M:%S')}",
                {
                    "study_file": self.study.source,
                    "objectives": [o.spec for o in self.study.objectives],
                    "sampler": self.study.sampler,
                    "pruner": self.study.pruner.type,
                    "batch": batch_size,
                    "seeds_per_trial": self.study.seeds_per_trial,
                    "aggregate": self.study.aggregate,
                    "trials_target": target,
                    "space": [p.name for p in self.study.space],
                    **self.study.render.to_dict(),
                },
                {
                    "study": self.study_name,
                    "storage": shown_url(self.storage),
                    **{k: str(v) for k, v in this_worker().items()},
                },
            )
            self.reconcile_told_trials()
            while True:
                self.raise_stage_errors()
                batch = self.await_job(upcoming)
                if batch is None:
                    break
                settled = batches[-1] if batches else None
                upcoming = self.asker.submit(self.next_batch, settled, deadline, target, per_call)
                self.sample_batch(batch)
                batches = [*batches[-1:], batch]
                self.judge.put(batch)  # blocks while the judge is a batch behind: memory stays flat
                if not self.settings.overlap:
                    self.judge.wait_idle()
                    self.publisher.wait_idle()
            self.judge.wait_idle()
            self.raise_stage_errors()
            # Every trial is told: the study pictures are drawn while the publisher finishes the last runs.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-pictures") as pictures:
                self.study_pictures = pictures.submit(self.draw_study_pictures)
                self.publisher.wait_idle()
            self.raise_stage_errors()
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self._stopping = True
            self.stop_asking()
            if isinstance(error, KeyboardInterrupt):
                self.stop_on_interrupt()
            elif isinstance(error, DiskFullError) and self.judge.error is None:
                self.drain_quietly()  # no room for new trials: the ones sampled are still judged
            else:
                self.abandon("the search stopped on an error")
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
            self._stop_beating.set()
            self.stop_asking()
            self.previewer.shutdown(wait=True, cancel_futures=True)
            self.judge.close()
            self.publisher.close()
            try:
                self.fail_stale_trials()  # a rerun that completes the budget leaves nothing of the dead alive
                self.finish(status)
            except Exception as error:  # e.g. the disk is full: say the first error, not this one
                logger.warning("could not close the search cleanly: %s", one_line(error))
        return SearchSummary(
            self.study_name, self.storage, self.outcomes, self.unet_samples, self.tracker.parent_run_id
        )

    def next_batch(
        self, settled: Batch | None, deadline: float, target: int | None, per_call: int
    ) -> Batch | None:
        """The next batch to sample (None: the budget or the time is spent), asked once ``settled`` (the
        batch before the one sampling now) is told: the sampler then knows the same finished trials on every
        run of a study, however fast the host (tested). Runs on the asker thread."""
        self.wait_told(settled, stop=self._stop_asking)
        while time.monotonic() < deadline and not self._stop_asking.is_set():
            self.fail_stale_trials()
            # Counting and asking under the study's ask lock, which every worker on every machine takes:
            # together they never ask more trials than the budget has left.
            with ask_lock(self.storage, self.study_name):
                self.fail_orphaned_trials()
                running = len(self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                # Told trials are finished in the storage; asked ones (this worker's or another's) RUNNING.
                remaining = (target - self.finished_count() - running) if target is not None else per_call
                if isinstance(self.optuna_study.sampler, AskTellGridSampler):  # (it counts RUNNING as taken)
                    remaining = min(remaining, self.optuna_study.sampler.unvisited(self.optuna_study))
                if remaining > 0:
                    k = min(per_call, remaining)
                    self.check_room(k)
                    return self.ask_batch(k)
                if not running:
                    return None
            # A trial in flight (here or on another worker) may yet be cut short and need doing again (a
            # dead worker's is retried): wait for a tell here, or poll the others'.
            with self._tell_lock:
                self._told.wait(timeout=0.5)
        return None

    def await_job(self, job: Future[Batch | None]) -> Batch | None:
        """The asker's next batch; a stage's error surfaces meanwhile (in short waits, so Ctrl-C reaches the
        main thread at once)."""
        while True:
            self.raise_stage_errors()
            self.check_stop_requested()
            try:
                return job.result(timeout=0.2)
            except FutureTimeoutError:
                continue

    def check_stop_requested(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for (see ``stop_requested``) and not yet handled."""
        if self.stop_requested.is_set() and not self._stopping:
            self._stopping = True
            raise KeyboardInterrupt

    def stop_asking(self) -> None:
        """Stop the asker; a batch it asked that will never be sampled is left untold, so the stop's own
        handling (drain, abandon) fails it as interrupted."""
        self._stop_asking.set()
        self.asker.shutdown(wait=True, cancel_futures=True)

    def raise_stage_errors(self) -> None:
        """A stage's error that ends the search (a full disk, a failed store) surfaces in the main thread."""
        for stage in (self.judge, self.publisher):
            if stage.error is not None:
                raise stage.error

    def stop_on_interrupt(self) -> None:
        """Ctrl-C (or SIGTERM): the trials already sampled are drained (judged, told, their files and MLflow
        runs finished); the batch that was on the device is failed as interrupted. A second Ctrl-C abandons
        the drain instead."""
        print(
            f"\ninterrupted: finishing the {len(self._untold)} trial(s) in flight that were already sampled, "
            "and the files and MLflow runs of the trials told (Ctrl-C again abandons them)",
            file=sys.stderr,
        )
        try:
            self.judge.wait_idle()
            self.publisher.wait_idle()
        except KeyboardInterrupt:
            self.abandon("abandoned on a second Ctrl-C")
            return
        # What is still untold never reached the judge: it was being sampled (or asked) when Ctrl-C came.
        for trial in list(self._untold.values()):
            outcome = TrialOutcome(trial.number, TrialState.FAIL, reason=INTERRUPTED)
            self.tell(trial, outcome)
            self.log_trial(trial.number, trial._trial_id, outcome, config=trial.params)
        print("drained: every told trial has its files and MLflow run", file=sys.stderr)

    def drain_quietly(self) -> None:
        """Finish the trials already sampled (judged, told, published); fail what never reached the judge."""
        try:
            self.judge.wait_idle()
            self.publisher.wait_idle()
        except KeyboardInterrupt:
            self.abandon("abandoned on Ctrl-C")
            return
        for trial in list(self._untold.values()):
            self.tell(trial, TrialOutcome(trial.number, TrialState.FAIL, reason=INTERRUPTED))

    def abandon(self, why: str) -> None:
        """Stop the background stages now: untold trials are failed as interrupted; told trials whose clip or
        MLflow run is missing are completed at the next start (:meth:`reconcile_told_trials`)."""
        self._abandon.set()
        untold = sorted(self._untold)
        for trial in list(self._untold.values()):
            try:
                self.tell(trial, TrialOutcome(trial.number, TrialState.FAIL, reason=INTERRUPTED))
            except Exception as error:  # the store itself failed: the next start fails the trial
                logger.warning("trial %d could not be told: %s", trial.number, one_line(error))
        if untold or self.publisher.busy():
            print(
                f"{why}: trial(s) {untold} failed as interrupted; told trials not yet in MLflow are "
                "completed at the next start",
                file=sys.stderr,
            )

    def draw_study_pictures(self) -> tuple[list[Path], dict[str, float]]:
        """History or Pareto front, importances and contact sheet of the study, with its best values."""
        from sounding_anagrams.search.report import study_pictures

        folder = self.settings.runs_dir / "reports" / self.study_name / str(self.tracker.parent_run_id)
        return study_pictures(
            self.optuna_study, self.study, folder, cache=self.settings.runs_dir / "downloads"
        )

    def finish(self, status: str) -> None:
        """The study pictures on the search's MLflow run (drawn now unless drawn already), then its end."""
        try:
            drawn = self.study_pictures.result() if self.study_pictures else self.draw_study_pictures()
            self.tracker.log_parent_artifacts(*drawn)
        except Exception as error:  # pictures are a bonus; never lose the run over a plot
            logger.warning("could not draw the study pictures: %s", error)
        try:
            from sounding_anagrams.search.report import leaderboard

            board = leaderboard(self.optuna_study, LEADERBOARD_TOP, tracking_uri=self.tracker.tracking_uri)
            if not board.knob_sets.empty:
                self.tracker.log_leaderboard(board.knob_sets)
        except Exception as error:  # the table is a copy of what `leaderboard` prints
            logger.warning("could not log the leaderboard table: %s", one_line(error))
        self.tracker.end_parent(status)

    def open_artifact_store(self) -> Any:
        """The store of the trials' media, named on the study for `dashboard` (the first worker's choice
        stands: a worker given another store says so)."""
        location = self.settings.artifact_store or default_location(self.settings.runs_dir)
        store = open_artifact_store(location)
        recorded = self.optuna_study.user_attrs.get(STORE_ATTR)
        if recorded is None:
            self.optuna_study.set_user_attr(STORE_ATTR, location)
        elif recorded != location:
            logger.warning(
                "study %s keeps its media in %s; this worker's go to %s, which `dashboard` does not read",
                self.study_name,
                recorded,
                location,
            )
        return store

    def check_room(self, trials: int) -> None:
        """Stop before a batch that the disk under --runs has no room for: the GPU work would be lost, and the
        databases beside the renders need room to record what is finished.

        The need is measured, not guessed: the largest trial folder of this study so far (its renders and
        clip; MLflow links to it), for this batch and the trials still in the pipeline, plus room for the
        stores.
        """
        per_trial = max((folder_bytes(p) for p in self.render_root.glob("trial-*") if p.is_dir()), default=0)
        pending = len(self._untold)
        need = (trials + pending) * per_trial + ROOM_FOR_STORES
        free = shutil.disk_usage(self.render_root).free
        if free < need:
            stores = f"{ROOM_FOR_STORES // 2**20} MiB for the stores"
            what = (
                f"{per_trial / 2**20:.1f} MiB a trial, as written so far, and {stores}"
                if per_trial
                else stores
            )
            raise DiskFullError(
                f"only {free / 2**20:.0f} MiB are free under {self.render_root}; the next batch of "
                f"{trials} trial(s) and the {pending} in flight need about {need / 2**20:.0f} MiB ({what}): "
                f"the trials finished are kept in {shown_url(self.storage)}; free some space and run the "
                "same command to resume"
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
        # A retry of a trial whose worker died renders the seeds of the trial it retries.
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(self.rdb.get_trial(trial._trial_id))
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        # Only the benchmark's single-seed baseline design searches "seed" itself; study files cannot.
        seeds = (
            [config.seed]
            if "seed" in params
            else trial_seeds(
                self.study.seed, trial.number if retry_of is None else retry_of, self.study.seeds_per_trial
            )
        )
        trial.set_user_attr("seeds", seeds)
        return TrialPlan(trial, config, seeds, [config.replace(seed=seed) for seed in seeds])

    def ask_batch(self, k: int) -> Batch:
        """Ask k trials and plan them: a knob set and its seeds each (an invalid knob set fails at once)."""
        visible = frozenset(t.number for t in self.optuna_study.get_trials(deepcopy=False, states=FINISHED))
        trials = [self.optuna_study.ask() for _ in range(k)]
        with self._tell_lock:
            self._untold.update((trial.number, trial) for trial in trials)
        self.heartbeat(trials)
        batch = Batch(trials, visible)
        for trial in trials:
            trial.set_user_attr("worker", this_worker())
            try:
                batch.plans.append(self.plan_trial(trial))
            except ConfigError as error:
                batch.outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.FAIL, reason=f"invalid knobs: {error}"
                )
        batch.previews = {t.number: [] for t in trials}
        return batch

    def sample_batch(self, batch: Batch) -> None:
        """Every seed of every trial of the batch in one batched sampler call (the device's work).

        Previews: at a preview step all seeds of a trial are at the same stage (one knob set, one schedule).
        Their x0 pictures are decoded and scored in the background while the sampler goes on; the result is
        taken a fixed number of steps later (:func:`decision_step`), aggregated over the seeds like the final
        values, reported once per trial, and a pruned trial stops all of its seeds. The pruner compares with
        the trials finished when the batch was asked (``batch.visible``): the same trials on every run,
        however fast the host, and no wait for the judge.
        """
        plans = batch.plans
        if not plans:
            return
        configs = [config for plan in plans for config in plan.configs]
        owner = [p for p, plan in enumerate(plans) for _ in plan.configs]  # render -> its trial's plan
        steps = [preview_steps(plan.config, self.study.previews) for plan in plans]
        single = len(self.study.objectives) == 1
        pending: list[Preview] = []  # in the order they were taken: each trial reports its percents in order

        def on_step(state: StepState) -> list[int]:
            self.check_stop_requested()
            rendering: dict[int, list[tuple[int, int]]] = {}  # plan -> (row, render) of its seeds still going
            for row, c in enumerate(state.candidates):
                rendering.setdefault(owner[c], []).append((row, c))
            # The seeds of one trial share one schedule, so a seed missing here has failed (NaN): the knob set
            # fails as a whole, and its other seeds stop now instead of rendering for nothing.
            stop = [c for p, rows in rendering.items() if len(rows) < len(plans[p].configs) for _, c in rows]
            due = {
                p: [c for _, c in rows]
                for p, rows in rendering.items()
                if state.step + 1 in steps[p] and len(rows) == len(plans[p].configs)
            }
            if due:
                x0 = {p: take_rows(state.pred_x0, [row for row, _ in rendering[p]]) for p in due}
                job = self.previewer.submit(
                    self.score_previews,
                    x0,
                    {p: plans[p].configs for p in due},
                    ready_event(self.models.device),  # where x0 is made, on the sampler's stream
                )
                for p, renders in due.items():
                    length = state.num_inference_steps[rendering[p][0][0]]
                    pending.append(
                        Preview(p, steps[p][state.step + 1], renders, decision_step(state.step, length), job)
                    )
            for preview in [q for q in pending if q.decide_at <= state.step]:
                pending.remove(preview)
                if preview.plan in rendering and preview.plan not in {owner[c] for c in stop}:
                    stop += self.decide(batch, plans[preview.plan].trial, preview, single)
            return stop

        try:
            batch.output = self.sampler(
                configs,
                callback=on_step,
                progress=self.settings.progress,  # always: it sends the heartbeats
            )
            self.unet_samples += sum(batch.output.unet_samples.values())
        except KeyboardInterrupt:
            raise
        except Exception as error:  # out of memory, a judge refusing input: the batch fails, not the study
            fail_batch(batch, error)
        finally:
            for preview in pending:  # of trials that failed before their decision: nothing to report
                preview.job.cancel()

    def score_previews(
        self,
        x0: Mapping[int, torch.Tensor],
        configs: Mapping[int, Sequence[RenderConfig]],
        ready: torch.cuda.Event | None = None,
    ) -> dict[int, ScoredPreview | None]:
        """Background: per trial, its seeds' x0 ``(S, 4, h, w)`` decoded and scored (None: not finite).

        On a GPU this runs on the thread's high-priority stream once ``ready`` (x0 made) is reached, so it
        does not queue behind the sampler's next steps."""
        with side_stream(self.models.device, after=ready):
            for latents in x0.values():
                used_on_this_stream(latents)
            return self._score_previews(x0, configs)

    def _score_previews(
        self, x0: Mapping[int, torch.Tensor], configs: Mapping[int, Sequence[RenderConfig]]
    ) -> dict[int, ScoredPreview | None]:
        finite = {p: bool(torch.isfinite(latents).all()) for p, latents in x0.items()}
        flat = [(p, k) for p in x0 if finite[p] for k in range(len(configs[p]))]
        if not flat:
            return {p: None for p in x0}
        decoded = decode_candidates(
            torch.stack([x0[p][k] for p, k in flat]),
            [configs[p][k] for p, k in flat],
            self.models,
            vae_batch=PREVIEW_VAE_BATCH,
        )
        with self._score_lock:  # the judge thread scores too; one model call at a time
            records = self.scorers.score(
                [
                    self.candidate(configs[p][k], d.pictures, d.waves)
                    for (p, k), d in zip(flat, decoded, strict=True)
                ]
            )
        scored: dict[int, ScoredPreview | None] = {
            p: ScoredPreview([], []) if finite[p] else None for p in x0
        }
        for (p, _), d, record in zip(flat, decoded, records, strict=True):
            preview = scored[p]
            assert preview is not None
            preview.decoded.append(d)
            preview.records.append(record)
        return scored

    def decide(self, batch: Batch, trial: Trial, preview: Preview, single: bool) -> list[int]:
        """Report one trial's preview to Optuna and MLflow; returns its renders to stop if it is pruned."""
        scored = preview.job.result()[preview.plan]  # waits, if the preview is not scored yet
        if scored is None:  # x0 not finite: the seed fails on its own, at its step
            return []
        seed_records = scored.records
        record = mean_record(seed_records)
        value = aggregate([self.study.objectives[0].value(r) for r in seed_records], self.study.aggregate)
        batch.previews[trial.number].append((preview.percent, {**record, "objective": value}))
        if single and math.isfinite(value):
            trial.report(value, preview.percent)
            if should_prune(self.optuna_study, trial, batch.visible):
                batch.pruned_previews[trial.number] = (preview.percent, scored.decoded)
                return list(preview.renders)
        return []

    def wait_told(self, batch: Batch | None, *, stop: threading.Event | None = None) -> None:
        """Until every trial of ``batch`` is told (or the judge stopped, or ``stop`` is set): the Optuna
        sampler then sees the same finished trials on every run of a study, whatever the host's speed."""
        if batch is None:
            return
        numbers = [trial.number for trial in batch.trials]
        with self._told:
            while (
                any(n in self._untold for n in numbers)
                and self.judge.error is None
                and self.judge.alive()
                and not (stop is not None and stop.is_set())
            ):
                self._told.wait(timeout=0.2)

    def judge_batch(self, batch: Batch) -> None:
        """Stage 1 (background): decode, score and write the batch's renders, then tell Optuna each trial.

        The files that make a candidate (pictures, sounds, config) are written before the tell, so a trial
        whose files could not be written is told FAIL with its reason: a told trial cannot change in Optuna.
        """
        if self._abandon.is_set():
            return
        plans = batch.plans
        try:
            if batch.output is not None:
                configs = [config for plan in plans for config in plan.configs]
                folders = [
                    self.render_folder(p.trial.number, k) for p in plans for k in range(len(p.configs))
                ]
                with side_stream(self.models.device):  # not behind the sampler's steps (see side_stream)
                    results = decode_and_write(batch.output, configs, self.models, folders, with_clip=False)
                    renders = iter(results)
                    batch.results = [[next(renders) for _ in plan.configs] for plan in plans]
                    self.score_and_judge(batch.results, plans, batch.outcomes)
                self.write_pruned_previews(batch)
                self.attach_media(batch)
        except Exception as error:  # out of memory, a judge refusing input: the batch fails, not the study
            fail_batch(batch, error)
        batch.output = None  # the latents are no longer needed
        full = [o for o in batch.outcomes.values() if o.reason and o.reason.startswith(DISK_FULL)]
        if full:  # every later trial would fail the same way: ask for none (the tells below free budget)
            self._stop_asking.set()
        for trial in batch.trials:
            self.tell(trial, batch.outcomes[trial.number])
        self.publisher.put(batch)
        if full:
            # Stop, with what was finished kept.
            raise DiskFullError(
                f"the disk under {self.render_root} is full (trial {full[0].number}: {full[0].reason}); the "
                f"trials finished before are kept in {shown_url(self.storage)}, and the cut-short ones are "
                "done again: free some space and run the same command to resume"
            )

    def write_pruned_previews(self, batch: Batch) -> None:
        """A pruned trial keeps the pictures and sounds it was pruned on: its seeds' x0 previews, written as
        their render folders (``render.json`` says ``preview_percent``). A write error is only logged: the
        trial is judged (pruned) either way."""
        for plan, renders in zip(batch.plans, batch.results, strict=True):
            kept = batch.pruned_previews.pop(plan.trial.number, None)
            if kept is None or batch.outcomes[plan.trial.number].state != TrialState.PRUNED:
                continue
            percent, decoded = kept
            for render, seed_decoded in zip(renders, decoded, strict=True):
                metadata = {
                    "seed": render.config.seed,
                    "device": str(self.models.device),
                    "dtype": str(self.models.dtype).removeprefix("torch."),
                    "preview_percent": percent,
                    "torch": torch.__version__,
                }
                try:
                    write_render_folder(render.folder, render.config, seed_decoded, metadata)
                except OSError as error:
                    logger.warning(
                        "trial %d: its preview could not be written: %s", plan.trial.number, one_line(error)
                    )

    def attach_media(self, batch: Batch) -> None:
        """Before the tell (Optuna takes a trial's artifacts only while it runs): the clip of each complete
        trial's best seed, then the media its dashboard page shows (that seed's views, spectrogram, clip and
        sounds; a pruned trial's preview) uploaded to the study's artifact store. Neither is the trial's
        judgement: an error is logged and the trial is told as judged."""
        shown: dict[int, Path] = {}
        clips: dict[int, Future[Path]] = {}
        # The clips are encoded side by side: the encoder releases the GIL.
        with ThreadPoolExecutor(
            WRITER_THREADS, thread_name_prefix="search-clip", initializer=lower_this_thread_priority
        ) as encoders:
            for plan, renders in zip(batch.plans, batch.results, strict=True):
                outcome = batch.outcomes[plan.trial.number]
                if outcome.state == TrialState.COMPLETE and outcome.best_seed is not None:
                    best = renders[outcome.best_seed]
                    shown[plan.trial.number] = best.folder
                    if best.decoded is not None:
                        waves = best.decoded.waves
                        clips[plan.trial.number] = encoders.submit(
                            write_clip,
                            best.folder,
                            best.config,
                            best.decoded.pictures,
                            waves[0] if waves else None,
                        )
                elif outcome.state == TrialState.PRUNED and renders:
                    shown[plan.trial.number] = renders[0].folder
            for number, clip in clips.items():
                try:
                    clip.result()
                except Exception as error:  # the clip is a bonus; the trial is judged
                    logger.warning("trial %d: the clip could not be made: %s", number, one_line(error))
        for trial in batch.trials:
            if trial.number in shown and not self._abandon.is_set():
                upload_media(self.artifact_store, trial, shown[trial.number])

    def publish_batch(self, batch: Batch) -> None:
        """Stage 2 (background): each trial's MLflow run (knobs, scores, card and files).

        Made from what the judge wrote; an error here is logged and the trial keeps its judged value (its
        pictures and sounds exist). A run that a kill left unfinished is completed at the next start from
        the files (:meth:`reconcile_told_trials`).
        """
        by_number = {plan.trial.number: plan for plan in batch.plans}
        for trial in batch.trials:
            if self._abandon.is_set():
                return
            plan = by_number.get(trial.number)
            self.log_trial(
                trial.number,
                trial._trial_id,
                batch.outcomes[trial.number],
                config=plan.knob_set() if plan else trial.params,
                previews=batch.previews.get(trial.number, []),
            )
        batch.results = []  # the decoded pictures and sounds: memory stays flat

    @staticmethod
    def candidate(config: RenderConfig, pictures: list[Any], waves: list[Any]) -> Candidate:
        return Candidate(pictures, waves, config.image_prompts, config.audio_prompts)

    def heartbeat(self, trials: Sequence[Trial]) -> None:
        """Tell the storage these trials are alive."""
        for trial in trials:
            self.rdb.record_heartbeat(trial._trial_id)

    def beat(self) -> None:
        """The heartbeat thread: every trial asked and not yet told is said alive every HEARTBEAT_SECONDS,
        however long a step, a decode or a tell takes (a slow step must not look like a dead worker)."""
        while not self._stop_beating.wait(HEARTBEAT_SECONDS):
            with self._tell_lock:
                alive = list(self._untold.values())
            try:
                self.heartbeat(alive)
            except Exception as error:  # the store is busy or gone: the next beat, or the search, says so
                logger.warning("heartbeat not recorded: %s", one_line(error))

    def fail_stale_trials(self) -> None:
        """Trials of workers that died become FAIL, so nothing of a dead process stays RUNNING.

        Two ways, both safe with live workers: a worker on this machine whose process is gone (its pid and
        boot id are recorded on each trial) is dead at once; a worker elsewhere is dead when its heartbeats
        stop for the grace period (Optuna's stale-trial check).
        """
        optuna.storages.fail_stale_trials(self.optuna_study)  # (ExperimentalWarning: see open_storage)
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
                if not self.rdb.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    continue
                logger.warning("trial %d: its worker (pid %s) died; failed", trial.number, worker["pid"])
            except (RuntimeError, ValueError):  # finished meanwhile by another live worker
                continue
            self.retry_dead_workers_trial(self.optuna_study, self.rdb.get_trial(trial._trial_id))
        self.tracker.end_dead_parents()

    def fail_orphaned_trials(self) -> None:
        """Fail RUNNING trials that name no worker: their asker died inside its ask, before naming itself.

        Called under the ask lock: a live worker asks and names its trials without letting the lock go, so
        no live worker's trial is nameless then (on a storage without a shared lock, nothing is done). Such a
        trial has no heartbeat either (Optuna's stale check never sees it); left RUNNING, it would hold a
        place of the budget forever. A knob set it had taken from the queue (the baseline, a start point, a
        retry) goes back into the queue.
        """
        if not has_shared_lock(self.storage):
            return
        for trial in self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in trial.user_attrs:
                continue
            try:
                self.rdb.set_trial_user_attr(trial._trial_id, "fail_reason", ORPHANED)
                if not self.rdb.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    continue
            except (RuntimeError, ValueError):  # finished meanwhile
                continue
            logger.warning("trial %d: %s; failed (it does not count)", trial.number, ORPHANED)
            queued = trial.system_attrs.get("fixed_params")
            if queued:
                labels = {k: v for k, v in trial.user_attrs.items() if k in ("start_point", "retry_of")}
                self.optuna_study.enqueue_trial(dict(queued), user_attrs=labels)

    def retry_dead_workers_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial failed because its worker died (its pid is gone, or its heartbeats stopped) is retried
        once: the same knob set on the same seeds, as a new trial that names it (Optuna's
        ``RetryHeartbeatStaleTrialCallback``; the new trial's ``retry_of`` attribute and MLflow tag)."""
        if trial.user_attrs.get("fail_reason") is None:  # failed by Optuna's heartbeat check
            worker = trial.user_attrs.get("worker", {})
            logger.warning(
                "trial %d: no heartbeat from its worker (pid %s on %s) for %d s; failed and retried",
                trial.number,
                worker.get("pid"),
                worker.get("host"),
                GRACE_SECONDS,
            )
        # The retry carries the knob set and where it started from; the dead attempt's own record (its
        # worker, seeds, reason) stays on the failed trial.
        source = copy.deepcopy(trial)
        source.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "start_point"}
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, source)

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
        with self._score_lock:
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

    def tell(self, trial: Trial, outcome: TrialOutcome) -> None:
        """Tell Optuna one trial's outcome, once (the judge and an abandoning main thread may both try)."""
        with self._tell_lock:
            if trial.number not in self._untold:
                return
            self.outcomes.append(outcome)
            if outcome.reason:
                logger.warning("trial %d failed: %s", trial.number, outcome.reason)
            self.open_trial_run(trial, outcome)
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
            finally:
                # Only now, after the tell: the budget never counts a trial twice, nor misses one. (A store
                # that failed leaves the trial RUNNING; the next start fails it as its worker's.)
                del self._untold[trial.number]
                self._told.notify_all()
            self._on_told()

    def open_trial_run(self, trial: Trial, outcome: TrialOutcome) -> None:
        """Open the trial's MLflow run before the tell, so that Optuna's record names it (run id, artifact
        URI); the publisher fills it. If MLflow refuses, the publisher opens it later."""
        tags = {"retry_of": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {}
        try:
            outcome.run_id, outcome.artifact_uri = self.tracker.open_trial_run(
                trial.number, self.study_name, tags
            )
        except Exception as error:  # MLflow is the browsable copy; Optuna's tell comes first
            logger.warning("trial %d: no MLflow run could be opened: %s", trial.number, one_line(error))

    def log_trial(
        self,
        number: int,
        trial_id: int,
        outcome: TrialOutcome,
        *,
        config: Mapping[str, Any],
        previews: Sequence[tuple[int, Mapping[str, float]]] = (),
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """The trial's MLflow run (knobs, scores, per-seed values, previews, card and files)."""
        try:
            frozen = self.rdb.get_trial(trial_id)
            if "retry_of" in frozen.user_attrs:
                tags = {**(tags or {}), "retry_of": str(frozen.user_attrs["retry_of"])}
            self.tracker.log_trial(
                trial_number=number,
                state=frozen.state.name,
                study=self.study_name,
                config=config,
                scores=outcome.scores,
                objectives=objective_metrics(outcome.values),
                previews=previews,
                folder=outcome.folder,
                reason=outcome.reason,
                seeds=outcome.seeds,
                seed_scores=outcome.seed_scores,
                seed_objectives=[objective_metrics(v) for v in outcome.seed_values],
                best_seed=outcome.best_seed,
                tags=tags,
                run_id=outcome.run_id,
            )
        except Exception as error:  # MLflow is the browsable copy; Optuna already has the trial
            logger.warning("trial %d was not logged to MLflow: %s", number, one_line(error))

    def reconcile_told_trials(self) -> None:
        """Told trials whose clip or MLflow run a stopped search left unfinished are completed now.

        Only trials whose worker is gone are touched: a dead process on this machine (its pid), or a told
        trial older than the heartbeat grace period from elsewhere; a live worker publishes its own trials.
        """
        logged = self.tracker.logged_trials()
        now = time.time()
        for frozen in self.optuna_study.get_trials(deepcopy=False, states=FINISHED):
            if frozen.number in logged:
                continue
            worker = frozen.user_attrs.get("worker")
            completed = frozen.datetime_complete.timestamp() if frozen.datetime_complete else now
            if worker and not worker_is_dead(worker) and now - completed < GRACE_SECONDS:
                continue
            outcome = outcome_of(frozen)
            if frozen.state == TrialState.COMPLETE and outcome.best_seed is not None and outcome.folder:
                best = outcome.folder / f"seed-{outcome.best_seed}"
                try:
                    if (best / "config.yaml").exists() and not (best / CLIP_FILE).exists():
                        rendered = RenderConfig.from_yaml(best / "config.yaml")
                        write_clip(best, rendered, read_pictures(best, len(rendered.views)))
                except Exception as error:  # a file the dead process did not finish
                    logger.warning("trial %d: the clip could not be made: %s", frozen.number, one_line(error))
            knobs: dict[str, Any] = {**frozen.params, "seeds": outcome.seeds}
            with contextlib.suppress(ConfigError):  # a study file changed since: its params are what is known
                knobs = self.study.candidate_config(frozen.params).to_dict() | {"seeds": outcome.seeds}
                knobs.pop("seed", None)
            logger.warning("trial %d: completing its MLflow run, which a stopped search left", frozen.number)
            self.log_trial(
                frozen.number, frozen._trial_id, outcome, config=knobs, tags={"reconciled": "true"}
            )


LEADERBOARD_TOP = 50  # knob sets in the search run's leaderboard table


def warm_up_study_pictures() -> None:
    """Import the plotting libraries of the study pictures while the device works: the end of the search,
    when the device waits, is then only the drawing."""
    from sounding_anagrams.search.report import import_plotting

    try:
        import_plotting()
    except Exception:  # the pictures say why when they are drawn
        logger.debug("the plotting libraries could not be imported", exc_info=True)


def fail_batch(batch: Batch, error: Exception) -> None:
    """Out of memory, a judge refusing input: every trial of the batch not yet judged fails, not the study."""
    logger.exception("batch of trials %s failed", [t.number for t in batch.trials])
    for plan in batch.plans:
        batch.outcomes.setdefault(
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
        dict(attrs.get("scores", {})),
        reason=attrs.get("fail_reason"),
        folder=Path(folder) if folder else None,
        seeds=list(attrs.get("seeds", [])),
        seed_values=list(attrs.get("seed_values", [])),
        seed_scores=list(attrs.get("seed_scores", [])),
        best_seed=attrs.get("best_seed"),
        run_id=attrs.get("mlflow_run_id"),
        artifact_uri=attrs.get("artifact_uri"),
    )


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
