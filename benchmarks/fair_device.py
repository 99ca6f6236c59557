"""The fair device model (SIMULATION, benchmark only): a search's model forwards charged as an H100 and its
host would pay them, the rest of the search real.

What each stand-in charges (costs from :mod:`benchmarks.device_costs`, measured on real-size models):

- the **host**: the eager forward's launch cost, as busy CPU on the calling thread: the module's Python
  share holding the GIL, the operators' C++ share with it released, as PyTorch does;
- the **device**: the forward's kernel time, per kernel the larger of FLOPs / FLOP/s and bytes / bandwidth,
  on one timeline for all threads. The device cannot finish a forward before the host has launched its last
  kernel: a launch-bound forward leaves the device idle, and that idle time is not counted as busy.

Where the host waits is where the real code waits: the sampler's one-step-late flags (``HostReadback``), the
one copy of a decoded chunk to the host (``render.to_host``), the judges' embeddings coming back. The
background threads' work goes to a high-priority side stream that starts no earlier than its ``after=``
event (where the sampler's stream stood when the preview's x0 was made).

The outputs depend on the inputs, so the search sees a real, varying objective and its pruner prunes: the
UNet stand-in's noise prediction mixes the latent with a fixed pattern per model scaled by the prompt's
embedding (so guidance scales, view weights, audio weight and start step all move the result); the VAE
stand-in draws the latent's first channels up to pixels; the vocoder stand-in makes a sound from the
canvas's mel bands. The judges are the real CLIP and CLAP scorers (the windowed protocol's 25 windows a
picture, CLAP's resampling to 48 kHz and its feature extractor, both on this CPU) with only their networks
swapped for stand-ins charging the real-size towers.

Left out, and said so in docs/PERFORMANCE.md: the non-model tensor work (views, scheduler steps, colour
conversions, the windows' crops) runs on this CPU at full size, where a GPU would run it as a few kernels
(this errs against the pipeline too); text encoders and prompt embeddings are the tiny models' (embedded once
per search, cached); no kernel runs in under its launch latency on the device (a floor is not modelled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

from benchmarks.device_costs import BANDWIDTH, Costs, ModuleCost
from sounding_anagrams import render as render_module
from sounding_anagrams.evaluation.evaluate import Scorers
from sounding_anagrams.sampler.models import ModelBundle, load_models
from sounding_anagrams.sampler.transfer import HostReadback
from sounding_anagrams.search import judging as judging_module
from sounding_anagrams.search import sampling as sampling_module
from sounding_anagrams.search.loop import SearchRunner
from sounding_anagrams.search.opening import SearchSettings
from sounding_anagrams.search.study import StudyConfig


def spin(seconds: float) -> None:
    """Busy CPU for ``seconds`` holding the GIL (not a sleep: a launch keeps its core busy)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


_SCRATCH = np.ones((3, 8192))


def spin_released(seconds: float) -> None:
    """Busy CPU for ``seconds`` with the GIL released (numpy's ufuncs release it: a few microseconds each)."""
    a, b, out = _SCRATCH
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        np.multiply(a, b, out=out)


class FairDevice:
    """One GPU's timeline. Forwards from any thread queue behind those already queued, as on one CUDA stream;
    a thread inside :meth:`side_stream` queues on a high-priority stream that runs at the next kernel
    boundary and pushes the queued normal work back by as much."""

    def __init__(self, costs: Costs, flops: float) -> None:
        self.costs = costs
        self.flops = flops
        self.lock = threading.Lock()
        self.free_at = 0.0  # perf_counter time when the normal stream's queued work is done
        self.priority_free_at = 0.0
        self.busy = 0.0  # device seconds of kernel work
        self.first = math.inf
        self.side = threading.local()  # .on, .after: this thread is on its side stream, after that time

    def forward(self, cost: ModuleCost, rows: int, *, host_reads_now: bool) -> None:
        """One eager forward of ``rows`` batch rows: the host launches it, the device runs it."""
        self.launch(
            cost.host_gil_seconds,
            cost.host_released_seconds,
            cost.device_seconds(rows, self.flops),
            host_reads_now=host_reads_now,
        )

    def launch(
        self, gil_seconds: float, released_seconds: float, device_seconds: float, *, host_reads_now: bool
    ) -> None:
        """The host spends ``gil_seconds`` + ``released_seconds`` launching ``device_seconds`` of kernels."""
        began = time.perf_counter()
        spin(gil_seconds)
        spin_released(released_seconds)
        with self.lock:
            launched = time.perf_counter()
            if getattr(self.side, "on", False):
                start = max(began, self.priority_free_at, getattr(self.side, "after", 0.0))
                done = self.priority_free_at = max(start + device_seconds, launched)
                self.free_at = max(self.free_at + device_seconds, done)
            else:
                start = max(began, self.free_at)
                done = self.free_at = max(start + device_seconds, launched)
            self.first = min(self.first, start)
            self.busy += device_seconds
        if host_reads_now:
            self.wait_until(done)

    def mark(self) -> float:
        """When the work queued so far on this thread's stream is done (a CUDA event recorded now)."""
        with self.lock:
            return self.priority_free_at if getattr(self.side, "on", False) else self.free_at

    def wait_for_queue(self) -> None:
        """A blocking copy to the host: until this thread's stream is done."""
        self.wait_until(self.mark())

    @staticmethod
    def wait_until(done: float) -> None:
        while (wait := done - time.perf_counter()) > 0:
            time.sleep(wait)

    @contextlib.contextmanager
    def side_stream(self, device: Any, after: float | None = None) -> Iterator[None]:
        """Stands in for :func:`sounding_anagrams.sampler.transfer.side_stream`; ``after`` is a time from
        :meth:`ready_event`."""
        self.side.on, self.side.after = True, after or 0.0
        try:
            yield
        finally:
            self.side.on, self.side.after = False, 0.0

    def ready_event(self, device: Any) -> float:
        """Stands in for :func:`sounding_anagrams.sampler.transfer.ready_event`."""
        return self.mark()


