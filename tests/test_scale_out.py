"""Many workers, no shared disk: one study on PostgreSQL, one MLflow server (PostgreSQL backend, served
artifacts), three worker processes with their own empty --runs folders; one is SIGKILLed mid-trial.

Everything runs for real on loopback: the PostgreSQL server of this machine (the databases are created by
the server and the workers, which find them missing, and dropped here), ``sounding-anagrams server`` on a
free port, ``sounding-anagrams search`` workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow.artifacts
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from sounding_anagrams.cli import main
from sounding_anagrams.search.report import confirmed_records, confirmed_winner
from sounding_anagrams.search.stores import open_storage, trial_record
from sounding_anagrams.search.workers import is_cut_short
from tests.processes import free_port, kill_mid_trial, light_rotate, served
from tests.servers import fresh_databases

REPO = Path(__file__).resolve().parents[1]
BUDGET = 6  # knob sets; the tiny rotate study renders 2 seeds of each


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sounding_anagrams.cli", *args]


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path) -> Iterator[str]:
    """``sounding-anagrams server`` on a free loopback port; yields its URI."""
    port = free_port()
    command = cli(
        "server", "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
        "--port", str(port),
    )  # fmt: skip
    with served(command, port, log) as printed:
        assert printed.startswith(f"MLflow tracking server: http://127.0.0.1:{port}"), printed
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def shared_stores(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(Optuna storage URL, MLflow server URI): fresh PostgreSQL databases and a server of their own."""
    with (
        fresh_databases("optuna", "mlflow") as (storage, backend),
        mlflow_server(backend, tmp_path / "server-artifacts", tmp_path / "server.log") as uri,
    ):
        yield storage, uri


