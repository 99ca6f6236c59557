"""What one eager forward of each real-size model costs the GPU and the host that launches it.

The fair device model of ``bench_pipeline.py`` charges these costs. They are measured here, on meta tensors
(shapes and dtypes without storage, so an 860 M-parameter UNet runs its Python in milliseconds on any CPU):

- **kernels**: the ATen operators one forward dispatches that launch a CUDA kernel in eager PyTorch (views,
  reshapes and allocations launch none). Counted with a ``TorchDispatchMode``.
- **device time**: for every such operator, its FLOPs (PyTorch's own formulas, ``torch.utils.flop_counter``)
  over the device's FLOP/s and the bytes it moves (every tensor it reads and writes: eager runs unfused, so
  each operator's inputs come from and its outputs go to device memory) over the memory bandwidth; the
  larger of the two, summed over the operators. Measured at two batch sizes and taken as linear in between
  (FLOPs and activation bytes grow with the batch, weight bytes do not).
- **host time**: the wall time on this CPU of a narrow twin of the model (the same layers with a few
  channels, on a small input: the same Python, the same dispatches, each kernel on a tiny tensor), median of
  7, per kernel, times the real model's kernels, plus ``LAUNCH_API_SECONDS`` per kernel for what the CPU
  skips: the CUDA caching allocator and ``cudaLaunchKernel``. That figure is an assumption, not measured
  here (no GPU). The share of the twin's time that holds the GIL is measured too (:func:`gil_share`):
  PyTorch releases the GIL around each operator's C++, so only the module's Python keeps other threads out.

Fused attention: on the meta device ``scaled_dot_product_attention`` may decompose into a matmul, softmax and
matmul that write the whole attention matrix; an H100 runs one flash-attention kernel that never writes it.
Attention is therefore counted as one kernel, its FLOPs ``4 * B * heads * Lq * Lk * d`` and its bytes those of
q, k, v and the output.

Usage: ``python benchmarks/device_costs.py`` prints the table that docs/PERFORMANCE.md quotes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

# Assumed host cost per kernel beyond what the meta device runs: the caching allocator's bookkeeping and the
# cudaLaunchKernel call itself. PyTorch profiles of eager CUDA models commonly show cudaLaunchKernel at 3-5
# microseconds of CPU per call; 4 is taken. Not measured here (no GPU).
LAUNCH_API_SECONDS = 4e-6
# Memory bandwidth an H100 SXM reaches on streaming kernels: about 80% of its 3.35 TB/s HBM3 peak.
BANDWIDTH = 2.7e12
# fp32 convolutions and matmuls run as TF32 on tensor cores (PyTorch's default for cuDNN convolutions): half
# the fp16 rate on an H100. The vocoder and CLAP run in fp32.
FP32_RATE = 0.5

# Operators that launch no kernel: views, metadata changes and bare allocations.
NO_KERNEL = {
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "permute",
    "transpose",
    "t",
    "expand",
    "as_strided",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "alias",
    "detach",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "view_as_real",
    "view_as_complex",
    "_to_copy_noop",
}


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel of a forward: its FLOPs and bytes moved."""

    flop: float
    bytes: float


