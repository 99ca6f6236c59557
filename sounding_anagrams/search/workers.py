"""Who runs a trial, whether that process is certainly gone (for failing a dead worker's trials), and which
failed trials were cut short rather than judged."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Reasons of a FAIL that judged nothing: such a trial does not count against the budget.
INTERRUPTED = "interrupted"
WORKER_DIED = "its worker died"
# A trial asked by a worker that died inside its ask, before it named itself on the trial or chose its knobs.
ORPHANED = "asked by a worker that died before it chose the knobs"
DISK_FULL = "disk full"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


# Who runs a trial: a worker on this machine whose process is gone is dead at once (pid and boot id, since a
# pid is reused after a reboot); elsewhere only heartbeats tell.
_MACHINE = {"host": socket.gethostname(), "boot": _boot_id()}


def this_worker() -> dict[str, Any]:
    """This process as a worker: host, pid and boot id (JSON)."""
    return {**_MACHINE, "pid": os.getpid()}


def worker_is_dead(worker: Mapping[str, Any]) -> bool:
    """Whether a worker recorded on a trial or run is certainly gone (it ran on this machine)."""
    if worker.get("host") != _MACHINE["host"]:
        return False
    if worker.get("boot") != _MACHINE["boot"]:
        return True  # this machine rebooted since
    pid = int(worker.get("pid", -1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def is_cut_short(trial: Any) -> bool:
    """A FAIL that judged nothing (Ctrl-C, a dead worker, a full disk): it does not count against the
    budget. ``trial`` is an Optuna ``FrozenTrial``. A FAIL with no reason at all was failed by Optuna's
    heartbeat check (the search gives a reason to every trial it fails): its worker died."""
    if trial.state.name != "FAIL":
        return False
    reason = trial.user_attrs.get("fail_reason")
    cut_short = (WORKER_DIED, ORPHANED, DISK_FULL)
    return reason is None or reason == INTERRUPTED or str(reason).startswith(cut_short)
