"""Score candidates in memory (for the search) or render folders on disk (``sounding-anagrams evaluate``).

Models load once per process (``Scorers.load``); the pictures and sounds of many candidates are scored in
batches, on the GPU when there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, SoundingAnagramsError, unknown_name_message
from sounding_anagrams.evaluation.clap import DEFAULT_CLAP_MODEL, AudioTextScorer, ClapScorer
from sounding_anagrams.evaluation.clip import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    PROTOCOLS,
    ClipScorer,
    ImageTextScorer,
)
from sounding_anagrams.evaluation.metrics import summarize
from sounding_anagrams.files import write_text_atomic
from sounding_anagrams.sampler.audio import read_wav

SAMPLE_RATE = 16_000
SCORES_FILE = "scores.json"
STALE_SCORES_FILE = "scores.stale.json"


class RenderFolderError(SoundingAnagramsError):
    """A render folder cannot be scored (missing file, wrong sample rate, bad config); others still are."""


@dataclass
class Candidate:
    """What one candidate shows and sounds like: ``pictures[i]`` is view i ``(3, H, W)`` in [0, 1]."""

    pictures: list[torch.Tensor]
    waves: list[np.ndarray]
    image_prompts: tuple[str, ...]
    audio_prompts: tuple[str, ...]


@dataclass
class Scorers:
    """The CLIP and CLAP judges, loaded once."""

    clip: ImageTextScorer
    clap: AudioTextScorer
    protocol: str = "windowed"
    clip_name: str = f"{DEFAULT_CLIP_MODEL}/{DEFAULT_CLIP_PRETRAINED}"
    clap_name: str = DEFAULT_CLAP_MODEL

    @classmethod
    def load(
        cls,
        *,
        models: str | None = None,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        clap_model: str = DEFAULT_CLAP_MODEL,
        protocol: str = "windowed",
        device: str = "auto",
    ) -> Scorers:
        """``models='tiny'`` gives tiny offline judges; otherwise the named CLIP and CLAP checkpoints."""
        if protocol not in PROTOCOLS:
            raise ConfigError("protocol", protocol, unknown_name_message("protocol", protocol, PROTOCOLS))
        if models == "tiny":
            clip_model, clip_pretrained, clap_model = "tiny", None, "tiny"
        elif models not in (None, "default"):
            raise ConfigError(
                "--models",
                models,
                "must be 'tiny' or 'default' (pick real judges with --clip-model / --clap-model)",
            )
        clip = ClipScorer(clip_model, clip_pretrained, device=device)
        clap = ClapScorer(clap_model, device=device)
        clip_name = clip_model if clip_pretrained is None else f"{clip_model}/{clip_pretrained}"
        return cls(clip, clap, protocol, clip_name, clap_model)

    def score(self, candidates: Sequence[Candidate]) -> list[dict[str, float]]:
        """One score record per candidate; candidates sharing prompts are scored in one batch."""
        records: list[dict[str, float]] = [{} for _ in candidates]
        by_image: dict[tuple[str, ...], list[int]] = defaultdict(list)
        by_audio: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for index, candidate in enumerate(candidates):
            by_image[candidate.image_prompts].append(index)
            by_audio[candidate.audio_prompts].append(index)
        for prompts, members in by_image.items():
            scored = self.clip.score_batch([candidates[i].pictures for i in members], prompts, self.protocol)
            for index, record in zip(members, scored, strict=True):
                records[index].update(record)
        for prompts, members in by_audio.items():
            scored_audio = self.clap.score_batch([candidates[i].waves for i in members], prompts, SAMPLE_RATE)
            for index, record in zip(members, scored_audio, strict=True):
                records[index].update(record)
        return records

    def describe(self) -> dict[str, str]:
        return {"clip": self.clip_name, "clap": self.clap_name, "protocol": self.protocol}


def load_render_folder(folder: Path) -> Candidate:
    """Read ``config.yaml``, ``view{i}.png`` and ``audio{a}.wav`` of a render folder, checking each."""
    config_path = folder / "config.yaml"
    if not folder.is_dir():
        raise RenderFolderError(f"{folder}: not a folder")
    if not config_path.exists():
        raise RenderFolderError(f"{folder}: no config.yaml (is this a render folder written by `render`?)")
    try:
        config = RenderConfig.from_yaml(config_path, field="config")
    except ConfigError as error:
        raise RenderFolderError(f"{folder}: {error}") from None
    size = (config.height, config.width)
    views = listed_files(folder, "view{}.png", len(config.views), "views")
    sounds = listed_files(folder, "audio{}.wav", len(config.audio_prompts), "audio prompts")
    pictures = [read_picture(folder, path, size) for path in views]
    waves = [read_sound(folder, path) for path in sounds]
    return Candidate(pictures, waves, config.image_prompts, config.audio_prompts)


def listed_files(folder: Path, pattern: str, count: int, what: str) -> list[Path]:
    """The ``count`` files ``pattern.format(i)`` of a render folder that its config.yaml implies (one per
    view, one per audio prompt); a missing one is a RenderFolderError saying how many ``what`` it lists."""
    paths = [folder / pattern.format(index) for index in range(count)]
    for path in paths:
        if not path.exists():
            raise RenderFolderError(f"{folder}: missing {path.name} ({count} {what} in config.yaml)")
    return paths


def read_sound(folder: Path, path: Path) -> np.ndarray:
    """An ``audio{a}.wav`` of a render folder as float32 samples; a file that is no WAV, or not at the
    renders' 16 kHz, is a RenderFolderError."""
    try:
        wave, rate = read_wav(path)
    except ConfigError as error:
        raise RenderFolderError(f"{folder}: {path.name}: {error}") from None
    if rate != SAMPLE_RATE:
        raise RenderFolderError(f"{folder}: {path.name} is {rate} Hz; renders are {SAMPLE_RATE} Hz")
    return wave


