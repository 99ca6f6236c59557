"""``sounding-anagrams``: the command line.

Bad input ends with one line naming the field, the value and what is allowed, and a non-zero exit code
(2: bad input, 3: models could not be loaded, 130: interrupted); never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sounding_anagrams.errors import (
    ConfigError,
    DiskFullError,
    SoundingAnagramsError,
    StoreError,
    database_cause,
    is_disk_full,
    one_line,
)
from sounding_anagrams.hub import AUFFUSION_ID, SD15_ID, TINY_MODELS

if TYPE_CHECKING:
    from sounding_anagrams.config import RenderConfig


def finite_float(text: str) -> float:
    """An argparse type: a number that is neither NaN nor infinite (argparse's own ``float`` takes both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, but got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, but got {text!r}")
    return value


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
        help="'tiny' (small random offline models), 'default' (the hub ids), a folder holding image/ and "
        "audio/ pipeline folders, or a hub id / folder for the image model",
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

    evaluate = commands.add_parser(
        "evaluate",
        help="score render folders with CLIP (every view) and CLAP (every sound)",
        description="Score render folders; writes scores.json next to each and prints a table with the mean, "
        "its 95%% interval and the 90th/95th percentiles across folders.",
    )
    evaluate.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help="render folders, or folders holding render folders (e.g. a --num-seeds output)",
    )
    evaluate.add_argument("--models", help="'tiny' for tiny offline judges (no weights needed)")
    evaluate.add_argument(
        "--clip-model",
        default="ViT-B-16",
        help="open_clip model name, hf-hub:ORG/NAME or a local folder (default ViT-B-16)",
    )
    evaluate.add_argument(
        "--clip-pretrained", default="openai", help="open_clip pretrained tag (default openai)"
    )
    evaluate.add_argument(
        "--clap-model", default="laion/clap-htsat-unfused", help="CLAP hub id or local folder"
    )
    evaluate.add_argument(
        "--protocol",
        default="windowed",
        help="windowed (images-that-sound: 256x256 windows, stride 32) or whole",
    )
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda")

    search = commands.add_parser(
        "search",
        help="tune the knobs of a study with Optuna; every candidate lands in MLflow",
        description="Run a study file: Optuna proposes knobs, the batched sampler renders, CLIP/CLAP score, "
        "MLflow keeps every candidate. Running the same command again resumes the study.",
    )
    search.add_argument("study", type=Path, help="a study file, e.g. studies/rotate.yaml")
    search.add_argument(
        "--models",
        help="'tiny' (offline, CPU, small and fast), 'default', or a folder with image/ and audio/",
    )
    search.add_argument(
        "--trials", type=int, help="total finished trials (knob sets, each on seeds_per_trial seeds) to reach"
    )
    search.add_argument("--minutes", type=finite_float, help="stop asking for new trials after this long")
    search.add_argument(
        "--batch",
        type=int,
        help="renders per batched sampler call: a multiple of the study's seeds_per_trial (whole trials)",
    )
    _add_runs_arguments(search)
    search.add_argument("--device", default=None, help="auto, cpu or cuda (default: the study's)")
    search.add_argument(
        "--max-unet-batch", type=int, default=None, help="chunk UNet batches to this many samples"
    )
    search.add_argument(
        "--artifact-store",
        default=None,
        help="where the trials' media go for optuna-dashboard: a folder (a shared one for many machines) or "
        "s3://bucket (default <runs>/optuna-artifacts)",
    )
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    search.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, all on one study: one per GPU (CUDA_VISIBLE_DEVICES), "
        "their logs under <runs>/workers/",
    )

    for name, text in (
        ("leaderboard", "print the best candidates of a study"),
        ("export", "write the best config (the Pareto set for several objectives)"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("study", help="a study name, or its study file (studies/rotate.yaml)")
        command.add_argument("--models", help="'tiny' for the study a tiny search made (named <study>-tiny)")
        _add_runs_arguments(command)
        if name == "leaderboard":
            command.add_argument("--top", type=int, default=10)
            command.add_argument(
                "--format",
                default="table",
                help="table (default), markdown, csv (the knob sets) or json (both tables, as numbers)",
            )
        else:
            command.add_argument(
                "--out", type=Path, default=None, help="folder for the configs (default <runs>/exports)"
            )
            command.add_argument(
                "--prefer", action="store_true", help="the candidates a person preferred in `prefer`'s study"
            )
    ui = commands.add_parser(
        "ui",
        help="MLflow's UI over a search's store, opened on a study's leaderboard",
        description="Serve MLflow's UI over the store under --runs (loopback only by default) and print the "
        "page of a study's leaderboard: its trials sorted by objective, with their scores and knobs. With an "
        "MLflow server (--tracking-uri), print that page of the server.",
    )
    _study_page_arguments(ui)
    _add_runs_arguments(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)

    dashboard = commands.add_parser(
        "dashboard",
        help="optuna-dashboard over a search's storage, with each trial's pictures, clip and sound",
        description="Serve optuna-dashboard (loopback only by default) over the Optuna storage under --runs "
        "(or --storage) and the study's artifact store, and print the page of the study's best trial: its "
        "views, spectrogram and clip shown, its sound played.",
    )
    _study_page_arguments(dashboard)
    dashboard_arguments(dashboard)

    prefer = commands.add_parser(
        "prefer",
        help="a person steers: compare candidates in optuna-dashboard, a preferential GP proposes the next",
        description="Run a preferential study over a study file's space: --candidates candidates at a time "
        "are rendered and shown side by side in optuna-dashboard (each one's clip: the views turning while "
        "its sound plays); the person clicks the worst, and optuna-dashboard's preferential GP sampler "
        "proposes the next knob set from every choice so far. Needs the [prefer] extra (BoTorch).",
    )
    prefer.add_argument("study", type=Path, help="a study file, e.g. studies/rotate.yaml")
    prefer.add_argument(
        "--models", help="'tiny' (offline, CPU), 'default', or a folder with image/ and audio/"
    )
    prefer.add_argument("--candidates", type=int, default=4, help="candidates shown at a time (default 4)")
    prefer.add_argument(
        "--trials", type=int, default=None, help="candidates to make in all (default: the study's budget)"
    )
    prefer.add_argument(
        "--from-search",
        action="store_true",
        help="start from the top knob sets of the study's automatic search (same storage) instead of random",
    )
    dashboard_arguments(prefer)
    prefer.add_argument("--device", default=None, help="auto, cpu or cuda (default: the study's)")
    prefer.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard here")
    prefer.add_argument("--quiet", action="store_true", help="no progress bars")

    server = commands.add_parser(
        "server",
        help="start an MLflow tracking server for many workers (PostgreSQL backend, served artifacts)",
        description="Start an MLflow tracking server: runs in a PostgreSQL database (created if missing), "
        "artifacts stored under --artifacts-destination and served through the server, so workers on "
        "machines with no shared disk log their files to one place. Prints the URI to give the workers.",
    )
    server.add_argument(
        "--backend-store-uri",
        default=os.environ.get("SOUNDING_ANAGRAMS_MLFLOW_DB", DEFAULT_SERVER_DB),
        help=f"the runs' database (default {DEFAULT_SERVER_DB})",
    )
    server.add_argument(
        "--artifacts-destination",
        default="runs/server-artifacts",
        help="where the server keeps artifacts: a folder (an NFS mount for a cluster), s3://bucket/path "
        "(with AWS_* / MLFLOW_S3_ENDPOINT_URL for MinIO)... (default runs/server-artifacts)",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for a cluster)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host headers the server accepts, comma-separated (MLflow's; needed when workers reach it "
        "by a cluster name, e.g. mlflow.cluster.local:5000)",
    )
    return parser


DEFAULT_SERVER_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow"


def _study_page_arguments(parser: argparse.ArgumentParser) -> None:
    """The study whose page a UI opens on (``ui``, ``dashboard``)."""
    parser.add_argument("study", nargs="?", help="a study name or file (default: the study searched last)")
    parser.add_argument("--models", help="'tiny' for the study a tiny search made (named <study>-tiny)")


def dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    """The stores and the address of an optuna-dashboard (``dashboard``, ``prefer``)."""
    _runs_and_storage(parser)
    parser.add_argument(
        "--artifact-store",
        default=None,
        help="the media's store: a folder or s3://bucket (default: the study's, or <runs>/optuna-artifacts)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)


def _runs_and_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        type=Path,
        default=Path(os.environ.get("SOUNDING_ANAGRAMS_RUNS", "runs")),
        help="folder of the stores and render folders (default runs/)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default sqlite:///<runs>/optuna.db; PostgreSQL for many machines)",
    )


def _add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    _runs_and_storage(parser)
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store or server, e.g. http://mlflow-host:5000 (default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<runs>/mlflow.db)",
    )


def expand_render_folders(folders: Sequence[Path]) -> list[Path]:
    """A folder without config.yaml but with render folders inside stands for those folders."""
    expanded: list[Path] = []
    for folder in folders:
        inner = sorted(p.parent for p in folder.glob("*/config.yaml")) if folder.is_dir() else []
        expanded.extend(inner if inner and not (folder / "config.yaml").exists() else [folder])
    return expanded


def study_name_of(study: str, models: str | None) -> str:
    """A study file or name -> the Optuna study name (tiny searches are kept apart as <name>-tiny)."""
    name = study
    if study.endswith((".yaml", ".yml")) or Path(study).is_file():
        from sounding_anagrams.search.study import load_study

        name = load_study(study).name
    return f"{name}-tiny" if models == "tiny" and not name.endswith("-tiny") else name


def study_with_overrides(args: argparse.Namespace) -> Any:
    """The study file of ``search`` or ``prefer``, with ``--models`` and ``--device`` applied."""
    from sounding_anagrams.search.study import load_study

    study = load_study(args.study, tiny=args.models == "tiny")
    if args.models not in (None, "tiny"):
        study = dataclasses.replace(study, render=study.render.replace(**models_overrides(args.models)))
    if args.device:
        study = dataclasses.replace(study, render=study.render.replace(device=args.device))
    return study


def checked_search(args: argparse.Namespace) -> Any:
    """The study of ``search`` with its overrides, once every argument is checked (before any work)."""
    study = study_with_overrides(args)
    if args.batch is not None:
        from sounding_anagrams.search.study import check_batch

        check_batch(args.batch, study.seeds_per_trial, field="--batch")
    for flag, value, low in (
        ("--trials", args.trials, 1),
        ("--max-unet-batch", args.max_unet_batch, 2),
    ):
        if value is not None and value < low:
            raise ConfigError(flag, value, f"must be at least {low}")
    if args.minutes is not None and args.minutes <= 0:
        raise ConfigError("--minutes", args.minutes, "must be positive")
    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "must be at least 1 (worker processes on this machine)")
    return study


