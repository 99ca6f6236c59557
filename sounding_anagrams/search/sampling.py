"""Stage 2, the sampler: every seed of every trial of a batch in one batched sampler call, with x0 previews
scored on the side and the pruner's decisions taken at fixed steps.

Runs on the main thread (the device's work). Contract:
- takes an asked :class:`Batch`; fills ``batch.output`` (the latents, for the judge), ``batch.previews`` and
  ``batch.pruned_previews``; a pruned trial's renders stop at its decision step;
- the preview thread (``search-preview``) decodes and scores x0 previews while the sampler goes on;
- on error: a failing sampler call (out of memory, NaN everywhere, a judge refusing input) fails the batch's
  trials, not the study; a stop request raises :class:`SearchStopped` out of the current step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from optuna.trial import Trial

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import one_line
from sounding_anagrams.render import decode_candidates
from sounding_anagrams.sampler.models import ModelBundle
from sounding_anagrams.sampler.pipeline import JointSampler, StepState, take_rows
from sounding_anagrams.sampler.transfer import ready_event, side_stream, used_on_this_stream
from sounding_anagrams.search.judging import SharedScorers
from sounding_anagrams.search.opening import OpenedSearch
from sounding_anagrams.search.samplers import should_prune
from sounding_anagrams.search.stopping import SearchStopped
from sounding_anagrams.search.trials import Batch, Preview, ScoredPreview, aggregate, mean_record

logger = logging.getLogger(__name__)

PREVIEW_LAG = 0.1  # of the steps: how long a preview is scored in the background before its decision
PREVIEW_VAE_BATCH = 4  # x0 previews per VAE call: fewer, larger device calls; GPU memory grows with it


def decision_step(taken_at: int, steps: int) -> int:
    """Loop index at which a preview taken at loop index ``taken_at`` prunes or not: PREVIEW_LAG of the
    schedule later (at least one step, never past the last), while its pictures are scored off the device's
    thread. A fixed step, not "when scored", so the same study renders the same steps on every run."""
    return min(taken_at + max(1, round(PREVIEW_LAG * steps)), steps - 1)


def preview_steps(config: RenderConfig, fractions: Sequence[float]) -> dict[int, int]:
    """Step (1-based: after that many steps) -> percent of the schedule, where the x0 preview is scored.

    Previews are reported to Optuna (and MLflow) at the percent, not the step, so a pruner compares candidates
    at the same stage even when the number of steps is one of the searched knobs. Never the last step.
    """
    n = config.num_inference_steps
    steps = {max(1, round(f * n)): round(100 * f) for f in fractions}
    return {step: percent for step, percent in steps.items() if step < n}


class BatchSampler:
    """Samples batches for one search invocation (see the module's contract)."""

    def __init__(
        self,
        opened: OpenedSearch,
        models: ModelBundle,
        scorers: SharedScorers,
        *,
        progress: bool,
        max_unet_batch: int | None,
        check: Callable[[], None],
    ) -> None:
        self.opened = opened
        self.models = models
        self.scorers = scorers
        self.progress = progress
        self.check = check  # raises SearchStopped once a stop is asked for
        self.sampler = JointSampler(models, max_unet_batch=max_unet_batch)
        self.previewer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-preview")
        self.unet_samples = 0
        self.renders = 0  # renders sampled by this invocation, since `started` (the pace of the search)
        self.started = time.monotonic()

    def close(self) -> None:
        self.previewer.shutdown(wait=True, cancel_futures=True)

    def sample(self, batch: Batch) -> None:
        """Every seed of every trial of the batch in one batched sampler call.

        Previews: at a preview step all seeds of a trial are at the same stage (one knob set, one schedule).
        Their x0 pictures are decoded and scored in the background while the sampler goes on; the result is
        taken a fixed number of steps later (:func:`decision_step`), aggregated over the seeds like the final
        values, reported once per trial, and a pruned trial stops all of its seeds. The pruner compares with
        the trials finished when the batch was asked (``batch.visible``): the same trials on every run,
        however fast the host, and no wait for the judge.
        """
        plans = batch.plans
        if not plans:
            return
        study = self.opened.study
        configs = [config for plan in plans for config in plan.round_configs]
        owner = [p for p, plan in enumerate(plans) for _ in plan.round_configs]  # render -> its trial's plan
        steps = [preview_steps(plan.config, study.previews) for plan in plans]
        pending: list[Preview] = []  # in the order they were taken: each trial reports its percents in order

        def on_step(state: StepState) -> list[int]:
            self.check()
            rendering: dict[int, list[tuple[int, int]]] = {}  # plan -> (row, render) of its seeds still going
            for row, c in enumerate(state.candidates):
                rendering.setdefault(owner[c], []).append((row, c))
            # The seeds of one trial share one schedule, so a seed missing here has failed (NaN): the knob set
            # fails as a whole, and its other seeds stop now instead of rendering for nothing.
            stop = [
                c for p, rows in rendering.items() if len(rows) < len(plans[p].round_configs) for _, c in rows
            ]
            due = {
                p: [c for _, c in rows]
                for p, rows in rendering.items()
                if state.step + 1 in steps[p] and len(rows) == len(plans[p].round_configs)
            }
            if due:
                x0 = {p: take_rows(state.pred_x0, [row for row, _ in rendering[p]]) for p in due}
                job = self.previewer.submit(
                    self.score_previews,
                    x0,
                    {p: plans[p].round_configs for p in due},
                    ready_event(self.models.device),  # where x0 is made, on the sampler's stream
                )
                for p, renders in due.items():
                    length = state.num_inference_steps[rendering[p][0][0]]
                    pending.append(
                        Preview(p, steps[p][state.step + 1], renders, decision_step(state.step, length), job)
                    )
            for preview in [q for q in pending if q.decide_at <= state.step]:
                pending.remove(preview)
                if preview.plan in rendering and preview.plan not in {owner[c] for c in stop}:
                    stop += self.decide(batch, plans[preview.plan].trial, preview)
            return stop

        try:
            batch.output = self.sampler(configs, callback=on_step, progress=self.progress)
            self.unet_samples += sum(batch.output.unet_samples.values())
            self.renders += len(configs)
        except (SearchStopped, KeyboardInterrupt):
            raise
        except Exception as error:  # out of memory, a judge refusing input: the batch fails, not the study
            batch.fail(error)
        finally:
            for preview in pending:  # of trials that failed before their decision: nothing to report
                preview.job.cancel()

    def score_previews(
        self,
        x0: Mapping[int, torch.Tensor],
        configs: Mapping[int, Sequence[RenderConfig]],
        ready: torch.cuda.Event | None = None,
    ) -> dict[int, ScoredPreview | None]:
        """Preview thread: per trial, its seeds' x0 ``(S, 4, h, w)`` decoded and scored (None: not finite, or
        no memory to score it).

        On a GPU this runs on the thread's high-priority stream once ``ready`` (x0 made) is reached, so it
        does not queue behind the sampler's next steps. Out of memory costs these previews only: they are
        not reported, their trials go on, and so does the batch."""
        try:
            return self._score_previews(x0, configs, ready)
        except torch.cuda.OutOfMemoryError as error:
            reason = one_line(error)
        # Outside the except block: the failed call's tensors, held by its traceback, are free now.
        torch.cuda.empty_cache()
        logger.warning(
            "out of memory scoring the x0 previews of %d trial(s); they go on without this preview: %s",
            len(x0),
            reason,
        )
        return {p: None for p in x0}

    def _score_previews(
        self,
        x0: Mapping[int, torch.Tensor],
        configs: Mapping[int, Sequence[RenderConfig]],
        ready: torch.cuda.Event | None,
    ) -> dict[int, ScoredPreview | None]:
        with side_stream(self.models.device, after=ready):
            for latents in x0.values():
                used_on_this_stream(latents)
            finite = {p: bool(torch.isfinite(latents).all()) for p, latents in x0.items()}
            flat = [(p, k) for p in x0 if finite[p] for k in range(len(configs[p]))]
            if not flat:
                return {p: None for p in x0}
            decoded = decode_candidates(
                torch.stack([x0[p][k] for p, k in flat]),
                [configs[p][k] for p, k in flat],
                self.models,
                vae_batch=PREVIEW_VAE_BATCH,
                keep_on_device=True,  # scored where decoded
            )
            records = self.scorers.score([configs[p][k] for p, k in flat], decoded)
        scored: dict[int, ScoredPreview | None] = {
            p: ScoredPreview([], []) if finite[p] else None for p in x0
        }
        for (p, _), d, record in zip(flat, decoded, records, strict=True):
            preview = scored[p]
            assert preview is not None
            preview.decoded.append(d)
            preview.records.append(record)
        return scored

    def decide(self, batch: Batch, trial: Trial, preview: Preview) -> list[int]:
        """Report one trial's preview to Optuna and MLflow; returns its renders to stop if it is pruned."""
        scored = preview.job.result()[preview.plan]  # waits, if the preview is not scored yet
        if scored is None:  # x0 not finite: the seed fails on its own, at its step
            return []
        study = self.opened.study
        seed_records = scored.records
        record = mean_record(seed_records)
        value = aggregate([study.objectives[0].value(r) for r in seed_records], study.aggregate)
        batch.previews[trial.number].append((preview.percent, {**record, "objective": value}))
        # A racing study's intermediate values are its seeds' values (step = seed index): its previews are
        # logged, not reported (docs/METHOD.md §5).
        if len(study.objectives) == 1 and math.isfinite(value) and not study.races:
            trial.report(value, preview.percent)
            if should_prune(self.opened.optuna_study, trial, batch.visible):
                batch.pruned_previews[trial.number] = (preview.percent, scored.decoded)
                return list(preview.renders)
        return []
