"""Does the device wait for the host? Per-stage times of a candidate, bytes per candidate, and the fraction of
a 16-trial search's wall time a simulated GPU is busy, with the pipeline's overlap on and off.

Part 1 (stages): the tiny models on this machine's CPU, each stage of one candidate timed by itself.

Part 2 (SIMULATED DEVICE): every model forward is replaced by a stand-in that takes the time an H100 would,
computed from its work at an assumed 400 TFLOP/s dense fp16 (an H100 SXM runs near that on these
convolutions): a UNet sample-forward of SD 1.5 / Auffusion at 256x1024 is 0.803 TFLOP (2.0 ms), a VAE decode
of a 256x1024 canvas 1.24 TFLOP (3.1 ms), the vocoder and the CLIP/CLAP judges about 1 ms a candidate. The
forwards of all threads go on one device timeline, as on one GPU (see :class:`SimulatedDevice` for the two
models of launching: the issue's "sleep until done" and CUDA's asynchronous launches with a high-priority side
stream for the background threads). The stand-ins' outputs are made cheaply on the host (zeros; pictures
drawn once), so "busy" is only the modelled time. Everything else (the sampler's own arithmetic, views,
files, clip encoding, Optuna, MLflow, the designed judges' arithmetic) is real and runs on this machine. The
busy fraction is the device time over the wall time of ``SearchRunner.run``, from its first line to its
study pictures.

Part 3 (MEASURED, only where CUDA is present): the same 16-trial search for real on the GPU, with models of
the real sizes and random weights (no weights can be downloaded here; speed does not depend on their values):
two SD 1.5-size UNets and CLIP ViT-L-size text encoders (``bench_sampler.real_size_models``), an SD-size VAE
and a HiFi-GAN of Auffusion's vocoder layout, fp16; the judges are the tiny CLIP and CLAP on the GPU. Every
model forward is bracketed by CUDA events on the stream it runs on; the busy time is the union of those
intervals (an upper bound of kernel time: launch gaps inside one forward count as busy), over the wall time
of ``SearchRunner.run``.

Usage: ``python benchmarks/bench_pipeline.py [--trials 16] [--steps 50] [--skip-stages] [--skip-simulation]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import optuna  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from sounding_anagrams import render as render_module  # noqa: E402
from sounding_anagrams.animation import transition_frames, write_mp4  # noqa: E402
from sounding_anagrams.config import RenderConfig  # noqa: E402
from sounding_anagrams.evaluation.evaluate import Candidate, Scorers  # noqa: E402
from sounding_anagrams.files import folder_bytes  # noqa: E402
from sounding_anagrams.sampler import pipeline as pipeline_module  # noqa: E402
from sounding_anagrams.sampler.models import ModelBundle, load_models  # noqa: E402
from sounding_anagrams.sampler.pipeline import JointSampler  # noqa: E402
from sounding_anagrams.sampler.transfer import HostReadback  # noqa: E402
from sounding_anagrams.sampler.views import build_views  # noqa: E402
from sounding_anagrams.search import judging as judging_module  # noqa: E402
from sounding_anagrams.search import sampling as sampling_module  # noqa: E402
from sounding_anagrams.search.loop import SearchRunner  # noqa: E402
from sounding_anagrams.search.opening import SearchSettings  # noqa: E402
from sounding_anagrams.search.study import load_study  # noqa: E402
from sounding_anagrams.search.tracking import Tracker  # noqa: E402
from tests.designed_judges import designed_judges  # noqa: E402

H100_FLOPS = 400e12  # assumed dense fp16 throughput, FLOP/s
UNET_FLOP = 0.803e12  # one UNet sample-forward at 256x1024 (SD 1.5 and Auffusion share the architecture)
VAE_FLOP = 1.24e12  # one VAE decode of a 256x1024 canvas
JUDGE_SECONDS = 1e-3  # vocoder + CLIP + CLAP of one candidate


# -- part 1: per-stage times ---------------------------------------------------------------------------


def stage_table(models: ModelBundle, steps: int) -> None:
    scorers = Scorers.load(models="tiny", device="cpu")
    base = RenderConfig(
        image_model="tiny",
        audio_model="tiny",
        num_inference_steps=steps,
        views=["identity", "tile_rotate_cw"],
        image_prompts=["a painting of a garden", "a painting of a helicopter"],
        audio_prompts=["bird chirping"],
    )
    configs = [base.replace(seed=seed) for seed in range(4)]
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def clock(name: str, share: int = 1) -> Iterator[None]:
        started = time.perf_counter()
        yield
        times.setdefault(name, []).append((time.perf_counter() - started) / share)

    with clock(f"sampler ({steps} steps, in a batch of 4)", share=4):
        output = JointSampler(models)(configs, progress=False)
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    tracker = Tracker(root, "bench")
    tracker.start_parent("bench", {}, {})
    study = optuna.create_study(storage=f"sqlite:///{root / 'optuna.db'}", direction="maximize")
    clip_bytes: dict[str, list[int]] = {"MP4": [], "GIF": []}
    for index, config in enumerate(configs):
        with clock("decode (2 VAEs, vocoder)"):
            decoded = render_module.decode_candidate(output.latents[index], config, models)
        with clock("score (CLIP, CLAP)"):
            record = scorers.score(
                [Candidate(decoded.pictures, decoded.waves, config.image_prompts, config.audio_prompts)]
            )
        folder = root / "renders" / f"trial-{index:04d}" / "seed-0"
        with clock("files (PNG, WAV, config)"):
            render_module.write_render_folder(folder, config, decoded, {})
        with clock("clip frames (512x128)"):
            frames = transition_frames(build_views(config.view_specs()), decoded.pictures)
        with clock("clip encode (H.264 MP4)"):
            write_mp4(folder / "transition.mp4", frames)
        images = [Image.fromarray(frame, mode="L") for frame in frames]
        gif = folder.parent / "transition.gif"
        with clock("the same frames as a GIF (for comparison)"):
            images[0].save(gif, save_all=True, append_images=images[1:], duration=83, loop=0)
        clip_bytes["GIF"].append(gif.stat().st_size)
        clip_bytes["MP4"].append((folder / "transition.mp4").stat().st_size)
        gif.unlink()
        trial = study.ask()
        trial.suggest_float("audio_weight", 0, 1)
        with clock("Optuna tell (sqlite)"):
            study.tell(trial, 0.5)
        with clock("MLflow log_trial (card, linked artifacts)"):
            tracker.log_trial(
                trial_number=index,
                state="COMPLETE",
                study="bench",
                config=config.to_dict(),
                scores=record[0],
                objectives={"objective": 0.5},
                folder=folder.parent,
                seeds=[config.seed],
                seed_scores=record,
                seed_objectives=[{"objective": 0.5}],
                best_seed=0,
            )
    print("| stage, per candidate (tiny models, CPU) | seconds (median of 4) |")
    print("|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} |")
    renders, mlflow = folder_bytes(root / "renders") / 4, folder_bytes(root / "mlartifacts") / 4
    card = (root / "renders" / "trial-0000" / "card.html").stat().st_size
    print(
        f"\nbytes per candidate: render folder {renders / 1e6:.2f} MB (card.html {card / 1e3:.1f} kB), "
        f"MLflow artifact store {mlflow / 1e6:.2f} MB (a link), total {(renders + mlflow) / 1e6:.2f} MB; "
        f"clip: MP4 {statistics.median(clip_bytes['MP4']) / 1e3:.0f} kB vs GIF "
        f"{statistics.median(clip_bytes['GIF']) / 1e3:.0f} kB of the same frames"
    )


# -- part 2: the simulated device ----------------------------------------------------------------------


class SimulatedDevice:
    """One GPU's timeline (SIMULATION): a forward of ``seconds`` from any thread queues behind those already
    queued, as on one CUDA stream. Only the queued time counts as busy.

    ``asynchronous=False`` is the issue's model: every forward's thread sleeps until its forward is done (a
    sleep frees the CPU, as a kernel does). ``asynchronous=True`` is how CUDA runs the sampler: a UNet
    launch returns at once and the host goes on preparing the next step; it waits only where the real code
    waits for the device, at a :class:`HostReadback` (the per-step flags, read one step late). Forwards whose
    outputs the host reads at once (VAE decodes, vocoder, judges: their pictures go to files and scores) wait
    in both; in the asynchronous model the background threads' forwards go to a high-priority side stream,
    as the real code's do (:func:`sounding_anagrams.sampler.transfer.side_stream`).
    """

    def __init__(self, *, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self.lock = threading.Lock()
        self.free_at = 0.0  # perf_counter time when the forwards queued so far are done
        self.priority_free_at = 0.0  # when the high-priority forwards queued so far are done
        self.busy = 0.0
        self.first = math.inf  # when the first forward started
        self.side = threading.local()  # .on: this thread's forwards go to its high-priority side stream

    def launch(self, seconds: float, *, host_reads_now: bool = True) -> None:
        """Queue a forward of ``seconds``. On a high-priority side stream (asynchronous model only) it starts
        at the next kernel boundary, taken as now, and pushes the queued normal work back by as much."""
        with self.lock:
            now = time.perf_counter()
            if self.asynchronous and getattr(self.side, "on", False):
                start = max(now, self.priority_free_at)
                done = self.priority_free_at = start + seconds
                self.free_at = max(self.free_at + seconds, done)
            else:
                start = max(now, self.free_at)
                done = self.free_at = start + seconds
            self.first = min(self.first, start)
            self.busy += seconds
        if host_reads_now or not self.asynchronous:
            self.wait_until(done)

    @contextlib.contextmanager
    def side_stream(self, device: Any, after: Any = None) -> Iterator[None]:
        """Stands in for :func:`sounding_anagrams.sampler.transfer.side_stream` (a no-op on the CPU)."""
        self.side.on = True
        try:
            yield
        finally:
            self.side.on = False

    def mark(self) -> float:
        """When the work queued so far is done (a CUDA event recorded now)."""
        with self.lock:
            return self.free_at

    @staticmethod
    def wait_until(done: float) -> None:
        while (wait := done - time.perf_counter()) > 0:
            time.sleep(wait)


def simulate(models: ModelBundle, device: SimulatedDevice) -> None:
    """Swap every model forward of ``models`` for a sleeping stand-in (SIMULATION: benchmark only).

    A stand-in's output is made cheaply on the host (zeros; pictures drawn once), so the busy time is only
    the modelled device time and the rest of the run's CPU work is the project's own.
    """
    pictures: dict[tuple[int, ...], list[torch.Tensor]] = {}
    calls = [0]

    def picture(shape: tuple[int, ...]) -> torch.Tensor:
        """A smooth random picture ``(1, 3, H, W)``: it compresses like a real one (noise is the PNG/H.264
        worst case); 16 are drawn once per size, then reused."""
        if shape not in pictures:
            coarse = torch.rand(16, 3, shape[-2] // 4, shape[-1] // 4)
            smooth = F.interpolate(coarse * 2 - 1, scale_factor=32, mode="bilinear", align_corners=False)
            pictures[shape] = list(smooth.split(1))
        calls[0] += 1
        return pictures[shape][calls[0] % 16]

    for model in (models.image, models.audio):

        def unet_forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: Any = None, **_: Any):
            device.launch(sample.shape[0] * UNET_FLOP / H100_FLOPS, host_reads_now=False)
            return SimpleNamespace(sample=torch.zeros_like(sample))

        def vae_decode(latents: torch.Tensor, *_: Any, **__: Any):
            device.launch(latents.shape[0] * VAE_FLOP / H100_FLOPS)
            pixels = torch.cat([picture(tuple(latents.shape[1:])) for _ in range(latents.shape[0])])
            return SimpleNamespace(sample=pixels.to(latents.dtype))

        model.unet.forward = unet_forward  # type: ignore[method-assign]
        model.vae.decode = vae_decode  # type: ignore[method-assign]

    def vocode(generator: Any, log_mel: torch.Tensor, **_: Any) -> torch.Tensor:
        device.launch(log_mel.shape[0] * JUDGE_SECONDS / 2)
        return torch.zeros(log_mel.shape[0], log_mel.shape[-1] * 160)

    render_module.vocode = vocode  # type: ignore[assignment]

    class SimulatedReadback(HostReadback):
        """The copy is done when the device's queue, as it stood at the copy, is done."""

        def mark(self) -> None:
            self.done_at = device.mark()

        def wait(self) -> None:
            device.wait_until(self.done_at)

    pipeline_module.HostReadback = SimulatedReadback  # type: ignore[misc]
    sampling_module.side_stream = device.side_stream  # type: ignore[assignment]
    judging_module.side_stream = device.side_stream  # type: ignore[assignment]


