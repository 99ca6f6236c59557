"""Stage 3, the judge: a sampled batch decoded, scored, written and told.

Runs on the ``search-judge`` thread, a batch behind the sampler. Contract:
- takes a sampled :class:`Batch` (``batch.output`` holds its latents);
- writes each render folder (pictures, sounds, config) and, for each complete trial, the clip of its best
  seed, uploads the media the dashboard shows, and only then tells Optuna each trial (a told trial cannot
  change); a racing trial between rounds is not told: the race decides (:meth:`Judge.races_out`) and its
  next round goes to the ledger for the asker; hands the batch on to the publisher;
- on error: a failing decode or judge fails the batch's trials (not the study); a write error fails that
  trial with its reason; a full disk fails the trials it cut short (they are done again), asks the asker to
  stop and raises :class:`DiskFullError` once the batch is told.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from optuna.trial import TrialState

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import DiskFullError, is_disk_full, one_line, shown_url
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers
from sounding_anagrams.render import (
    WRITER_THREADS,
    Decoded,
    RenderResult,
    decode_and_write,
    lower_this_thread_priority,
    write_clip,
    write_render_folder,
)
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.sampler.transfer import side_stream
from sounding_anagrams.search.media import upload_media
from sounding_anagrams.search.opening import OpenedSearch
from sounding_anagrams.search.samplers import should_prune
from sounding_anagrams.search.telling import Teller
from sounding_anagrams.search.trials import (
    Batch,
    TrialOutcome,
    TrialPlan,
    aggregate,
    best_seed_index,
    mean_record,
)
from sounding_anagrams.search.workers import DISK_FULL

logger = logging.getLogger(__name__)


class SharedScorers:
    """The judges (CLIP, CLAP), called by the preview thread and the judge thread, one call at a time."""

    def __init__(self, scorers: Scorers) -> None:
        self.scorers = scorers
        self._lock = threading.Lock()

    def score(self, configs: Sequence[RenderConfig], decoded: Sequence[Decoded]) -> list[dict[str, float]]:
        """One score record per render (its prompts from its config), of its pictures where they were decoded
        (on the device, with no trip through the host)."""
        candidates = [
            Candidate(d.judged_pictures, d.waves, c.image_prompts, c.audio_prompts)
            for c, d in zip(configs, decoded, strict=True)
        ]
        with self._lock:
            records = self.scorers.score(candidates)
        for d in decoded:
            d.device_pictures = None  # the judges were their only reader: the device memory goes back
        return records


class Judge:
    """Judges the batches of one search invocation (see the module's contract)."""

    def __init__(
        self,
        opened: OpenedSearch,
        models: ModelBundle,
        scorers: SharedScorers,
        teller: Teller,
        *,
        abandoned: threading.Event,
        stop_asking: Callable[[], None],
        publish: Callable[[Batch], None],
    ) -> None:
        self.opened = opened
        self.models = models
        self.scorers = scorers
        self.teller = teller
        self.abandoned = abandoned
        self.stop_asking = stop_asking
        self.publish = publish

    def judge(self, batch: Batch) -> None:
        if self.abandoned.is_set():
            return
        plans = batch.plans
        try:
            if batch.output is not None:
                configs = [config for plan in plans for config in plan.round_configs]
                folders = [
                    self.opened.render_folder(p.trial.number, p.first + k)
                    for p in plans
                    for k in range(len(p.round_configs))
                ]
                with side_stream(self.models.device):  # not behind the sampler's steps (see side_stream)
                    results = decode_and_write(
                        batch.output, configs, self.models, folders, with_clip=False, keep_on_device=True
                    )
                    renders = iter(results)
                    batch.results = [[next(renders) for _ in plan.round_configs] for plan in plans]
                    self.score(batch)
                self.write_pruned_previews(batch)
                self.attach_media(batch)
        except Exception as error:  # out of memory, a judge refusing input: the batch fails, not the study
            batch.fail(error)
        batch.output = None  # the latents are no longer needed
        full = [o for o in batch.outcomes.values() if o.reason and o.reason.startswith(DISK_FULL)]
        if full:  # every later trial would fail the same way: ask for none (the tells below free budget)
            self.stop_asking()
        for trial in batch.trials:
            if trial.number in batch.outcomes:
                self.teller.tell(trial, batch.outcomes[trial.number])
        for plan in batch.going_on:  # after a failure of the batch, its racing trials failed instead
            if plan.trial.number not in batch.outcomes:
                self.teller.ledger.race_on(plan)
        self.publish(batch)
        if full:
            raise DiskFullError(
                f"the disk under {self.opened.render_root} is full (trial {full[0].number}: "
                f"{full[0].reason}); the trials finished before are kept in {shown_url(self.opened.url)}, "
                "and the cut-short ones are done again: free some space and run the same command to resume"
            )

    def score(self, batch: Batch) -> None:
        """Per trial: FAIL if any seed failed (the knob set is not reliable), PRUNED if stopped, else its
        seeds' objective values (the per-seed values and scores are kept). A trial complete on all its seeds
        takes their aggregate; a racing trial between rounds either races on (its next round in
        ``batch.going_on``) or is raced out, with the aggregate of the seeds it rendered."""
        study = self.opened.study
        done: list[tuple[TrialPlan, list[RenderResult]]] = []
        for plan, renders in zip(batch.plans, batch.results, strict=True):
            number = plan.trial.number
            folder = self.opened.trial_folder(number)
            failed = [(plan.first + k, r) for k, r in enumerate(renders) if r.failure]
            if failed:
                reason = "; ".join(f"seed {k} (seed={r.config.seed}): {r.failure}" for k, r in failed)
                if any(r.write_error is not None and is_disk_full(r.write_error) for _, r in failed):
                    # Judged nothing: like an interrupted trial it is done again once there is room.
                    reason = f"{DISK_FULL}: {reason}"
                batch.outcomes[number] = TrialOutcome(
                    number, TrialState.FAIL, reason=reason, folder=folder, seeds=plan.seeds
                )
            elif any(r.stopped for r in renders):
                batch.outcomes[number] = TrialOutcome(
                    number, TrialState.PRUNED, folder=folder, seeds=plan.seeds
                )
            else:
                done.append((plan, renders))
        decoded = [(r.config, r.decoded) for _, renders in done for r in renders if r.decoded is not None]
        records = iter(self.scorers.score([c for c, _ in decoded], [d for _, d in decoded]))
        for plan, renders in done:
            number = plan.trial.number
            round_scores = [next(records) for _ in renders]
            round_values = [[o.value(record) for o in study.objectives] for record in round_scores]
            seed_scores = plan.judged.seed_scores + round_scores
            seed_values = plan.judged.seed_values + round_values
            best = best_seed_index(seed_values)
            best_render = renders[best - plan.first] if best >= plan.first else plan.judged.best
            finite = all(math.isfinite(v) for values in round_values for v in values)
            raced = False
            if study.races and finite:
                for k, values in enumerate(round_values):  # step = seed index, the same in every trial
                    plan.trial.report(values[0], plan.first + k)
            if not plan.last_round and finite:
                raced = self.races_out(plan, batch.visible)
                if not raced:
                    plan.judged.seed_values, plan.judged.seed_scores = seed_values, seed_scores
                    plan.judged.best = best_render
                    batch.going_on.append(plan.next_round())
                    continue
            values = [
                aggregate([v[j] for v in seed_values], study.aggregate) for j in range(len(study.objectives))
            ]
            outcome = TrialOutcome(
                number,
                TrialState.COMPLETE,
                values,
                mean_record(seed_scores),
                folder=self.opened.trial_folder(number),
                seeds=plan.seeds[: len(seed_values)],
                seed_values=seed_values,
                seed_scores=seed_scores,
                best_seed=best,
                raced=raced,
            )
            missing = [o.spec for o, v in zip(study.objectives, values, strict=True) if not math.isfinite(v)]
            if missing:
                outcome.state, outcome.values, outcome.raced = TrialState.FAIL, [], False
                outcome.reason = f"objective not finite: {missing}"
            elif best_render is not None:
                batch.best_renders[number] = best_render
            batch.outcomes[number] = outcome

    def races_out(self, plan: TrialPlan, visible: frozenset[int]) -> bool:
        """Whether the study's Wilcoxon pruner finds the trial significantly worse than the leader on the
        seeds reported so far, among the trials finished when this batch was asked (docs/METHOD.md §5)."""
        return should_prune(self.opened.optuna_study, plan.trial, visible)

    def write_pruned_previews(self, batch: Batch) -> None:
        """A pruned trial keeps the pictures and sounds it was pruned on: its seeds' x0 previews, written as
        their render folders (``render.json`` says ``preview_percent``). A write error is only logged: the
        trial is judged (pruned) either way."""
        for plan, renders in zip(batch.plans, batch.results, strict=True):
            kept = batch.pruned_previews.pop(plan.trial.number, None)
            outcome = batch.outcomes.get(plan.trial.number)
            if kept is None or outcome is None or outcome.state != TrialState.PRUNED:
                continue
            percent, decoded = kept
            for render, seed_decoded in zip(renders, decoded, strict=True):
                metadata = {
                    "seed": render.config.seed,
                    "device": str(self.models.device),
                    "dtype": str(self.models.dtype).removeprefix("torch."),
                    "preview_percent": percent,
                    "torch": torch.__version__,
                }
                try:
                    write_render_folder(render.folder, render.config, seed_decoded, metadata)
                except OSError as error:
                    logger.warning(
                        "trial %d: its preview could not be written: %s", plan.trial.number, one_line(error)
                    )

    def attach_media(self, batch: Batch) -> None:
        """Before the tell (Optuna takes a trial's artifacts only while it runs): the clip of each complete
        trial's best seed, then the media its dashboard page shows (that seed's views, spectrogram, clip and
        sounds; a pruned trial's preview) uploaded to the study's artifact store. Neither is the trial's
        judgement: an error is logged and the trial is told as judged."""
        shown: dict[int, Path] = {}
        clips: dict[int, Future[Path]] = {}
        # The clips are encoded side by side: the encoder releases the GIL.
        with ThreadPoolExecutor(
            WRITER_THREADS, thread_name_prefix="search-clip", initializer=lower_this_thread_priority
        ) as encoders:
            for plan, renders in zip(batch.plans, batch.results, strict=True):
                outcome = batch.outcomes.get(plan.trial.number)
                if outcome is None:  # racing on
                    continue
                best = batch.best_renders.get(plan.trial.number)
                if outcome.state == TrialState.COMPLETE and best is not None:
                    shown[plan.trial.number] = best.folder
                    if best.decoded is not None:
                        waves = best.decoded.waves
                        clips[plan.trial.number] = encoders.submit(
                            write_clip,
                            best.folder,
                            best.config,
                            best.decoded.pictures,
                            waves[0] if waves else None,
                        )
                elif outcome.state == TrialState.PRUNED and renders:
                    shown[plan.trial.number] = renders[0].folder
            for number, clip in clips.items():
                try:
                    clip.result()
                except Exception as error:  # the clip is a bonus; the trial is judged
                    logger.warning("trial %d: the clip could not be made: %s", number, one_line(error))
        for trial in batch.trials:
            if trial.number in shown and not self.abandoned.is_set():
                upload_media(self.opened.artifact_store, trial, shown[trial.number])
