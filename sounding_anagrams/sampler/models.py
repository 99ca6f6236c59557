"""Load Stable Diffusion 1.5 and Auffusion (or the offline ``tiny`` preset) through ``from_pretrained``.

Each model is a diffusers pipeline folder or hub id; only the subfolders we use are read (unet, vae,
text_encoder, tokenizer, scheduler, vocoder), so the multi-GB single-file checkpoints of the SD 1.5 repo are
never downloaded. The ``tiny`` preset builds small random components from a fixed seed, saves them once to a
cache folder and loads them back through the very same code path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sounding_anagrams.config import AUFFUSION_ID, SD15_ID, TINY_MODELS, RenderConfig
from sounding_anagrams.devices import make_current, resolve_device
from sounding_anagrams.errors import ConfigError, ModelLoadError, one_line
from sounding_anagrams.files import looks_like_path
from sounding_anagrams.sampler.vocoder import HiFiGANConfig, HiFiGANGenerator, load_vocoder, save_vocoder

logger = logging.getLogger(__name__)

# Bump when the tiny components change so that stale caches are rebuilt, not reused.
TINY_VERSION = 4
_TINY_SEEDS = {"image": 1234, "audio": 5678}
# SD 1.5's noise schedule (its scheduler/scheduler_config.json), used by the tiny preset.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


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


# -- the tiny preset -------------------------------------------------------------------------------------


def tiny_cache_dir() -> Path:
    root = os.environ.get("SOUNDING_ANAGRAMS_CACHE") or Path.home() / ".cache" / "sounding-anagrams"
    return Path(root) / f"tiny-v{TINY_VERSION}"


def ensure_built(folder: Path, build: Callable[[Path], None], *, marker: str) -> Path:
    """Build ``folder`` once with ``build(staging)``; ``marker``, a file ``build`` writes last, marks it done.

    Built in a staging folder and renamed into place under a file lock, so concurrent processes (test workers,
    search workers) neither race nor see a half-written folder; a half-written one is rebuilt.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not (folder / marker).exists():
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            build(staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
    return folder


def ensure_tiny_models() -> dict[str, Path]:
    """The tiny image and audio pipeline folders, built on first use."""
    root = tiny_cache_dir()
    return {
        kind: ensure_built(
            root / kind,
            partial(build_tiny_pipeline, seed=seed, with_vocoder=kind == "audio"),
            marker="model_index.json",
        )
        for kind, seed in _TINY_SEEDS.items()
    }


def tiny_unet() -> UNet2DConditionModel:
    # Attention only at the lowest of three levels (8x32 cells of a 32x128 latent): at 16x64 it was 4x slower
    # on a CPU, most of the test suite's time.
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def tiny_vae() -> AutoencoderKL:
    # Four blocks, three downsamplings: a 256x1024 canvas gives a 4x32x128 latent, like SD's VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=0.18215,
    )


def byte_level_chars() -> list[str]:
    """The 256 characters byte-level BPE spells bytes with: printable ones as themselves, others from 256."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _byte_level_vocab() -> dict[str, int]:
    """A CLIP-style byte-level vocabulary without merges: each byte is a token (and its end-of-word form)."""
    chars = byte_level_chars()
    vocab = {char: index for index, char in enumerate(chars)}
    vocab.update({char + "</w>": 256 + index for index, char in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def write_byte_level_tokenizer(
    folder: Path, vocab: dict[str, int], *, max_length: int, tokenizer_class: str
) -> int:
    """Write a byte-level BPE tokenizer with no merges (vocab.json, merges.txt, tokenizer_config.json) that
    ``tokenizer_class.from_pretrained`` loads; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": max_length, "tokenizer_class": tokenizer_class}), encoding="utf-8"
    )
    return len(vocab)


def write_tiny_tokenizer(folder: Path) -> int:
    """The tiny preset's tokenizer, loadable by ``CLIPTokenizer.from_pretrained``; returns the vocab size."""
    return write_byte_level_tokenizer(
        folder, _byte_level_vocab(), max_length=77, tokenizer_class="CLIPTokenizer"
    )


def tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def build_tiny_pipeline(folder: Path, *, seed: int, with_vocoder: bool) -> None:
    """Save a small random pipeline in the diffusers folder layout (plus Auffusion's vocoder/ when asked)."""
    torch.manual_seed(seed)
    tiny_unet().save_pretrained(folder / "unet")
    tiny_vae().save_pretrained(folder / "vae")
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    tiny_text_encoder(vocab_size).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SD15_SCHEDULE).save_pretrained(folder / "scheduler")
    if with_vocoder:
        save_vocoder(HiFiGANGenerator(HiFiGANConfig.tiny()), folder / "vocoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_sounding_anagrams_tiny": TINY_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    # Written last: its presence marks a complete folder.
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
