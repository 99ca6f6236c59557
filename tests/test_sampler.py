"""The batched joint sampler against a plain reference loop, and its batching, pruning and determinism."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.sampler.pipeline import JointSampler, make_scheduler
from tests.reference_loop import reference_loop

TINY = {"image_model": "tiny", "audio_model": "tiny", "device": "cpu", "dtype": "float32"}


def tiny_config(**changes) -> RenderConfig:
    base = {"num_inference_steps": 3, "image_start_step": 1, "seed": 7, **TINY}
    return RenderConfig(**{**base, **changes})


class UNetRecorder:
    """Counts UNet calls and their batch sizes through forward hooks on the real modules."""

    def __init__(self, models):
        self.batches: dict[str, list[int]] = defaultdict(list)
        self.handles = [
            models.image.unet.register_forward_hook(
                lambda m, args, out: self.batches["image"].append(len(args[0]))
            ),
            models.audio.unet.register_forward_hook(
                lambda m, args, out: self.batches["audio"].append(len(args[0]))
            ),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_batched_equals_reference_with_different_knobs_per_candidate(tiny_models):
    configs = [
        tiny_config(seed=1),
        tiny_config(
            seed=2,
            audio_weight=0.3,
            view_weights=[0.25, 0.75],
            image_guidance_scale=4.0,
            audio_guidance_scale=6.0,
            image_start_step=0,
        ),
        tiny_config(seed=3, num_inference_steps=2, image_start_step=0, audio_start_step=1),
        tiny_config(seed=4, scheduler="dpmsolver++", num_inference_steps=4, image_start_step=2),
    ]
    output = JointSampler(tiny_models)(configs, progress=False)
    for index, config in enumerate(configs):
        expected = reference_loop(tiny_models, config)
        torch.testing.assert_close(output.latents[index], expected, atol=2e-4, rtol=1e-4)
    assert output.steps_done == [3, 3, 2, 4]
    assert not any(output.stopped) and output.failures == {}


def test_batched_equals_reference_with_an_audio_prompt_per_view(tiny_models):
    configs = [
        tiny_config(
            views=["identity", "flip"],
            image_prompts=["a castle", "a car"],
            audio_prompts=["bird chirping", "bell ringing"],
            seed=5,
        ),
        tiny_config(
            views=["identity", "flip"],
            image_prompts=["a castle", "a car"],
            audio_prompts=["bird chirping", "bell ringing"],
            audio_view_weights=[0.8, 0.2],
            seed=6,
        ),
    ]
    output = JointSampler(tiny_models)(configs, progress=False)
    for index, config in enumerate(configs):
        torch.testing.assert_close(
            output.latents[index], reference_loop(tiny_models, config), atol=2e-4, rtol=1e-4
        )


def test_batched_equals_reference_for_hybrid_views(tiny_models):
    config = tiny_config(views=["low_pass", "high_pass"], image_prompts=["a castle", "a car"])
    output = JointSampler(tiny_models)([config], progress=False)
    torch.testing.assert_close(output.latents[0], reference_loop(tiny_models, config), atol=2e-4, rtol=1e-4)


def test_warm_start_switches_terms_by_their_start_step_only(tiny_models):
    # The seed's loop: audio_weight=0 with a late image start is an audio-only warm-up, then image-only
    # steps; audio_weight=1 with a late audio start is the mirror case. Both match the seed-style loop.
    configs = [
        tiny_config(seed=8, num_inference_steps=4, audio_weight=0.0, image_start_step=2),
        tiny_config(seed=9, num_inference_steps=4, audio_weight=1.0, image_start_step=0, audio_start_step=2),
    ]
    with UNetRecorder(tiny_models) as calls:
        output = JointSampler(tiny_models)(configs, progress=False)
    for index, config in enumerate(configs):
        torch.testing.assert_close(
            output.latents[index], reference_loop(tiny_models, config), atol=2e-4, rtol=1e-4
        )
    # Steps 0-1: candidate 1's image term (2 views x CFG) and candidate 0's audio term; steps 2-3 the other
    # way round. A zero weight costs nothing once both terms are on.
    assert calls.batches["image"] == [4, 4, 4, 4]
    assert calls.batches["audio"] == [2, 2, 2, 2]
    # And they differ from the runs without a warm-up: the warm-up steps really used the other model.
    plain = JointSampler(tiny_models)(
        [
            tiny_config(seed=8, num_inference_steps=4, audio_weight=0.0, image_start_step=0),
            tiny_config(seed=9, num_inference_steps=4, audio_weight=1.0, image_start_step=0),
        ],
        progress=False,
    )
    for index in range(2):
        assert (plain.latents[index] - output.latents[index]).abs().max() > 1e-3


def test_one_unet_call_per_model_per_step_for_all_candidates(tiny_models):
    configs = [tiny_config(seed=s, image_start_step=0) for s in range(3)]
    with UNetRecorder(tiny_models) as calls:
        output = JointSampler(tiny_models)(configs, progress=False)
    # 3 candidates x 2 views x 2 CFG branches for the image model, 3 x 1 x 2 for the audio model.
    assert calls.batches["image"] == [12, 12, 12]
    assert calls.batches["audio"] == [6, 6, 6]
    assert output.unet_calls == {"image": 3, "audio": 3}
    assert output.unet_samples == {"image": 36, "audio": 18}


def test_no_unet_work_for_zero_weights_or_before_start_steps(tiny_models):
    configs = [
        tiny_config(seed=1, audio_weight=0.0, image_start_step=0),  # no audio term at all
        tiny_config(seed=2, view_weights=[1.0, 0.0], image_start_step=2),  # view 1 never; image from step 2
    ]
    with UNetRecorder(tiny_models) as calls:
        JointSampler(tiny_models)(configs, progress=False)
    # Image: step 0, 1 only candidate 0 (2 views); step 2 adds candidate 1's single view.
    assert calls.batches["image"] == [4, 4, 6]
    # Audio: only candidate 1, every step.
    assert calls.batches["audio"] == [2, 2, 2]


def test_max_unet_batch_chunks_calls_with_the_same_result(tiny_models):
    configs = [tiny_config(seed=s) for s in range(2)]
    whole = JointSampler(tiny_models)(configs, progress=False)
    with UNetRecorder(tiny_models) as calls:
        chunked = JointSampler(tiny_models, max_unet_batch=4)(configs, progress=False)
    assert max(calls.batches["image"]) == 4
    torch.testing.assert_close(chunked.latents, whole.latents, atol=1e-5, rtol=1e-5)


def test_same_config_and_seed_give_identical_latents(tiny_models):
    config = tiny_config(seed=11)
    first = JointSampler(tiny_models)([config], progress=False).latents
    second = JointSampler(tiny_models)([config], progress=False).latents
    assert torch.equal(first, second)
    other = JointSampler(tiny_models)([tiny_config(seed=12)], progress=False).latents
    assert not torch.allclose(first, other)


def test_seeded_reference_slice(tiny_models):
    """Pins the tiny pipeline end to end (models from fixed seeds, noise, schedule, combination)."""
    output = JointSampler(tiny_models)([tiny_config(seed=0)], progress=False)
    got = output.latents[0, :, 0, :3].flatten()
    expected = torch.tensor(EXPECTED_SLICE)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


# Measured on torch 2.14 / diffusers 0.42, CPU fp32 (tiny models v3, built from fixed seeds).
EXPECTED_SLICE = [
    -3.2608,
    -3.6762,
    -1.3806,
    5.0155,
    2.4912,
    -1.1649,
    1.4817,
    -2.0939,
    2.9832,
    -3.9938,
    -2.7758,
    0.3929,
]


def test_callback_sees_x0_and_can_prune_candidates(tiny_models):
    configs = [tiny_config(seed=s, num_inference_steps=4, image_start_step=0) for s in range(3)]
    seen = []

    def callback(state):
        seen.append((state.step, list(state.candidates)))
        assert state.pred_x0.shape == state.latents.shape == (len(state.candidates), 4, 32, 128)
        assert torch.isfinite(state.pred_x0).all()
        return [1] if state.step == 1 else None

    with UNetRecorder(tiny_models) as calls:
        output = JointSampler(tiny_models)(configs, callback=callback, progress=False)
    assert seen == [(0, [0, 1, 2]), (1, [0, 1, 2]), (2, [0, 2]), (3, [0, 2])]
    assert output.stopped == [False, True, False]
    assert output.steps_done == [4, 2, 4]
    assert calls.batches["image"] == [12, 12, 8, 8]  # the batch shrinks once candidate 1 is pruned


def test_pred_x0_matches_the_ddim_prediction(tiny_models):
    config = tiny_config(seed=3, num_inference_steps=2, image_start_step=0)
    states = []
    JointSampler(tiny_models)([config], callback=lambda s: states.append(s), progress=False)
    # Self-consistency of DDIM with eta 0: z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    scheduler = DDIMScheduler.from_config(tiny_models.scheduler_config)
    scheduler.set_timesteps(2)
    t0, t1 = (int(t) for t in scheduler.timesteps)
    a0, a1 = scheduler.alphas_cumprod[t0], scheduler.alphas_cumprod[t1]
    z0 = torch.randn(config.latent_shape, generator=torch.Generator().manual_seed(config.seed))[None]
    x0 = states[0].pred_x0
    eps = (z0 - a0.sqrt() * x0) / (1 - a0).sqrt()
    torch.testing.assert_close(
        states[0].latents, a1.sqrt() * x0 + (1 - a1).sqrt() * eps, atol=1e-4, rtol=1e-4
    )


def test_candidates_must_share_prompts_views_and_canvas(tiny_models):
    with pytest.raises(ConfigError, match=r"image_prompts=.*candidate 1 differs"):
        JointSampler(tiny_models)([tiny_config(), tiny_config(image_prompts=["x", "y"])], progress=False)
    with pytest.raises(TypeError, match="sequence of RenderConfig"):
        JointSampler(tiny_models)(tiny_config(), progress=False)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"max_unet_batch must be at least 2 \(one CFG pair\), but got max_unet_batch=1"
    ):
        JointSampler(tiny_models, max_unet_batch=1)


def test_a_non_finite_candidate_fails_at_its_step_and_leaves_the_others_alone(tiny_models, monkeypatch):
    configs = [tiny_config(seed=s, num_inference_steps=4, image_start_step=0) for s in range(3)]
    clean = JointSampler(tiny_models)(configs, progress=False)
    original = JointSampler.prepare_latents

    def poisoned(self, configs):
        latents = original(self, configs)
        latents[1] = float("nan")
        return latents

    monkeypatch.setattr(JointSampler, "prepare_latents", poisoned)
    with UNetRecorder(tiny_models) as calls:
        output = JointSampler(tiny_models)(configs, progress=False)
    scheduler = DDIMScheduler.from_config(tiny_models.scheduler_config)
    scheduler.set_timesteps(4)
    assert output.failures == {1: f"non-finite latents at step 0 (timestep {int(scheduler.timesteps[0])})"}
    assert output.steps_done == [4, 1, 4]
    # The flags of a step are read at the next one (the host never waits for the device): the failed
    # candidate takes one more step in the batch, then leaves it.
    assert calls.batches["image"] == [12, 12, 8, 8]
    torch.testing.assert_close(output.latents[[0, 2]], clean.latents[[0, 2]])
    assert torch.isnan(output.latents[1]).all()


def test_dpm_solver_candidates_keep_their_own_history_in_one_batch(tiny_models):
    """A multistep solver keeps a history row per candidate: a candidate rendered next to others gives what
    it gives alone, and a second call starts from fresh solver state."""
    configs = [
        tiny_config(seed=s, scheduler="dpmsolver++", num_inference_steps=4, image_start_step=0)
        for s in range(2)
    ]
    sampler = JointSampler(tiny_models)
    together = sampler(configs, progress=False).latents
    alone = [sampler([config], progress=False).latents[0] for config in configs]
    # (Batch sizes change the CPU kernels' rounding a little; shared solver history would change everything.)
    torch.testing.assert_close(together, torch.stack(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sampler(configs, progress=False).latents, together, rtol=0, atol=0)


def test_pred_x0_comes_from_ddims_step_and_from_the_epsilon_formula_for_dpm_solver(tiny_models):
    """DDIM's step output carries the x0 it stepped with; DPM-Solver++'s carries none, so the sampler computes
    it. Both are (z - sqrt(1 - a) eps) / sqrt(a) at the row's timestep."""
    ddim = tiny_config(seed=1, num_inference_steps=2)
    dpm = tiny_config(seed=2, num_inference_steps=2, scheduler="dpmsolver++")
    plans = JointSampler(tiny_models).prepare_schedules([ddim, ddim, dpm])
    gen = torch.Generator().manual_seed(0)
    z, eps = (torch.randn(3, *ddim.latent_shape, generator=gen) for _ in range(2))
    _, pred_x0 = JointSampler.scheduler_step(plans, 0, z, eps)

    reference = DDIMScheduler.from_config(tiny_models.scheduler_config)
    reference.set_timesteps(2)
    ddim_out = reference.step(eps[:2], plans[0].timesteps[0], z[:2])
    torch.testing.assert_close(pred_x0[:2], ddim_out.pred_original_sample, rtol=0, atol=0)
    for row, plan in enumerate(plans):
        a = plan.scheduler.alphas_cumprod[plan.timesteps[0]]
        expected = (z[row] - (1 - a).sqrt() * eps[row]) / a.sqrt()
        torch.testing.assert_close(pred_x0[row], expected, atol=1e-5, rtol=1e-5)


