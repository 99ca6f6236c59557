"""The offline ``tiny`` preset: small random components of the real architectures, built from a fixed seed,
saved once to a cache folder (``SOUNDING_ANAGRAMS_CACHE``, default ``~/.cache/sounding-anagrams``) and loaded
back through the real loaders' ``from_pretrained`` path (:mod:`sounding_anagrams.sampler.models`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel

from sounding_anagrams.sampler.vocoder import HiFiGANConfig, HiFiGANGenerator, save_vocoder

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
