"""The confirmation stage: the study's top knob sets rendered again on held-out seeds.

The best of many noisy means is biased upward (the winner's curse): the leaderboard's first knob set won on
the seeds it was searched on. Confirmation renders the ``confirm.top`` best knob sets on ``confirm.seeds``
seeds that no trial rendered (:func:`~sounding_anagrams.search.study.held_out_seeds`, the same for each), and
reports each one's held-out mean with a 95% t-interval (docs/METHOD.md §5). ``export`` then names the knob set
with the best held-out mean.

Contract:
- runs on the thread that owns the device (the searching main thread once its budget is spent and its stages
  are idle, or ``sounding-anagrams confirm STUDY``);
- a knob set is confirmed once per set of held-out seeds: its record is the study's user attribute
  ``confirmations`` (trial number -> seeds, per-seed values, mean, interval, folder, MLflow run), and workers
  finishing together split the work through claims taken under the study's ask lock;
- renders go to ``<render root>/confirmation/trial-NNNN/seed-K`` and to an MLflow run per knob set, tagged
  ``confirmation`` (nested under the search's run);
- ``deadline`` (a monotonic time) ends it between sampler calls: the knob sets not rendered yet stay
  unconfirmed, and say so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers
from sounding_anagrams.evaluation.metrics import summarize
from sounding_anagrams.render import render
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.search.report import CONFIRMATIONS_ATTR, confirmed_records, ranked_trials
from sounding_anagrams.search.seeds import held_out_seeds
from sounding_anagrams.search.stores import ask_lock
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.tracking import Tracker, objective_metrics
from sounding_anagrams.search.trials import mean_record

logger = logging.getLogger(__name__)

CLAIMS_ATTR = "confirmation_claims"  # study user attribute: str(trial number) -> the worker confirming it


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """One knob set (trial ``trial``) rendered on the held-out ``seeds``: per seed its objective values
    (NaN where a render failed), their mean and 95% t-interval half-width per objective."""

    trial: int
    seeds: list[int]
    values: list[list[float]]
    mean: list[float]
    ci95: list[float]
    folder: str
    run_id: str | None = None

    @classmethod
    def of(cls, trial: int, seeds: list[int], values: list[list[float]], folder: Path) -> Confirmation:
        columns = [summarize([v[j] for v in values]) for j in range(len(values[0]))] if values else []
        return cls(
            trial, seeds, values, [c["mean"] for c in columns], [c["ci95"] for c in columns], str(folder)
        )

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stored_confirmations(study: optuna.Study) -> dict[int, Confirmation]:
    """The study's confirmed knob sets, by trial number."""
    return {number: Confirmation(**record) for number, record in confirmed_records(study).items()}


def to_confirm(study: optuna.Study, top: int, seeds: Sequence[int]) -> list[FrozenTrial]:
    """The ``top`` best completed trials (the Pareto set first, for several objectives) not yet confirmed on
    ``seeds``; never a raced-out one (the race found it worse than the leader)."""
    done = stored_confirmations(study)
    contenders = [r.trial for r in ranked_trials(study) if not r.trial.user_attrs.get("raced")]
    return [
        trial
        for trial in contenders[:top]
        if trial.number not in done or done[trial.number].seeds != list(seeds)
    ]


