"""Candidates per second of the batched joint sampler against the reference-style loop, in one run.

Always: the tiny models on the CPU. With CUDA: SD 1.5-size UNets (Auffusion is a fine-tune of the same
architecture) with random weights in fp16 at 256x1024 (latent 4x32x128), 2 views and 1 audio prompt, for 1, 4
and 8 candidates, plus peak GPU memory. Speed does not depend on weight values, so random weights measure it
exactly. Usage: ``make bench`` or ``python benchmarks/bench_sampler.py [--steps N] [--candidates 1 4 8]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sounding_anagrams.config import RenderConfig  # noqa: E402
from sounding_anagrams.sampler.models import DiffusionModel, ModelBundle, load_models  # noqa: E402
from sounding_anagrams.sampler.pipeline import JointSampler  # noqa: E402
from sounding_anagrams.sampler.tiny import SD15_SCHEDULE, tiny_vae, write_tiny_tokenizer  # noqa: E402
from tests.reference_loop import reference_loop  # noqa: E402

# Stable Diffusion 1.5's UNet (its unet/config.json): 859.5 M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def real_size_models(device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """Two SD 1.5-size UNets and CLIP ViT-L-size text encoders with random weights (no download)."""
    import tempfile

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(tempfile.mkdtemp())
    vocab_size = write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)

    def model(seed: int) -> DiffusionModel:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET).to(device, dtype).eval()
        text = (
            CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=vocab_size,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                )
            )
            .to(device, dtype)
            .eval()
        )
        return DiffusionModel("random-sd15", unet, tiny_vae().to(device, dtype), text, tokenizer)

    return ModelBundle(model(0), model(1), None, dict(SD15_SCHEDULE), device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(models: ModelBundle, n: int, steps: int, device: torch.device) -> dict[str, float]:
    configs = [
        RenderConfig(
            seed=s,
            num_inference_steps=steps,
            image_start_step=min(5, steps - 1),
            image_model="bench",
            audio_model="bench",
        )
        for s in range(n)
    ]
    sampler = JointSampler(models)
    sampler(configs[:1], progress=False)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    batched = sampler(configs, progress=False).latents
    synchronize(device)
    t_batched = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    start = time.perf_counter()
    reference = torch.stack([reference_loop(models, config) for config in configs])
    synchronize(device)
    t_reference = time.perf_counter() - start
    return {
        "batched_cps": n / t_batched,
        "reference_cps": n / t_reference,
        "speedup": t_reference / t_batched,
        "max_abs_diff": (batched - reference).abs().max().item(),
        "peak_gib": peak,
    }


def report(title: str, models: ModelBundle, candidates: list[int], steps: int, device: torch.device) -> None:
    print(f"\n## {title}: {steps} steps, 2 views (identity, tile_rotate_cw), 1 audio prompt")
    print(
        "| candidates | batched cand/s | reference cand/s | speedup | batched cand/h @100 steps | "
        "max |diff| | peak GPU GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in candidates:
        r = measure(models, n, steps, device)
        per_hour = r["batched_cps"] * 3600 * steps / 100
        print(
            f"| {n} | {r['batched_cps']:.3f} | {r['reference_cps']:.3f} | {r['speedup']:.2f}x | "
            f"{per_hour:.0f} | "
            f"{r['max_abs_diff']:.2e} | {r['peak_gib']:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: 6 on CPU, 20 on CUDA)"
    )
    parser.add_argument("--candidates", type=int, nargs="+", default=None)
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA real-size benchmark")
    args = parser.parse_args()

    print(
        f"# bench_sampler {datetime.date.today()} | {platform.node()} | torch {torch.__version__} | "
        f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'} | "
        f"cpu threads {torch.get_num_threads()}"
    )
    if not args.skip_cpu:
        cpu = torch.device("cpu")
        tiny = load_models("tiny", "tiny", device="cpu", dtype="float32", with_vocoder=False)
        report("tiny models, CPU, fp32", tiny, args.candidates or [1, 4], args.steps or 6, cpu)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        models = real_size_models(cuda, torch.float16)
        report(
            "SD 1.5-size UNets (random weights), CUDA, fp16, 256x1024",
            models,
            args.candidates or [1, 4, 8],
            args.steps or 20,
            cuda,
        )
    else:
        print("\nno CUDA device: the real-size benchmark was skipped")


if __name__ == "__main__":
    main()
