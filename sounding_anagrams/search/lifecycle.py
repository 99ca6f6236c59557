"""A worker's life in a shared study: its heartbeats, and what it does about the trials of workers that died.

Many workers (processes, machines) may search one study. Each one:
- sends a heartbeat for every trial it holds, from its own thread, however long a step or a tell takes;
- fails the trials of dead workers (a pid gone on this machine, or no heartbeat for the grace period
  elsewhere) and retries each such knob set once, on the same seeds;
- fails trials left nameless by a worker that died inside its ask (under the study's ask lock);
- completes the MLflow runs and clips of trials a dead worker told but did not publish.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, one_line
from sounding_anagrams.files import CLIP_FILE
from sounding_anagrams.render import read_pictures, write_clip
from sounding_anagrams.search.stores import GRACE_SECONDS, HEARTBEAT_SECONDS, has_shared_lock
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.telling import TrialLedger
from sounding_anagrams.search.tracking import Tracker
from sounding_anagrams.search.trials import FINISHED, TrialOutcome, outcome_of
from sounding_anagrams.search.workers import ORPHANED, WORKER_DIED, worker_is_dead

logger = logging.getLogger(__name__)
MISSED_BEATS_SAID = 3  # heartbeats missed in a row before a warning (the grace period is 10 beats)


def retry_dead_workers_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial failed because its worker died (its pid is gone, or its heartbeats stopped) is retried once:
    the same knob set on the same seeds, as a new trial that names it (Optuna's
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
    # The retry carries the knob set and where it started from; the dead attempt's own record (its worker,
    # seeds, reason) stays on the failed trial.
    source = copy.deepcopy(trial)
    source.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "start_point"}
    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, source)


class Heartbeats:
    """The heartbeat thread: every trial in the ledger is said alive every HEARTBEAT_SECONDS (a slow step
    must not look like a dead worker). It takes the ledger's lock only to copy the ids."""

    def __init__(self, storage: RDBStorage, ledger: TrialLedger, *, seconds: float = HEARTBEAT_SECONDS):
        self.storage = storage
        self.ledger = ledger
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="search-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def beat_now(self) -> None:
        for trial_id in self.ledger.alive():
            self.storage.record_heartbeat(trial_id)

    def _beat(self) -> None:
        missed = 0
        while not self._stop.wait(self.seconds):
            try:
                self.beat_now()
                missed = 0
            except Exception as error:  # the store is busy or gone: the search's own next call says which
                missed += 1
                # One missed beat is a blip; several in a row and other workers will soon take this worker
                # for dead (GRACE_SECONDS), which the person running it should hear about.
                log = logger.warning if missed == MISSED_BEATS_SAID else logger.debug
                log("%d heartbeat(s) in a row not recorded: %s", missed, one_line(error))


class DeadWorkers:
    """Finds and fails the trials of workers that died, and completes what they told but did not publish."""

    def __init__(
        self,
        study: optuna.Study,
        storage: RDBStorage,
        url: str,
        tracker: Tracker,
        trial_id: Callable[[int], int],
    ) -> None:
        self.study = study
        self.storage = storage
        self.url = url
        self.tracker = tracker
        self.trial_id = trial_id  # a trial number's id in the storage

    def fail_stale_trials(self) -> None:
        """Trials of workers that died become FAIL, so nothing of a dead process stays RUNNING.

        Two ways, both safe with live workers: a worker on this machine whose process is gone (its pid and
        boot id are recorded on each trial) is dead at once; a worker elsewhere is dead when its heartbeats
        stop for the grace period (Optuna's stale-trial check).
        """
        optuna.storages.fail_stale_trials(self.study)  # (ExperimentalWarning: see open_storage)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker")
            if not worker or not worker_is_dead(worker):
                continue
            trial_id = self.trial_id(trial.number)
            try:
                self.storage.set_trial_user_attr(
                    trial_id, "fail_reason", f"{WORKER_DIED} (pid {worker['pid']} on {worker['host']})"
                )
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
                logger.warning("trial %d: its worker (pid %s) died; failed", trial.number, worker["pid"])
            except (RuntimeError, ValueError):  # finished meanwhile by another live worker
                continue
            retry_dead_workers_trial(self.study, self.storage.get_trial(trial_id))
        self.tracker.end_dead_parents()

    def fail_orphaned_trials(self) -> None:
        """Fail RUNNING trials that name no worker: their asker died inside its ask, before naming itself.

        Called under the ask lock: a live worker asks and names its trials without letting the lock go, so
        no live worker's trial is nameless then (on a storage without a shared lock, nothing is done). Such a
        trial has no heartbeat either (Optuna's stale check never sees it); left RUNNING, it would hold a
        place of the budget forever. A knob set it had taken from the queue (the baseline, a start point, a
        retry) goes back into the queue.
        """
        if not has_shared_lock(self.url):
            return
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in trial.user_attrs:
                continue
            trial_id = self.trial_id(trial.number)
            try:
                self.storage.set_trial_user_attr(trial_id, "fail_reason", ORPHANED)
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except (RuntimeError, ValueError):  # finished meanwhile
                continue
            logger.warning("trial %d: %s; failed (it does not count)", trial.number, ORPHANED)
            queued = trial.system_attrs.get("fixed_params")
            if queued:
                labels = {k: v for k, v in trial.user_attrs.items() if k in ("start_point", "retry_of")}
                self.study.enqueue_trial(dict(queued), user_attrs=labels)

    def reconcile_told_trials(
        self,
        study: StudyConfig,
        log_trial: Callable[..., None],
        *,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        """Told trials whose clip or MLflow run a stopped search left unfinished are completed now.

        Only trials whose worker is gone are touched: a dead process on this machine (its pid), or a told
        trial older than the heartbeat grace period from elsewhere; a live worker publishes its own trials.
        ``log_trial`` is the publisher's; ``check`` is called between trials (it raises to stop).
        """
        self.tracker.end_orphaned_trial_runs()
        logged = self.tracker.logged_trials()
        now = time.time()
        for frozen in self.study.get_trials(deepcopy=False, states=FINISHED):
            if frozen.number in logged:
                continue
            worker = frozen.user_attrs.get("worker")
            completed = frozen.datetime_complete.timestamp() if frozen.datetime_complete else now
            if worker and not worker_is_dead(worker) and now - completed < GRACE_SECONDS:
                continue
            check()
            outcome = outcome_of(frozen)
            if frozen.state == TrialState.COMPLETE:
                make_missing_clip(frozen.number, outcome)
            knobs: dict[str, Any] = {**frozen.params, "seeds": outcome.seeds}
            with contextlib.suppress(ConfigError):  # a study file changed since: its params are what is known
                knobs = study.candidate_config(frozen.params).to_dict() | knobs
                knobs.pop("seed", None)
            logger.warning("trial %d: completing its MLflow run, which a stopped search left", frozen.number)
            log_trial(frozen.number, outcome, config=knobs, tags={"reconciled": "true"})


def make_missing_clip(number: int, outcome: TrialOutcome) -> None:
    """The clip of a told trial's best seed, from its pictures, if a stopped search did not make it."""
    if outcome.best_seed is None or not outcome.folder:
        return
    best = outcome.folder / f"seed-{outcome.best_seed}"
    try:
        if (best / "config.yaml").exists() and not (best / CLIP_FILE).exists():
            rendered = RenderConfig.from_yaml(best / "config.yaml")
            write_clip(best, rendered, read_pictures(best, len(rendered.views)))
    except Exception as error:  # a file the dead process did not finish
        logger.warning("trial %d: the clip could not be made: %s", number, one_line(error))