class SleepingJudges(Scorers):
    """The designed judges (their arithmetic runs on this CPU, as host work), charging the simulated device
    for CLIP and CLAP."""

    def __init__(self, device: SimulatedDevice) -> None:
        judges = designed_judges()
        super().__init__(judges.clip, judges.clap, protocol=judges.protocol)
        self.device = device

    def score(self, candidates: Any) -> Any:
        records = super().score(candidates)
        self.device.launch(len(candidates) * JUDGE_SECONDS / 2)
        return records


@dataclasses.dataclass
class Busy:
    """One search on the simulated device: its busy seconds, and where the wall time went."""

    busy: float  # device seconds
    wall: float  # the whole of SearchRunner.run
    start: float  # before the first forward (stores, MLflow, first ask)
    drain: float  # after the last forward (the last batch's files, clips, MLflow runs, study pictures)

    @property
    def whole(self) -> float:
        return self.busy / self.wall

    @property
    def between(self) -> float:
        return self.busy / (self.wall - self.start - self.drain)


def busy_fraction(trials: int, steps: int, *, overlap: bool, asynchronous: bool) -> Busy:
    """One search of ``trials`` trials on the simulated device."""
    device = SimulatedDevice(asynchronous=asynchronous)
    models = load_models("tiny", "tiny", device="cpu", dtype="float32")
    simulate(models, device)
    study = load_study(REPO / "studies" / "rotate.yaml")
    study = dataclasses.replace(
        study,
        render=study.render.replace(image_model="tiny", audio_model="tiny", num_inference_steps=steps),
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as runs:
        runner = SearchRunner.open(
            study,
            models,
            SleepingJudges(device),
            SearchSettings(runs_dir=Path(runs), trials=trials, progress=False, overlap=overlap),
        )
        device.busy, device.first = 0.0, math.inf
        started = time.perf_counter()
        runner.run()
        ended = time.perf_counter()
    return Busy(device.busy, ended - started, device.first - started, max(0.0, ended - device.free_at))


# -- part 3: measured on a real GPU ------------------------------------------------------------------------


class ForwardTimeline:
    """CUDA events around every model forward, on the stream each runs on; ``busy`` is their union."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.origin = torch.cuda.Event(enable_timing=True)

    def wrap(self, forward: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()  # on this thread's current stream: the sampler's, or a side stream
            out = forward(*args, **kwargs)
            end.record()
            with self.lock:
                self.pairs.append((start, end))
            return out

        return timed

    def busy(self) -> tuple[float, float]:
        """(busy seconds, first forward's start in seconds after ``origin``), after a synchronize."""
        torch.cuda.synchronize()
        spans = sorted(
            (self.origin.elapsed_time(start) / 1e3, self.origin.elapsed_time(end) / 1e3)
            for start, end in self.pairs
        )
        total, reach = 0.0, -math.inf
        for begin, finish in spans:
            if finish > reach:
                total += finish - max(begin, reach)
                reach = finish
        return total, spans[0][0] if spans else math.nan


def real_size_bundle(device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """SD 1.5-size UNets and text encoders (bench_sampler's), an SD-size VAE and an Auffusion-layout vocoder
    (fp32, as ``load_models`` keeps it), random weights."""
    from diffusers import AutoencoderKL

    from benchmarks.bench_sampler import real_size_models
    from sounding_anagrams.sampler.vocoder import HiFiGANConfig, HiFiGANGenerator

    models = real_size_models(device, dtype)
    for seed, model in enumerate((models.image, models.audio)):
        torch.manual_seed(100 + seed)
        model.vae = (
            AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=4,
                sample_size=512,
                scaling_factor=0.18215,
            )
            .to(device, dtype)
            .eval()
        )
    vocoder_layout = HiFiGANConfig(
        resblock="1",
        upsample_rates=(5, 4, 4, 2),
        upsample_kernel_sizes=(11, 8, 8, 4),
        upsample_initial_channel=512,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    )
    models.vocoder = HiFiGANGenerator(vocoder_layout).to(device).eval()
    return models


def measured_busy_fraction(trials: int, steps: int) -> Busy:
    """One search of ``trials`` trials on the GPU with real-size random models (MEASURED)."""
    models = real_size_bundle(torch.device("cuda"), torch.float16)
    timeline = ForwardTimeline()
    for model in (models.image, models.audio):
        model.unet.forward = timeline.wrap(model.unet.forward)  # type: ignore[method-assign]
        model.vae.decode = timeline.wrap(model.vae.decode)  # type: ignore[method-assign]
    assert models.vocoder is not None
    models.vocoder.forward = timeline.wrap(models.vocoder.forward)  # type: ignore[method-assign]
    judges = Scorers.load(models="tiny", device="cuda")
    study = load_study(REPO / "studies" / "rotate.yaml")
    study = dataclasses.replace(
        study,
        render=study.render.replace(image_model="bench", audio_model="bench", num_inference_steps=steps),
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-cuda-") as runs:
        runner = SearchRunner.open(
            study, models, judges, SearchSettings(runs_dir=Path(runs), trials=trials, progress=False)
        )
        torch.cuda.synchronize()
        timeline.origin.record()
        started = time.perf_counter()
        runner.run()
        ended = time.perf_counter()
    busy, first = timeline.busy()
    last = max((timeline.origin.elapsed_time(end) / 1e3 for _, end in timeline.pairs), default=math.nan)
    wall = ended - started
    return Busy(busy, wall, first, max(0.0, wall - last))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"# bench_pipeline {datetime.date.today()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    if not args.skip_stages:
        stage_table(load_models("tiny", "tiny", device="cpu", dtype="float32"), args.steps)
    if torch.cuda.is_available():
        run = measured_busy_fraction(args.trials, args.steps)
        print(
            f"\nMEASURED on {torch.cuda.get_device_name()}: real-size random-weight models in fp16, "
            f"studies/rotate.yaml, {args.trials} trials, {args.steps} steps"
        )
        print(
            "| device busy (model forwards) | first to last forward | device s | wall s | start s | drain s |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| {100 * run.whole:.1f}% | {100 * run.between:.1f}% | {run.busy:.1f} | {run.wall:.1f} "
            f"| {run.start:.1f} | {run.drain:.1f} |"
        )
    else:
        print("\nno CUDA device: the measured GPU busy fraction (part 3) did not run")
    if args.skip_simulation:
        return
    print(
        f"\nSIMULATED DEVICE (model forwards take their H100 time at {H100_FLOPS / 1e12:.0f} TFLOP/s; "
        f"see the docstring): studies/rotate.yaml (4 seeds a trial, batch 8, previews at 40%/70%, median "
        f"pruner), {args.trials} trials, {args.steps} steps"
    )
    print(
        "| pipeline | launches | simulated device busy | first to last forward | device s | wall s | start s "
        "| drain s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for overlap, asynchronous in ((False, False), (True, False), (True, True)):
        run = busy_fraction(args.trials, args.steps, overlap=overlap, asynchronous=asynchronous)
        pipeline = "overlapped (judge, publish, previews in the background)" if overlap else "serial"
        launches = "asynchronous (CUDA)" if asynchronous else "blocking (sleep per forward)"
        print(
            f"| {pipeline} | {launches} | {100 * run.whole:.1f}% | {100 * run.between:.1f}% "
            f"| {run.busy:.1f} | {run.wall:.1f} | {run.start:.1f} | {run.drain:.1f} |"
        )


if __name__ == "__main__":
    main()
