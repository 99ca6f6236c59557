"""``render``: one sounding anagram (or several seeds in one batch) from a config file and flags."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sounding_anagrams.commands.common import finite_float, models_overrides, quiet_libraries
from sounding_anagrams.errors import ConfigError, DiskFullError, is_disk_full
from sounding_anagrams.hub import AUFFUSION_ID, SD15_ID

if TYPE_CHECKING:
    from sounding_anagrams.config import RenderConfig


# flag -> RenderConfig field, for flags that override one field each.
RENDER_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--views": (
        "views",
        {"nargs": "+", "metavar": "VIEW", "help": "one view per image prompt, e.g. identity tile_rotate_cw"},
    ),
    "--image-prompts": (
        "image_prompts",
        {"nargs": "+", "metavar": "PROMPT", "help": "one image prompt per view"},
    ),
    "--audio-prompts": (
        "audio_prompts",
        {"nargs": "+", "metavar": "PROMPT", "help": "one audio prompt per view"},
    ),
    "--view-weights": ("view_weights", {"nargs": "+", "type": finite_float, "metavar": "W"}),
    "--audio-view-weights": ("audio_view_weights", {"nargs": "+", "type": finite_float, "metavar": "W"}),
    "--audio-weight": (
        "audio_weight",
        {"type": finite_float, "help": "weight w_s of the audio model, in [0, 1]"},
    ),
    "--image-guidance": ("image_guidance_scale", {"type": finite_float}),
    "--audio-guidance": ("audio_guidance_scale", {"type": finite_float}),
    "--image-start-step": (
        "image_start_step",
        {"type": int, "help": "steps before this are audio only (default: 5%% of --steps)"},
    ),
    "--audio-start-step": ("audio_start_step", {"type": int, "help": "steps before this are image only"}),
    "--steps": ("num_inference_steps", {"type": int}),
    "--scheduler": ("scheduler", {"help": "ddim (default) or dpmsolver++"}),
    "--seed": ("seed", {"type": int}),
    "--height": ("height", {"type": int}),
    "--width": ("width", {"type": int}),
    "--vocoder": ("vocoder", {"help": "hifigan (Auffusion's) or griffin_lim (needs no vocoder weights)"}),
    "--crop-right": ("crop_right", {"type": int, "help": "pixel columns cut from the right of the sound"}),
    "--image-model": ("image_model", {"help": f"hub id or folder (default {SD15_ID})"}),
    "--audio-model": ("audio_model", {"help": f"hub id or folder (default {AUFFUSION_ID})"}),
    "--device": ("device", {"help": "auto, cpu, cuda or cuda:N (N: a CUDA device index)"}),
    "--dtype": ("dtype", {"help": "auto, float32, float16 or bfloat16"}),
}


def fresh_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... when it exists: default render folders never collide."""
    folder, n = base, 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    if folder != base:
        print(f"{base} exists; rendering into {folder}", file=sys.stderr)
    return folder


def render_config_from_args(args: argparse.Namespace) -> RenderConfig:
    from sounding_anagrams.config import RenderConfig

    base = RenderConfig.from_yaml(args.config) if args.config else RenderConfig()
    overrides: dict[str, Any] = {
        dest: getattr(args, dest) for dest, _ in RENDER_FLAGS.values() if hasattr(args, dest)
    }
    if hasattr(args, "audio_prompt"):
        if "audio_prompts" in overrides:
            raise ConfigError(
                "--audio-prompt", args.audio_prompt, "give --audio-prompt or --audio-prompts, not both"
            )
        overrides["audio_prompts"] = [args.audio_prompt]
    overrides.update(models_overrides(args.models))
    return base.replace(**overrides) if overrides else base


def run_render(args: argparse.Namespace) -> int:
    config = render_config_from_args(args)
    if args.num_seeds < 1:
        raise ConfigError("--num-seeds", args.num_seeds, "must be at least 1")
    if args.max_unet_batch is not None and args.max_unet_batch < 2:
        raise ConfigError("--max-unet-batch", args.max_unet_batch, "must be at least 2 (one CFG pair)")
    if config.seed + args.num_seeds > 2**63:
        raise ConfigError(
            "--num-seeds",
            args.num_seeds,
            f"renders seeds {config.seed}..{config.seed + args.num_seeds - 1}, but seeds must be below 2**63",
        )
    configs = [config.replace(seed=config.seed + k) for k in range(args.num_seeds)]
    out = args.out or fresh_folder(
        Path("renders") / f"{'-'.join(v.split('(')[0] for v in config.views)}-seed{config.seed}"
    )
    folders = [out] if len(configs) == 1 else [out / f"seed{c.seed}" for c in configs]
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a file; give a folder for the render")
    finished = [folder for folder in folders if (folder / "config.yaml").exists()]
    if finished:
        raise ConfigError(
            "--out",
            str(out),
            f"holds a finished render ({finished[0] / 'config.yaml'}); a render is never written over: give "
            "another --out, or remove that folder first",
        )

    # The last check, as it needs torch: a device this machine lacks is said before any model loads.
    from sounding_anagrams.devices import resolve_device

    resolve_device(config.device, field="--device" if hasattr(args, "device") else "device")

    # Imported here so that `--help` and input errors answer at once, before diffusers loads.
    from sounding_anagrams.render import render
    from sounding_anagrams.sampler.models import load_models_for

    quiet_libraries()

    started = time.perf_counter()
    models = load_models_for(config)
    print(
        f"models loaded on {models.device} ({str(models.dtype).removeprefix('torch.')}) "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    started = time.perf_counter()
    results = render(
        configs, models, folders, progress=not args.quiet, max_unet_batch=args.max_unet_batch
    ).results
    print(f"rendered {len(results)} candidate(s) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    failed = 0
    for result in results:
        if result.failure:
            failed += 1
            print(f"seed {result.config.seed}: FAILED: {result.failure}")
            continue
        print(f"seed {result.config.seed}: {result.folder}")
        for name, path in result.files.items():
            print(f"  {name:12s} {path}")
    if any(r.write_error is not None and is_disk_full(r.write_error) for r in results):
        print(
            "error: the disk is full: the renders listed above as FAILED were not written (nothing "
            "half-written is left); free some space and render them again",
            file=sys.stderr,
        )
        return DiskFullError.exit_code
    return 1 if failed else 0
