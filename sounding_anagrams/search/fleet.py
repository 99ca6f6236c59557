"""Many workers on one study: ``search --workers N`` on one machine, and ``server``, the MLflow tracking
server that workers on many machines log to.

Kept free of torch and the models: the parent of the workers only starts, watches and stops processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sounding_anagrams.commands.common import check_port, checked_search, study_name_of
from sounding_anagrams.errors import ConfigError, shown_url
from sounding_anagrams.files import MLFLOW_ARTIFACTS, MLFLOW_FILE
from sounding_anagrams.search.stopping import EXIT_INTERRUPTED
from sounding_anagrams.search.workers import is_cut_short


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (none on a machine without)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [name.strip() for name in listed.split(",") if name.strip() and name.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def worker_argv(argv: Sequence[str]) -> list[str]:
    """A worker's command line: the parent's, without ``--workers`` and with ``--quiet``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [*out, "--quiet"] if "--quiet" not in out else out


def run_workers(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``search --workers N``: N worker processes on one study, one GPU each when there are GPUs.

    Each worker is a whole search process (it asks, renders, tells, logs); they share the study through its
    storage and the MLflow store. One progress line here counts the study's finished trials. Ctrl-C (or
    SIGTERM) is passed on once to every worker, which drains as a single search does; a second one abandons.
    """
    from sounding_anagrams.search.opening import SearchSettings, check_stores

    study = checked_search(args)
    gpus = visible_gpus()
    if gpus and args.workers > len(gpus):
        raise ConfigError(
            "--workers",
            args.workers,
            f"this machine shows {len(gpus)} GPU(s) ({','.join(gpus)}): at most one worker per GPU",
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not gpus and args.workers > cores:
        raise ConfigError(
            "--workers",
            args.workers,
            f"this machine shows no GPU and {cores} CPU core(s) for this process: at most one worker per "
            "core (each worker renders on all of them; more would only wait)",
        )
    # Once here, not by each worker: an artifact store that cannot be used and a server that does not answer
    # are said before any worker starts (and the databases and tables are made).
    if args.artifact_store is not None:
        from sounding_anagrams.search.media import open_artifact_store

        open_artifact_store(args.artifact_store)
    check_stores(SearchSettings(runs_dir=args.runs, storage=args.storage, tracking_uri=args.tracking_uri))
    logs = args.runs / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "sounding_anagrams.cli", *worker_argv(argv)]
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []
    interrupted: list[int] = []

    def pass_on(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        for process, _ in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for index in range(args.workers):
        env = {**os.environ, "SOUNDING_ANAGRAMS_WORKER": str(index)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index]
        log = logs / f"{stamp}-worker-{index}.log"
        with log.open("wb") as handle:
            # Its own session: a Ctrl-C at the terminal reaches this parent only, which passes it on once.
            processes.append(
                (
                    subprocess.Popen(
                        command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    ),
                    log,
                )
            )
    where = f" on GPU {', '.join(gpus[: args.workers])}" if gpus else ""
    name = study_name_of(study.name, args.models)
    print(f"{args.workers} workers{where} on study {name}; their logs: {logs}/{stamp}-worker-*.log")
    target = args.trials if args.trials is not None else study.budget.trials
    watch_workers([p for p, _ in processes], args, target, quiet=args.quiet)
    codes = [process.wait() for process, _ in processes]
    for (process, log), code in zip(processes, codes, strict=True):
        if code not in (0, 130) or (code == 130 and not interrupted):
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            print(f"worker pid {process.pid} ended with exit code {code}; {log}:", file=sys.stderr)
            for line in tail:
                print(f"  {line}", file=sys.stderr)
    if interrupted:
        print(
            f"interrupted: every worker stopped (exit codes {codes}); finished trials are kept: run the "
            "same command to resume",
            file=sys.stderr,
        )
        return 130
    failed = [code for code in codes if code != 0]
    if failed:
        return max(failed)
    tiny = " --models tiny" if args.models == "tiny" else ""
    storage = f" --storage {shown_url(args.storage)}" if args.storage else ""
    print(
        f"all {args.workers} workers finished: sounding-anagrams leaderboard {args.study}{tiny} "
        f"--runs {args.runs}{storage}"
    )
    print_gallery(args.runs, name, args.storage)
    return 0


def print_gallery(runs: Path, name: str, storage: str | None, page: str | None = None) -> None:
    """Say where the study's gallery is, when it has been written here (and its ``page`` in MLflow's UI)."""
    from sounding_anagrams.search.gallery import find_gallery

    gallery = find_gallery(runs, name, storage)
    if gallery is not None:
        print(f"gallery, the top knob sets side by side: {gallery}", flush=True)
    if page is not None:
        print(f"  in MLflow's UI: {page}", flush=True)


def watch_workers(
    processes: Sequence[subprocess.Popen[bytes]], args: argparse.Namespace, target: int | None, *, quiet: bool
) -> None:
    """One progress line for all workers: the study's finished trials that count against the budget, read
    from its storage every second."""
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from sounding_anagrams.search.stores import default_storage, open_storage

    name = study_name_of(str(args.study), args.models)
    storage = open_storage(args.storage or default_storage(args.runs))  # made by check_stores already
    bar = tqdm(total=target, desc="trials (all workers)", unit="trial", disable=quiet)
    try:
        while any(process.poll() is None for process in processes):
            try:
                finished = optuna.load_study(study_name=name, storage=storage).get_trials(
                    deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                )
            except KeyError:  # no worker has created the study yet
                finished = []
            counted = sum(not is_cut_short(t) for t in finished)
            if counted > bar.n:
                bar.update(counted - bar.n)
            time.sleep(1)
    finally:
        bar.close()


def run_server(args: argparse.Namespace) -> int:
    """``server``: an MLflow tracking server (this process becomes it) for workers on many machines."""
    check_port(args.host, args.port, expose=args.expose)
    from sounding_anagrams.search.stores import ensure_database

    ensure_database(args.backend_store_uri, field="--backend-store-uri")
    destination = args.artifacts_destination
    if "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)
        destination = str(Path(destination).resolve())
    local = args.host in ("127.0.0.1", "localhost", "::1")
    uri = f"http://{args.host}:{args.port}" if local else f"http://<this machine's name>:{args.port}"
    print(
        f"MLflow tracking server: {uri}\n"
        f"  runs in {shown_url(args.backend_store_uri)}; artifacts in {destination}, served by the server\n"
        f"  workers: sounding-anagrams search STUDY --tracking-uri {uri} "
        "--storage postgresql+psycopg://USER@DBHOST:5432/optuna\n"
        "  Ctrl-C stops it",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        args.backend_store_uri,
        "--artifacts-destination",
        destination,
        "--serve-artifacts",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.allowed_hosts:
        command += ["--allowed-hosts", args.allowed_hosts]
    return supervise(command)


SERVER_STOP_SECONDS = 30  # a server's graceful shutdown, before it is killed


def supervise(command: list[str]) -> int:
    """Run a server (MLflow's) as a child until Ctrl-C or SIGTERM, then stop it cleanly.

    The child runs in a session of its own, so a Ctrl-C at the terminal reaches this process only (sent to
    MLflow's workers it printed a traceback each); a signal here becomes one SIGTERM to the child, whose
    shutdown is waited for. Should this process be killed outright, the child is sent SIGTERM by the kernel
    (Linux's parent-death signal), so no server is left behind. Returns the child's exit code, or 130 when
    stopped by a signal.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_terminate_with_parent)
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        if child.poll() is None:
            child.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    deadline: float | None = None
    try:
        while (code := child.poll()) is None:
            if stopped and deadline is None:
                deadline = time.monotonic() + SERVER_STOP_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                child.kill()  # it did not stop on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        print("stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return code


def _terminate_with_parent() -> None:
    """In the child, before it runs: SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes

    with contextlib.suppress(OSError):  # not Linux's libc: the parent's own stop path is all there is
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_ui(args: argparse.Namespace) -> int:
    """``ui``: print the page of a study's leaderboard, and serve MLflow's UI over a local store (this process
    becomes the server); an MLflow server (``--tracking-uri``) is its own UI."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # this process will serve the UI: its address is checked before anything else
        check_port(args.host, args.port, expose=args.expose)
    store = args.runs.resolve() / MLFLOW_FILE
    if not uri:
        if not store.is_file():
            raise ConfigError(
                "--runs", str(args.runs), "holds no mlflow.db: run a search first, or give --runs"
            )
        uri = f"sqlite:///{store}"
    from mlflow.tracking import MlflowClient

    from sounding_anagrams.search.tracking import is_server, leaderboard_url, relocated_store

    client = MlflowClient(tracking_uri=uri)
    studies = {e.name: e.experiment_id for e in client.search_experiments() if e.name != "Default"}
    if args.study:
        name = study_name_of(str(args.study), args.models)
        if name not in studies:
            from sounding_anagrams.errors import unknown_name_message

            raise ConfigError("study", name, unknown_name_message("study", name, sorted(studies)))
    else:
        last = client.search_runs(
            list(studies.values()), max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not last:
            raise ConfigError("--runs", str(args.runs), "holds no search yet: run one first")
        name = next(n for n, i in studies.items() if i == last[0].info.experiment_id)
    from sounding_anagrams.search.gallery import gallery_page

    if is_server(uri):
        print(f"study {name}: {leaderboard_url(uri, studies[name])}")
        print_gallery(args.runs, name, args.storage, gallery_page(client, uri, studies[name]))
        return 0
    ui = f"http://{args.host}:{args.port}"
    page = leaderboard_url(ui, studies[name])
    print(f"MLflow UI, study {name}: {page}\n  (store {uri}; Ctrl-C stops it)", flush=True)
    print_gallery(args.runs, name, args.storage, gallery_page(client, ui, studies[name]))
    with tempfile.TemporaryDirectory(prefix="sounding-anagrams-ui-") as scratch:
        served = uri
        if uri == f"sqlite:///{store}":
            copy = relocated_store(store, args.runs, Path(scratch))
            if copy is not None:
                print(
                    f"  ({args.runs} was moved or copied here: a copy of its store that finds the runs' "
                    "files here is served; the folder itself is not written)",
                    flush=True,
                )
                served = f"sqlite:///{copy}"
        return supervise(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                served,
                "--default-artifact-root",
                str(args.runs.resolve() / MLFLOW_ARTIFACTS),
                "--host",
                args.host,
                "--port",
                str(args.port),
                "--workers",
                "1",  # one person browsing: starts in seconds, not four processes
            ],
        )
