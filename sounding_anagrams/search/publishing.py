"""Stage 4, the publisher: each told trial's MLflow run filled (knobs, scores, previews, card and files).

Runs on the ``search-publish`` thread at low priority (it only encodes and logs). Contract:
- takes a judged and told :class:`Batch`; logs each trial into the run the tell opened, and ends it; then
  rewrites the study gallery (:mod:`sounding_anagrams.search.gallery`);
- on error: logged, and the trial keeps its judged value (its pictures and sounds exist), except an Optuna
  storage that stopped answering, which is raised: the search stops on it; a run that a stop
  left unfinished is ended KILLED by the stop path and completed at the next start from the files
  (:meth:`sounding_anagrams.search.lifecycle.DeadWorkers.reconcile_told_trials`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from sounding_anagrams.errors import one_line, raise_if_connection_lost
from sounding_anagrams.search.gallery import publish_gallery
from sounding_anagrams.search.opening import OpenedSearch
from sounding_anagrams.search.tracking import objective_metrics
from sounding_anagrams.search.trials import Batch, TrialOutcome

logger = logging.getLogger(__name__)


class Publisher:
    """Publishes the batches of one search invocation (see the module's contract)."""

    def __init__(self, opened: OpenedSearch, *, abandoned: threading.Event) -> None:
        self.opened = opened
        self.abandoned = abandoned

    def publish(self, batch: Batch) -> None:
        by_number = {plan.trial.number: plan for plan in batch.plans}
        told = [trial for trial in batch.trials if trial.number in batch.outcomes]
        for trial in batch.trials:
            if self.abandoned.is_set():
                return
            if trial.number not in batch.outcomes:  # racing on: logged once told
                continue
            plan = by_number.get(trial.number)
            self.log_trial(
                trial.number,
                batch.outcomes[trial.number],
                config=plan.knob_set() if plan else trial.params,
                previews=batch.previews.get(trial.number, []),
            )
        batch.results = []  # the decoded pictures and sounds: memory stays flat
        if told and not self.abandoned.is_set():
            publish_gallery(self.opened)  # the page's rows link the runs just logged

    def log_trial(
        self,
        number: int,
        outcome: TrialOutcome,
        *,
        config: Mapping[str, Any],
        previews: Sequence[tuple[int, Mapping[str, float]]] = (),
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """The trial's MLflow run (knobs, scores, per-seed values, previews, card and files)."""
        opened = self.opened
        names = opened.study.objective_names
        try:
            frozen = opened.storage.get_trial(opened.trial_id(number))
        except Exception as error:
            raise_if_connection_lost(error)  # the search stops on a lost storage, and says so once
            logger.warning("trial %d was not logged to MLflow: %s", number, one_line(error))
            return
        try:
            if "retry_of" in frozen.user_attrs:
                tags = {**(tags or {}), "retry_of": str(frozen.user_attrs["retry_of"])}
            if frozen.user_attrs.get("raced"):
                tags = {**(tags or {}), "raced": "true"}
            opened.tracker.log_trial(
                trial_number=number,
                state=frozen.state.name,
                study=opened.name,
                config=config,
                scores=outcome.scores,
                objectives=objective_metrics(outcome.values, names),
                previews=previews,
                folder=outcome.folder,
                reason=outcome.reason,
                seeds=outcome.seeds,
                seed_scores=outcome.seed_scores,
                seed_objectives=[objective_metrics(v, names) for v in outcome.seed_values],
                best_seed=outcome.best_seed,
                tags=tags,
                run_id=outcome.run_id,
                started=frozen.datetime_start,
                searched=list(frozen.params),
                ended=frozen.datetime_complete,
            )
        except Exception as error:  # MLflow is the browsable copy; Optuna already has the trial
            logger.warning("trial %d was not logged to MLflow: %s", number, one_line(error))
