"""Why a search ends, and how a stop asked from outside (Ctrl-C, SIGTERM) reaches the main thread.

A signal handler only sets flags here; it never raises into whatever the main thread is doing (a library
call that swallows ``KeyboardInterrupt``, or a lock held half-way, would lose or garble it). The main thread
checks the flags at every denoising step and in every wait, and then takes the search's one stop path
(:meth:`sounding_anagrams.search.loop.SearchRunner.stop`).

- First signal: stop asking, finish what was sampled (judge, tell, publish), fail the rest as interrupted.
- Second signal: abandon the drain: fail every untold trial as interrupted, end the open MLflow runs KILLED.
- Third signal: the process exits at once (130), for a stop path stuck in a store that does not answer.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_INTERRUPTED = 130


class StopReason(enum.Enum):
    """How a search ended, and the status of its MLflow parent run."""

    BUDGET = "budget"  # the budget (trials, minutes, a grid) is spent
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM
    DISK_FULL = "disk full"
    STORE_LOST = "store lost"  # the Optuna storage stopped answering: nothing more can be told to it
    ERROR = "error"  # a stage failed

    @property
    def status(self) -> str:
        """The MLflow status of the search's parent run."""
        return {"budget": "FINISHED", "interrupted": "KILLED"}.get(self.value, "FAILED")


class SearchStopped(Exception):
    """Raised in the main thread at its next check once a stop was asked for by a signal."""


class StopRequest:
    """Flags set by signal handlers, read by the search's threads."""

    def __init__(self) -> None:
        self.requested = threading.Event()  # stop asking, drain what was sampled
        self.abandon = threading.Event()  # stop draining too
        self.signal_name = "Ctrl-C"
        self._raised = False

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """The signal handler's whole work (main thread, between two bytecodes of whatever runs)."""
        if not self.requested.is_set():
            self.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.requested.set()
        elif not self.abandon.is_set():
            self.abandon.set()
        else:
            os.write(sys.stderr.fileno(), b"\ninterrupted three times: exiting now\n")
            os._exit(EXIT_INTERRUPTED)

    def check(self) -> None:
        """Raise :class:`SearchStopped` once, at the first check after a stop was asked for."""
        if self.requested.is_set() and not self._raised:
            self._raised = True
            raise SearchStopped(self.signal_name)


@contextlib.contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[None]:
    """Inside: Ctrl-C and SIGTERM (a plain ``kill``) ask ``request`` to stop; after, the handlers before."""

    def handler(signum: int, frame: object) -> None:
        request.interrupt(signum)

    before = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)
