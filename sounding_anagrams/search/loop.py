"""The search loop: ask K trials, render all their seeds in one batched call, score, tell Optuna, log MLflow.

- A trial is one knob set rendered on ``seeds_per_trial`` seeds that the study derives (never the Optuna
  sampler); its value is the ``aggregate`` of the per-seed objective values (docs/METHOD.md §5). Trial 0 is
  the study's hand-tuned ``render:`` values, then its ``start_points``. A racing study (``pruner:
  wilcoxon``) renders a trial's seeds in rounds over several batches and stops a loser between rounds.
- Previews: at a few fractions of the steps each render's predicted clean latent is decoded and scored; the
  aggregate over the trial's seeds is reported to Optuna and a pruned trial stops all its seeds.
- A trial that fails (NaN on any seed, out of memory, a decoding error, an invalid combination of knobs)
  becomes a FAIL trial with its reason; the study goes on.
- Every told trial is in the Optuna storage at once: Ctrl-C or a kill loses no finished trial, and running the
  same command again resumes the same study (the trial budget counts the study's finished trials).

The stages, each in its own module with its contract: :mod:`asking` (asker thread), :mod:`sampling` (main
thread, the device), :mod:`judging` (judge thread), :mod:`publishing` (publisher thread); the worker's life
in a shared study is :mod:`lifecycle`; how a search ends is :mod:`stopping`. docs/ARCHITECTURE.md draws it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import optuna
from tqdm.auto import tqdm

from sounding_anagrams.errors import (
    DiskFullError,
    SoundingAnagramsError,
    StoreError,
    is_connection_lost,
    is_disk_full,
    one_line,
    shown_url,
)
from sounding_anagrams.evaluation.evaluate import Scorers
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.search.asking import Asker, counted_trials
from sounding_anagrams.search.confirmation import Confirmation, confirm_top
from sounding_anagrams.search.gallery import publish_gallery
from sounding_anagrams.search.judging import Judge, SharedScorers
from sounding_anagrams.search.lifecycle import DeadWorkers, Heartbeats
from sounding_anagrams.search.opening import OpenedSearch, SearchSettings, open_search
from sounding_anagrams.search.publishing import Publisher
from sounding_anagrams.search.sampling import BatchSampler
from sounding_anagrams.search.stage import POLL_SECONDS, Stage
from sounding_anagrams.search.stopping import SearchStopped, StopReason, StopRequest
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.telling import Teller, TrialLedger
from sounding_anagrams.search.tracking import Tracker
from sounding_anagrams.search.trials import Batch, TrialOutcome
from sounding_anagrams.search.workers import DISK_FULL, INTERRUPTED, this_worker

logger = logging.getLogger(__name__)
T = TypeVar("T")
LEADERBOARD_TOP = 50  # knob sets in the search run's leaderboard table


@dataclass
class SearchSummary:
    study_name: str
    storage: str
    outcomes: list[TrialOutcome]
    unet_samples: int
    parent_run_id: str | None
    stopped_by: StopReason


class SearchRunner:
    """Runs one study: batches of trials through the asker, the sampler, the judge and the publisher.

    Build it with :meth:`open` (which opens the stores); :meth:`run` runs the budget; every ending goes
    through :meth:`stop`.
    """

    def __init__(
        self, opened: OpenedSearch, models: ModelBundle, scorers: Scorers, settings: SearchSettings
    ) -> None:
        self.opened = opened
        self.study = opened.study
        self.models = models
        self.settings = settings
        self.stop_request = StopRequest()  # set by signal handlers (stopping.stop_on_signals)
        self.stop_asking = threading.Event()
        self.abandoned = threading.Event()  # the background stages drop their work
        self.ledger = TrialLedger()
        self.teller = Teller(
            opened.optuna_study, opened.tracker, self.ledger, opened.trial_id, opened.storage
        )
        self.heartbeats = Heartbeats(opened.storage, self.ledger)
        self.dead_workers = DeadWorkers(
            opened.optuna_study, opened.storage, opened.url, opened.tracker, opened.trial_id
        )
        self.scorers = SharedScorers(scorers)
        self.publisher = Publisher(opened, abandoned=self.abandoned)
        self.judge = Judge(
            opened,
            models,
            self.scorers,
            self.teller,
            abandoned=self.abandoned,
            stop_asking=self.stop_asking.set,
            publish=lambda batch: self.publishing.put(batch),
        )
        self.sampler = BatchSampler(
            opened,
            models,
            self.scorers,
            progress=settings.progress,
            max_unet_batch=settings.max_unet_batch,
            check=self.stop_request.check,
        )
        self.study_pictures: Future[tuple[list[Path], dict[str, float]]] | None = None
        self.confirmations: list[Confirmation] = []
        self.left_running: list[int] = []  # trials in flight when a lost storage stopped the search

    @classmethod
    def open(
        cls,
        study: StudyConfig,
        models: ModelBundle,
        scorers: Scorers,
        settings: SearchSettings,
        *,
        study_name: str | None = None,
    ) -> SearchRunner:
        """Open the study's stores (:func:`open_search`) and build its runner."""
        return cls(open_search(study, settings, study_name), models, scorers, settings)

    # Names the commands and tests read.
    @property
    def optuna_study(self) -> optuna.Study:
        return self.opened.optuna_study

    @property
    def study_name(self) -> str:
        return self.opened.name

    @property
    def storage(self) -> str:
        return self.opened.url

    @property
    def tracker(self) -> Tracker:
        return self.opened.tracker

    @property
    def render_root(self) -> Path:
        return self.opened.render_root

    @property
    def unet_samples(self) -> int:
        return self.sampler.unet_samples

    def target_trials(self) -> int | None:
        return self.settings.trials if self.settings.trials is not None else self.study.budget.trials

    def run(self) -> SearchSummary:
        """Run the study's budget through the pipeline; returns what this run did.

        The main thread samples (the device's work); the next batch is asked in the background while this one
        samples; batch k is judged (decoded, scored, written, clipped, its media uploaded, told) and published
        (card, MLflow) in the background while batch k+1 is sampled. A real ``KeyboardInterrupt`` (no signal
        handlers installed) is raised again once the search has stopped.
        """
        target = self.target_trials()
        batch_size = self.settings.batch or self.study.batch  # renders per sampler call
        asker = self.start_stages(target, batch_size)
        reason = StopReason.BUDGET
        error: BaseException | None = None
        try:
            # 1. What dead workers left RUNNING is failed (and retried) before anything is counted.
            self.dead_workers.fail_stale_trials()
            done = counted_trials(self.opened)
            self.bar.update(min(done, target or done))
            # 2. The first batch is asked while the search's MLflow run starts and what a dead worker told but
            #    did not publish is completed.
            upcoming = self.asking.submit(asker.next_batch, None)
            self.start_parent_run(target, batch_size)
            self.dead_workers.reconcile_told_trials(
                self.study, self.publisher.log_trial, check=self.stop_request.check
            )
            # 3. Batch after batch: take the asked one, ask the next, sample, hand it to the judge.
            settled: Batch | None = None
            while (batch := self.await_batch(upcoming)) is not None:
                upcoming = self.asking.submit(asker.next_batch, settled)
                self.sampler.sample(batch)
                settled = batch
                self.judging.put(batch, check=self.check)  # waits while the judge is a batch behind
                if not self.settings.overlap:
                    self.wait_for_stages()
            # 4. Every trial is told; then the top knob sets are confirmed on held-out seeds (the device is
            #    free: the stages are idle). The study pictures are drawn while the publisher finishes.
            self.judging.wait_idle()
            self.check()
            self.confirm(batch_size, asker.deadline)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-pictures") as pictures:
                self.study_pictures = pictures.submit(self.draw_study_pictures)
                self.wait_for_stages()
        except (SearchStopped, KeyboardInterrupt) as stopped:
            reason, error = StopReason.INTERRUPTED, stopped
        except BaseException as caught:
            reason, error = stop_reason_of(caught), caught
        finally:
            self.bar.close()
        # 5. The one stop path, whatever ended the run.
        self.stop(reason)
        if error is not None and not isinstance(error, SearchStopped):
            raise self.said(error)
        return SearchSummary(
            self.study_name,
            self.storage,
            self.teller.outcomes,
            self.unet_samples,
            self.tracker.parent_run_id,
            reason,
        )

    def confirm(self, batch_size: int, deadline: float) -> None:
        """The confirmation stage (:mod:`sounding_anagrams.search.confirmation`), if the study has one and
        this invocation confirms."""
        if self.study.confirm is None or not self.settings.confirm:
            return
        self.confirmations = confirm_top(
            self.study,
            self.opened.optuna_study,
            self.opened.url,
            self.models,
            self.scorers.scorers,
            self.tracker,
            self.render_root,
            batch=batch_size,
            progress=self.settings.progress,
            deadline=deadline,
            check=self.check,
        )

    def trial_renders(self) -> int | None:
        """The study's render budget less the confirmation stage's renders (None: no render budget)."""
        renders = self.study.budget.renders
        spec = self.study.confirm
        if renders is None or spec is None or not self.settings.confirm:
            return renders
        return renders - spec.top * spec.seeds

    def confirmation_reserve(self) -> float:
        """Seconds of a ``minutes`` budget kept for the confirmation stage: its renders at this run's pace so
        far (0 before the first batch is sampled, or without confirmation)."""
        spec = self.study.confirm
        if spec is None or not self.settings.confirm or not self.sampler.renders:
            return 0.0
        pace = (time.monotonic() - self.sampler.started) / self.sampler.renders
        return spec.top * spec.seeds * pace

    def start_stages(self, target: int | None, batch_size: int) -> Asker:
        """The progress bar and the background stages (threads only: no store is touched here)."""
        self.bar = tqdm(
            total=target if target is not None else self.study.trial_budget,  # (racing may fit a few more)
            desc=f"trials of {self.study_name}",
            disable=not self.settings.progress,
            unit="trial",
        )
        self.teller.on_told = lambda outcome: self.bar.update(1)
        self.publishing: Stage[Batch] = Stage("publish", self.publisher.publish, depth=2, background=True)
        self.judging: Stage[Batch] = Stage("judge", self.judge.judge, depth=1)
        self.asking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-ask")
        self.heartbeats.start()
        threading.Thread(target=warm_up_study_pictures, name="search-warm-up", daemon=True).start()
        minutes = self.settings.minutes if self.settings.minutes is not None else self.study.budget.minutes
        return Asker(
            self.opened,
            self.teller,
            self.dead_workers,
            self.heartbeats,
            per_call=max(1, batch_size // self.study.seeds_per_round),
            target=target,
            renders=self.trial_renders(),
            minutes=minutes,
            stop=self.stop_asking,
            judge_stopped=lambda: self.judging.error is not None or not self.judging.alive(),
            reserve=self.confirmation_reserve,
        )

    def stop(self, reason: StopReason) -> None:
        """The one way a search ends (budget spent, error, full disk, Ctrl-C once or twice, SIGTERM, a store
        lost). Afterwards no trial of this invocation is RUNNING in Optuna, and no run of it in MLflow:

        1. stop asking; on an interrupt say what is drained;
        2. drain: the batches already sampled are judged, told and published (a full disk, an interrupt),
           unless the stop is an error or a second interrupt, which abandons them;
        3. close the stages (threads joined), stop the heartbeats;
        4. fail the trials nobody will judge, as interrupted or cut short by the full disk (the one place);
           a storage that stopped answering cannot be told: they stay RUNNING there, for the next start;
        5. end every MLflow trial run left open (KILLED), then the parent run with the study pictures.
        """
        interrupted = reason is StopReason.INTERRUPTED
        storage_answers = reason is not StopReason.STORE_LOST
        self.stop_asking.set()
        if interrupted:
            print(
                f"\ninterrupted ({self.stop_request.signal_name}): finishing the {self.ledger.pending()} "
                "trial(s) in flight that were already sampled, and the files and MLflow runs of the trials "
                "told (Ctrl-C again abandons them)",
                file=sys.stderr,
            )
        if reason in (StopReason.ERROR, StopReason.STORE_LOST):
            self.abandoned.set()
        else:
            self.wait_for_stages(give_up=self.stop_request.abandon, quiet=True)
            if self.stop_request.abandon.is_set():
                self.abandoned.set()
        for closing in (
            lambda: self.asking.shutdown(wait=True, cancel_futures=True),
            self.sampler.close,
            self.judging.close,
            self.publishing.close,
            self.heartbeats.stop,
        ):
            closing()
        cut_short = f"{DISK_FULL}: the search stopped before this trial was judged"
        self.left_running = [trial.number for trial in self.ledger.untold()]
        failed = (
            self.teller.fail_untold(cut_short if reason is StopReason.DISK_FULL else INTERRUPTED)
            if storage_answers
            else []
        )
        if not self.abandoned.is_set():
            for trial, outcome in failed:
                self.publisher.log_trial(trial.number, outcome, config=trial.params)
        killed = self.closing_step("end the open MLflow runs", lambda: self.tracker.end_open_runs("KILLED"))
        if interrupted and not self.abandoned.is_set():
            print("drained: every told trial has its files and MLflow run", file=sys.stderr)
        elif (failed or killed) and storage_answers:  # (a lost storage: the error says it all)
            how = f"abandoned on a second {self.stop_request.signal_name}" if interrupted else "stopped"
            print(
                f"{how}: trial(s) {[t.number for t, _ in failed]} failed as cut short; "
                f"{len(killed or [])} MLflow run(s) ended KILLED, completed at the next start",
                file=sys.stderr,
            )
        self.closing_step("end the search's MLflow run", lambda: self.finish_parent_run(reason))
        # A rerun that completes the budget leaves nothing of the dead alive.
        if storage_answers:
            self.closing_step("fail dead workers' trials", self.dead_workers.fail_stale_trials)

    @staticmethod
    def closing_step(what: str, step: Callable[[], T]) -> T | None:
        """One step of the stop path: a store that fails here (it may be what stopped the search) is said in
        one line, and the next step still runs."""
        try:
            return step()
        except Exception as error:
            logger.warning("could not %s: %s", what, one_line(error))
            return None

    # -- the main thread's waits ------------------------------------------------------------------------

    def check(self) -> None:
        """Between short waits: a stage's error or a stop request ends the wait."""
        for stage in (self.judging, self.publishing):
            if stage.error is not None:
                raise stage.error
        self.stop_request.check()

    def await_batch(self, job: Future[Batch | None]) -> Batch | None:
        """The asker's next batch (None: the budget is spent)."""
        while True:
            self.check()
            try:
                return job.result(timeout=POLL_SECONDS)
            except FutureTimeoutError:
                continue

    def wait_for_stages(self, *, give_up: threading.Event | None = None, quiet: bool = False) -> None:
        """Until the judge and the publisher have done every batch put so far (or ``give_up`` is set)."""
        self.judging.wait_idle(give_up=give_up)
        self.publishing.wait_idle(give_up=give_up)
        if not quiet:
            self.check()

    # -- the search's MLflow run ------------------------------------------------------------------------

    def start_parent_run(self, target: int | None, batch_size: int) -> None:
        study = self.study
        self.tracker.start_parent(
            f"search {time.strftime('%Y-%m-%d %H:%M:%S')}",
            {
                "study_file": study.source,
                "objectives": [o.spec for o in study.objectives],
                "sampler": study.sampler,
                "pruner": study.pruner.type,
                "batch": batch_size,
                "seeds_per_trial": study.seeds_per_trial,
                "seeds_per_round": study.seeds_per_round,
                "aggregate": study.aggregate,
                "seeds": study.seeds,
                "trials_target": target,
                "space": [p.name for p in study.space],
                **study.render.to_dict(),
            },
            {
                "study": self.study_name,
                "storage": shown_url(self.storage),
                **{k: str(v) for k, v in this_worker().items()},
            },
        )

    def draw_study_pictures(self) -> tuple[list[Path], dict[str, float]]:
        """History or Pareto front, importances and contact sheet of the study, with its best values."""
        from sounding_anagrams.search.pictures import study_pictures

        folder = self.render_root / "study"  # beside the trials' folders and the gallery
        return study_pictures(
            self.optuna_study, self.study, folder, cache=self.settings.runs_dir / "downloads"
        )

    def finish_parent_run(self, reason: StopReason) -> None:
        """The study pictures and leaderboard on the search's MLflow run, then its end with the reason's
        status. An abandoned search draws nothing: it ends now."""
        if self.tracker.parent_run_id is None:
            return
        if not self.abandoned.is_set():
            try:
                drawn = self.study_pictures.result() if self.study_pictures else self.draw_study_pictures()
                self.tracker.log_parent_artifacts(*drawn)
            except Exception as error:  # pictures are a bonus; never lose the run over a plot
                logger.warning("could not draw the study pictures: %s", error)
            try:
                from sounding_anagrams.search.report import leaderboard

                board = leaderboard(
                    self.optuna_study, LEADERBOARD_TOP, tracking_uri=self.tracker.tracking_uri
                )
                if not board.knob_sets.empty:
                    self.tracker.log_leaderboard(board.knob_sets)
            except Exception as error:  # the table is a copy of what `leaderboard` prints
                logger.warning("could not log the leaderboard table: %s", one_line(error))
            try:
                publish_gallery(self.opened)  # after the confirmation stage: its held-out means too
            except Exception as error:  # the storage was lost at the very end: the run still ends
                logger.warning("could not write the study gallery: %s", one_line(error))
        self.tracker.end_parent(reason.status)

    def said(self, error: BaseException) -> BaseException:
        """The error the search stopped on, as the command says it: a full database disk is a
        :class:`DiskFullError` naming where the finished trials are kept."""
        if is_disk_full(error) and not isinstance(error, SoundingAnagramsError):
            # The database under --runs could not grow: a transaction is whole or not at all in it, so what
            # was told before is kept.
            return DiskFullError(
                f"the disk under {self.settings.runs_dir} is full ({one_line(error)}); the trials finished "
                f"before are kept in {shown_url(self.storage)}: free some space and run the same command to "
                "resume"
            )
        if is_connection_lost(error) and not isinstance(error, SoundingAnagramsError):
            in_flight = (
                f"; trial(s) {self.left_running} were in flight: the next start fails them"
                if self.left_running
                else ""
            )
            return StoreError(
                f"the Optuna storage {shown_url(self.storage)} stopped answering ({one_line(error)}); every "
                f"trial told before is kept there{in_flight}: run the same command to resume once it answers "
                "again"
            )
        return error


def stop_reason_of(error: BaseException) -> StopReason:
    """Why a search stopped on ``error``: a full disk, a lost storage, or another error."""
    if isinstance(error, DiskFullError) or is_disk_full(error):
        return StopReason.DISK_FULL
    if is_connection_lost(error):
        return StopReason.STORE_LOST
    return StopReason.ERROR


def warm_up_study_pictures() -> None:
    """Import the plotting libraries of the study pictures while the device works: the end of the search,
    when the device waits, is then only the drawing."""
    from sounding_anagrams.search.pictures import import_plotting

    try:
        import_plotting()
    except Exception:  # the pictures say why when they are drawn
        logger.debug("the plotting libraries could not be imported", exc_info=True)
