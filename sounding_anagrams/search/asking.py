"""Stage 1, the asker: the next batch of trials, asked from Optuna within the budget, each with its knob set
and seeds.

Runs on its own thread (``search-ask``), one batch ahead of the sampler, so the device goes from batch to
batch without waiting for Optuna. Contract:
- takes the batch before the one sampling now (``settled``) and waits until every trial of it is told (or,
  racing, judged and handed on to its next round), so the Optuna sampler sees the same finished trials on
  every run of a study, however fast the host;
- hands on a :class:`Batch`: the next rounds of the racing trials judged in ``settled``, then new asked and
  planned trials (in the ledger, with heartbeats); or None when the budget, the time or a stop says so;
- on error: an invalid knob set is a FAIL outcome of that trial in the batch; a full disk raises
  :class:`DiskFullError` before anything is asked; any other error (a store) raises to the main thread.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from sounding_anagrams.errors import ConfigError, DiskFullError, shown_url
from sounding_anagrams.files import folder_bytes
from sounding_anagrams.search.lifecycle import DeadWorkers, Heartbeats
from sounding_anagrams.search.opening import OpenedSearch
from sounding_anagrams.search.samplers import AskTellGridSampler, nothing_left_to_find, seed_noise
from sounding_anagrams.search.seeds import render_seeds
from sounding_anagrams.search.space import ParamSpec
from sounding_anagrams.search.stores import ask_lock
from sounding_anagrams.search.telling import Teller
from sounding_anagrams.search.trials import FINISHED, Batch, TrialOutcome, TrialPlan
from sounding_anagrams.search.workers import is_cut_short, this_worker

logger = logging.getLogger(__name__)
ROOM_FOR_STORES = 16 * 2**20  # bytes kept free for the Optuna and MLflow databases beside the renders


def counted(opened: OpenedSearch) -> list[FrozenTrial]:
    """Finished trials that count against the budget: a trial cut short by Ctrl-C, or whose worker died,
    judged nothing and is done again."""
    trials = opened.optuna_study.get_trials(deepcopy=False, states=FINISHED)
    return [t for t in trials if not is_cut_short(t)]


def counted_trials(opened: OpenedSearch) -> int:
    return len(counted(opened))


def rendered_seeds(trials: list[FrozenTrial], per_trial: int) -> int:
    """Renders the counted ``trials`` spent: every seed of a trial, but only the seeds a raced-out trial
    rendered."""
    return sum(len(t.user_attrs.get("seeds", ())) if t.user_attrs.get("raced") else per_trial for t in trials)


def suggest(trial: Trial, param: ParamSpec) -> Any:
    """One knob of the study's ``space`` from Optuna's sampler."""
    if param.type == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.type == "int":
        assert param.low is not None and param.high is not None
        return trial.suggest_int(
            param.name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
    assert param.low is not None and param.high is not None
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


class Asker:
    """Asks batches of trials for one search invocation (see the module's contract)."""

    def __init__(
        self,
        opened: OpenedSearch,
        teller: Teller,
        dead_workers: DeadWorkers,
        heartbeats: Heartbeats,
        *,
        per_call: int,
        target: int | None,
        renders: int | None = None,
        minutes: float | None,
        stop: threading.Event,
        judge_stopped: Callable[[], bool],
        reserve: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.opened = opened
        self.teller = teller
        self.dead_workers = dead_workers
        self.heartbeats = heartbeats
        self.per_call = per_call  # trials (rounds of trials, when racing) per sampler call
        self.target = target
        self.renders = renders  # the render budget left to the trials (confirmation's renders kept aside)
        self.asked: Batch | None = None  # the last batch handed on
        self.stopped_early = False  # by the terminator
        self.deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        self.reserve = reserve  # seconds of the time budget kept for what follows the trials (confirmation)
        self.stop = stop
        self.judge_stopped = judge_stopped

    def next_batch(self, settled: Batch | None) -> Batch | None:
        """The next batch to sample (None: the budget or the time is spent, or the search stops): first the
        next rounds of the racing trials judged in ``settled`` (and before), then new trials."""
        study = self.opened.optuna_study
        self.wait_told(settled)
        next_rounds = self.teller.ledger.take_next_rounds()
        while time.monotonic() < self.deadline - self.reserve() and not self.stop.is_set():
            self.dead_workers.fail_stale_trials()
            # Counting and asking under the study's ask lock, which every worker on every machine takes:
            # together they never ask more trials than the budget has left.
            with ask_lock(self.opened.url, self.opened.name):
                self.dead_workers.fail_orphaned_trials()
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                remaining = self.room_for_trials(len(running))
                if isinstance(study.sampler, AskTellGridSampler):  # (it counts RUNNING as taken)
                    remaining = min(remaining, study.sampler.unvisited(study))
                new = max(0, min(self.per_call - len(next_rounds), remaining))
                if new and self.terminated():
                    new = 0
                if new or next_rounds:
                    self.check_room(new + len(next_rounds))
                    self.asked = self.ask_batch(new, next_rounds)
                    return self.asked
                if not running:
                    return None
            # Nothing to render now. The racing trials of the batch sampling now may go on: their next
            # rounds, once it is judged (a fixed rule, so every run of a study renders the same rounds).
            if self.asked is not None and self.teller.ledger.unjudged(self.asked.rounds()):
                self.wait_told(self.asked)
                if self.judge_stopped():  # (the main thread raises its error)
                    return None
                next_rounds = self.teller.ledger.take_next_rounds()
                continue
            # A trial in flight (here or on another worker) may yet be cut short and need doing again (a
            # dead worker's is retried): wait for a tell here, or poll the others'.
            self.teller.ledger.wait_for_a_tell(timeout=0.5)
        return None

    def terminated(self) -> bool:
        """Whether the study's terminator (``terminate:``) says nothing is left to find; said once."""
        spec = self.opened.study.terminate
        if spec is None or self.stopped_early:
            return self.stopped_early
        study = self.opened.optuna_study
        if nothing_left_to_find(study, spec.min_trials, self.opened.study.seed):
            self.stopped_early = True
            logger.warning(
                "the terminator stops the search: the improvement still possible is below the seed noise of "
                "a trial's value (%.3g) after %d complete trials; the trials in flight finish",
                seed_noise(study),
                len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
            )
        return self.stopped_early

    def room_for_trials(self, running: int) -> int:
        """New trials the budget has room for now: the trial budget less the trials finished (counted) and
        running; the render budget less the renders of the finished trials and all seeds of the running
        ones (a racing trial may yet render every seed)."""
        room = self.per_call
        if self.target is None and self.renders is None:
            return room
        finished = counted(self.opened)  # one read of the storage for both budgets
        if self.target is not None:
            room = self.target - len(finished) - running
        if self.renders is not None:
            per_trial = self.opened.study.seeds_per_trial
            left = self.renders - rendered_seeds(finished, per_trial) - running * per_trial
            room = min(room, left // per_trial)
        return room

    def wait_told(self, batch: Batch | None) -> None:
        """Until every trial round of ``batch`` is told or judged, the judge stopped, or the search stops."""
        if batch is None:
            return
        rounds = batch.rounds()
        while self.teller.ledger.unjudged(rounds) and not self.judge_stopped() and not self.stop.is_set():
            self.teller.ledger.wait_for_a_tell(timeout=0.2)

    def ask_batch(self, k: int, next_rounds: list[TrialPlan] | None = None) -> Batch:
        """The next rounds of racing trials, then k new trials, each planned: a knob set and its seeds (an
        invalid knob set fails at once)."""
        study = self.opened.optuna_study
        visible = frozenset(t.number for t in study.get_trials(deepcopy=False, states=FINISHED))
        trials = [study.ask() for _ in range(k)]
        self.teller.add(trials)
        self.heartbeats.beat_now()
        going_on = list(next_rounds or [])
        batch = Batch([plan.trial for plan in going_on] + trials, visible, plans=going_on)
        for trial in trials:
            trial.set_user_attr("worker", this_worker())
            try:
                batch.plans.append(self.plan_trial(trial))
            except ConfigError as error:
                batch.outcomes[trial.number] = TrialOutcome(
                    trial.number, TrialState.FAIL, reason=f"invalid knobs: {error}"
                )
        batch.previews = {t.number: [] for t in batch.trials}
        return batch

    def plan_trial(self, trial: Trial) -> TrialPlan:
        """The trial's knob set and its seeds (from the study seed, never proposed: docs/METHOD.md §5)."""
        study = self.opened.study
        params = {param.name: suggest(trial, param) for param in study.space}
        config = study.candidate_config(params)
        # A retry of a trial whose worker died renders the seeds of the trial it retries.
        frozen = self.opened.storage.get_trial(self.opened.trial_id(trial.number))
        retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        # Only the benchmark's single-seed baseline design searches "seed" itself; study files cannot.
        seeds = (
            [config.seed]
            if "seed" in params
            else render_seeds(study, trial.number if retry_of is None else retry_of)
        )
        trial.set_user_attr("seeds", seeds)
        configs = [config.replace(seed=seed) for seed in seeds]
        return TrialPlan(trial, config, seeds, configs, round_size=study.seeds_per_round)

    def check_room(self, trials: int) -> None:
        """Stop before a batch that the disk under --runs has no room for: the GPU work would be lost, and the
        databases beside the renders need room to record what is finished.

        The need is measured, not guessed: the largest trial folder of this study so far (its renders and
        clip; MLflow links to it), for this batch and the trials still in the pipeline, plus room for the
        stores.
        """
        root = self.opened.render_root
        per_trial = max((folder_bytes(p) for p in root.glob("trial-*") if p.is_dir()), default=0)
        pending = self.teller.ledger.pending()
        need = (trials + pending) * per_trial + ROOM_FOR_STORES
        free = shutil.disk_usage(root).free
        if free < need:
            stores = f"{ROOM_FOR_STORES // 2**20} MiB for the stores"
            what = (
                f"{per_trial / 2**20:.1f} MiB a trial, as written so far, and {stores}"
                if per_trial
                else stores
            )
            raise DiskFullError(
                f"only {free / 2**20:.0f} MiB are free under {root}; the next batch of {trials} trial(s) "
                f"and the {pending} in flight need about {need / 2**20:.0f} MiB ({what}): the trials "
                f"finished are kept in {shown_url(self.opened.url)}; free some space and run the same "
                "command to resume"
            )