class KernelTally(TorchDispatchMode):
    """Records every kernel-launching operator dispatched inside it, with its FLOPs and bytes; fused attention
    (``F.scaled_dot_product_attention``, which the meta device decomposes) as one kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.in_attention = False

    def __enter__(self) -> KernelTally:
        self.plain_attention = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.attention
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        F.scaled_dot_product_attention = self.plain_attention
        super().__exit__(*exc)

    def attention(self, query: Tensor, key: Tensor, value: Tensor, *rest: Any, **options: Any) -> Any:
        self.in_attention = True
        try:
            out = self.plain_attention(query, key, value, *rest, **options)
        finally:
            self.in_attention = False
        *batch, length_q, head_dim = query.shape
        flop = 4 * math.prod(batch) * length_q * key.shape[-2] * head_dim
        self.ops.append(Op(flop, sum(t.numel() * t.element_size() for t in (query, key, value, out))))
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_attention or func.overloadpacket.__name__ in NO_KERNEL:
            return out
        formula = flop_registry.get(func.overloadpacket)
        flop = float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        self.ops.append(Op(flop, sum(t.numel() * t.element_size() for t in tensors)))
        return out


@dataclasses.dataclass(frozen=True)
class ModuleCost:
    """One eager forward of a model: ``kernels`` launches costing the host ``host_seconds``, part of it
    holding the GIL; its kernels'
    FLOPs and bytes at batch 2 (``ops_2``) and their growth per extra batch row (``ops_step``). (Batch 2, not
    1: at batch 1 some reshapes need no copy, so it launches fewer kernels; the sampler's calls have at least
    two rows, the prompt's and the empty prompt's.)"""

    name: str
    kernels: int
    host_gil_seconds: float  # launch cost that holds the GIL (the module's Python)
    host_released_seconds: float  # launch cost in C++ with the GIL released (dispatch, cudaLaunchKernel)
    ops_2: tuple[Op, ...]
    ops_step: tuple[Op, ...]
    fp32: bool

    @property
    def host_seconds(self) -> float:
        return self.host_gil_seconds + self.host_released_seconds

    def flop(self, rows: int) -> float:
        return sum(a.flop + (rows - 2) * d.flop for a, d in zip(self.ops_2, self.ops_step, strict=True))

    def bytes(self, rows: int) -> float:
        return sum(a.bytes + (rows - 2) * d.bytes for a, d in zip(self.ops_2, self.ops_step, strict=True))

    def device_seconds(self, rows: int, flops: float, bandwidth: float = BANDWIDTH) -> float:
        """Device time of a forward of ``rows`` batch rows: per kernel the larger of its FLOP time and its
        memory time, summed."""
        rate = flops * (FP32_RATE if self.fp32 else 1.0)
        return sum(
            max((a.flop + (rows - 2) * d.flop) / rate, (a.bytes + (rows - 2) * d.bytes) / bandwidth)
            for a, d in zip(self.ops_2, self.ops_step, strict=True)
        )


def tally(forward: Callable[[int], Any], rows: int) -> list[Op]:
    with torch.no_grad(), KernelTally() as counter:
        forward(rows)
    return counter.ops


def gil_share(work: Callable[[], None]) -> float:
    """The share of ``work``'s time spent in Python (holding the GIL), the rest in ATen operators' C++
    (PyTorch's bindings release the GIL around them): from ``torch.profiler``'s CPU events, the top-level
    operators' time over the wall time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        work()
        wall = time.perf_counter() - started
    in_operators = sum(e.cpu_time_total for e in profiler.events() if e.cpu_parent is None) / 1e6
    return min(1.0, max(0.0, 1 - in_operators / wall))


def narrow_host(narrow: Callable[[int], Any]) -> tuple[float, float]:
    """The host seconds per kernel of ``narrow(2)`` on this CPU, median of 7 (see :func:`measure`), and the
    share of them that holds the GIL."""
    kernels = len(tally(narrow, 2))
    walls = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a launch runs on one host thread; no intra-op thread pool to wake per kernel
    try:
        with torch.no_grad():
            narrow(2)  # warm: lazy imports and caches
            for _ in range(7):
                started = time.perf_counter()
                narrow(2)
                walls.append(time.perf_counter() - started)
            share = gil_share(lambda: narrow(2))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(walls) / kernels, share


def measure(name: str, real: Callable[[int], Any], host: tuple[float, float], *, fp32: bool) -> ModuleCost:
    """``real(rows)``: one forward of the real-size model on meta tensors, for its kernels' FLOPs and bytes.
    ``host``: the host seconds a kernel's dispatch costs and their GIL share, from :func:`narrow_host` of
    the model's narrow twin: the same layers with a few channels on a small input, on this CPU (the same
    Python and dispatches, each kernel on a tiny tensor). The meta forward's own time would overstate the
    host's work: the meta device's shape functions are partly Python, many times slower than CUDA's C++."""
    two, three = tally(real, 2), tally(real, 3)
    if len(two) != len(three):
        raise RuntimeError(f"{name}: {len(two)} kernels at batch 2 but {len(three)} at batch 3")
    step = tuple(Op(b.flop - a.flop, b.bytes - a.bytes) for a, b in zip(two, three, strict=True))
    per_kernel, share = host
    python = len(two) * per_kernel * share
    released = len(two) * (per_kernel * (1 - share) + LAUNCH_API_SECONDS)
    return ModuleCost(name, len(two), python, released, tuple(two), step, fp32)


# -- the real-size modules on the meta device, and their narrow twins on the CPU -----------------------------


def unet_cost() -> ModuleCost:
    """SD 1.5's UNet (Auffusion's has the same architecture) on a 4x32x128 latent, fp16."""
    from diffusers import UNet2DConditionModel

    from benchmarks.bench_sampler import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).half().eval()
    narrow = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": (32, 32, 64, 64)}).eval()

    def forward(model: Any, rows: int, latent: tuple[int, int], device: str, dtype: torch.dtype) -> Any:
        sample = torch.zeros(rows, 4, *latent, device=device, dtype=dtype)
        states = torch.zeros(rows, 77, 768, device=device, dtype=dtype)
        return model(sample, torch.tensor(500, device=device), encoder_hidden_states=states).sample

    return measure(
        "UNet (SD 1.5 size, 4x32x128 latent, fp16)",
        lambda rows: forward(unet, rows, (32, 128), "meta", torch.float16),
        narrow_host(lambda rows: forward(narrow, rows, (8, 8), "cpu", torch.float32)),
        fp32=False,
    )


def vae_decode_cost() -> ModuleCost:
    """SD's VAE decoder, a 4x32x128 latent to a 3x256x1024 picture, fp16."""
    from diffusers import AutoencoderKL

    def vae(widths: tuple[int, ...]) -> Any:
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=widths,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        ).eval()

    with torch.device("meta"):
        real = vae((128, 256, 512, 512)).half()
    narrow = vae((32, 32, 32, 32))  # 2x2 latent: 16x16 pixels
    return measure(
        "VAE decode (SD size, to 256x1024, fp16)",
        lambda rows: real.decode(torch.zeros(rows, 4, 32, 128, device="meta", dtype=torch.float16)).sample,
        narrow_host(lambda rows: narrow.decode(torch.zeros(rows, 4, 2, 2)).sample),
        fp32=False,
    )


