"""Every way a search ends goes through its one stop path, and leaves nothing RUNNING: no Optuna trial and no
MLflow run of the invocation (tiny models, real stores, real processes and signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sounding_anagrams.errors import StoreError
from sounding_anagrams.evaluation.evaluate import Scorers
from sounding_anagrams.search.stopping import StopReason
from sounding_anagrams.search.stores import open_storage, trial_id_of
from tests.designed_judges import JUDGED_STUDY as STUDY
from tests.designed_judges import designed_judges
from tests.servers import CuttableProxy, fresh_databases
from tests.test_search import _search_command, _wait_for_a_finished_trial, runner_for


@pytest.fixture(scope="module")
def designed_scorers() -> Scorers:
    return designed_judges()


def mlflow_runs(runs: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client.search_runs([found.experiment_id], max_results=1000)


def parent_and_trials(runs: Path, experiment: str) -> tuple[list, list]:
    everything = mlflow_runs(runs, experiment)
    return (
        [r for r in everything if r.data.tags.get("kind") == "search"],
        [r for r in everything if "trial" in r.data.tags],
    )


def as_if_its_process_died(runs: Path, name: str) -> None:
    """Make what the search in this test process left RUNNING look like a search whose process has died, as
    it is for the next start of a real search: its trials and its MLflow runs name a pid that has ended."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(gone.stdout)
    storage = open_storage(f"sqlite:///{runs / 'optuna.db'}")
    study = optuna.load_study(study_name=name, storage=storage)
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        worker = {**trial.user_attrs.get("worker", {}), "pid": pid}
        storage.set_trial_user_attr(trial_id_of(storage, name, trial.number), "worker", worker)
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    for run in mlflow_runs(runs, name):
        if "pid" in run.data.tags:
            client.set_tag(run.info.run_id, "pid", str(pid))


def trial_states(runs: Path, name: str) -> list[TrialState]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}")
    return [t.state for t in study.get_trials()]


@pytest.mark.slow
def test_the_budget_reached_ends_every_run(tiny_models, designed_scorers, tmp_path: Path):
    runner = runner_for({**STUDY, "budget": {"trials": 3}}, tiny_models, designed_scorers, tmp_path)
    summary = runner.run()
    assert summary.stopped_by is StopReason.BUDGET
    assert TrialState.RUNNING not in trial_states(tmp_path, "unit")
    parents, trials = parent_and_trials(tmp_path, "unit")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}


