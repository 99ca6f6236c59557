"""``sounding-anagrams``: the command line.

Bad input ends with one line naming the field, the value and what is allowed, and a non-zero exit code
(2: bad input, 3: models could not be loaded, 130: interrupted); never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sounding_anagrams.config import AUFFUSION_ID, SD15_ID, TINY_MODELS, RenderConfig
from sounding_anagrams.errors import ConfigError, SoundingAnagramsError

# flag -> RenderConfig field, for flags that override one field each.
_RENDER_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
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
    "--view-weights": ("view_weights", {"nargs": "+", "type": float, "metavar": "W"}),
    "--audio-view-weights": ("audio_view_weights", {"nargs": "+", "type": float, "metavar": "W"}),
    "--audio-weight": ("audio_weight", {"type": float, "help": "weight w_s of the audio model, in [0, 1]"}),
    "--image-guidance": ("image_guidance_scale", {"type": float}),
    "--audio-guidance": ("audio_guidance_scale", {"type": float}),
    "--image-start-step": ("image_start_step", {"type": int, "help": "steps before this are audio only"}),
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
    "--device": ("device", {"help": "auto, cpu or cuda"}),
    "--dtype": ("dtype", {"help": "auto, float32, float16 or bfloat16"}),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sounding-anagrams", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)

    render = commands.add_parser(
        "render",
        help="render one sounding anagram (or several seeds in one batch)",
        description="Render a sounding anagram: a picture per view, spectrogram, WAVs, animation.",
    )
    render.add_argument("--config", type=Path, help="a YAML file of RenderConfig fields; flags override it")
    render.add_argument(
        "--models",
        help="'tiny' (small random offline models), 'default' (the hub ids), or a folder holding image/ and "
        "audio/ pipeline folders",
    )
    for flag, (dest, kwargs) in _RENDER_FLAGS.items():
        render.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **kwargs)
    render.add_argument(
        "--audio-prompt",
        dest="audio_prompt",
        default=argparse.SUPPRESS,
        help="one audio prompt heard on the canvas",
    )
    render.add_argument("--num-seeds", type=int, default=1, help="render seeds seed..seed+N-1 in one batch")
    render.add_argument(
        "--max-unet-batch", type=int, default=None, help="chunk UNet batches to this many samples"
    )
    render.add_argument(
        "--out", type=Path, default=None, help="render folder (default renders/<views>-seed<seed>)"
    )
    render.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def models_overrides(models: str | None) -> dict[str, str]:
    """``--models`` -> image_model/audio_model fields."""
    if models is None:
        return {}
    if models == TINY_MODELS:
        return {"image_model": TINY_MODELS, "audio_model": TINY_MODELS}
    if models == "default":
        return {"image_model": SD15_ID, "audio_model": AUFFUSION_ID}
    folder = Path(models)
    if folder.is_dir() and (folder / "image").is_dir() and (folder / "audio").is_dir():
        return {"image_model": str(folder / "image"), "audio_model": str(folder / "audio")}
    raise ConfigError(
        "--models",
        models,
        "must be 'tiny', 'default' or a folder holding image/ and audio/ pipeline folders; "
        "give hub ids or single folders with --image-model / --audio-model",
    )


def render_config_from_args(args: argparse.Namespace) -> RenderConfig:
    base = RenderConfig.from_yaml(args.config) if args.config else RenderConfig()
    overrides: dict[str, Any] = {
        dest: getattr(args, dest) for dest, _ in _RENDER_FLAGS.values() if hasattr(args, dest)
    }
    if hasattr(args, "audio_prompt"):
        if "audio_prompts" in overrides:
            raise ConfigError(
                "--audio-prompt", args.audio_prompt, "give --audio-prompt or --audio-prompts, not both"
            )
        overrides["audio_prompts"] = [args.audio_prompt]
    overrides.update(models_overrides(args.models))
    return base.replace(**overrides) if overrides else base


def quiet_libraries() -> None:
    """Our own progress bar is the one to watch: hide the libraries' per-file loading bars and notices."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


def run_render(args: argparse.Namespace) -> int:
    config = render_config_from_args(args)
    if args.num_seeds < 1:
        raise ConfigError("--num-seeds", args.num_seeds, "must be at least 1")
    if args.max_unet_batch is not None and args.max_unet_batch < 2:
        raise ConfigError("--max-unet-batch", args.max_unet_batch, "must be at least 2 (one CFG pair)")
    configs = [config.replace(seed=config.seed + k) for k in range(args.num_seeds)]
    out = args.out or Path("renders") / f"{'-'.join(v.split('(')[0] for v in config.views)}-seed{config.seed}"
    folders = [out] if len(configs) == 1 else [out / f"seed{c.seed}" for c in configs]

    # Imported here so that `--help` and input errors answer at once, before diffusers loads.
    from sounding_anagrams.render import render
    from sounding_anagrams.sampler.models import load_models

    quiet_libraries()

    started = time.perf_counter()
    models = load_models(
        config.image_model,
        config.audio_model,
        device=config.device,
        dtype=config.dtype,
        with_vocoder=config.vocoder == "hifigan",
    )
    print(
        f"models loaded on {models.device} ({str(models.dtype).removeprefix('torch.')}) "
        f"in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    started = time.perf_counter()
    results = render(configs, models, folders, progress=not args.quiet, max_unet_batch=args.max_unet_batch)
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
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SOUNDING_ANAGRAMS_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        if args.command == "render":
            return run_render(args)
        raise AssertionError(f"unhandled command {args.command}")
    except SoundingAnagramsError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
