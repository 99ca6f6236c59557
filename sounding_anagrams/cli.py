"""``sounding-anagrams``: the command line.

Bad input ends with one line naming the field, the value and what is allowed, and a non-zero exit code
(2: bad input, 3: models could not be loaded, 130: interrupted); never a traceback.

Here: one parser per command, and ``main``, which dispatches to the commands' implementations
(:mod:`sounding_anagrams.commands`, and the search modules for ``ui``, ``dashboard``, ``prefer`` and
``server``). Nothing imports this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sounding_anagrams.commands.common import finite_float
from sounding_anagrams.commands.evaluate import run_evaluate
from sounding_anagrams.commands.render import RENDER_FLAGS, run_render
from sounding_anagrams.commands.search import (
    run_confirm,
    run_export,
    run_gallery,
    run_leaderboard,
    run_search,
)
from sounding_anagrams.errors import (
    DiskFullError,
    SoundingAnagramsError,
    StoreError,
    database_cause,
    debugging,
    debugging_switched_on,
    is_disk_full,
    one_line,
)

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_SERVER_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sounding-anagrams", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an unexpected error (also SOUNDING_ANAGRAMS_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_render_parser(commands)
    add_evaluate_parser(commands)
    add_search_parser(commands)
    add_confirm_parser(commands)
    add_leaderboard_parser(commands)
    add_gallery_parser(commands)
    add_export_parser(commands)
    add_ui_parser(commands)
    add_dashboard_parser(commands)
    add_prefer_parser(commands)
    add_server_parser(commands)
    return parser


def add_render_parser(commands: Commands) -> None:
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
    for flag, (dest, kwargs) in RENDER_FLAGS.items():
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


def add_evaluate_parser(commands: Commands) -> None:
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
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def add_search_parser(commands: Commands) -> None:
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
    search.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
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
        "--no-confirm",
        dest="confirm",
        action="store_false",
        help="skip the study's confirmation stage at the end (run `sounding-anagrams confirm` later)",
    )
    search.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, all on one study: one per GPU (CUDA_VISIBLE_DEVICES), "
        "their logs under <runs>/workers/",
    )


def add_confirm_parser(commands: Commands) -> None:
    text = "render a study's top knob sets on held-out seeds, which no trial used, and name the winner"
    confirm = commands.add_parser(
        "confirm",
        help=text,
        description=text + ". A search does this at its end (the study's confirm:); this runs it again, "
        "e.g. after a search stopped by --no-confirm, or with more knob sets or seeds.",
    )
    confirm.add_argument("study", type=Path, help="the study file searched, e.g. studies/rotate.yaml")
    confirm.add_argument("--models", help="'tiny' for the study a tiny search made (named <study>-tiny)")
    confirm.add_argument("--top", type=int, default=None, help="knob sets to confirm (default: the study's)")
    confirm.add_argument("--seeds", type=int, default=None, help="held-out seeds each (default: the study's)")
    confirm.add_argument("--batch", type=int, default=None, help="renders per batched sampler call")
    _add_runs_arguments(confirm)
    confirm.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
    confirm.add_argument("--quiet", action="store_true", help="no progress bars")


def add_leaderboard_parser(commands: Commands) -> None:
    text = "print the best candidates of a study"
    leaderboard = commands.add_parser("leaderboard", help=text, description=text)
    _stored_study_arguments(leaderboard)
    leaderboard.add_argument("--top", type=int, default=10)
    leaderboard.add_argument(
        "--format",
        default="table",
        help="table (default), markdown, csv (the knob sets) or json (both tables, as numbers)",
    )
    leaderboard.add_argument(
        "--wide",
        action="store_true",
        help="every column (scores, origin, files) at full knob names, whatever the terminal's width",
    )


def add_gallery_parser(commands: Commands) -> None:
    text = "write a study's gallery: its top knob sets side by side, to look at and listen to"
    gallery = commands.add_parser(
        "gallery",
        help=text,
        description=text + ". One HTML page, gallery.html in the study's render folder, written from the "
        "stored study without rendering (a search rewrites it after each batch); prints its path.",
    )
    _stored_study_arguments(gallery)
    gallery.add_argument("--top", type=int, default=8, help="knob sets shown (default 8)")


def add_export_parser(commands: Commands) -> None:
    text = "write the best config (the Pareto set for several objectives)"
    export = commands.add_parser("export", help=text, description=text)
    _stored_study_arguments(export)
    export.add_argument(
        "--out", type=Path, default=None, help="folder for the configs (default <runs>/exports)"
    )
    export.add_argument(
        "--prefer", action="store_true", help="the candidates a person preferred in `prefer`'s study"
    )


def add_ui_parser(commands: Commands) -> None:
    ui = commands.add_parser(
        "ui",
        help="MLflow's UI over a search's store, opened on a study's leaderboard",
        description="Serve MLflow's UI over the store under --runs (loopback only by default) and print the "
        "page of a study's leaderboard: its trials sorted by objective, with their scores and knobs. With an "
        "MLflow server (--tracking-uri), print that page of the server.",
    )
    _study_page_arguments(ui)
    _add_runs_arguments(ui)
    _address_arguments(ui, 5000)


def add_dashboard_parser(commands: Commands) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="optuna-dashboard over a search's storage, with each trial's pictures, clip and sound",
        description="Serve optuna-dashboard (loopback only by default) over the Optuna storage under --runs "
        "(or --storage) and the study's artifact store, and print the page of the study's best trial: its "
        "views, spectrogram and clip shown, its sound played.",
    )
    _study_page_arguments(dashboard)
    dashboard_arguments(dashboard)


def add_prefer_parser(commands: Commands) -> None:
    prefer = commands.add_parser(
        "prefer",
        help="a person steers: compare candidates in optuna-dashboard, a preferential GP proposes the next",
        description="Run a preferential study over a study file's space: --candidates candidates at a time "
        "are rendered and shown side by side in optuna-dashboard (each one's captioned clip: its views under "
        "their prompts, the turn, its spectrogram while its sound plays, its knobs); the person clicks the "
        "worst, and optuna-dashboard's preferential GP sampler proposes the next knob set from every choice "
        "so far. Each candidate is logged to MLflow, in the prefer study's experiment. Ctrl-C or SIGTERM "
        "fails the candidates not yet shown (exit 130). Needs the [prefer] extra (BoTorch).",
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
    _tracking_uri_argument(prefer)
    prefer.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the study's)")
    prefer.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard here")
    prefer.add_argument("--quiet", action="store_true", help="no progress bars")


def add_server_parser(commands: Commands) -> None:
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
    _address_arguments(server, 5000, host_help="address to bind (0.0.0.0 for a cluster, with --expose)")
    server.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host headers the server accepts, comma-separated (MLflow's; needed when workers reach it "
        "by a cluster name, e.g. mlflow.cluster.local:5000)",
    )


def _address_arguments(
    parser: argparse.ArgumentParser, port: int, *, host_help: str = "address to bind (default 127.0.0.1)"
) -> None:
    """Where a command serves its page (``ui``, ``server``, ``dashboard``, ``prefer``): loopback unless
    ``--expose`` (:func:`~sounding_anagrams.commands.common.check_port`)."""
    parser.add_argument("--host", default="127.0.0.1", help=host_help)
    parser.add_argument(
        "--expose",
        action="store_true",
        help="allow a --host beyond this machine (no authentication: see the README)",
    )
    parser.add_argument("--port", type=int, default=port)


def _stored_study_arguments(parser: argparse.ArgumentParser) -> None:
    """A study a search stored (``leaderboard``, ``gallery``, ``export``)."""
    parser.add_argument("study", help="a study name, or its study file (studies/rotate.yaml)")
    parser.add_argument("--models", help="'tiny' for the study a tiny search made (named <study>-tiny)")
    _add_runs_arguments(parser)


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
    _address_arguments(parser, 8080)


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
    _tracking_uri_argument(parser)


def _tracking_uri_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store or server, e.g. http://mlflow-host:5000 (default $MLFLOW_TRACKING_URI, else "
        "sqlite:///<runs>/mlflow.db)",
    )


# An error nobody foresaw (a bug): sysexits' EX_SOFTWARE.
UNEXPECTED_EXIT = 70


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SOUNDING_ANAGRAMS_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with debugging_switched_on(args.debug):
        return run_command(args, argv)


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed command; every error a user can cause ends here in one line and an exit code."""
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
        if args.command == "confirm":
            return run_confirm(args)
        if args.command == "leaderboard":
            return run_leaderboard(args)
        if args.command == "gallery":
            return run_gallery(args)
        if args.command == "export":
            return run_export(args)
        raise AssertionError(f"unhandled command {args.command}")
    except SoundingAnagramsError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`leaderboard | head`): nothing more to say to it, and nothing to say about it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
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
            where = f" {error.filename}" if error.filename else ""
            print(
                f"error: could not use{where}: {error.strerror or error}; check the place's permissions and "
                "disk, or choose another place",
                file=sys.stderr,
            )
            return 1
        if database_cause(error) is not None:
            print(f"error: a store of the search failed: {one_line(error)}", file=sys.stderr)
            return StoreError.exit_code
        if debugging():
            raise  # its traceback, for a report
        print(
            f"error: an unexpected error ({type(error).__name__}: {one_line(error)}): a bug of "
            "sounding-anagrams; run the same "
            "command with --debug (sounding-anagrams --debug ...) for its traceback, and report it",
            file=sys.stderr,
        )
        return UNEXPECTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
