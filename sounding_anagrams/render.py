"""Turn sampled latents into the files a user looks at and listens to: one folder per candidate.

A render folder holds::

    view0.png, view1.png, ...   what each view shows (SD's VAE, the view applied at 8x in pixels)
    spectrogram.png             the canvas as Auffusion's VAE decodes it, right strip cropped (what is heard)
    audio0.wav, ...             one 16 kHz WAV per audio prompt (the canvas, or the canvas under view a)
    transition.mp4              view 0 turning into view 1 and back, playing audio0 (H.264 + AAC; complete
                                candidates)
    config.yaml                 re-renders exactly this candidate
    render.json                 seed, device, dtype, steps done (or preview_percent: a pruned trial's x0
                                preview), sample counts, file list
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sounding_anagrams.animation import transition_frames, write_mp4
from sounding_anagrams.config import RenderConfig
from sounding_anagrams.files import CLIP_FILE
from sounding_anagrams.sampler.audio import MelConfig, griffin_lim, image_to_log_mel, read_wav, write_wav
from sounding_anagrams.sampler.models import DiffusionModel, ModelBundle
from sounding_anagrams.sampler.pipeline import JointSampler, SamplerOutput, StepCallback
from sounding_anagrams.sampler.views import build_views
from sounding_anagrams.sampler.vocoder import HiFiGANGenerator, vocode

logger = logging.getLogger(__name__)

MEL = MelConfig()
# Threads that write render folders while the next candidate decodes (encoders release the GIL).
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))
# zlib level 1: a third less encoding time than the default 6 for files about 7% larger (a search writes
# three PNGs for every candidate, most of which nobody opens; docs/PERFORMANCE.md).
PNG_COMPRESS_LEVEL = 1
# Candidates per call of each VAE and of the vocoder when decoding: fewer, larger device calls; GPU memory
# grows with it (a chunk that runs out of memory is decoded again one candidate at a time).
DECODE_BATCH = 4
BACKGROUND_NICENESS = 10  # of threads that only encode files: the sampler and the previews come first


def lower_this_thread_priority() -> None:
    """Let the kernel run this thread after the ones that feed the device (Linux schedules each thread by
    its own niceness). Bulk encoding (PNG, H.264) waits a little; the sampler and the previews do not."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # not allowed: the thread keeps its priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


@dataclass
class Decoded:
    """One candidate decoded: pictures in [0, 1] ``(3, H, W)`` per view, the heard canvas, and its sounds.

    ``pictures``, ``spectrogram`` and ``waves`` are on the host: what the files hold. ``device_pictures``,
    when asked for and the decoding device is not the CPU, are the same pictures where they were decoded:
    the judges score those, with no trip to the host and back.
    """

    pictures: list[torch.Tensor]
    spectrogram: torch.Tensor  # (H, W - crop_right) in [0, 1]
    waves: list[np.ndarray]  # one per audio prompt, float32 in [-1, 1]
    device_pictures: list[torch.Tensor] | None = None

    @property
    def judged_pictures(self) -> list[torch.Tensor]:
        """What the judges score: the pictures on the device where kept, else the host's (same values)."""
        return self.pictures if self.device_pictures is None else self.device_pictures

    def non_finite(self) -> str | None:
        """What came out NaN or infinite (the VAE can overflow on a finite latent), else None."""
        if not all(bool(torch.isfinite(p).all()) for p in self.pictures):
            return "pictures"
        if not bool(torch.isfinite(self.spectrogram).all()):
            return "spectrogram"
        if not all(bool(np.isfinite(w).all()) for w in self.waves):
            return "sound"
        return None


@dataclass
class RenderResult:
    folder: Path
    config: RenderConfig
    files: dict[str, Path] = field(default_factory=dict)
    failure: str | None = None
    stopped: bool = False
    decoded: Decoded | None = None
    write_error: OSError | None = None  # the files could not be written (e.g. a full disk)