def claim(study: optuna.Study, url: str, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Of ``trials``, those this worker takes: unclaimed, or claimed by a worker of this host that is gone.
    Taken under the study's ask lock, so two workers never confirm one knob set."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    with ask_lock(url, study.study_name):
        claims = dict(study.user_attrs.get(CLAIMS_ATTR) or {})
        mine = [t for t in trials if claims.get(str(t.number)) in (None, me) or _gone(claims[str(t.number)])]
        if mine:
            claims.update({str(t.number): me for t in mine})
            study.set_user_attr(CLAIMS_ATTR, claims)
    return mine


def release(study: optuna.Study, url: str, trial_number: int) -> None:
    """Drop the claim on a knob set once its confirmation is stored: a later `confirm` (more seeds) may take
    it again, whichever worker runs it."""
    with ask_lock(url, study.study_name):
        claims = dict(study.user_attrs.get(CLAIMS_ATTR) or {})
        if claims.pop(str(trial_number), None) is not None:
            study.set_user_attr(CLAIMS_ATTR, claims)


def _gone(worker: str) -> bool:
    """A claim of a process on this host that no longer runs (another host's claim is trusted)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def confirm_top(
    study: StudyConfig,
    optuna_study: optuna.Study,
    url: str,
    models: ModelBundle,
    scorers: Scorers,
    tracker: Tracker,
    render_root: Path,
    *,
    batch: int,
    progress: bool = True,
    deadline: float = math.inf,
    check: Callable[[], None] = lambda: None,
) -> list[Confirmation]:
    """Confirm the study's ``confirm.top`` knob sets on ``confirm.seeds`` held-out seeds (see the module's
    contract); returns the confirmations this call made. ``check`` is called at every denoising step (a stop
    request raises there)."""
    spec = study.confirm
    if spec is None:
        return []
    seeds = held_out_seeds(study.seed, spec.seeds)
    trials = claim(optuna_study, url, to_confirm(optuna_study, spec.top, seeds))
    made: list[Confirmation] = []
    # Whole knob sets per sampler call (a knob set's seeds in one call, as in the search), at least one.
    per_call = max(1, batch // len(seeds))
    for start in range(0, len(trials), per_call):
        if time.monotonic() >= deadline:
            logger.warning(
                "the time budget ended: trial(s) %s not confirmed (sounding-anagrams confirm does them)",
                [t.number for t in trials[start:]],
            )
            break
        chunk = trials[start : start + per_call]
        made += _confirm_chunk(
            study, optuna_study, url, chunk, seeds, models, scorers, tracker, render_root, progress, check
        )
    return made


def _confirm_chunk(
    study: StudyConfig,
    optuna_study: optuna.Study,
    url: str,
    trials: Sequence[FrozenTrial],
    seeds: list[int],
    models: ModelBundle,
    scorers: Scorers,
    tracker: Tracker,
    render_root: Path,
    progress: bool,
    check: Callable[[], None],
) -> list[Confirmation]:
    jobs: list[tuple[FrozenTrial, int, RenderConfig, Path]] = []
    for trial in trials:
        config = study.candidate_config(trial.params)
        folder = render_root / "confirmation" / f"trial-{trial.number:04d}"
        jobs += [(trial, k, config.replace(seed=seed), folder / f"seed-{k}") for k, seed in enumerate(seeds)]
    results = render(
        [j[2] for j in jobs], models, [j[3] for j in jobs], callback=lambda _: check(), progress=progress
    ).results
    # Every render that made it, judged in one call.
    judged = [i for i, result in enumerate(results) if not result.failure and result.decoded is not None]
    candidates = []
    for i in judged:
        decoded, config = results[i].decoded, jobs[i][2]
        assert decoded is not None
        prompts = config.image_prompts, config.audio_prompts
        candidates.append(Candidate(decoded.pictures, decoded.waves, *prompts))
    scored = dict(zip(judged, scorers.score(candidates) if candidates else [], strict=True))
    made = []
    for trial in trials:
        mine = [i for i, job in enumerate(jobs) if job[0] is trial]
        records = [scored.get(i, {}) for i in mine]
        values = [
            [objective.value(scored[i]) for objective in study.objectives]
            if i in scored
            else [math.nan] * len(study.objectives)
            for i in mine
        ]
        confirmation = Confirmation.of(trial.number, seeds, values, jobs[mine[0]][3].parent)
        run_id = _log_run(study, optuna_study, trial, confirmation, records, tracker)
        confirmation = dataclasses.replace(confirmation, run_id=run_id)
        stored = dict(optuna_study.user_attrs.get(CONFIRMATIONS_ATTR) or {})
        stored[str(trial.number)] = confirmation.record()
        optuna_study.set_user_attr(CONFIRMATIONS_ATTR, stored)
        release(optuna_study, url, trial.number)
        made.append(confirmation)
    return made


def _log_run(
    study: StudyConfig,
    optuna_study: optuna.Study,
    trial: FrozenTrial,
    confirmation: Confirmation,
    records: Sequence[dict[str, float]],
    tracker: Tracker,
) -> str | None:
    """The confirmation's MLflow run (a failure to log is said, and the confirmation is kept)."""
    from sounding_anagrams.errors import one_line

    try:
        return tracker.log_trial(
            trial_number=trial.number,
            state="COMPLETE",
            study=optuna_study.study_name,
            config=study.candidate_config(trial.params).to_dict() | trial.params,
            scores=mean_record([r for r in records if r]),  # the renders that were judged
            objectives=objective_metrics(confirmation.mean, study.objective_names),
            folder=Path(confirmation.folder),
            seeds=confirmation.seeds,
            seed_scores=records,
            seed_objectives=[objective_metrics(v, study.objective_names) for v in confirmation.values],
            kind="confirmation",
            searched=list(trial.params),
        )
    except Exception as error:
        logger.warning(
            "could not log the confirmation of trial %d to MLflow: %s", trial.number, one_line(error)
        )
        return None