# Measured with the per-candidate DPM-Solver++ path (one deep-copied scheduler per candidate, stepped alone),
# torch 2.14 / diffusers 0.42, CPU fp32: candidates 0 and 2 of `dpm_batch`, candidate 1 pruned after step 2.
EXPECTED_DPM_SLICES = {
    0: [
        -6.4655,
        -7.3255,
        -2.1253,
        9.5366,
        4.8284,
        -2.2562,
        2.5390,
        -3.9902,
        5.6203,
        -7.7600,
        -5.2140,
        0.8724,
    ],
    2: [
        -6.7784,
        5.5559,
        -8.1338,
        -7.2412,
        12.6350,
        -3.9518,
        7.0461,
        6.2152,
        -0.7219,
        -16.3439,
        -13.3089,
        -9.6423,
    ],
}


def dpm_batch() -> list[RenderConfig]:
    """Three candidates of one DPM-Solver++ schedule and one of another (its own group)."""
    configs = [tiny_config(seed=s, scheduler="dpmsolver++", num_inference_steps=5) for s in range(3)]
    return [*configs, tiny_config(seed=9, scheduler="dpmsolver++")]


def test_dpm_solver_candidates_of_one_schedule_step_together_as_they_stepped_alone(tiny_models, monkeypatch):
    """One scheduler call per schedule and step (not one per candidate), no deep copy per batch, and the
    latents the per-candidate path gave (seeded slices), also when a candidate leaves mid-way."""
    import sounding_anagrams.sampler.pipeline as pipeline

    def no_deepcopy(_):
        raise AssertionError("a scheduler was deep-copied")

    monkeypatch.setattr(pipeline.copy, "deepcopy", no_deepcopy)
    sampler = JointSampler(tiny_models)
    steps = []
    original = DPMSolverMultistepScheduler.step

    def counted(self, model_output, timestep, sample, **kwargs):
        steps.append(len(sample))
        return original(self, model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", counted)
    output = sampler(dpm_batch(), callback=lambda s: [1] if s.step == 2 else None, progress=False)
    # Steps 0-2: 3 candidates of the 5-step schedule + 1 of the 3-step one; then 2 after the prune.
    assert steps == [3, 1, 3, 1, 3, 1, 2, 2]
    for index, expected in EXPECTED_DPM_SLICES.items():
        got = output.latents[index, :, 0, :3].flatten()
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-3, rtol=1e-3)
    again = sampler(dpm_batch(), callback=lambda s: [1] if s.step == 2 else None, progress=False)
    assert torch.equal(again.latents, output.latents)  # each call starts from fresh solver state


