"""``prefer``'s candidates in MLflow, beside the searches' trials: the prefer study's experiment (named like
the study, ``rotate-prefer``) holds one run per candidate, named ``candidate-0003``:

- params: its knobs under their study-file names (``view_balance``), over the whole render config it makes
  (``view_weights``, ``seed``, ...);
- tags: ``kind`` ``prefer-candidate``, its number, study, seed, origin (baseline, start point, proposed from
  N choices, random start) and state; ``fail_reason`` for a candidate that was never shown;
- artifacts: its render folder (the captioned clip and its poster, the views, sounds and ``config.yaml``);
- the person's choices, as they come: on each candidate's run the candidates it was judged worst against
  (tag ``judged_worst_against``) and those it was preferred to (``preferred_to``), with their counts as
  metrics (``choices/judged_worst``, ``choices/preferred_to``) to sort by in MLflow's UI.

Built on :class:`sounding_anagrams.search.tracking.Tracker` (its client and its artifact storing). MLflow is a
record beside the study: a write that fails is logged, and the person goes on choosing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sounding_anagrams.errors import one_line

if TYPE_CHECKING:
    import optuna

    from sounding_anagrams.config import RenderConfig
    from sounding_anagrams.search.tracking import Tracker

logger = logging.getLogger(__name__)

CANDIDATE_KIND = "prefer-candidate"
RUN_ATTR = "mlflow_run_id"  # the trial attribute naming its candidate's run
NONE = "none"


def choices_by_candidate(pairs: list[tuple[int, int]]) -> dict[int, tuple[list[int], list[int]]]:
    """``(better, worse)`` pairs -> per candidate: the candidates it was judged worst against, and those it
    was preferred to."""
    by: dict[int, tuple[list[int], list[int]]] = {}
    for better, worse in pairs:
        by.setdefault(worse, ([], []))[0].append(better)
        by.setdefault(better, ([], []))[1].append(worse)
    return {n: (sorted(set(against)), sorted(set(beaten))) for n, (against, beaten) in by.items()}


def numbers_text(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers)) if numbers else NONE


class CandidateRuns:
    """Logs the candidates of one ``prefer`` invocation (and the choices on every candidate of its study)."""

    def __init__(self, tracker: Tracker, study_name: str) -> None:
        self.tracker = tracker
        self.study_name = study_name
        # What was last logged of each run's choices: a look that finds no change writes nothing.
        self._choices: dict[str, tuple[list[int], list[int]]] = {}

    def log(
        self,
        trial: optuna.trial.FrozenTrial | optuna.Trial,
        *,
        knobs: Mapping[str, Any],
        config: RenderConfig,
        origin: str,
        status: str,
        folder: Path | None = None,
        reason: str | None = None,
    ) -> str | None:
        """One ended run for a candidate (``FINISHED``: shown; ``FAILED``; ``KILLED``: stopped before it was
        shown), from the time it was asked to now. Returns its id, or None when MLflow refused it."""
        from mlflow.entities import Param

        from sounding_anagrams.search.tracking import flatten_params, git_commit

        started = trial.datetime_start
        tags = {
            "kind": CANDIDATE_KIND,
            "candidate": str(trial.number),
            "study": self.study_name,
            "seeds": json.dumps([config.seed]),
            "origin": origin,
            "state": {"FINISHED": "shown", "FAILED": "failed", "KILLED": "interrupted"}.get(status, status),
            "git_commit": git_commit(),
        }
        if reason:
            tags["fail_reason"] = reason[:4000]
        # The knobs under their study-file names win over the config values they set (view_weights).
        params = {**flatten_params(config.to_dict()), **flatten_params(knobs)}
        client = self.tracker.client
        try:
            run = client.create_run(
                self.tracker.experiment_id,
                start_time=int(started.timestamp() * 1000) if started else None,
                run_name=f"candidate-{trial.number:04d}",
                tags=tags,
            )
            run_id = str(run.info.run_id)
            client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
            if folder is not None:
                self.tracker.store_artifacts(run_id, folder)
            client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))
        except Exception as error:  # a record beside the study: the person goes on choosing
            logger.warning("candidate %d: its MLflow run was not logged: %s", trial.number, one_line(error))
            return None
        return run_id

    def log_choices(self, study: optuna.Study) -> None:
        """The person's choices so far on each candidate's run (an undone choice is taken back); only the
        runs whose choices changed since the last look are written."""
        from mlflow.entities import Metric, RunTag
        from optuna_dashboard.preferential import PreferentialStudy

        preferences = PreferentialStudy(study).get_preferences(deepcopy=False)
        by = choices_by_candidate([(better.number, worse.number) for better, worse in preferences])
        now = int(time.time() * 1000)
        for trial in study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if not run_id:
                continue
            choices = by.get(trial.number, ([], []))
            if self._choices.get(run_id) == choices:
                continue
            against, beaten = choices
            try:
                self.tracker.client.log_batch(
                    run_id,
                    metrics=[
                        Metric("choices/judged_worst", float(bool(against)), now, len(preferences)),
                        Metric("choices/preferred_to", float(len(beaten)), now, len(preferences)),
                    ],
                    tags=[
                        RunTag("judged_worst_against", numbers_text(against)),
                        RunTag("preferred_to", numbers_text(beaten)),
                    ],
                )
            except Exception as error:
                logger.warning(
                    "the choices on candidate %d were not logged: %s", trial.number, one_line(error)
                )
                continue
            self._choices[run_id] = choices
