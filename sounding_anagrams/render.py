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
from sounding_anagrams.sampler.vocoder import vocode

logger = logging.getLogger(__name__)

MEL = MelConfig()
# Threads that write render folders while the next candidate decodes (encoders release the GIL).
WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))
# zlib level 1: a third less encoding time than the default 6 for files about 7% larger (a search writes
# three PNGs for every candidate, most of which nobody opens; docs/PERFORMANCE.md).
PNG_COMPRESS_LEVEL = 1
BACKGROUND_NICENESS = 10  # of threads that only encode files: the sampler and the previews come first


def lower_this_thread_priority() -> None:
    """Let the kernel run this thread after the ones that feed the device (Linux schedules each thread by
    its own niceness). Bulk encoding (PNG, H.264) waits a little; the sampler and the previews do not."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):  # not allowed: the thread keeps its priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)


@dataclass
class Decoded:
    """One candidate decoded: pictures in [0, 1] ``(3, H, W)`` per view, the heard canvas, and its sounds."""

    pictures: list[torch.Tensor]
    spectrogram: torch.Tensor  # (H, W - crop_right) in [0, 1]
    waves: list[np.ndarray]  # one per audio prompt, float32 in [-1, 1]

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
    """``(B, 4, h, w)`` latents -> ``(B, 3, 8h, 8w)`` pixels in [-1, 1] with that model's own VAE."""
    vae = model.vae
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.float().clamp(-1, 1).cpu()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels + 1) / 2).clamp(0, 1)


def spectrogram_to_wave(spectrogram: torch.Tensor, config: RenderConfig, models: ModelBundle) -> np.ndarray:
    """``(H, W)`` canvas in [0, 1] -> waveform ``(W * hop,)``, by the HiFi-GAN vocoder or Griffin-Lim."""
    log_mel = image_to_log_mel(spectrogram[None], MEL)  # (1, H, W), row 0 of the image = highest bin
    n_mels = models.vocoder.config.num_mels if models.vocoder is not None else MEL.n_mels
    if log_mel.shape[1] != n_mels:
        # A non-256-pixel-high canvas: resample its rows to the vocoder's mel bins.
        logger.warning("canvas height %d resampled to %d mel bins for the sound", log_mel.shape[1], n_mels)
        log_mel = F.interpolate(log_mel[:, None], size=(n_mels, log_mel.shape[-1]), mode="bilinear")[:, 0]
    if config.vocoder == "griffin_lim":
        wave = griffin_lim(log_mel, MEL, seed=config.seed)
    else:
        if models.vocoder is None:
            raise ValueError("vocoder='hifigan' needs models loaded with_vocoder=True")
        wave = vocode(models.vocoder, log_mel.to(next(models.vocoder.parameters()).device))
    return wave[0].float().cpu().numpy()


@torch.no_grad()
def decode_candidate(latent: torch.Tensor, config: RenderConfig, models: ModelBundle) -> Decoded:
    """Decode one ``(4, h, w)`` latent into pictures per view, the heard canvas and its sounds."""
    return decode_candidates(latent[None], [config], models)[0]


@torch.no_grad()
def decode_candidates(
    latents: torch.Tensor, configs: Sequence[RenderConfig], models: ModelBundle, *, vae_batch: int = 1
) -> list[Decoded]:
    """Decode ``(N, 4, h, w)`` latents, ``vae_batch`` of them per VAE call (batched calls are faster on a GPU
    but not bit-identical to single ones: the files of a render are decoded one by one, previews batched)."""
    if vae_batch < 1:
        raise ValueError(f"vae_batch must be at least 1, but got {vae_batch=}.")
    chunks = [latents[i : i + vae_batch] for i in range(0, latents.shape[0], vae_batch)]
    image = torch.cat([decode_latents(models.image, chunk) for chunk in chunks])  # (N, 3, H, W) in [-1, 1]
    # Auffusion's VAE: the spectrogram that becomes sound.
    audio = torch.cat([decode_latents(models.audio, chunk) for chunk in chunks])
    return [_decoded(image[k : k + 1], audio[k : k + 1], config, models) for k, config in enumerate(configs)]


def _decoded(
    pixels: torch.Tensor, canvas: torch.Tensor, config: RenderConfig, models: ModelBundle
) -> Decoded:
    """One candidate's decoded ``(1, 3, H, W)`` picture and canvas -> its pictures per view and sounds."""
    pictures = [to_unit(view.view_pixels(pixels))[0] for view in config.parsed_views()]
    # The dark strip sits at the right of the frame the audio model denoised, so crop after the view.
    width = config.width - config.crop_right
    spectrogram = to_unit(canvas)[0].mean(dim=0)[:, :width]  # (H, W - crop) grayscale
    waves = [
        spectrogram_to_wave(to_unit(view.view_pixels(canvas))[0].mean(dim=0)[:, :width], config, models)
        for view in config.parsed_audio_views()
    ]
    return Decoded(pictures, spectrogram, waves)


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
        frames = transition_frames(config.parsed_views(), pictures, seconds=seconds)
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
) -> list[RenderResult]:
    """The sampler's latents -> decoded candidates written to their folders (one result per config).

    Candidates are decoded one after the other (the device's work) while the ones already decoded are written
    by a few threads (PNG and H.264 encoding release the GIL): a batch's files take a fraction of the time
    they take in series, and the search's judge is done sooner. ``with_clip=False`` leaves the clip out: the
    search makes it later, for complete trials only, off the sampler's path.
    """
    results = [
        RenderResult(Path(folder), config, stopped=output.stopped[index], failure=output.failures.get(index))
        for index, (config, folder) in enumerate(zip(configs, folders, strict=True))
    ]
    with ThreadPoolExecutor(
        WRITER_THREADS, thread_name_prefix="render-writer", initializer=lower_this_thread_priority
    ) as writers:
        writing: list[tuple[RenderResult, Future[None]]] = []
        for index, result in enumerate(results):
            if result.failure is not None or result.stopped:
                continue
            try:
                decoded = decode_candidate(output.latents[index], result.config, models)
                broken = decoded.non_finite()
                if broken is not None:
                    raise ValueError(f"the decoded {broken} are not finite")
            except (RuntimeError, ValueError) as error:
                result.failure = f"decoding failed: {error}"
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


def _write_result(result: RenderResult, decoded: Decoded, metadata: dict[str, Any], with_clip: bool) -> None:
    """One decoded candidate's folder, then its clip; ``result`` gets its files and pictures once the folder
    is written."""
    result.files = write_render_folder(result.folder, result.config, decoded, metadata)
    result.decoded = decoded
    if with_clip:
        result.files["transition"] = write_clip(
            result.folder, result.config, decoded.pictures, decoded.waves[0] if decoded.waves else None
        )