@pytest.mark.slow
def test_a_database_lost_mid_search_stops_it_and_nothing_stays_running(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    """The Optuna database stops answering after the first tell: the search stops on that error, ends its
    MLflow runs (KILLED, the search FAILED) and the next start fails what the lost database kept RUNNING."""
    study = {**STUDY, "batch": 2, "budget": {"trials": 2}}  # one trial (2 seeds) per sampler call
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    storage = runner.opened.storage
    tell = storage.set_trial_state_values
    told = {"n": 0}

    def lost_after_one(trial_id, state, values=None):
        told["n"] += 1
        if told["n"] > 1:
            raise sqlalchemy.exc.OperationalError(
                "UPDATE trials", {}, Exception("server closed the connection")
            )
        return tell(trial_id, state, values)

    monkeypatch.setattr(storage, "set_trial_state_values", lost_after_one)
    with pytest.raises(StoreError, match=r"stopped answering \(server closed the connection\); every trial"):
        runner.run()
    assert runner.left_running  # could not be told: the storage keeps them RUNNING, for the next start
    parents, trials = parent_and_trials(tmp_path, "unit")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert trials and all(r.info.status != "RUNNING" for r in trials)
    # The database kept the trials it could not be told about RUNNING; once it answers again, the next start
    # fails them as its dead worker's (here: said to be dead, since the worker is this test's own process).
    monkeypatch.undo()
    as_if_its_process_died(tmp_path, "unit")
    rerun = runner_for(study, tiny_models, designed_scorers, tmp_path)
    rerun.run()
    assert TrialState.RUNNING not in trial_states(tmp_path, "unit")
    parents, trials = parent_and_trials(tmp_path, "unit")
    assert all(r.info.status != "RUNNING" for r in parents + trials)


@pytest.mark.slow
def test_mlflow_lost_mid_search_keeps_the_search_and_the_next_start_completes_its_runs(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    """MLflow is the browsable copy: while it is lost the search goes on and Optuna has every trial; the runs
    it could not finish are completed at the next start."""
    study = {**STUDY, "batch": 2, "budget": {"trials": 3}}
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    client = runner.tracker.client
    lost = threading.Event()
    for name in ("log_batch", "set_terminated", "set_tag", "create_run", "log_artifact", "log_table"):
        original = getattr(client, name)

        def refusing(*args, _original=original, **kwargs):
            if lost.is_set():
                raise MlflowException("connection refused")
            return _original(*args, **kwargs)

        monkeypatch.setattr(client, name, refusing)
    publish = runner.publisher.log_trial

    def lose_mlflow_after_the_first(*args, **kwargs) -> None:
        publish(*args, **kwargs)
        lost.set()

    monkeypatch.setattr(runner.publisher, "log_trial", lose_mlflow_after_the_first)
    runner.run()
    assert trial_states(tmp_path, "unit").count(TrialState.COMPLETE) == 3
    monkeypatch.undo()
    # Told trials cannot be changed: their worker (this process) is said to be dead instead. The rerun
    # renders nothing (the budget is spent), so no trial of its own is taken for a dead one's.
    import sounding_anagrams.search.lifecycle as lifecycle_module
    import sounding_anagrams.search.tracking as tracking_module

    for module in (lifecycle_module, tracking_module):
        monkeypatch.setattr(module, "worker_is_dead", lambda worker: True)
    runner_for(study, tiny_models, designed_scorers, tmp_path).run()
    parents, trials = parent_and_trials(tmp_path, "unit")
    assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2]
    assert all(r.info.status != "RUNNING" for r in parents + trials)


class Stderr:
    """The lines a process writes to stderr, read as they come."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, process: subprocess.Popen, timeout: float = 240) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert process.poll() is None, "".join(self.lines[-30:])
            assert time.monotonic() < deadline, (
                f"{text!r} not seen in {timeout} s: {''.join(self.lines[-30:])}"
            )
            time.sleep(0.1)

    def text(self) -> str:
        self._thread.join(timeout=60)
        return "".join(self.lines)


def start_search(runs: Path, trials: int) -> tuple[subprocess.Popen, Stderr]:
    process = subprocess.Popen(
        _search_command(runs, trials),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return process, Stderr(process)


def assert_nothing_left_running(runs: Path, parent_status: str) -> None:
    assert TrialState.RUNNING not in trial_states(runs, "rotate-tiny")
    parents, trials = parent_and_trials(runs, "rotate-tiny")
    assert [p.info.status for p in parents] == [parent_status]
    assert all(r.info.status != "RUNNING" for r in trials), [
        (r.data.tags["trial"], r.info.status) for r in trials
    ]


@pytest.mark.slow
def test_sigterm_drains_like_ctrl_c_and_leaves_nothing_running(tmp_path: Path):
    process, stderr = start_search(tmp_path, 8)
    _wait_for_a_finished_trial(process, tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 130
    err = stderr.text()
    assert "interrupted (SIGTERM)" in err and "drained: every told trial has its files and MLflow run" in err
    assert "Traceback" not in err
    assert_nothing_left_running(tmp_path, "KILLED")


@pytest.mark.slow
def test_a_second_ctrl_c_abandons_the_drain_in_one_line_and_leaves_nothing_running(tmp_path: Path):
    process, stderr = start_search(tmp_path, 8)
    _wait_for_a_finished_trial(process, tmp_path)
    process.send_signal(signal.SIGINT)
    stderr.wait_for("interrupted (Ctrl-C)", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    err = stderr.text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # Drained before the second Ctrl-C came, or abandoned in one line: either way nothing is left RUNNING.
    abandoned = [line for line in err.splitlines() if line.startswith("abandoned on a second Ctrl-C")]
    assert len(abandoned) <= 1
    assert "interrupted: finished trials are kept" in err
    assert_nothing_left_running(tmp_path, "KILLED")
    # The rerun completes what was abandoned: every told trial gets its one ended MLflow run.
    rerun = subprocess.run(
        _search_command(tmp_path, 8),
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert rerun.returncode == 0, rerun.stderr
    _, trials = parent_and_trials(tmp_path, "rotate-tiny")
    assert all(r.info.status != "RUNNING" and r.data.tags.get("pending") != "true" for r in trials)


def told_trials(storage: str) -> int:
    """Trials told in the Optuna database at ``storage``, read without Optuna (which would create its tables
    beside the search creating them)."""
    engine = sqlalchemy.create_engine(storage)
    try:
        with engine.connect() as connection:
            told = "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
            return int(connection.execute(sqlalchemy.text(told)).scalar_one())
    except sqlalchemy.exc.SQLAlchemyError:  # not made yet: the database or its tables
        return 0
    finally:
        engine.dispose()


@pytest.mark.slow
def test_postgresql_lost_under_a_running_search_ends_in_one_sentence_and_keeps_the_told_trials(
    tmp_path: Path, spawned: list[subprocess.Popen]
):
    """The connection to the PostgreSQL storage is cut while a search runs (every connection reset, new ones
    refused): the search stops with one sentence naming the storage and what to do, exit 1, no traceback
    from any thread; the trials told before the cut are kept."""
    import time

    from sqlalchemy.engine import make_url

    with fresh_databases("cut") as (direct,):
        server = make_url(direct)
        proxy = CuttableProxy((server.host or "127.0.0.1", server.port or 5432))
        through = server.set(port=proxy.port).render_as_string(hide_password=False)
        process = subprocess.Popen(
            [*_search_command(tmp_path, 40), "--storage", through],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        spawned.append(process)
        stderr = Stderr(process)
        deadline = time.monotonic() + 300
        while not told_trials(direct):
            assert process.poll() is None, stderr.text()
            assert time.monotonic() < deadline, "no trial finished in 300 s"
            time.sleep(0.5)
        before = len(stderr.lines)
        proxy.cut()
        assert process.wait(timeout=300) == 1, stderr.text()
        err = stderr.text()
        said = [line for line in stderr.lines[before:] if line.strip()]
        assert "Traceback" not in err and len(said) == 1, err
        shown = make_url(through).render_as_string(hide_password=True)
        assert said[0].startswith(f"error: the Optuna storage {shown} stopped answering ("), err
        assert said[0].rstrip().endswith("run the same command to resume once it answers again"), err
        assert told_trials(direct) >= 1  # what was told before the cut is kept
