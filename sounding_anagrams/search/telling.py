"""The trials a worker holds (asked, not yet told) and the one way they leave it: a tell to Optuna.

Who calls what:
- the asker thread adds each trial it asks (:meth:`TrialLedger.add`) and takes the next rounds of the
  racing trials (:meth:`TrialLedger.take_next_rounds`);
- the judge thread tells the trials it judged (:meth:`Teller.tell`), or hands on the next round of a trial
  that races on (:meth:`TrialLedger.race_on`);
- the main thread, on its stop path only, fails the trials nobody will judge (:meth:`Teller.fail_untold`);
- the heartbeat thread reads which trials are alive (:meth:`TrialLedger.alive`).

The ledger's lock guards only its dictionaries: no database or network call is ever made under it, so a slow
MLflow server or database cannot starve the heartbeats. A trial is told once: whoever claims it first tells
it; it leaves the ledger only after its tell, so the budget never counts it twice nor misses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

import optuna
from optuna.trial import Trial, TrialState

from sounding_anagrams.errors import one_line
from sounding_anagrams.search.tracking import Tracker
from sounding_anagrams.search.trials import TrialOutcome, TrialPlan
from sounding_anagrams.search.workers import INTERRUPTED

logger = logging.getLogger(__name__)


class TrialLedger:
    """The trials asked by this worker and not yet told, by number, with their storage ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._told = threading.Condition(self._lock)  # notified at each tell
        self._untold: dict[int, Trial] = {}
        self._ids: dict[int, int] = {}
        self._claimed: set[int] = set()  # being told now
        self._rounds_judged: dict[int, int] = {}  # racing trials: rounds judged so far
        self._next_rounds: dict[int, TrialPlan] = {}  # racing trials: their next round, not yet asked for

    def add(self, trials: Iterable[Trial], ids: Iterable[int]) -> None:
        with self._lock:
            for trial, trial_id in zip(trials, ids, strict=True):
                self._untold[trial.number] = trial
                self._ids[trial.number] = trial_id

    def claim(self, number: int) -> bool:
        """Whether the caller is the one to tell trial ``number`` (it is untold and nobody else tells it)."""
        with self._lock:
            if number not in self._untold or number in self._claimed:
                return False
            self._claimed.add(number)
            return True

    def release(self, number: int) -> None:
        """Trial ``number`` is told (or its tell failed for good): it leaves the ledger."""
        with self._lock:
            self._untold.pop(number, None)
            self._ids.pop(number, None)
            self._claimed.discard(number)
            self._rounds_judged.pop(number, None)
            self._next_rounds.pop(number, None)
            self._told.notify_all()

    def race_on(self, plan: TrialPlan) -> None:
        """A racing trial's round ``plan.round - 1`` is judged and it goes on: ``plan`` is its next round."""
        with self._lock:
            self._rounds_judged[plan.trial.number] = plan.round
            self._next_rounds[plan.trial.number] = plan
            self._told.notify_all()

    def take_next_rounds(self) -> list[TrialPlan]:
        """The next rounds handed on so far, by trial number (the asker puts them first in its next batch)."""
        with self._lock:
            plans = [self._next_rounds[n] for n in sorted(self._next_rounds)]
            self._next_rounds.clear()
            return plans

    def alive(self) -> list[int]:
        """The storage ids of the trials in flight (for the heartbeats)."""
        with self._lock:
            return list(self._ids.values())

    def untold(self) -> list[Trial]:
        """The trials in flight that nobody is telling now."""
        with self._lock:
            return [t for n, t in sorted(self._untold.items()) if n not in self._claimed]

    def pending(self, numbers: Iterable[int] | None = None) -> int:
        """How many of ``numbers`` (default: all) are still in flight."""
        with self._lock:
            return len(self._untold) if numbers is None else sum(n in self._untold for n in numbers)

    def unjudged(self, rounds: Mapping[int, int]) -> int:
        """How many of the trial rounds ``{number: round}`` are neither told nor judged (raced on)."""
        with self._lock:
            return sum(n in self._untold and self._rounds_judged.get(n, 0) <= r for n, r in rounds.items())

    def wait_for_a_tell(self, timeout: float) -> None:
        with self._told:
            self._told.wait(timeout)


