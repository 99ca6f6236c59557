"""The reference method written plainly, as the seed code runs it: the oracle for tests and benchmarks.

Per step, one UNet call of batch 2 (uncond, cond) per (model, view); one candidate at a time. Warm start as in
the seed's ``mixed.py`` (docs/METHOD.md §1): each model's noise is computed from its start step on, whatever
the audio weight; both present -> mixed by the audio weight, one present -> used alone.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.sampler.views import build_views


def reference_loop(models, config: RenderConfig) -> torch.Tensor:
    """The reference method, written plainly: per step, one UNet call of batch 2 per (model, view)."""
    if config.scheduler == "ddim":
        scheduler = DDIMScheduler.from_config(models.scheduler_config)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            models.scheduler_config, algorithm_type="dpmsolver++"
        )
    scheduler.set_timesteps(config.num_inference_steps)

    def embed(model, text):
        ids = model.tokenizer(
            [text],
            padding="max_length",
            max_length=model.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return model.text_encoder(ids.to(models.device))[0]

    def guided_sum(model, views, prompts, weights, negative, scale, z, t):
        total = torch.zeros_like(z)
        for view, prompt, weight in zip(views, prompts, weights, strict=True):
            if weight == 0:
                continue
            x = view.view(z)
            text = torch.cat([embed(model, negative), embed(model, prompt)])
            dtype = model.unet.dtype
            noise = model.unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=text.to(dtype)).sample
            uncond, cond = noise.float().chunk(2)
            total = total + weight * view.inverse_view(uncond + scale * (cond - uncond))
        return total

    z = torch.randn(config.latent_shape, generator=torch.Generator().manual_seed(config.seed))[None]
    z = z.to(models.device)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            image = audio = None
            if i >= config.image_start:
                image = guided_sum(
                    models.image,
                    build_views(config.view_specs()),
                    config.image_prompts,
                    config.view_weights,
                    config.image_negative_prompt,
                    config.image_guidance_scale,
                    z,
                    t,
                )
            if i >= config.audio_start_step:
                audio = guided_sum(
                    models.audio,
                    build_views(config.audio_view_specs()),
                    config.audio_prompts,
                    config.audio_view_weights,
                    config.audio_negative_prompt,
                    config.audio_guidance_scale,
                    z,
                    t,
                )
            if image is not None and audio is not None:
                eps = (1 - config.audio_weight) * image + config.audio_weight * audio
            else:
                eps = image if image is not None else audio
            z = scheduler.step(eps, t, z).prev_sample
    return z[0].cpu()
