"""Load Stable Diffusion 1.5 and Auffusion (or the offline ``tiny`` preset) through ``from_pretrained``.

Each model is a diffusers pipeline folder or hub id; only the subfolders we use are read (unet, vae,
text_encoder, tokenizer, scheduler, vocoder), so the multi-GB single-file checkpoints of the SD 1.5 repo are
never downloaded. The ``tiny`` preset (:mod:`sounding_anagrams.sampler.tiny`) builds small random components
from a fixed seed, saves them once to a cache folder, and they load through the very same code path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sounding_anagrams.config import AUFFUSION_ID, SD15_ID, TINY_MODELS, RenderConfig
from sounding_anagrams.devices import make_current, resolve_device
from sounding_anagrams.errors import ConfigError, ModelLoadError, one_line
from sounding_anagrams.files import looks_like_path
from sounding_anagrams.sampler.vocoder import HiFiGANGenerator, load_vocoder

logger = logging.getLogger(__name__)


@dataclass
class DiffusionModel:
    """The parts of one latent diffusion model that the sampler uses."""

    source: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


@dataclass
class ModelBundle:
    """Image model (SD 1.5), audio model (Auffusion), its vocoder, and the shared DDIM noise schedule."""

    image: DiffusionModel
    audio: DiffusionModel
    vocoder: HiFiGANGenerator | None
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype


# -- dtype -------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA (SD 1.5's released precision), fp32 on CPU where half matmuls are slow or missing."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    resolved = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cpu" and resolved == torch.float16:
        raise ConfigError("dtype", dtype, "float16 is not supported on the CPU; use float32 or bfloat16")
    return resolved


# -- loading --------------------------------------------------------------------------------------------


def resolve_model_source(name: str, kind: str) -> str:
    """``tiny`` -> the cached tiny pipeline folder; anything else (hub id or folder) is used as is."""
    if name == TINY_MODELS:
        from sounding_anagrams.sampler.tiny import ensure_tiny_models  # builds them once, on first use

        return str(ensure_tiny_models()[kind])
    return name


def _load_help(source: str, part: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {part} of {source!r}: {one_line(error)} "
        f"Give a hub id (downloaded to the HF cache, e.g. {SD15_ID!r} / {AUFFUSION_ID!r}), a local diffusers "
        f"pipeline folder with {part}/ inside, or 'tiny' for small random offline models."
    )


def _from_pretrained(cls: Any, source: str, subfolder: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """Prefer safetensors and the fp16 variant where the repo has one; fall back to the plain weights."""
    variants = ["fp16", None] if dtype == torch.float16 else [None]
    last_error: Exception | None = None
    for variant in variants:
        try:
            return cls.from_pretrained(source, subfolder=subfolder, variant=variant, **kwargs)
        except (OSError, ValueError) as error:
            last_error = error
    assert last_error is not None
    raise _load_help(source, subfolder, last_error) from last_error


def load_diffusion_model(source: str, *, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """Load unet, vae, text encoder and tokenizer of one pipeline folder or hub id."""
    if looks_like_path(source) and not Path(source).expanduser().is_dir():
        raise ModelLoadError(
            f"model folder {source!r} does not exist; give a diffusers pipeline folder (unet/, vae/, "
            f"text_encoder/, tokenizer/, scheduler/), a hub id such as {SD15_ID!r}, or 'tiny'"
        )
    source = str(Path(source).expanduser()) if looks_like_path(source) else source
    unet = _from_pretrained(UNet2DConditionModel, source, "unet", dtype, torch_dtype=dtype)
    vae = _from_pretrained(AutoencoderKL, source, "vae", dtype, torch_dtype=dtype)
    text_encoder = _from_pretrained(CLIPTextModel, source, "text_encoder", dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except (OSError, ValueError) as error:
        raise _load_help(source, "tokenizer", error) from error
    # unet and vae were loaded in `dtype` already (diffusers keeps its float32-only modules as they are).
    unet.to(device).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return DiffusionModel(source, unet, vae, text_encoder, tokenizer)


def load_scheduler_config(source: str) -> dict[str, Any]:
    """SD 1.5's noise schedule as a DDIM config (the repo ships a PNDM config with the same betas)."""
    try:
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError) as error:
        raise _load_help(source, "scheduler", error) from error
    return dict(scheduler.config)


def load_models(
    image_model: str = SD15_ID,
    audio_model: str = AUFFUSION_ID,
    *,
    device: str = "auto",
    dtype: str = "auto",
    with_vocoder: bool = True,
) -> ModelBundle:
    """Load both models on one device; the vocoder runs in fp32 (it is small and fp16 hurts the sound)."""
    torch_device = resolve_device(device)
    make_current(torch_device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    image_source = resolve_model_source(image_model, "image")
    audio_source = resolve_model_source(audio_model, "audio")
    logger.info(
        "loading image model %s and audio model %s on %s (%s)",
        image_source,
        audio_source,
        torch_device,
        torch_dtype,
    )
    image = load_diffusion_model(image_source, device=torch_device, dtype=torch_dtype)
    audio = load_diffusion_model(audio_source, device=torch_device, dtype=torch_dtype)
    vocoder = load_vocoder(audio_source, "vocoder", device=torch_device) if with_vocoder else None
    return ModelBundle(
        image=image,
        audio=audio,
        vocoder=vocoder,
        scheduler_config=load_scheduler_config(image_source),
        device=torch_device,
        dtype=torch_dtype,
    )


def load_models_for(config: RenderConfig) -> ModelBundle:
    """The models, device and dtype a render config names (with the vocoder when it uses HiFi-GAN)."""
    return load_models(
        config.image_model,
        config.audio_model,
        device=config.device,
        dtype=config.dtype,
        with_vocoder=config.vocoder == "hifigan",
    )