class Teller:
    """Tells Optuna the outcome of a trial once, after opening its MLflow run (so that Optuna's record names
    the run: its id and artifact URI). Thread-safe; no lock is held across the calls to the stores."""

    def __init__(
        self,
        study: optuna.Study,
        tracker: Tracker,
        ledger: TrialLedger,
        trial_id: Callable[[int], int],
        storage: optuna.storages.BaseStorage,
        *,
        on_told: Callable[[TrialOutcome], object] = lambda outcome: None,
    ) -> None:
        self.study = study
        self.tracker = tracker
        self.ledger = ledger
        self.trial_id = trial_id  # a trial number's id in the storage
        self.storage = storage  # the trials' long records go in as system attributes (stores.TRIAL_RECORDS)
        self.on_told = on_told
        self.outcomes: list[TrialOutcome] = []  # of the trials told by this worker, in order
        self._outcomes_lock = threading.Lock()

    def add(self, trials: list[Trial]) -> None:
        """Trials just asked: in the ledger, with their storage ids (one look-up each, here, not per beat)."""
        self.ledger.add(trials, [self.trial_id(trial.number) for trial in trials])

    def tell(self, trial: Trial, outcome: TrialOutcome) -> bool:
        """Tell one trial's outcome, unless it was told already; returns whether this call told it."""
        if not self.ledger.claim(trial.number):
            return False
        try:
            if outcome.reason and outcome.reason != INTERRUPTED:  # (the stop path says those in one line)
                logger.warning("trial %d failed: %s", trial.number, outcome.reason)
            self.open_run(trial, outcome)
            try:
                for key, value in outcome.user_attrs().items():
                    trial.set_user_attr(key, value)
                trial_id = self.trial_id(trial.number)
                for key, value in outcome.records().items():
                    self.storage.set_trial_system_attr(trial_id, key, value)
                if outcome.state == TrialState.COMPLETE:
                    self.study.tell(trial, outcome.values)
                else:
                    self.study.tell(trial, state=outcome.state)
            except (RuntimeError, ValueError) as error:  # e.g. failed as stale meanwhile by another worker
                logger.warning(
                    "trial %d could not be told (%s); the storage keeps its state", trial.number, error
                )
            with self._outcomes_lock:
                self.outcomes.append(outcome)
        finally:
            # Only now, after the tell: the budget never counts a trial twice, nor misses one. (A store that
            # failed leaves the trial RUNNING; the next start fails it as its dead worker's.)
            self.ledger.release(trial.number)
        self.on_told(outcome)
        return True

    def open_run(self, trial: Trial, outcome: TrialOutcome) -> None:
        """Open the trial's MLflow run before the tell; the publisher fills it. If MLflow refuses, the
        publisher opens one later."""
        tags = {"retry_of": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {}
        try:
            outcome.run_id, outcome.artifact_uri = self.tracker.open_trial_run(
                trial.number, self.study.study_name, tags, started=trial.datetime_start
            )
        except Exception as error:  # MLflow is the browsable copy; Optuna's tell comes first
            logger.warning("trial %d: no MLflow run could be opened: %s", trial.number, one_line(error))

    def fail_untold(self, reason: str = INTERRUPTED) -> list[tuple[Trial, TrialOutcome]]:
        """The one place where trials asked and never judged are failed, with ``reason`` (``interrupted``, or
        ``disk full: ...``): they judged nothing, so they do not count against the budget and their knob sets
        are done again. Called on the stop path once no stage is left to tell them. Returns the trials this
        call told."""
        failed: list[tuple[Trial, TrialOutcome]] = []
        for trial in self.ledger.untold():
            try:
                seeds = list(trial.user_attrs.get("seeds", []))  # kept: a retry renders the same seeds
                outcome = TrialOutcome(trial.number, TrialState.FAIL, reason=reason, seeds=seeds)
                if self.tell(trial, outcome):
                    failed.append((trial, outcome))
            except Exception as error:  # the store itself failed: the next start fails the trial
                logger.warning("trial %d could not be told: %s", trial.number, one_line(error))
        return failed
