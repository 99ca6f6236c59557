"""Does the device wait for the host? Per-stage times of a candidate, bytes per candidate, and the fraction of
a 16-trial search's wall time a GPU is busy: simulated (two models) and, where CUDA is present, measured.

Part 1 (stages): the tiny models on this machine's CPU, each stage of one candidate timed by itself.

Part 2 (OLD SIMULATED DEVICE, kept so the difference is seen): every model forward is replaced by a stand-in
that takes the time an H100 would from its FLOPs at 400 TFLOP/s (a UNet sample-forward of SD 1.5 / Auffusion
at 256x1024 is 0.803 TFLOP, 2.0 ms; a VAE decode "1.24 TFLOP", 3.1 ms; the vocoder and the judges 1 ms a
candidate), launched for free; the judges are the tests' designed ones; the vocoder returns silence. See
:class:`SimulatedDevice` for its two models of launching (blocking, and CUDA's asynchronous launches with a
high-priority side stream for the background threads).

Part 2b (FAIR SIMULATED DEVICE, :mod:`benchmarks.fair_device`): each forward charges the host its eager
launch cost as busy CPU and the device its kernels' time from FLOPs and bytes moved, both measured on
real-size models by :mod:`benchmarks.device_costs`; the real CLIP and CLAP scorers run their preprocessing at
real sizes with only their networks stubbed; the stand-ins' outputs depend on their inputs, so the objective
varies and the pruner prunes; the background threads' device work waits for its ``after=`` event. Swept over
device speeds, for ``rotate``, ``hybrid`` and ``dpmsolver`` (rotate with DPM-Solver++ at half the steps),
each the median of ``--repeats`` runs.

Part 3 (MEASURED, only where CUDA is present; ``--gpu-only`` runs it alone, about 3 minutes on an H100 by the
fair model's figures plus model building): the same 16-trial search for real on the GPU, with models of the
real sizes and random weights (no weights can be downloaded here; speed does not depend on their values): two
SD 1.5-size UNets and CLIP ViT-L-size text encoders (``bench_sampler.real_size_models``), an SD-size VAE and a
HiFi-GAN of Auffusion's vocoder layout, fp16; the judges are the tiny CLIP and CLAP on the GPU. Busy is the
union of the kernels' own intervals from ``torch.profiler`` (CUDA activity, every stream) over the wall time
of ``SearchRunner.run``.

Every search here runs the trials only (``SearchSettings(confirm=False)``): the confirmation stage after them
is plain batched rendering.

Usage: ``python benchmarks/bench_pipeline.py [--trials 16] [--steps 50] [--repeats 3]
[--studies rotate,hybrid,dpmsolver] [--tflops 200,400,800] [--skip-stages] [--skip-old] [--skip-fair]
[--gpu-only]``.
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

from benchmarks.device_costs import measure_all, print_table  # noqa: E402
from benchmarks.fair_device import fair_search  # noqa: E402
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
from sounding_anagrams.search.study import StudyConfig, load_study  # noqa: E402
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
            SearchSettings(
                runs_dir=Path(runs), trials=trials, progress=False, overlap=overlap, confirm=False
            ),
        )
        device.busy, device.first = 0.0, math.inf
        started = time.perf_counter()
        runner.run()
        ended = time.perf_counter()
    return Busy(device.busy, ended - started, device.first - started, max(0.0, ended - device.free_at))


# -- part 3: measured on a real GPU ------------------------------------------------------------------------


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


@dataclasses.dataclass
class Measured(Busy):
    kernels: int = 0


def kernel_union(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals: time when at least one kernel ran."""
    total, reach = 0.0, -math.inf
    for begin, finish in sorted(intervals):
        if finish > reach:
            total += finish - max(begin, reach)
            reach = finish
    return total