def smooth_field(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth random field ``shape`` (C, H, W), values about in [-1, 1]."""
    coarse = torch.randn(1, shape[0], shape[1] // 8, shape[2] // 8, generator=generator)
    return F.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)[0]


def install(models: ModelBundle, scorers: Scorers, device: FairDevice, audio_prompts: Sequence[str]) -> None:
    """Swap every model forward of ``models`` and the judges' networks for the fair stand-ins, and the
    sampler's and the background threads' stream handling for the timeline's."""
    generator = torch.Generator().manual_seed(0)
    for model in (models.image, models.audio):
        pattern = smooth_field(generator, (4, 32, 128))

        def unet_forward(
            sample: torch.Tensor,
            timestep: Any,
            encoder_hidden_states: torch.Tensor,
            *_: Any,
            pattern: torch.Tensor = pattern,  # this model's own (bound now, not the loop's last)
            **__: Any,
        ) -> SimpleNamespace:
            device.forward(device.costs.unet, sample.shape[0], host_reads_now=False)
            # Differs between a prompt and the empty prompt, so guidance scales matter.
            strength = encoder_hidden_states.float()[:, :4].mean(dim=(1, 2)).view(-1, 1, 1, 1)
            field = F.interpolate(pattern[None], size=sample.shape[-2:], mode="bilinear")
            return SimpleNamespace(sample=(0.9 * sample + field * (0.5 + strength)).to(sample.dtype))

        def vae_decode(latents: torch.Tensor, *_: Any, **__: Any) -> SimpleNamespace:
            device.forward(device.costs.vae_decode, latents.shape[0], host_reads_now=False)
            pixels = F.interpolate(latents[:, :3].float(), scale_factor=8, mode="bilinear")
            return SimpleNamespace(sample=torch.tanh(pixels).to(latents.dtype))

        model.unet.forward = unet_forward  # type: ignore[method-assign]
        model.vae.decode = vae_decode  # type: ignore[method-assign]

    def vocode(generator: Any, log_mel: torch.Tensor, *, to_host: bool = True) -> torch.Tensor:
        device.forward(device.costs.vocoder, log_mel.shape[0], host_reads_now=False)
        wave = sound_of(log_mel)
        if to_host:
            device.wait_for_queue()
        return wave

    def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device.wait_for_queue()  # the real one's .cpu() waits for the chunk's decodes
        return [t.float() for t in tensors]

    render_module.vocode = vocode  # type: ignore[assignment]
    render_module.to_host = to_host  # type: ignore[assignment]

    class FairReadback(HostReadback):
        """The copy is done when the device's queue, as it stood at the copy, is done."""

        def mark(self) -> None:
            self.done_at = device.mark()

        def wait(self) -> None:
            device.wait_until(self.done_at)

    from sounding_anagrams.sampler import pipeline as pipeline_module

    pipeline_module.HostReadback = FairReadback  # type: ignore[misc]
    sampling_module.side_stream = device.side_stream  # type: ignore[assignment]
    sampling_module.ready_event = device.ready_event  # type: ignore[assignment]
    judging_module.side_stream = device.side_stream  # type: ignore[assignment]
    stub_judges(scorers, device, generator, audio_prompts)


def sound_of(log_mel: torch.Tensor, bands: int = 8, hop: int = 160, rate: int = 16_000) -> torch.Tensor:
    """``(B, n_mels, T)`` natural-log mel -> ``(B, T * hop)``: a tone per band of mel rows, its loudness the
    band's energy frame by frame (row 0 is the lowest bin). Cheap, and it sounds like its canvas."""
    energy = log_mel.float().exp().unflatten(1, (bands, -1)).mean(dim=2)  # (B, bands, T)
    envelope = F.interpolate(energy, scale_factor=hop, mode="linear", align_corners=False)
    seconds = torch.arange(envelope.shape[-1]) / rate
    pitches = torch.linspace(200.0, 6000.0, bands)
    tones = torch.sin(2 * math.pi * pitches[:, None] * seconds[None])  # (bands, T * hop)
    wave = (envelope * tones).sum(dim=1)
    return wave / wave.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)


