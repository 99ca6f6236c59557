"""What several commands share: ``--models`` and ``--device`` applied to a config or study file, the study
name a search is kept under, the checks of ``search``'s arguments, and quiet libraries.

Below both ``cli.py`` and the search modules that implement commands (``dashboard``, ``prefer``, ``ui``,
``server``, ``search --workers``), so that none of them imports the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.hub import AUFFUSION_ID, SD15_ID, TINY_MODELS

if TYPE_CHECKING:
    from sounding_anagrams.search.study import StudyConfig


def finite_float(text: str) -> float:
    """An argparse type: a number that is neither NaN nor infinite (argparse's own ``float`` takes both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, but got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, but got {text!r}")
    return value


def check_port(host: str, port: int, *, expose: bool = False) -> None:
    """A port to serve on: a TCP port, and free on ``host`` now, so that a busy one is said before any work
    (a server started on it would fail in a log line, after the work). A ``host`` beyond loopback serves
    without authentication to whoever reaches the machine: refused unless ``expose`` (``--expose``), and then
    said in a warning with how to add authentication."""
    import socket

    if not 1 <= port <= 65535:
        raise ConfigError("--port", port, "must be a TCP port, 1 to 65535")
    if not is_loopback(host):
        if not expose:
            raise ConfigError(
                "--host",
                host,
                "would serve beyond this machine with no authentication: add --expose if that is meant "
                "(default 127.0.0.1, this machine only)",
            )
        print(
            f"warning: serving on {host}:{port} with no authentication: whoever reaches this machine can "
            "read (and for MLflow, write) the study; add authentication in front of it: MLflow's "
            "`mlflow server --app-name basic-auth`, or a reverse proxy with a password (e.g. nginx "
            "auth_basic) for the dashboard",
            file=sys.stderr,
            flush=True,
        )
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError("--host", host, f"is no address to serve on ({error.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as error:
            raise ConfigError(
                "--port",
                port,
                f"is in use on {host} ({error.strerror}): stop what serves there, or give another --port",
            ) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to stay here
        return False


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


def study_name_of(study: str, models: str | None) -> str:
    """A study file or name -> the Optuna study name (tiny searches are kept apart as <name>-tiny)."""
    name = study
    if study.endswith((".yaml", ".yml")) or Path(study).is_file():
        from sounding_anagrams.search.study import load_study

        name = load_study(study).name
    return f"{name}-tiny" if models == "tiny" and not name.endswith("-tiny") else name


def study_with_overrides(args: argparse.Namespace) -> StudyConfig:
    """The study file of ``search`` or ``prefer``, with ``--models`` and ``--device`` applied."""
    from sounding_anagrams.search.study import load_study

    study = load_study(args.study, tiny=args.models == "tiny")
    if args.models not in (None, "tiny"):
        study = dataclasses.replace(study, render=study.render.replace(**models_overrides(args.models)))
    if args.device:
        study = dataclasses.replace(study, render=study.render.replace(device=args.device))
    return study


def checked_search(args: argparse.Namespace) -> StudyConfig:
    """The study of ``search`` with its overrides, once every argument is checked (before any work)."""
    study = study_with_overrides(args)
    if args.batch is not None:
        from sounding_anagrams.search.study import check_batch

        unit = "seeds_per_round" if study.races else "seeds_per_trial"
        check_batch(args.batch, study.seeds_per_round, field="--batch", unit=unit)
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