@dataclass
class RenderBatch:
    """The candidates of one batched sampler run, and the UNet work it took (samples per model)."""

    results: list[RenderResult]
    unet_calls: dict[str, int]
    unet_samples: dict[str, int]


@torch.no_grad()
def decode_latents(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """``(B, 4, h, w)`` latents -> ``(B, 3, 8h, 8w)`` float32 pixels in [-1, 1] with that model's own VAE, on
    the VAE's device."""
    vae = model.vae
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.float().clamp(-1, 1)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels + 1) / 2).clamp(0, 1)


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> float32 copies on the CPU, in one copy (flattened into one buffer, cut up again on
    the host) instead of one wait per tensor. CPU tensors are handed back as they are."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.float() for t in tensors]
    return cut(torch.cat([t.reshape(-1).float() for t in tensors]).cpu(), tensors)


def cut(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat buffer -> views of it shaped like ``like``, one after the other."""
    parts = flat.split([t.numel() for t in like])
    return [part.view(t.shape) for part, t in zip(parts, like, strict=True)]


def _log_mel(spectrogram: torch.Tensor, models: ModelBundle) -> torch.Tensor:
    """``(H, W)`` canvas in [0, 1] -> ``(1, n_mels, W)`` log-mel, rows resampled to the vocoder's mel bins."""
    log_mel = image_to_log_mel(spectrogram[None], MEL)  # (1, H, W), row 0 of the image = highest bin
    n_mels = models.vocoder.config.num_mels if models.vocoder is not None else MEL.n_mels
    if log_mel.shape[1] != n_mels:
        # A non-256-pixel-high canvas: resample its rows to the vocoder's mel bins.
        logger.warning("canvas height %d resampled to %d mel bins for the sound", log_mel.shape[1], n_mels)
        log_mel = F.interpolate(log_mel[:, None], size=(n_mels, log_mel.shape[-1]), mode="bilinear")[:, 0]
    return log_mel


def _vocoder(models: ModelBundle) -> HiFiGANGenerator:
    if models.vocoder is None:
        raise ValueError("vocoder='hifigan' needs models loaded with_vocoder=True")
    return models.vocoder


def spectrogram_to_wave(spectrogram: torch.Tensor, config: RenderConfig, models: ModelBundle) -> np.ndarray:
    """``(H, W)`` canvas in [0, 1] -> waveform ``(W * hop,)``, by the HiFi-GAN vocoder or Griffin-Lim."""
    log_mel = _log_mel(spectrogram, models)
    if config.vocoder == "griffin_lim":
        wave = griffin_lim(log_mel, MEL, seed=config.seed)
    else:
        wave = vocode(_vocoder(models), log_mel)
    return wave[0].float().cpu().numpy()


@torch.no_grad()
def decode_candidate(latent: torch.Tensor, config: RenderConfig, models: ModelBundle) -> Decoded:
    """Decode one ``(4, h, w)`` latent into pictures per view, the heard canvas and its sounds."""
    return decode_candidates(latent[None], [config], models)[0]


@torch.no_grad()
def decode_candidates(
    latents: torch.Tensor,
    configs: Sequence[RenderConfig],
    models: ModelBundle,
    *,
    vae_batch: int = DECODE_BATCH,
    keep_on_device: bool = False,
) -> list[Decoded]:
    """Decode ``(N, 4, h, w)`` latents, ``vae_batch`` candidates per call of each VAE and of the vocoder; a
    chunk's pictures and sounds come to the host in one copy. ``keep_on_device``: each also keeps its
    pictures on the device, for the judges.

    A chunk decoded together is not bit-identical to its candidates decoded alone: the VAE's kernels round
    differently in a batch (fp32, CPU, tiny models, chunks of 3: pixels within 8e-5, so about 0.1% of the
    8-bit values move by one level; the vocoder within 1e-7), as the sampler's batches already do for the
    latents. One candidate per chunk is the one-at-a-time decoding to the bit (tests/test_decoding.py).
    """
    if vae_batch < 1:
        raise ValueError(f"vae_batch must be at least 1, but got {vae_batch=}.")
    decoded: list[Decoded] = []
    for start in range(0, latents.shape[0], vae_batch):
        chunk = slice(start, start + vae_batch)
        decoded += _decode_chunk(latents[chunk], configs[chunk], models, keep_on_device)
    return decoded


def _decode_chunk(
    latents: torch.Tensor, configs: Sequence[RenderConfig], models: ModelBundle, keep_on_device: bool
) -> list[Decoded]:
    """``(k, 4, h, w)`` latents -> their Decoded: one call of each VAE, one vocoder call for all the chunk's
    HiFi-GAN sounds of one length, one copy to the host."""
    pixels = decode_latents(models.image, latents)  # (k, 3, H, W) in [-1, 1], on the device
    canvas = decode_latents(models.audio, latents)  # Auffusion's VAE: the spectrogram that becomes sound
    pictures, spectrograms, heard = [], [], []
    for k, config in enumerate(configs):
        views = build_views(config.view_specs())
        pictures.append([to_unit(view.view_pixels(pixels[k : k + 1]))[0] for view in views])
        # The dark strip sits at the right of the frame the audio model denoised, so crop after the view.
        width = config.width - config.crop_right
        spectrograms.append(to_unit(canvas[k : k + 1])[0].mean(dim=0)[:, :width])  # (H, W - crop) gray
        heard.append(
            [
                to_unit(view.view_pixels(canvas[k : k + 1]))[0].mean(dim=0)[:, :width]
                for view in build_views(config.audio_view_specs())
            ]
        )
    # HiFi-GAN: the sounds of every candidate and audio view in one call per length (crop_right may differ).
    by_length: dict[int, list[tuple[int, int]]] = {}
    for k, config in enumerate(configs):
        if config.vocoder == "hifigan":
            for a, spectrogram in enumerate(heard[k]):
                by_length.setdefault(spectrogram.shape[-1], []).append((k, a))
    for members in by_length.values():
        log_mels = torch.cat([_log_mel(heard[k][a], models) for k, a in members])  # (G, n_mels, W)
        waves = vocode(_vocoder(models), log_mels, to_host=False)  # (G, W * hop)
        for (k, a), wave in zip(members, waves, strict=True):
            heard[k][a] = wave
    # One copy to the host of what the files need; Griffin-Lim's spectrograms go too (it runs on the host).
    parts = [t for k in range(len(configs)) for t in (*pictures[k], spectrograms[k], *heard[k])]
    host = iter(to_host(parts))
    decoded = []
    for k, config in enumerate(configs):
        host_pictures = [next(host) for _ in pictures[k]]
        spectrogram = next(host)
        sounds = [next(host) for _ in heard[k]]
        if config.vocoder == "griffin_lim":  # seeded per candidate, on the CPU: as it always ran
            sounds = [griffin_lim(_log_mel(s, models), MEL, seed=config.seed)[0] for s in sounds]
        kept = pictures[k] if keep_on_device and pixels.device.type != "cpu" else None
        decoded.append(Decoded(host_pictures, spectrogram, [s.float().numpy() for s in sounds], kept))
    return decoded


def _to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` or ``(H, W)`` in [0, 1] -> 8-bit PIL image (rounded: same input, same bytes)."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if array.ndim == 3:
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    return Image.fromarray(array, mode="L")


def write_clip(
    folder: Path, config: RenderConfig, pictures: Sequence[torch.Tensor], sound: np.ndarray | None = None
) -> Path:
    """``transition.mp4`` of a candidate from its view pictures ``(3, H, W)`` in [0, 1] and its first sound
    ``(N,)`` (in memory, or read back from its files: a clip can be made again from the files alone).
    Written whole or not at all."""
    path = folder / CLIP_FILE
    partial = folder / f".{CLIP_FILE}.partial.mp4"
    if sound is None and (folder / "audio0.wav").is_file():
        sound = read_wav(folder / "audio0.wav")[0]
    seconds = 0.0 if sound is None else len(sound) / MEL.sample_rate
    try:
        frames = transition_frames(build_views(config.view_specs()), pictures, seconds=seconds)
        write_mp4(partial, frames, sound=sound, sample_rate=MEL.sample_rate)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_pictures(folder: Path, count: int) -> list[torch.Tensor]:
    """The view pictures ``view{i}.png`` of a render folder as ``(3, H, W)`` in [0, 1]."""
    pictures = []
    for index in range(count):
        with Image.open(folder / f"view{index}.png") as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        pictures.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return pictures


def write_render_folder(
    folder: Path, config: RenderConfig, decoded: Decoded, metadata: dict[str, Any]
) -> dict[str, Path]:
    """Write every file of one candidate; returns name -> path.

    The files are written into a hidden ``.<name>.*.partial`` folder beside ``folder`` and then moved in,
    ``config.yaml`` and ``render.json`` last: a folder with a ``config.yaml`` is always complete, and a write
    that fails (a full disk) leaves nothing half-written. A finished render is never written over.
    """
    if (folder / "config.yaml").exists():
        raise FileExistsError(
            errno.EEXIST, "holds a finished render, which is never written over", str(folder)
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".partial"))
    try:
        written = _write_files(partial, config, decoded, metadata)
        folder.mkdir(exist_ok=True)
        files = {}
        for name, path in written.items():  # in order of writing: config and render.json come last
            files[name] = folder / path.name
            os.replace(path, files[name])
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return files


def _write_files(
    folder: Path, config: RenderConfig, decoded: Decoded, metadata: dict[str, Any]
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for index, picture in enumerate(decoded.pictures):
        files[f"view{index}"] = folder / f"view{index}.png"
        _to_pil(picture).save(files[f"view{index}"], compress_level=PNG_COMPRESS_LEVEL)
    files["spectrogram"] = folder / "spectrogram.png"
    _to_pil(decoded.spectrogram).save(files["spectrogram"], compress_level=PNG_COMPRESS_LEVEL)
    for index, wave in enumerate(decoded.waves):
        files[f"audio{index}"] = folder / f"audio{index}.wav"
        write_wav(files[f"audio{index}"], wave, MEL.sample_rate)
    files["config"] = folder / "config.yaml"
    files["config"].write_text(config.to_yaml(), encoding="utf-8")
    files["render"] = folder / "render.json"
    summary = {
        **metadata,
        "sample_rate": MEL.sample_rate,
        "num_samples": [len(wave) for wave in decoded.waves],
        "duration_s": [round(len(wave) / MEL.sample_rate, 4) for wave in decoded.waves],
        "files": sorted(path.name for path in files.values()),
    }
    files["render"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return files


def render(
    configs: Sequence[RenderConfig],
    models: ModelBundle,
    folders: Sequence[Path],
    *,
    callback: StepCallback | None = None,
    progress: bool = True,
    max_unet_batch: int | None = None,
) -> RenderBatch:
    """Sample a batch of candidates in one batched run, then decode and write each to its folder.

    A candidate that fails (non-finite latents, a decoding error) gets ``failure`` set and no files; the
    others are still written. Candidates stopped by the callback are not decoded.
    """
    if len(configs) != len(folders):
        raise ValueError(f"give one folder per config: {len(configs)} configs, {len(folders)} folders")
    output: SamplerOutput = JointSampler(models, max_unet_batch=max_unet_batch)(
        configs, callback=callback, progress=progress
    )
    results = decode_and_write(output, configs, models, folders, with_clip=True)
    return RenderBatch(results, output.unet_calls, output.unet_samples)


def decode_and_write(
    output: SamplerOutput,
    configs: Sequence[RenderConfig],
    models: ModelBundle,
    folders: Sequence[Path],
    *,
    with_clip: bool,
    keep_on_device: bool = False,
) -> list[RenderResult]:
    """The sampler's latents -> decoded candidates written to their folders (one result per config).

    Candidates are decoded ``DECODE_BATCH`` at a time (the device's work) while the ones already decoded are
    written by a few threads (PNG and H.264 encoding release the GIL): a batch's files take a fraction of the
    time they take in series, and the search's judge is done sooner. ``with_clip=False`` leaves the clip out:
    the search makes it later, for complete trials only, off the sampler's path. ``keep_on_device``: each
    result's ``decoded`` keeps its pictures on the device too, for the judges.
    """
    results = [
        RenderResult(Path(folder), config, stopped=output.stopped[index], failure=output.failures.get(index))
        for index, (config, folder) in enumerate(zip(configs, folders, strict=True))
    ]
    todo = [index for index, result in enumerate(results) if result.failure is None and not result.stopped]
    with ThreadPoolExecutor(
        WRITER_THREADS, thread_name_prefix="render-writer", initializer=lower_this_thread_priority
    ) as writers:
        writing: list[tuple[RenderResult, Future[None]]] = []
        for start in range(0, len(todo), DECODE_BATCH):
            chunk = todo[start : start + DECODE_BATCH]
            decoded_chunk = decode_or_say_why(
                output.latents[chunk], [configs[index] for index in chunk], models, keep_on_device
            )
            for index, decoded in zip(chunk, decoded_chunk, strict=True):
                result = results[index]
                if isinstance(decoded, str):
                    result.failure = decoded
                    continue
                metadata = {
                    "seed": result.config.seed,
                    "device": str(models.device),
                    "dtype": str(models.dtype).removeprefix("torch."),
                    "steps_done": output.steps_done[index],
                    "torch": torch.__version__,
                }
                writing.append((result, writers.submit(_write_result, result, decoded, metadata, with_clip)))
        for result, job in writing:
            try:
                job.result()
            except (RuntimeError, ValueError) as error:
                result.failure = f"decoding failed: {error}"
            except OSError as error:
                result.failure = f"writing {result.folder} failed: {error}"
                result.write_error = error
    for index, result in enumerate(results):
        if result.failure:
            logger.warning("candidate %d (seed %d) failed: %s", index, result.config.seed, result.failure)
    return results


def decode_or_say_why(
    latents: torch.Tensor, configs: Sequence[RenderConfig], models: ModelBundle, keep_on_device: bool = False
) -> list[Decoded | str]:
    """``(k, 4, h, w)`` latents decoded in one chunk, each checked finite; a failed one is the reason,
    ``"decoding failed: ..."``. A chunk that fails (out of memory, a decoder's error) is decoded again one
    candidate at a time: only a candidate that fails alone fails."""
    failed: str | None = None
    try:
        decoded = decode_candidates(
            latents, configs, models, vae_batch=len(configs), keep_on_device=keep_on_device
        )
    except (RuntimeError, ValueError) as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
        failed = f"decoding failed: {error}"
    if failed is not None:
        if len(configs) == 1:
            return [failed]
        # Outside the except block: the failed chunk's tensors, held by its traceback, are free now.
        torch.cuda.empty_cache()
        logger.warning("%d candidates at once: %s; decoding them one by one", len(configs), failed)
        return [
            reason
            for k in range(len(configs))
            for reason in decode_or_say_why(latents[k : k + 1], configs[k : k + 1], models, keep_on_device)
        ]
    reasons = [d.non_finite() for d in decoded]
    return [
        d if r is None else f"decoding failed: the decoded {r} are not finite"
        for d, r in zip(decoded, reasons, strict=True)
    ]


def _write_result(result: RenderResult, decoded: Decoded, metadata: dict[str, Any], with_clip: bool) -> None:
    """One decoded candidate's folder, then its clip; ``result`` gets its files and pictures once the folder
    is written."""
    result.files = write_render_folder(result.folder, result.config, decoded, metadata)
    result.decoded = decoded
    if with_clip:
        result.files["transition"] = write_clip(
            result.folder, result.config, decoded.pictures, decoded.waves[0] if decoded.waves else None
        )
