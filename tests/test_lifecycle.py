"""A worker's life in a shared study, on its own: heartbeats, telling once, dead and orphaned workers' trials
(real sqlite storages and a real MLflow store; no models)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sounding_anagrams.search.lifecycle import DeadWorkers, Heartbeats
from sounding_anagrams.search.stores import open_storage, trial_id_of
from sounding_anagrams.search.telling import Teller, TrialLedger
from sounding_anagrams.search.tracking import Tracker
from sounding_anagrams.search.trials import TrialOutcome
from sounding_anagrams.search.workers import ORPHANED, WORKER_DIED, this_worker


def study_in(tmp_path: Path, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    storage = storage or open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return optuna.create_study(study_name="life", storage=storage, direction="maximize")


def dead_pid() -> int:
    """The pid of a process of this machine that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


class SlowTracker:
    """An MLflow tracker whose server hangs on opening a run until ``answer`` is set (a slow server)."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.asked = threading.Event()

    def open_trial_run(self, number: int, study: str, tags: dict, *, started=None) -> tuple[str, str]:
        self.asked.set()
        assert self.answer.wait(60)
        return f"run-{number}", "file:///nowhere"


def test_heartbeats_keep_the_ledgers_trials_alive_and_only_those(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2
    )
    study = study_in(tmp_path, storage)
    held, dropped = study.ask(), study.ask()
    ledger = TrialLedger()
    ledger.add([held], [trial_id_of(storage, "life", held.number)])
    for trial in (held, dropped):
        storage.record_heartbeat(trial_id_of(storage, "life", trial.number))
    beats = Heartbeats(storage, ledger, seconds=0.2)
    beats.start()
    try:
        time.sleep(3.0)  # past the grace period: only a trial that was beaten for is still alive
        optuna.storages.fail_stale_trials(study)
    finally:
        beats.stop()
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {held.number: TrialState.RUNNING, dropped.number: TrialState.FAIL}


def test_a_tell_stuck_in_a_slow_mlflow_does_not_stop_the_heartbeats(tmp_path: Path) -> None:
    study = study_in(tmp_path)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    ledger = TrialLedger()
    tracker = SlowTracker()
    teller = Teller(study, tracker, ledger, lambda n: trial_id_of(storage, "life", n), storage)  # type: ignore[arg-type]
    trial = study.ask()
    teller.add([trial])
    telling = threading.Thread(
        target=teller.tell, args=(trial, TrialOutcome(trial.number, TrialState.COMPLETE, [1.0]))
    )
    telling.start()
    assert tracker.asked.wait(30)
    beat = threading.Thread(target=Heartbeats(storage, ledger).beat_now)
    beat.start()
    beat.join(timeout=10)
    try:
        assert not beat.is_alive(), "the heartbeat waited for the tell's MLflow call"
        assert ledger.pending() == 1  # still held (and beaten for) until its tell is done
    finally:
        tracker.answer.set()
        telling.join(timeout=30)
    assert ledger.pending() == 0 and study.trials[0].state == TrialState.COMPLETE
    assert study.trials[0].user_attrs["mlflow_run_id"] == "run-0"


def test_a_trial_is_told_once_however_many_threads_tell_it(tmp_path: Path) -> None:
    study = study_in(tmp_path)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    tracker = SlowTracker()
    tracker.answer.set()
    teller = Teller(study, tracker, TrialLedger(), lambda n: trial_id_of(storage, "life", n), storage)  # type: ignore[arg-type]
    trial = study.ask()
    teller.add([trial])
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda v=v: results.append(
                teller.tell(trial, TrialOutcome(trial.number, TrialState.COMPLETE, [float(v)]))
            )
        )
        for v in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False, False, False, True]
    assert len(teller.outcomes) == 1 and study.trials[0].values == teller.outcomes[0].values
    # What nobody told is failed on the stop path, as interrupted, with its seeds kept.
    late = study.ask()
    late.set_user_attr("seeds", [7, 8])
    teller.add([late])
    failed = teller.fail_untold()
    assert [t.number for t, _ in failed] == [late.number]
    frozen = study.trials[late.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == "interrupted"
    assert frozen.user_attrs["seeds"] == [7, 8]
    assert teller.fail_untold() == []  # told once


@pytest.fixture
def dead_workers(tmp_path: Path) -> DeadWorkers:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    study = study_in(tmp_path, storage)
    tracker = Tracker(tmp_path, "life")
    return DeadWorkers(study, storage, url, tracker, lambda n: trial_id_of(storage, "life", n))


def test_a_dead_workers_trial_is_failed_and_its_knob_set_retried_once(dead_workers: DeadWorkers) -> None:
    study = dead_workers.study
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", this_worker())
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.set_user_attr("worker", {**this_worker(), "pid": dead_pid()})
    dead.set_user_attr("seeds", [3, 4])
    dead_workers.fail_stale_trials()
    trials = study.get_trials()
    assert trials[alive.number].state == TrialState.RUNNING  # its worker (this process) lives
    assert trials[dead.number].state == TrialState.FAIL
    assert trials[dead.number].user_attrs["fail_reason"].startswith(WORKER_DIED)
    retry = study.ask()
    assert retry.params == trials[dead.number].params
    assert (
        optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(study.trials[retry.number]) == 1
    )
    dead_workers.fail_stale_trials()  # nothing more to do: the dead trial is failed once, retried once
    assert sum(t.state == TrialState.WAITING for t in study.get_trials()) == 0


def test_a_trial_left_nameless_is_failed_and_its_queued_knob_set_goes_back(dead_workers: DeadWorkers) -> None:
    study = dead_workers.study
    study.enqueue_trial({"x": 0.25}, user_attrs={"start_point": "baseline"})
    nameless = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # its asker died at once
    dead_workers.fail_orphaned_trials()
    frozen = study.trials[nameless.number]
    assert frozen.state == TrialState.FAIL and frozen.user_attrs["fail_reason"] == ORPHANED
    again = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert again.params == {"x": 0.25} and again.user_attrs["start_point"] == "baseline"