def stub_judges(
    scorers: Scorers, device: FairDevice, generator: torch.Generator, audio_prompts: Sequence[str]
) -> None:
    """The real scorers' preprocessing at real sizes, their networks swapped for charged stand-ins."""
    clip, clap = scorers.clip, scorers.clap
    clip_width = clip.embed_texts(["a"]).shape[1]
    clip_projection = torch.randn(3 * 4 * 4, clip_width, generator=generator)
    clip.image_size = (224, 224)  # ViT-L/14's input: the windows are resized to it, as for the real model
    gil_per_kernel = device.costs.clip_image.host_gil_seconds / device.costs.clip_image.kernels
    released_per_kernel = device.costs.clip_image.host_released_seconds / device.costs.clip_image.kernels

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """Resize, clamp, normalise: four kernels on the device; here a 4x4 summary is all the stand-in
        needs."""
        moved = images.numel() * images.element_size() + 4 * images.shape[0] * 3 * 224 * 224 * 2
        device.launch(4 * gil_per_kernel, 4 * released_per_kernel, moved / BANDWIDTH, host_reads_now=False)
        return F.adaptive_avg_pool2d(images.float(), (4, 4))

    def encode_image(summary: torch.Tensor) -> torch.Tensor:
        device.forward(device.costs.clip_image, summary.shape[0], host_reads_now=True)
        return summary.flatten(1) @ clip_projection

    clip.preprocess = preprocess  # type: ignore[method-assign]
    clip.model.encode_image = encode_image

    clap_width = clap.embed_texts(["a"]).shape[1]
    clap_projection = torch.randn(64, clap_width, generator=generator) * 0.3
    # Leaning towards every prompt's embedding, so that CLAP's max(cos, 0) is mostly above 0 and varies.
    lean = clap.embed_texts(audio_prompts).mean(dim=0)

    def get_audio_features(input_features: torch.Tensor, is_longer: Any = None) -> torch.Tensor:
        device.forward(device.costs.clap_audio, input_features.shape[0], host_reads_now=True)
        mel = input_features[:, 0].float().mean(dim=1)  # (B, 64): the clip's mean spectrum
        return (mel - mel.mean(dim=1, keepdim=True)) @ clap_projection + lean

    clap.model.get_audio_features = get_audio_features


@dataclasses.dataclass
class Run:
    """One search on the fair device."""

    busy: float  # device seconds of kernel work
    wall: float  # the whole of SearchRunner.run
    start: float  # before the first forward (stores, MLflow, the first ask)
    drain: float  # after the last forward (the last batch's files, MLflow runs, study pictures)
    pruned: int
    trials: int

    @property
    def fraction(self) -> float:
        return self.busy / self.wall

    @property
    def between(self) -> float:
        """Busy from the first forward to the last."""
        return self.busy / (self.wall - self.start - self.drain)


def fair_search(study: StudyConfig, costs: Costs, flops: float, trials: int) -> Run:
    """One search of ``trials`` trials of ``study`` (its render settings as they are, models "tiny") on the
    fair device at ``flops`` FLOP/s."""
    device = FairDevice(costs, flops)
    models = load_models("tiny", "tiny", device="cpu", dtype="float32")
    scorers = Scorers.load(models="tiny", device="cpu")
    install(models, scorers, device, study.render.audio_prompts)
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as runs:
        runner = SearchRunner.open(
            study,
            models,
            scorers,
            # The trials' pipeline alone (the confirmation stage after it is plain batched rendering).
            SearchSettings(runs_dir=Path(runs), trials=trials, progress=False, confirm=False),
        )
        device.busy, device.first = 0.0, math.inf
        started = time.perf_counter()
        runner.run()
        ended = time.perf_counter()
        pruned = len(runner.optuna_study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    return Run(
        device.busy,
        ended - started,
        device.first - started,
        max(0.0, ended - device.free_at),
        pruned,
        trials,
    )