def measured_busy_fraction(trials: int, steps: int) -> Measured:
    """One search of ``trials`` trials on the GPU with real-size random models (MEASURED): the union of the
    kernels' times from ``torch.profiler`` (CUDA activity only: no per-operator host overhead; every
    stream), over the wall time of ``SearchRunner.run``. Not CUDA-event brackets around forwards: those count
    the launch gaps inside a forward as busy."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    models = real_size_bundle(torch.device("cuda"), torch.float16)
    judges = Scorers.load(models="tiny", device="cuda")
    study = load_study(REPO / "studies" / "rotate.yaml")
    study = dataclasses.replace(
        study,
        render=study.render.replace(image_model="bench", audio_model="bench", num_inference_steps=steps),
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-cuda-") as runs:
        runner = SearchRunner.open(
            study,
            models,
            judges,
            SearchSettings(runs_dir=Path(runs), trials=trials, progress=False, confirm=False),
        )
        marker = torch.ones(1, device="cuda")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            # One one-element kernel before and one after the run: the kernels' own clock marks its ends.
            marker.add_(1)
            torch.cuda.synchronize()
            started = time.perf_counter()
            runner.run()
            torch.cuda.synchronize()
            ended = time.perf_counter()
            marker.add_(1)
            torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start / 1e6, e.time_range.end / 1e6)
        for e in profiler.events()
        if e.device_type == DeviceType.CUDA
    )
    wall = ended - started
    opened, closed, work = kernels[0], kernels[-1], kernels[1:-1]
    if not work:
        return Measured(0.0, wall, math.nan, math.nan, 0)
    start = work[0][0] - opened[1]
    drain = closed[0] - max(end for _, end in work)
    return Measured(kernel_union(work), wall, start, max(0.0, drain), len(work))


def study_variant(name: str, steps: int) -> StudyConfig:
    """A shipped study with the tiny models' stand-ins: ``rotate``, ``hybrid``, or ``dpmsolver`` (rotate with
    DPM-Solver++ at half the steps, its usual count)."""
    study = load_study(REPO / "studies" / f"{'rotate' if name == 'dpmsolver' else name}.yaml")
    steps = max(2, steps // 2) if name == "dpmsolver" else steps
    render = study.render.replace(
        image_model="tiny",
        audio_model="tiny",
        num_inference_steps=steps,
        image_start_step=min(study.render.image_start, steps - 1),  # a smoke run's few steps
    )
    if name == "dpmsolver":
        render = render.replace(scheduler="dpmsolver++")
    return dataclasses.replace(study, render=render)


def old_model_table(trials: int, steps: int, repeats: int) -> None:
    """Part 2: the old model (constant FLOP-based times, free launches, designed judges), median of
    ``repeats`` runs."""
    print(
        f"\nOLD SIMULATED DEVICE (kept for comparison; see the docstring): studies/rotate.yaml, {trials} "
        f"trials, {steps} steps, {H100_FLOPS / 1e12:.0f} TFLOP/s, median of {repeats} (all runs in brackets)"
    )
    print("| pipeline | launches | simulated device busy | first to last forward | device s | wall s |")
    print("|---|---|---|---|---|---|")
    for overlap, asynchronous in ((False, False), (True, True)):
        runs = [
            busy_fraction(trials, steps, overlap=overlap, asynchronous=asynchronous) for _ in range(repeats)
        ]
        run = sorted(runs, key=lambda r: r.whole)[len(runs) // 2]
        each = ", ".join(f"{100 * r.whole:.0f}" for r in runs)
        pipeline = "overlapped (judge, publish, previews in the background)" if overlap else "serial"
        launches = "asynchronous (CUDA)" if asynchronous else "blocking (sleep per forward)"
        print(
            f"| {pipeline} | {launches} | {100 * run.whole:.1f}% ({each}) | {100 * run.between:.1f}% "
            f"| {run.busy:.1f} | {run.wall:.1f} |"
        )


def fair_model_table(studies: list[str], speeds: list[float], trials: int, steps: int, repeats: int) -> None:
    """Part 2b: the fair device model, each study at each speed, median of ``repeats`` runs."""
    costs = measure_all()
    print("\nFAIR DEVICE MODEL: the modules' costs (benchmarks/device_costs.py, measured now)")
    print_table(costs)
    print(
        f"\nFAIR SIMULATED DEVICE (benchmarks/fair_device.py): {trials} trials, {steps} steps "
        f"(dpmsolver: {max(2, steps // 2)}), median of {repeats} runs (all runs in brackets)"
    )
    print(
        "| study | TFLOP/s | device busy | first to last forward | pruned trials | device s | wall s "
        "| start s | drain s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in studies:
        study = study_variant(name, steps)
        for flops in speeds:
            runs = [fair_search(study, costs, flops, trials) for _ in range(repeats)]
            run = sorted(runs, key=lambda r: r.fraction)[len(runs) // 2]
            each = ", ".join(f"{100 * r.fraction:.0f}" for r in runs)
            pruned = ", ".join(str(r.pruned) for r in runs)
            print(
                f"| {name} | {flops / 1e12:.0f} | {100 * run.fraction:.1f}% ({each}) "
                f"| {100 * run.between:.1f}% | {run.pruned} ({pruned}) | {run.busy:.1f} | {run.wall:.1f} "
                f"| {run.start:.1f} | {run.drain:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", default="rotate,hybrid,dpmsolver")
    parser.add_argument("--tflops", default="200,400,800", help="device speeds of the fair model's sweep")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--skip-old", action="store_true", help="skip the old simulated device")
    parser.add_argument("--skip-fair", action="store_true", help="skip the fair simulated device")
    parser.add_argument("--gpu-only", action="store_true", help="only part 3, the measured GPU run")
    args = parser.parse_args()
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"# bench_pipeline {datetime.date.today()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    if not (args.skip_stages or args.gpu_only):
        stage_table(load_models("tiny", "tiny", device="cpu", dtype="float32"), args.steps)
    if torch.cuda.is_available():
        run = measured_busy_fraction(args.trials, args.steps)
        print(
            f"\nMEASURED on {torch.cuda.get_device_name()}: real-size random-weight models in fp16, "
            f"studies/rotate.yaml, {args.trials} trials, {args.steps} steps; busy = the union of the "
            "kernels' times (torch.profiler) over the wall time of SearchRunner.run"
        )
        print(
            "| GPU busy (kernels) | first to last kernel | kernel s | wall s | start s | drain s | kernels |"
        )
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {100 * run.whole:.1f}% | {100 * run.between:.1f}% | {run.busy:.1f} | {run.wall:.1f} "
            f"| {run.start:.1f} | {run.drain:.1f} | {run.kernels} |"
        )
    else:
        print("\nno CUDA device: the measured GPU busy fraction (part 3) did not run")
    if args.gpu_only:
        return
    if not args.skip_old:
        old_model_table(args.trials, args.steps, args.repeats)
    if not args.skip_fair:
        speeds = [float(x) * 1e12 for x in args.tflops.split(",")]
        fair_model_table(args.studies.split(","), speeds, args.trials, args.steps, args.repeats)


if __name__ == "__main__":
    main()
