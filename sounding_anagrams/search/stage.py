"""One background stage of the search pipeline: a thread working through a bounded queue of batches."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sounding_anagrams.render import lower_this_thread_priority

logger = logging.getLogger(__name__)
Item = TypeVar("Item")
POLL_SECONDS = 0.2  # every wait of the main thread is this short, so a stop request is seen at once


class Stage(Generic[Item]):
    """A daemon thread that runs ``work`` on each item put, in order.

    Contract:
    - ``put`` blocks while ``depth`` items wait, so the producer never runs more than that far ahead and
      memory stays flat. It raises the stage's error instead, once there is one.
    - The first exception of ``work`` is kept in ``error`` (for the main thread to raise); the stage then
      skips the items still queued. Nothing is retried here.
    - ``close`` ends the thread once its queue is done and waits for it: a thread still inside torch or
      FFmpeg when the interpreter exits would abort the process.
    """

    def __init__(
        self, name: str, work: Callable[[Item], None], *, depth: int, background: bool = False
    ) -> None:
        self.name = name
        self.work = work
        self.background = background  # only encodes and logs: runs after the threads that feed the device
        self.error: BaseException | None = None
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=depth)
        self._working = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"search-{name}", daemon=True)
        self._thread.start()

    def put(self, item: Item, *, check: Callable[[], None] = lambda: None) -> None:
        """Queue ``item``; ``check`` is called between short waits (it raises to stop waiting)."""
        while True:
            if self.error is not None:
                raise self.error
            check()
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def busy(self) -> bool:
        return self._working.is_set() or not self._queue.empty()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self, *, give_up: threading.Event | None = None) -> None:
        """Until every item put so far is done, the stage stopped on an error, or ``give_up`` is set."""
        pause = give_up or threading.Event()
        while self.busy() and self.error is None and self.alive():
            if pause.wait(0.05):
                return

    def close(self) -> None:
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=POLL_SECONDS)
                break
        self._thread.join()

    def _loop(self) -> None:
        if self.background:
            lower_this_thread_priority()
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._working.set()
            try:
                if self.error is None:
                    self.work(item)
            except BaseException as error:
                logger.debug("the %s stage stopped", self.name, exc_info=True)
                self.error = error
            finally:
                self._working.clear()