def test_a_group_step_equals_each_candidate_stepped_by_its_own_scheduler(tiny_models):
    """The grouped DPM-Solver++ step against one scheduler per candidate, on the same inputs: equal to the
    bit, also after a candidate leaves the group (its history rows are dropped)."""
    configs = [tiny_config(seed=s, scheduler="dpmsolver++", num_inference_steps=6) for s in range(3)]
    plans = JointSampler(tiny_models).prepare_schedules(configs)
    own = [make_scheduler("dpmsolver++", tiny_models.scheduler_config, 6) for _ in configs]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, *configs[0].latent_shape, generator=gen)
    alone = z.clone()
    active = [0, 1, 2]
    for step in range(6):
        if step == 3:
            active = [0, 2]  # candidate 1 is pruned
        eps = torch.randn(len(active), *configs[0].latent_shape, generator=gen)
        rows = torch.tensor(active)
        z_next, _ = JointSampler.scheduler_step([plans[c] for c in active], step, z[rows], eps)
        z[rows] = z_next
        for row, c in enumerate(active):
            t = plans[c].timesteps[step]
            alone[c] = own[c].step(eps[row : row + 1], t, alone[c : c + 1]).prev_sample[0]
    assert torch.equal(z[[0, 2]], alone[[0, 2]])


