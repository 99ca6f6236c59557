"""Judges whose answers are known, for tests and the pruning benchmark (the tiny CLIP/CLAP are random, so
their scores hardly vary between candidates and nothing would ever be pruned)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sounding_anagrams.evaluation.clap import AudioTextScorer
from sounding_anagrams.evaluation.clip import ImageTextScorer
from sounding_anagrams.evaluation.evaluate import Scorers


class BrightnessClip(ImageTextScorer):
    """A judge whose answers are known: 'bright' wants a light picture, 'dark' a dark one."""

    temperature = 0.01

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        level = images.mean(dim=(1, 2, 3))
        return torch.stack([level, 1 - level], dim=1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if p == "bright" else [0.0, 1.0] for p in prompts])


class LoudnessClap(AudioTextScorer):
    """'loud' wants a high RMS."""

    temperature = 0.01

    def embed_audio(self, waves: Sequence[np.ndarray], sample_rate: int) -> torch.Tensor:
        rms = torch.tensor([float(np.sqrt(np.mean(np.square(w)))) for w in waves])
        return torch.stack([rms, 0.05 * torch.ones_like(rms)], dim=1)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]] * len(prompts))


def designed_judges() -> Scorers:
    return Scorers(
        BrightnessClip(), LoudnessClap(), protocol="whole", clip_name="brightness", clap_name="loudness"
    )


# A small study those judges can rank: 'bright' / 'dark' pictures (identity, flip) and a 'loud' sound.
JUDGED_STUDY = {
    "name": "unit",
    "render": {
        "views": ["identity", "flip"],
        "image_prompts": ["bright", "dark"],
        "audio_prompts": ["loud"],
        "num_inference_steps": 4,
        "image_start_step": 0,
    },
    "space": {
        "audio_weight": {"type": "float", "low": 0.2, "high": 0.8},
        "image_guidance_scale": {"type": "float", "low": 1.0, "high": 12.0},
    },
    "objectives": ["mean(clip/view0, clap/audio0)"],
    "seeds_per_trial": 2,
    "batch": 4,  # renders per sampler call: 2 trials x 2 seeds
    "budget": {"trials": 4},
    "confirm": False,  # tests/test_confirmation.py turns it on
}
