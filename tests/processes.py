"""Helpers for tests of worker processes: they wait on states in the study's storage, never on timing."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import requests
import yaml
from optuna.trial import TrialState

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.search.stores import open_storage

REPO = Path(__file__).resolve().parents[1]


def light_rotate(tmp_path: Path) -> Path:
    """``studies/rotate.yaml`` with its tiny section made light for the tests of processes (kill, Ctrl-C, a
    full disk, several workers): 2 paired seeds per trial and no race, as the shipped tiny sections were
    before racing. What those tests check does not depend on the seeds; racing is tested in
    tests/test_racing.py, and the shipped tiny section by the README's first command. Written beside
    ``tmp_path``, never inside it (it is often the runs folder)."""
    data = yaml.safe_load((REPO / "studies" / "rotate.yaml").read_text(encoding="utf-8"))
    data["tiny"].update(
        seeds_per_trial=2,
        seeds_per_round=None,
        pruner="none",
        batch=4,
        budget={"trials": 6, "renders": None, "minutes": 10},
    )
    folder = tmp_path.with_name(f"{tmp_path.name}-study")
    folder.mkdir(exist_ok=True)
    path = folder / "rotate.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def running_trials_of(storage: str, study_name: str, pid: int) -> list[int]:
    """The numbers of the trials the worker with this pid has in flight now (their knob sets and seeds
    chosen: rendering, or rendered and not yet told), per the study's storage."""
    try:
        # Opened as the search opens it (under the storage's lock): never racing a worker's schema creation.
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # the study is not created yet
        return []
    except ConfigError as error:
        if "does not exist" in str(error):  # nor its database, which the first worker creates
            return []
        raise
    return [
        trial.number
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # In flight: its knob set and seeds are chosen (just after the ask, they are not yet).
        if trial.user_attrs.get("worker", {}).get("pid") == pid and "seeds" in trial.user_attrs
    ]
    return None


def kill_mid_trial(
    victim: subprocess.Popen, storage: str, study_name: str, timeout: float = 600
) -> list[int]:
    """SIGKILL the worker while Optuna holds trials of it RUNNING. It is stopped first (SIGSTOP), so the
    trials seen RUNNING are certainly in flight when it dies (a pipelined worker may hold a batch being
    judged and one being sampled). Returns their numbers."""
    deadline = time.monotonic() + timeout
    last_error: ConfigError | None = None
    while True:
        assert victim.poll() is None, "the worker to kill ended before it could be killed"
        assert time.monotonic() < deadline, f"no trial of the worker to kill in {timeout} s ({last_error})"
        try:
            if running_trials_of(storage, study_name, victim.pid):
                victim.send_signal(signal.SIGSTOP)
                numbers = running_trials_of(storage, study_name, victim.pid)
                if numbers:
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    return numbers
                victim.send_signal(signal.SIGCONT)
        except ConfigError as error:  # the workers are creating the storage; seen once on a loaded machine
            victim.send_signal(signal.SIGCONT)
            last_error = error
        time.sleep(0.2)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def served(
    command: list[str], port: int, log: Path, timeout: float = 240, *, ready: str = "/health"
) -> Iterator[str]:
    """Run a server command in its own session; yield the first line it printed once its port answers
    ``ready``; stop it (and what it started) after."""
    with log.open("wb") as handle:
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=handle, start_new_session=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline().decode()
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, f"the server ended: {first}{log.read_text()[-2000:]}"
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}{ready}", timeout=5).ok:
                    break
            assert time.monotonic() < deadline, f"nothing answered on port {port}: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