def run_search(args: argparse.Namespace) -> int:
    tiny = args.models == "tiny"
    study = checked_search(args)

    from sounding_anagrams.evaluation.evaluate import Scorers
    from sounding_anagrams.sampler.models import load_models_for
    from sounding_anagrams.search.loop import SearchRunner, SearchSettings
    from sounding_anagrams.search.report import leaderboard_text

    quiet_libraries()
    # The stores first: a bad --storage or an MLflow server that does not answer is said in seconds, not
    # after minutes of loading real weights.
    from sounding_anagrams.search.loop import check_stores

    check_stores(SearchSettings(runs_dir=args.runs, storage=args.storage, tracking_uri=args.tracking_uri))
    if args.artifact_store is not None:
        from sounding_anagrams.search.media import open_artifact_store

        open_artifact_store(args.artifact_store)
    render_config = study.render
    models = load_models_for(render_config)
    scorers = Scorers.load(models="tiny" if tiny else None, device=str(models.device))
    settings = SearchSettings(
        runs_dir=args.runs,
        storage=args.storage,
        trials=args.trials,
        minutes=args.minutes,
        batch=args.batch,
        progress=not args.quiet,
        max_unet_batch=args.max_unet_batch,
        tracking_uri=args.tracking_uri,
        artifact_store=args.artifact_store,
    )
    runner = SearchRunner(study, models, scorers, settings, study_name=study_name_of(study.name, args.models))

    # A plain `kill` (SIGTERM) is handled like Ctrl-C: in-flight trials are told FAIL, the MLflow run closed.
    # Either also sets the runner's stop flag, which it checks at every denoising step: a KeyboardInterrupt
    # raised inside library code that swallows it (seen on a loaded machine) still stops the search.
    def stop(signum: int, frame: Any) -> None:
        runner.stop_requested.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        summary = runner.run()
    except KeyboardInterrupt:
        print(
            f"interrupted: finished trials are kept in {runner.storage}; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    states = [o.state.name for o in summary.outcomes]
    print(
        f"\n{len(states)} trial(s) this run: "
        + ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL"))
    )
    print(leaderboard_text(runner.optuna_study, top=5))
    print(
        f"\nOptuna storage: {summary.storage}"
        f"\nMLflow: {runner.tracker.tracking_uri} (make ui RUNS={args.runs})"
        f"\nexport the best: sounding-anagrams export {args.study}{' --models tiny' if tiny else ''}"
        f" --runs {args.runs}"
    )
    return 0


def _open_study(args: argparse.Namespace) -> Any:
    if args.storage is None and not (args.runs / "optuna.db").exists():
        raise ConfigError(
            "--runs", str(args.runs), "holds no optuna.db: run a search first or pass --runs/--storage"
        )
    from sounding_anagrams.search.report import load_study_from_storage
    from sounding_anagrams.search.stores import default_storage

    storage = args.storage or default_storage(args.runs)
    name = study_name_of(args.study, args.models)
    if getattr(args, "prefer", False) and not name.endswith("-prefer"):
        name += "-prefer"
    return load_study_from_storage(name, storage)


def run_leaderboard(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ConfigError("--top", args.top, "must be at least 1 (the number of knob sets shown)")
    formats = ("table", "markdown", "csv", "json")
    if args.format not in formats:
        from sounding_anagrams.errors import unknown_name_message

        raise ConfigError("--format", args.format, unknown_name_message("format", args.format, formats))
    study = _open_study(args)
    from sounding_anagrams.search.report import leaderboard_text

    print(leaderboard_text(study, top=args.top, tracking_uri=args.tracking_uri, format=args.format))
    return 0


def run_export(args: argparse.Namespace) -> int:
    study = _open_study(args)
    from sounding_anagrams.search.prefer import export_preferred, is_preferential
    from sounding_anagrams.search.report import export_best

    out = args.out or args.runs / "exports"
    if is_preferential(study):  # `prefer`'s study: the candidates the person preferred
        written = export_preferred(study, out)
    else:
        written = export_best(study, out, cache=args.runs / "downloads", tracking_uri=args.tracking_uri)
    for path in written:
        print(f"{path}    (sounding-anagrams render --config {path})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    missing = [str(folder) for folder in args.folders if not Path(folder).is_dir()]
    if missing:  # said before the scorers load (seconds, or a download)
        raise ConfigError(
            "folders", missing[0], "not a folder: give render folders (with config.yaml) or folders of them"
        )
    from sounding_anagrams.evaluation.evaluate import Scorers, evaluate_folders, format_table

    quiet_libraries()
    scorers = Scorers.load(
        models=args.models,
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained,
        clap_model=args.clap_model,
        protocol=args.protocol,
        device=args.device,
    )
    results = evaluate_folders(expand_render_folders(args.folders), scorers)
    print(format_table(results))
    failed = [r for r in results if r.error]
    for result in failed:
        print(f"error: {result.error}", file=sys.stderr)
    if failed and len(failed) == len(results):
        return 2
    return 1 if failed else 0


def fresh_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... when it exists: default render folders never collide."""
    folder, n = base, 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    if folder != base:
        print(f"{base} exists; rendering into {folder}", file=sys.stderr)
    return folder


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
    # Another hub id ("owner/name") or pipeline folder is the image model; --audio-model sets the audio one.
    if folder.is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", models):
        return {"image_model": models}
    raise ConfigError(
        "--models",
        models,
        "must be 'tiny', 'default', a folder holding image/ and audio/ pipeline folders, or a hub id or "
        "pipeline folder for the image model (the audio model then comes from --audio-model)",
    )


def render_config_from_args(args: argparse.Namespace) -> RenderConfig:
    from sounding_anagrams.config import RenderConfig

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
    # MLflow logs its store's errors with their tracebacks before raising them; we say them in one line.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


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


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SOUNDING_ANAGRAMS_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "render":
            return run_render(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "search":
            if args.workers != 1:
                from sounding_anagrams.search.fleet import run_workers

                return run_workers(args, argv)
            return run_search(args)
        if args.command == "ui":
            from sounding_anagrams.search.fleet import run_ui

            return run_ui(args)
        if args.command == "dashboard":
            from sounding_anagrams.search.dashboard import run_dashboard

            return run_dashboard(args)
        if args.command == "prefer":
            from sounding_anagrams.search.prefer import run_prefer

            return run_prefer(args)
        if args.command == "server":
            from sounding_anagrams.search.fleet import run_server

            return run_server(args)
        if args.command == "leaderboard":
            return run_leaderboard(args)
        if args.command == "export":
            return run_export(args)
        raise AssertionError(f"unhandled command {args.command}")
    except SoundingAnagramsError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        # A full disk, a folder that cannot be written, a store that failed in use (a corrupt page read late).
        if is_disk_full(error):
            print(
                f"error: the disk is full ({one_line(error)}); what was finished is kept: free some space "
                "and run the same command",
                file=sys.stderr,
            )
            return DiskFullError.exit_code
        if isinstance(error, OSError):
            print(f"error: {error}", file=sys.stderr)
            return 1
        if database_cause(error) is not None:
            print(f"error: a store of the search failed: {one_line(error)}", file=sys.stderr)
            return StoreError.exit_code
        raise  # a bug: its traceback is what a report needs


if __name__ == "__main__":
    sys.exit(main())