class OutOfMemoryOnce:
    """Raises CUDA out of memory in the image UNet's forward for calls over ``limit`` samples, ``times``
    times (a one-off peak), and records every call's batch size."""

    def __init__(self, models, limit: int, times: int = 1):
        self.limit, self.left, self.sizes = limit, times, []
        self.handle = models.image.unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.sizes.append(len(args[0]))
        if len(args[0]) > self.limit and self.left > 0:
            self.left -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_out_of_memory_retries_the_call_smaller_then_grows_back(tiny_models, caplog):
    configs = [tiny_config(seed=s, image_start_step=0, num_inference_steps=6) for s in range(2)]
    whole = JointSampler(tiny_models)(configs, progress=False)
    sampler = JointSampler(tiny_models, max_unet_batch=8)
    sampler.grow_back_after = 3
    with OutOfMemoryOnce(tiny_models, limit=4) as oom:
        output = sampler(configs, progress=False)
    # 2 candidates x 2 views x CFG = 8 samples per image call. The first call fails once at 8, is done again
    # at 4 (two calls), and after 3 calls that fit (each model's call counts) the limit doubles back to 8.
    assert oom.sizes[:3] == [8, 4, 4]
    assert max(oom.sizes[3:]) == 8 and oom.sizes[-1] == 8
    assert sampler.unet_chunk is None  # back to max_unet_batch's
    # A batch cut in two rounds differently in fp32 (1.5e-5 seen over 6 steps); a lost or doubled sample
    # would be off by O(1).
    torch.testing.assert_close(output.latents, whole.latents, atol=1e-4, rtol=1e-3)
    assert "CUDA out of memory: UNet calls take at most 4 samples for the next 3 calls" in caplog.text
    # It never grows past max_unet_batch, and out of memory at 2 samples is raised.
    with OutOfMemoryOnce(tiny_models, limit=1, times=100), pytest.raises(torch.cuda.OutOfMemoryError):
        JointSampler(tiny_models, max_unet_batch=4)(configs, progress=False)