def read_picture(folder: Path, path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A view's PNG as ``(3, H, W)`` in [0, 1]; a file that is no PNG, cut short or of another size than the
    config's canvas is a RenderFolderError (a cropped or resized picture would get a wrong score)."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise RenderFolderError(f"{folder}: {path.name} is a {image.format} file, not a PNG")
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as error:  # what Pillow raises for a broken or truncated file
        reason = (
            "is not an image" if isinstance(error, UnidentifiedImageError) else f"cannot be read ({error})"
        )
        raise RenderFolderError(f"{folder}: {path.name} {reason}") from None
    if array.shape[:2] != size:
        raise RenderFolderError(
            f"{folder}: {path.name} is {array.shape[1]}x{array.shape[0]} pixels; config.yaml renders "
            f"{size[1]}x{size[0]}"
        )
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class FolderResult:
    folder: Path
    scores: dict[str, float] | None
    error: str | None = None


def evaluate_folders(folders: Sequence[Path], scorers: Scorers) -> list[FolderResult]:
    """Score every readable folder (writing ``scores.json`` next to it); unreadable ones carry their error."""
    results: list[FolderResult] = []
    loaded: list[tuple[int, Candidate]] = []
    for folder in folders:
        try:
            loaded.append((len(results), load_render_folder(Path(folder))))
            results.append(FolderResult(Path(folder), None))
        except RenderFolderError as error:
            results.append(FolderResult(Path(folder), None, str(error)))
    for result in results:
        if result.error is not None:
            set_aside_stale_scores(result)
    records = scorers.score([candidate for _, candidate in loaded])
    for (index, _), record in zip(loaded, records, strict=True):
        result = results[index]
        result.scores = record
        payload: dict[str, Any] = {
            "scores": record,
            "judges": scorers.describe(),
            "inputs": input_digests(result.folder),
        }
        try:
            write_text_atomic(
                result.folder / SCORES_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n"
            )
        except OSError as error:  # a full disk or a read-only folder costs this folder its file, no other's
            result.error = f"{result.folder}: {SCORES_FILE} could not be written: {error.strerror or error}"
    return results


def input_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each file a score was computed from: a scores.json says which files it describes."""
    names = [
        "config.yaml",
        *sorted(p.name for p in folder.glob("view*.png")),
        *sorted(p.name for p in folder.glob("audio*.wav")),
    ]
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in names}


def set_aside_stale_scores(result: FolderResult) -> None:
    """A folder that cannot be scored now keeps no scores.json beside it: that score described other files.

    It is renamed to ``scores.stale.json`` (nothing is deleted) and the folder's error says so.
    """
    scores = result.folder / SCORES_FILE
    if not scores.is_file():
        return
    stale = result.folder / STALE_SCORES_FILE
    try:
        os.replace(scores, stale)
    except OSError as error:
        result.error = f"{result.error}; its old {SCORES_FILE} could not be set aside: {error.strerror}"
        return
    result.error = (
        f"{result.error}; its old {SCORES_FILE} no longer describes the folder: moved to {stale.name}"
    )


def format_table(results: Sequence[FolderResult]) -> str:
    """Per folder its scores, then across folders mean ± 95% interval and the 90th/95th percentiles."""
    scored = [r for r in results if r.scores is not None]
    metrics: list[str] = []
    for result in scored:
        for name in result.scores or {}:
            if name not in metrics:
                metrics.append(name)
    width = max([len(str(r.folder)) for r in results] + [12])
    lines = [f"{'folder':<{width}}  " + "  ".join(f"{m:>16}" for m in metrics)]
    for result in results:
        if result.scores is None:
            lines.append(f"{result.folder!s:<{width}}  ERROR: {result.error}")
            continue
        cells = [result.scores.get(m, math.nan) for m in metrics]
        lines.append(f"{result.folder!s:<{width}}  " + "  ".join(f"{v:>16.4f}" for v in cells))
    if scored:
        stats = {m: summarize([r.scores.get(m, math.nan) for r in scored if r.scores]) for m in metrics}
        lines.append("")
        for label, cell in (
            ("mean ± 95% CI", lambda s: f"{s['mean']:.4f}±{s['ci95']:.4f}"),
            ("p90 (best-of-N)", lambda s: f"{s['p90']:.4f}"),
            ("p95 (best-of-N)", lambda s: f"{s['p95']:.4f}"),
        ):
            lines.append(f"{label:<{width}}  " + "  ".join(f"{cell(stats[m]):>16}" for m in metrics))
        lines.append(f"{'n':<{width}}  " + "  ".join(f"{stats[m]['n']:>16}" for m in metrics))
    return "\n".join(lines)
