"""The joint sampler: one latent denoised by an image model under several views and by an audio model.

For candidate ``c`` at step ``i`` (docs/METHOD.md §1)::

    eps = w_s * sum_a a_a * u_a^-1( cfg(eps_audio(u_a(z), t, y_audio_a)) )
        + (1 - w_s) * sum_v w_v * v^-1( cfg(eps_image(v(z), t, y_image_v)) )

where ``u_a`` is the identity for a single audio prompt, else view ``a``. Before a model's start step only the
other model's term is used, with weight 1. All candidates x views x CFG branches go through ONE image-UNet
call and ONE audio-UNet call per step (chunked only when ``max_unet_batch`` or memory asks for it); a term
whose weight is zero, or whose start step is not reached, costs no UNet work.

The loop is written out once in ``__call__`` as numbered steps; each step is a small named function.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from sounding_anagrams.config import RenderConfig, check_shared_fields
from sounding_anagrams.sampler.models import DiffusionModel, ModelBundle
from sounding_anagrams.sampler.transfer import HostReadback, upload
from sounding_anagrams.sampler.views import View, build_views

logger = logging.getLogger(__name__)

_OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


@dataclass
class StepState:
    """What the per-step callback sees, after the scheduler step of loop index ``step``.

    ``candidates`` are indices into the batch of configs that are still rendering; ``latents`` and ``pred_x0``
    are theirs, ``(n, 4, h, w)`` in float32.
    """

    step: int
    candidates: list[int]
    timesteps: torch.Tensor
    latents: torch.Tensor
    pred_x0: torch.Tensor
    num_inference_steps: list[int]


# The callback may return the indices of candidates to stop rendering (pruning); None keeps them all.
StepCallback = Callable[[StepState], Iterable[int] | None]


@dataclass
class SamplerOutput:
    """Final latents ``(N, 4, h, w)`` float32 on the CPU, and what happened to each candidate."""

    latents: torch.Tensor
    stopped: list[bool]
    failures: dict[int, str]
    unet_calls: dict[str, int]
    unet_samples: dict[str, int]
    steps_done: list[int] = field(default_factory=list)


@dataclass
class _Term:
    """One prompt of one model seen through one view, for a group of candidates."""

    view: View
    prompt_index: int
    weights: list[float]  # per candidate in the batch (0 = skip)


@dataclass
class _Solver:
    """One scheduler that steps every candidate of one schedule in one call per step.

    DDIM keeps no state between steps. DPM-Solver++ keeps its last model outputs in ``model_outputs``, one
    row per candidate: ``members`` are the candidates those rows belong to, in order.
    """

    scheduler: Any
    members: list[int] = field(default_factory=list)

    def follow(self, members: list[int]) -> None:
        """Keep the solver's history of ``members`` only (a candidate that stopped or failed leaves it)."""
        if members == self.members:
            return
        history = getattr(self.scheduler, "model_outputs", None)
        if history is not None and self.members:
            keep = [self.members.index(c) for c in members]
            self.scheduler.model_outputs = [None if h is None else take_rows(h, keep) for h in history]
        self.members = list(members)


@dataclass
class _Plan:
    """Per-candidate schedule and knobs, derived once from the configs."""

    config: RenderConfig
    solver: _Solver  # shared by the candidates of one schedule in one sampler call
    timesteps: list[int]
    candidate: int  # index in the sampler call's configs

    @property
    def scheduler(self) -> Any:
        return self.solver.scheduler


def make_scheduler(name: str, schedule_config: dict[str, Any], num_inference_steps: int) -> Any:
    """A fresh scheduler per candidate: multistep solvers keep per-sample history."""
    if name == "ddim":
        scheduler: Any = DDIMScheduler.from_config(schedule_config)
    elif name == "dpmsolver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            schedule_config, algorithm_type="dpmsolver++", solver_order=2
        )
    else:  # RenderConfig already rejected it; kept for direct callers.
        raise ValueError(f"unknown scheduler {name!r}")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


# What ``set_timesteps`` resets in a multistep solver: its per-run state. The rest (timesteps, sigmas, alphas)
# is only read while stepping, so a shallow copy shares it with the prototype.
_SOLVER_STATE = ("model_outputs", "lower_order_nums", "_step_index", "_begin_index")