def vocoder_cost() -> ModuleCost:
    """Auffusion's HiFi-GAN layout, a 256x1024 log-mel to 163 840 samples (10.24 s at 16 kHz), fp32."""
    from sounding_anagrams.sampler.vocoder import HiFiGANConfig, HiFiGANGenerator

    def layout(channels: int) -> HiFiGANConfig:
        return HiFiGANConfig(
            resblock="1",
            upsample_rates=(5, 4, 4, 2),
            upsample_kernel_sizes=(11, 8, 8, 4),
            upsample_initial_channel=channels,
            resblock_kernel_sizes=(3, 7, 11),
            resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        )

    with torch.device("meta"):
        real = HiFiGANGenerator(layout(512)).eval()
    narrow = HiFiGANGenerator(layout(32)).eval()
    return measure(
        "vocoder (HiFi-GAN, Auffusion layout, 1024 frames, fp32)",
        lambda rows: real(torch.zeros(rows, 256, 1024, device="meta")),
        narrow_host(lambda rows: narrow(torch.zeros(rows, 256, 2))),
        fp32=True,
    )


def clip_image_cost() -> ModuleCost:
    """open_clip's ViT-L/14 image tower at 224x224 (the judges' default CLIP), fp16 as under autocast."""
    import open_clip

    real = open_clip.create_model("ViT-L-14", pretrained=None, device="meta").half().eval()
    narrow = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 56, "layers": 24, "width": 64, "head_width": 16, "patch_size": 14},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    return measure(
        "CLIP image tower (ViT-L/14, one 224x224 window, fp16)",
        lambda rows: real.encode_image(torch.zeros(rows, 3, 224, 224, device="meta", dtype=torch.float16)),
        narrow_host(lambda rows: narrow.encode_image(torch.zeros(rows, 3, 56, 56))),
        fp32=False,
    )


def clap_audio_cost(host: tuple[float, float]) -> ModuleCost:
    """CLAP's HTSAT audio tower (laion/clap-htsat-unfused's layout: transformers' defaults) on 10 s at
    48 kHz (1001x64 log-mel), fp32 as the judges run it. HTSAT resizes any input to its 256x256 grid, so a
    narrow twin still computes for real on the CPU: ``host`` is taken from the CLIP tower's twin (both are
    transformer blocks of the same operators)."""
    from transformers import ClapConfig, ClapModel

    with torch.device("meta"):
        real = ClapModel(ClapConfig()).eval()

    def forward(rows: int) -> Any:
        features = torch.zeros(rows, 1, 1001, 64, device="meta")
        longer = torch.zeros(rows, 1, dtype=torch.bool, device="meta")
        return real.get_audio_features(input_features=features, is_longer=longer)

    return measure("CLAP audio tower (HTSAT, 10 s at 48 kHz, fp32)", forward, host, fp32=True)


@dataclasses.dataclass(frozen=True)
class Costs:
    unet: ModuleCost
    vae_decode: ModuleCost
    vocoder: ModuleCost
    clip_image: ModuleCost
    clap_audio: ModuleCost

    def all(self) -> list[ModuleCost]:
        return [self.unet, self.vae_decode, self.vocoder, self.clip_image, self.clap_audio]


def measure_all() -> Costs:
    clip = clip_image_cost()
    per_kernel = clip.host_seconds / clip.kernels - LAUNCH_API_SECONDS
    clap = clap_audio_cost((per_kernel, clip.host_gil_seconds / clip.kernels / per_kernel))
    return Costs(unet_cost(), vae_decode_cost(), vocoder_cost(), clip, clap)


def print_table(costs: Costs, flops: float = 400e12) -> None:
    launch_us, tflops, bandwidth = LAUNCH_API_SECONDS * 1e6, flops / 1e12, BANDWIDTH / 1e12
    print(
        f"| module (one batch row) | kernels | host ms (narrow twin + {launch_us:.0f} us/kernel) "
        f"| of which GIL held | GFLOP | MB moved | FLOP ms at {tflops:.0f} TFLOP/s "
        f"| bytes ms at {bandwidth:.1f} TB/s | device ms (per-kernel max, summed) | extra row: device ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cost in costs.all():
        rate = flops * (FP32_RATE if cost.fp32 else 1.0)
        one = cost.device_seconds(1, flops)
        extra = cost.device_seconds(2, flops) - one
        print(
            f"| {cost.name} | {cost.kernels} | {cost.host_seconds * 1e3:.1f} "
            f"| {cost.host_gil_seconds * 1e3:.1f} | {cost.flop(1) / 1e9:.0f} | {cost.bytes(1) / 1e6:.0f} "
            f"| {cost.flop(1) / rate * 1e3:.2f} | {cost.bytes(1) / BANDWIDTH * 1e3:.2f} | {one * 1e3:.2f} "
            f"| {extra * 1e3:.2f} |"
        )


if __name__ == "__main__":
    print_table(measure_all())