@pytest.mark.slow
def test_three_workers_share_a_postgresql_study_and_an_mlflow_server_and_survive_a_kill(
    shared_stores: tuple[str, str], spawned: list[subprocess.Popen], tmp_path: Path, capsys
):
    storage, uri = shared_stores
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = spawned
    study_file = str(light_rotate(tmp_path))
    for index in range(3):
        runs = tmp_path / f"machine-{index}"  # a machine of its own: nothing shared on disk
        log = (tmp_path / f"worker-{index}.log").open("wb")
        command = cli(
            "search", study_file, "--models", "tiny",
            "--storage", storage, "--tracking-uri", uri, "--runs", str(runs),
            "--trials", str(BUDGET), "--batch", "2", "--quiet",
        )  # fmt: skip
        workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    victim, *survivors = workers
    in_flight = kill_mid_trial(victim, storage, "rotate-tiny")
    killed = in_flight[0]
    for index, survivor in enumerate(survivors, start=1):
        assert survivor.wait(timeout=900) == 0, (tmp_path / f"worker-{index}.log").read_text()[-3000:]

    study = optuna.load_study(study_name="rotate-tiny", storage=storage)
    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # The killed worker's trials failed (by a survivor, at once: its pid is gone on this machine)...
    assert all(study.trials[n].state == TrialState.FAIL for n in in_flight)
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and dead.user_attrs["worker"]["pid"] == victim.pid
    assert dead.user_attrs["fail_reason"].startswith(f"its worker died (pid {victim.pid} on ")
    # ... and its knob set was retried once, on the same seeds, as a trial that names it.
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].state.is_finished()
    assert retries[0].params == dead.params and retries[0].user_attrs["seeds"] == dead.user_attrs["seeds"]
    # Exactly the budget's knob sets, none rendered twice on the same seeds.
    counted = [t for t in trials if t.state.is_finished() and not is_cut_short(t)]
    assert len(counted) == BUDGET
    renders = [(json.dumps(t.params, sort_keys=True), tuple(t.user_attrs["seeds"])) for t in counted]
    assert len(set(renders)) == len(renders)
    assert {t.user_attrs["worker"]["pid"] for t in counted} >= {s.pid for s in survivors}

    # Every trial's files live on the server: one artifact store, reached by HTTP from anywhere.
    client = MlflowClient(uri)
    for trial in counted:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["trial"] == str(trial.number)
        assert trial_record(trial, "artifact_uri") == run.info.artifact_uri
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        if trial.state != TrialState.COMPLETE:
            continue
        best = trial.user_attrs["best_seed"]
        files = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id,
                tracking_uri=uri,
                dst_path=str(tmp_path / "check" / run.info.run_id),
            )
        )
        for name in ("view0.png", "view1.png", "spectrogram.png", "audio0.wav", "config.yaml"):
            assert (files / f"seed-{best}" / name).stat().st_size > 0, name
        assert (files / "card.html").exists() and (files / f"seed-{best}" / "transition.mp4").exists()
    retry_run = client.get_run(retries[0].user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["retry_of"] == str(killed)
    assert {p.name for p in tmp_path.glob("machine-*/renders/*/*")} >= {
        f"trial-{t.number:04d}" for t in counted
    }

    # A fourth machine, with an empty folder and none of the workers' disks (gone here): the leaderboard
    # links the runs on the server, and the export downloads the best render's config, which re-renders it.
    for index in range(3):
        shutil.rmtree(tmp_path / f"machine-{index}")
    fourth = tmp_path / "machine-3"
    fourth.mkdir()
    where = ["--models", "tiny", "--storage", storage, "--runs", str(fourth)]
    assert main(["leaderboard", study_file, *where, "--wide"]) == 0  # --wide: with the files' column
    board = capsys.readouterr().out
    assert f"{uri}/#/experiments/" in board and "/runs/" in board
    assert f"retry of {killed}" in board or retries[0].state != TrialState.COMPLETE
    assert main(["export", study_file, *where, "--out", str(fourth / "exports")]) == 0
    # The confirmed winner (the best held-out mean of the top knob sets), which need not be the best search
    # mean: the held-out seeds are another draw.
    winner = confirmed_winner(study, confirmed_records(study))
    best = study.best_trial if winner is None else study.trials[winner]
    exported = fourth / "exports" / f"rotate-tiny-trial-{best.number:04d}.yaml"
    assert str(exported) in capsys.readouterr().out
    best_seed = best.user_attrs["best_seed"]
    assert yaml.safe_load(exported.read_text())["seed"] == best.user_attrs["seeds"][best_seed]
    downloaded = fourth / "downloads" / best.user_attrs["mlflow_run_id"] / f"seed-{best_seed}"
    assert main(["render", "--config", str(exported), "--quiet", "--out", str(fourth / "again")]) == 0
    for name in ("view0.png", "view1.png", "spectrogram.png"):
        again = np.asarray(Image.open(fourth / "again" / name), dtype=int)
        first = np.asarray(Image.open(downloaded / name), dtype=int)
        # Rendered in a batch of 2 by the worker, alone here: float sums in another order.
        assert np.abs(again - first).max() <= 1, name


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_of_search_workers_cleanly(spawned: list[subprocess.Popen], tmp_path: Path):
    """``search --workers 2``: one Ctrl-C at the parent reaches each worker once; each drains, and the parent
    says so and exits 130 with no worker left and no trial left RUNNING."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = cli(
        "search", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path),
        "--trials", "40", "--batch", "2", "--workers", "2",
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    parent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    spawned.append(parent)
    deadline = time.monotonic() + 600
    # Both workers are rendering (each holds a RUNNING trial) when the Ctrl-C comes.
    while True:
        assert parent.poll() is None, parent.communicate()
        assert time.monotonic() < deadline, "the workers never both rendered"
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="rotate-tiny", storage=open_storage(storage))
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len({t.user_attrs.get("worker", {}).get("pid") for t in running} - {None}) == 2:
                break
        time.sleep(0.2)
    parent.send_signal(signal.SIGINT)
    out, err = parent.communicate(timeout=300)
    assert parent.returncode == 130, out + err
    assert "interrupted: every worker stopped (exit codes [130, 130])" in err
    logs = sorted((tmp_path / "workers").glob("*-worker-*.log"))
    assert len(logs) == 2
    for log in logs:  # each worker drained once: a second signal would have said "abandoned"
        text = log.read_text()
        assert "interrupted: finished trials are kept" in text and "abandoned" not in text
    study = optuna.load_study(study_name="rotate-tiny", storage=open_storage(storage))
    assert not study.get_trials(states=(TrialState.RUNNING,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert {t.user_attrs["fail_reason"] for t in failed} <= {"interrupted"}


def test_bad_worker_and_server_arguments_are_refused_with_what_is_allowed(tmp_path: Path, capsys):
    study = str(REPO / "studies" / "rotate.yaml")
    assert main(["search", study, "--models", "tiny", "--runs", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers=0: must be at least 1" in capsys.readouterr().err
    assert main(["server", "--port", "70000"]) == 2
    assert "--port=70000: must be a TCP port, 1 to 65535" in capsys.readouterr().err
    # Bounded by the machine, before anything starts: no GPU here, so one worker per core.
    runs = tmp_path / "many"
    assert main(["search", study, "--models", "tiny", "--runs", str(runs), "--workers", "10000"]) == 2
    err = capsys.readouterr().err
    cores = len(os.sched_getaffinity(0))
    assert f"--workers=10000: this machine shows no GPU and {cores} CPU core(s)" in err and not runs.exists()
    # An artifact store that cannot be used is said once, before any worker starts.
    bad = ["--artifact-store", "ftp://nowhere", "--workers", "2"]
    assert main(["search", study, "--models", "tiny", "--runs", str(runs), *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--artifact-store='ftp://nowhere': must be a folder or s3://" in err
    assert not runs.exists()


def test_a_worker_runs_the_parents_command_without_workers_and_quiet(monkeypatch):
    from sounding_anagrams.search.fleet import visible_gpus, worker_argv

    argv = ["search", "studies/rotate.yaml", "--workers", "4", "--trials", "8", "--workers=4"]
    assert worker_argv(argv) == ["search", "studies/rotate.yaml", "--trials", "8", "--quiet"]
    assert worker_argv([*argv, "--quiet"]).count("--quiet") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"]  # one worker each, named as the scheduler named them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []


def _answers(port: int) -> bool:
    import requests

    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok
    except requests.RequestException:
        return False


def _wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.mark.slow
def test_server_stops_on_ctrl_c_in_one_line_and_leaves_no_process(
    tmp_path: Path, spawned: list[subprocess.Popen]
):
    """Ctrl-C to `server` is one clean stop (MLflow's workers printed a KeyboardInterrupt traceback each);
    and a server whose parent is killed outright goes with it."""
    for stop in (signal.SIGINT, signal.SIGKILL):
        port = free_port()
        log = tmp_path / f"server-{stop.name}.log"
        command = cli(
            "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--port", str(port),
        )  # fmt: skip
        with log.open("wb") as out:
            server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        spawned.append(server)
        _wait_for(lambda port=port: _answers(port), f"the server never answered: {log.read_text()[-2000:]}")
        server.send_signal(stop)
        code = server.wait(timeout=120)
        _wait_for(lambda port=port: not _answers(port), "the server outlived its parent", timeout=90)
        if stop == signal.SIGINT:
            said = log.read_text()
            assert code == 130 and "Traceback" not in said and "KeyboardInterrupt" not in said, said[-3000:]
            assert said.rstrip().endswith("stopped")