def fresh_solver(prototype: Any) -> Any:
    """A multistep scheduler ready for a new run, made from ``prototype`` (set up, never stepped) without
    copying its schedule: a shallow copy with the per-run state reset, not a deep copy at every batch."""
    state = vars(prototype)
    if not all(name in state for name in _SOLVER_STATE):  # a diffusers that keeps its state elsewhere
        return copy.deepcopy(prototype)
    scheduler = copy.copy(prototype)
    scheduler.model_outputs = [None] * len(prototype.model_outputs)  # a list of its own: step shifts it
    scheduler.lower_order_nums = 0
    scheduler._step_index = None
    scheduler._begin_index = None
    return scheduler


class JointSampler:
    """Batched sampler over candidates that share prompts, views and canvas (their knobs may differ)."""

    def __init__(self, models: ModelBundle, *, max_unet_batch: int | None = None) -> None:
        if max_unet_batch is not None and max_unet_batch < 2:
            raise ValueError(f"max_unet_batch must be at least 2 (one CFG pair), but got {max_unet_batch=}.")
        self.models = models
        self.max_unet_batch = max_unet_batch
        # The UNet batch limit out of memory left (None: max_unet_batch's), and the calls since it last
        # changed: an out-of-memory halves it for the failing call, a run of successes doubles it back.
        self.unet_chunk: int | None = None
        self._fitting_calls = 0
        self._largest_batch = 0
        # Kept between calls (a search samples batch after batch with the same prompts and schedules), so the
        # device is not left idle while the host rebuilds them.
        self._embeddings: dict[tuple[int, tuple[str, ...], str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._schedulers: dict[tuple[str, int], tuple[Any, list[int]]] = {}  # prototype, timesteps

    @torch.no_grad()
    def __call__(
        self,
        configs: Sequence[RenderConfig],
        *,
        callback: StepCallback | None = None,
        progress: bool = True,
    ) -> SamplerOutput:
        # 1. Check inputs: one batch shares prompts, views and canvas.
        self.check_inputs(configs)
        first = configs[0]
        views = build_views(first.view_specs())
        audio_views = build_views(first.audio_view_specs())

        # 2. Encode each prompt once for the whole run.
        image_cond, image_uncond = self.encode_prompts(
            self.models.image, list(first.image_prompts), first.image_negative_prompt
        )
        audio_cond, audio_uncond = self.encode_prompts(
            self.models.audio, list(first.audio_prompts), first.audio_negative_prompt
        )

        # 3. Prepare the initial noise (seeded, on the CPU) and a scheduler per candidate.
        latents = self.prepare_latents(configs)
        plans = self.prepare_schedules(configs)
        image_terms = [_Term(v, i, [c.view_weights[i] for c in configs]) for i, v in enumerate(views)]  # type: ignore[index]
        audio_terms = [
            _Term(v, i, [c.audio_view_weights[i] for c in configs])  # type: ignore[index]
            for i, v in enumerate(audio_views)
        ]

        # 4. Denoise. Nothing in a step waits for the device: small tensors go up without blocking, and the
        #    non-finite flags of step i are read at step i + 1, once that step's work is queued.
        n = len(configs)
        stopped = [False] * n
        failures: dict[int, str] = {}
        steps_done = [0] * n
        calls = {"image": 0, "audio": 0}
        samples = {"image": 0, "audio": 0}
        max_steps = max(len(p.timesteps) for p in plans)
        device = latents.device
        # The active candidates, and their indices on the device (None: all of them, in order).
        rows_of: tuple[list[int], torch.Tensor | None] = ([], None)
        # The last step's non-finite flags on their way to the host.
        flags: tuple[int, list[int], HostReadback] | None = None
        for step in tqdm(range(max_steps), desc="denoising", disable=not progress, leave=False):
            active = [
                c for c in range(n) if not stopped[c] and c not in failures and step < len(plans[c].timesteps)
            ]
            if not active:
                break
            if active != rows_of[0]:  # only when a candidate stops, fails or ends: one upload
                rows_of = (active, None if active == list(range(n)) else upload(active, device, torch.long))
            z = latents if rows_of[1] is None else latents.index_select(0, rows_of[1])
            step_timesteps = [plans[c].timesteps[step] for c in active]
            image_scale, audio_scale = self.term_scales([plans[c].config for c in active], step)

            # 4a. One UNet call per model for every active candidate x view x CFG branch.
            eps = torch.zeros_like(z)
            for kind, model, terms, cond, uncond, scale in (
                ("image", self.models.image, image_terms, image_cond, image_uncond, image_scale),
                ("audio", self.models.audio, audio_terms, audio_cond, audio_uncond, audio_scale),
            ):
                guidance = [getattr(plans[c].config, f"{kind}_guidance_scale") for c in active]
                contribution, n_samples = self.predict_noise(
                    model, terms, active, z, step_timesteps, cond, uncond, scale, guidance
                )
                if n_samples:
                    eps += contribution
                    calls[kind] += 1
                    samples[kind] += n_samples

            # 4b. Scheduler step: one call per schedule for all of its candidates (a multistep solver keeps a
            #     history row per candidate).
            z_next, pred_x0 = self.scheduler_step([plans[c] for c in active], step, z, eps)
            if rows_of[1] is None:
                latents = z_next
            else:
                latents.index_copy_(0, rows_of[1], z_next)
            for c in active:
                steps_done[c] = step + 1

            # 4c. Read the flags of the step before (done by now), and send this step's on their way.
            if flags is not None:
                self.record_non_finite(flags, plans, failures, steps_done)
            flags = (step, active, HostReadback(torch.isfinite(z_next).flatten(1).all(dim=1)))

            # 4d. Let the caller preview and prune.
            if callback is not None:
                state = StepState(
                    step,
                    active,
                    torch.tensor(step_timesteps, dtype=torch.long),
                    z_next.clone(),
                    pred_x0,
                    [len(plans[c].timesteps) for c in active],
                )
                for c in callback(state) or ():
                    stopped[c] = True
        if flags is not None:
            self.record_non_finite(flags, plans, failures, steps_done)

        # 5. Hand back the latents in float32 on the CPU.
        return SamplerOutput(latents.cpu(), stopped, failures, calls, samples, steps_done)

    # -- the named steps --------------------------------------------------------------------------------

    @staticmethod
    def check_inputs(configs: Sequence[RenderConfig]) -> None:
        if isinstance(configs, RenderConfig):
            raise TypeError("JointSampler takes a sequence of RenderConfig, e.g. [config]")
        check_shared_fields(configs)

    def encode_prompts(
        self, model: DiffusionModel, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(P, L, D)`` conditional and ``(1, L, D)`` negative-prompt embeddings (once per
        sampler: a search's batches share them)."""
        key = (id(model), tuple(prompts), negative_prompt)
        if key not in self._embeddings:
            self._embeddings[key] = self._encode_prompts(model, prompts, negative_prompt)
        return self._embeddings[key]

    def _encode_prompts(
        self, model: DiffusionModel, prompts: list[str], negative_prompt: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = model.tokenizer
        tokens = tokenizer(
            [*prompts, negative_prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        lengths = [len(ids) for ids in tokenizer([*prompts, negative_prompt]).input_ids]
        for text, length in zip([*prompts, negative_prompt], lengths, strict=True):
            if length > tokenizer.model_max_length:
                logger.warning(
                    "prompt %r is %d tokens; the text encoder sees the first %d",
                    text,
                    length,
                    tokenizer.model_max_length,
                )
        embeddings = model.text_encoder(tokens.input_ids.to(self.models.device))[0]
        return embeddings[:-1], embeddings[-1:]

    def prepare_latents(self, configs: Sequence[RenderConfig]) -> torch.Tensor:
        """``(N, 4, h, w)`` float32 noise, each drawn on the CPU from its own seed (device-independent)."""
        noise = [
            torch.randn(config.latent_shape, generator=torch.Generator("cpu").manual_seed(config.seed))
            for config in configs
        ]
        return torch.stack(noise).to(self.models.device)

    def prepare_schedules(self, configs: Sequence[RenderConfig]) -> list[_Plan]:
        """A schedule per candidate; the candidates of one schedule share one solver. DDIM keeps no state
        between steps, so its scheduler is kept between calls; a multistep solver's history belongs to one
        call, so each call starts from a fresh one (:func:`fresh_solver`)."""
        solvers: dict[tuple[str, int], _Solver] = {}
        plans = []
        for candidate, config in enumerate(configs):
            key = (config.scheduler, config.num_inference_steps)
            if key not in self._schedulers:
                prototype = make_scheduler(
                    config.scheduler, self.models.scheduler_config, config.num_inference_steps
                )
                # Every scheduler used here starts from unit-variance noise (init_noise_sigma == 1).
                assert float(prototype.init_noise_sigma) == 1.0
                self._schedulers[key] = (prototype, [int(t) for t in prototype.timesteps])
            prototype, timesteps = self._schedulers[key]
            if key not in solvers:
                solvers[key] = _Solver(prototype if config.scheduler == "ddim" else fresh_solver(prototype))
            plans.append(_Plan(config, solvers[key], timesteps, candidate))
        return plans

    @staticmethod
    def term_scales(configs: Sequence[RenderConfig], step: int) -> tuple[list[float], list[float]]:
        """Per candidate, the weight of the image sum and of the audio sum at ``step`` (warm start rules).

        A term is on from its start step, by the step alone (the seed's loop, docs/METHOD.md §1); while only
        one is on it weighs 1, so ``audio_weight=0`` with a late image start is an audio-only warm-up followed
        by image-only steps. A zero weight then costs no UNet work.
        """
        image_scale, audio_scale = [], []
        for config in configs:
            image_on = step >= config.image_start
            audio_on = step >= config.audio_start_step
            if image_on and audio_on:
                image_scale.append(1.0 - config.audio_weight)
                audio_scale.append(config.audio_weight)
            else:
                image_scale.append(1.0 if image_on else 0.0)
                audio_scale.append(1.0 if audio_on else 0.0)
        return image_scale, audio_scale

    def predict_noise(
        self,
        model: DiffusionModel,
        terms: Sequence[_Term],
        active: Sequence[int],
        z: torch.Tensor,
        timesteps: Sequence[int],
        cond: torch.Tensor,
        uncond: torch.Tensor,
        scale: Sequence[float],
        guidance: Sequence[float],
    ) -> tuple[torch.Tensor, int]:
        """One model's weighted, guided, view-inverted noise estimate ``(n, 4, h, w)`` for the active rows.

        Builds a single UNet batch ``[uncond entries; cond entries]`` over all (candidate, view) pairs with a
        non-zero weight. Returns the estimate and the number of UNet samples evaluated (0: no call made).
        """
        device = z.device
        groups = []  # (term, rows into z, per-row weight)
        for term in terms:
            rows = [r for r, c in enumerate(active) if scale[r] * term.weights[c] > 0]
            if rows:
                weights = [scale[r] * term.weights[active[r]] for r in rows]
                groups.append((term, rows, weights))
        if not groups:
            return torch.zeros_like(z), 0

        inputs = torch.cat([term.view.view(take_rows(z, rows)) for term, rows, _ in groups])
        step_t = upload([timesteps[r] for _, rows, _ in groups for r in rows], device, torch.long)
        text = torch.cat([cond[term.prompt_index].expand(len(rows), -1, -1) for term, rows, _ in groups])
        batch = inputs.shape[0]
        noise = self.run_unet(
            model,
            torch.cat([inputs, inputs]),
            torch.cat([step_t, step_t]),
            torch.cat([uncond.expand(batch, -1, -1), text]),
        )
        noise_uncond, noise_cond = noise.chunk(2)

        out = torch.zeros_like(z)
        offset = 0
        for term, rows, weights in groups:
            part = slice(offset, offset + len(rows))
            offset += len(rows)
            g = upload([guidance[r] for r in rows], device, torch.float32).view(-1, 1, 1, 1)
            guided = noise_uncond[part] + g * (noise_cond[part] - noise_uncond[part])
            w = upload(weights, device, torch.float32).view(-1, 1, 1, 1)
            out.index_add_(0, upload(rows, device, torch.long), w * term.view.inverse_view(guided))
        return out, 2 * batch

    # Successful UNet calls at a lowered limit before it doubles back (one denoising step makes one or two).
    grow_back_after = 16

    def run_unet(
        self, model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """UNet over a ``(B, 4, h, w)`` batch in chunks of at most ``max_unet_batch`` samples.

        On CUDA out of memory the limit halves and the same call is tried again (down to 2 samples); after
        ``grow_back_after`` calls that fit, it doubles back, never above ``max_unet_batch``: a one-off
        (another process's peak) costs a few slower steps, not the rest of the run.
        """
        dtype = next(model.unet.parameters()).dtype  # (diffusers' .dtype walks every module, each step)
        self._largest_batch = max(self._largest_batch, x.shape[0])
        while True:
            chunk = min(self.unet_chunk or x.shape[0], self.max_unet_batch or x.shape[0])
            try:
                outs = [
                    model.unet(
                        x[i : i + chunk].to(dtype),
                        t[i : i + chunk],
                        encoder_hidden_states=text[i : i + chunk].to(dtype),
                    ).sample
                    for i in range(0, x.shape[0], chunk)
                ]
            except _OOM_ERRORS:
                if chunk <= 2:
                    raise
            else:
                self._grow_back()
                return torch.cat(outs).float()
            # Outside the except block: the failed call's tensors, held by its traceback, are free now.
            self._shrink(chunk)

    def _shrink(self, chunk: int) -> None:
        """An out-of-memory call of ``chunk`` samples per UNet call: halve the limit."""
        self.unet_chunk = max(2, chunk // 2)
        self._fitting_calls = 0
        torch.cuda.empty_cache()
        logger.warning(
            "CUDA out of memory: UNet calls take at most %d samples for the next %d calls",
            self.unet_chunk,
            self.grow_back_after,
        )

    def _grow_back(self) -> None:
        """One more call that fit: after ``grow_back_after`` of them, double the limit (back to none once it
        reaches ``max_unet_batch`` or the largest batch seen)."""
        if self.unet_chunk is None:
            return
        self._fitting_calls += 1
        if self._fitting_calls < self.grow_back_after:
            return
        self._fitting_calls = 0
        grown = self.unet_chunk * 2
        ceiling = self.max_unet_batch or self._largest_batch
        self.unet_chunk = None if grown >= ceiling else grown
        logger.info("UNet calls take up to %s samples again", self.unet_chunk or ceiling)

    @staticmethod
    def scheduler_step(
        plans: Sequence[_Plan], step: int, z: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next latents and predicted clean latents ``(n, 4, h, w)`` of the active candidates' ``plans``.

        The candidates of one schedule are at the same timestep and take one call of their solver (a
        search's batch is usually one such group: far fewer small kernels and Python calls per step). A
        multistep solver's history holds one row per candidate, so stepping them together is stepping each
        alone (the same element-wise arithmetic: equal to the bit on the tiny models, CPU).
        """
        z_next, pred_x0 = torch.empty_like(z), torch.empty_like(z)
        groups: dict[tuple[int, int], list[int]] = {}
        for row, plan in enumerate(plans):
            groups.setdefault((id(plan.solver), plan.timesteps[step]), []).append(row)
        for rows in groups.values():
            plan = plans[rows[0]]
            t = plan.timesteps[step]
            z_rows, eps_rows = take_rows(z, rows), take_rows(eps, rows)
            plan.solver.follow([plans[r].candidate for r in rows])
            out = plan.scheduler.step(eps_rows, t, z_rows)
            put_rows(z_next, rows, out.prev_sample)
            # DDIM's step hands out the x0 it stepped with (the same formula as ours: max abs diff 0 on the
            # tiny models, 2 steps, CPU); DPM-Solver++'s output has only prev_sample.
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                x0 = JointSampler.predict_x0(plan.scheduler, z_rows, eps_rows, t)
            put_rows(pred_x0, rows, x0)
        return z_next, pred_x0

    @staticmethod
    def record_non_finite(
        flags: tuple[int, list[int], HostReadback],
        plans: Sequence[_Plan],
        failures: dict[int, str],
        steps_done: list[int],
    ) -> None:
        """Fail the candidates whose latents stopped being finite at the flags' step (read one step late)."""
        step, active, readback = flags
        for c, ok in zip(active, readback.result().tolist(), strict=True):
            if not ok and c not in failures:
                failures[c] = f"non-finite latents at step {step} (timestep {plans[c].timesteps[step]})"
                steps_done[c] = step + 1

    @staticmethod
    def predict_x0(scheduler: Any, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted clean latent ``(n, 4, h, w)`` of an epsilon-prediction model: ``(z - sqrt(1 - a) eps) /
        sqrt(a)``, for schedulers whose step gives none (DPM-Solver++: it keeps the same x0 in its internal
        ``model_outputs`` history, 1e-6 from this on the tiny models; not an interface to rely on)."""
        alpha = scheduler.alphas_cumprod[t].to(torch.float32)  # a CPU scalar: no copy to wait for
        return (z - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def take_rows(x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``x[rows]`` along dim 0: a view when the rows are consecutive, else a gather by a non-blocking index
    (indexing a CUDA tensor with a Python list would wait for the device)."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0] : rows[0] + len(rows)]
    return x.index_select(0, upload(rows, x.device, torch.long))


def put_rows(out: torch.Tensor, rows: Sequence[int], values: torch.Tensor) -> None:
    """``out[rows] = values`` along dim 0, without waiting for the device (see :func:`take_rows`)."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        out[rows[0] : rows[0] + len(rows)] = values
    else:
        out.index_copy_(0, upload(rows, out.device, torch.long), values)
