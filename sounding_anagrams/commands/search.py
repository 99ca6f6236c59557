"""``search`` (one process; ``--workers`` is :mod:`sounding_anagrams.search.fleet`), ``leaderboard``,
``gallery`` and ``export``: a study's search, and what it found."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sounding_anagrams.commands.common import checked_search, quiet_libraries, study_name_of
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.files import check_writable


def run_search(args: argparse.Namespace) -> int:
    tiny = args.models == "tiny"
    study = checked_search(args)

    from sounding_anagrams.evaluation.evaluate import Scorers
    from sounding_anagrams.sampler.models import load_models_for
    from sounding_anagrams.search.gallery import GALLERY_FILE
    from sounding_anagrams.search.loop import SearchRunner
    from sounding_anagrams.search.opening import SearchSettings, check_stores
    from sounding_anagrams.search.report import leaderboard_text
    from sounding_anagrams.search.stopping import StopReason, stop_on_signals

    quiet_libraries()
    # The stores first: a bad --artifact-store or --storage, or an MLflow server that does not answer, is said
    # in seconds, not after minutes of loading real weights (and before --runs is made).
    if args.artifact_store is not None:
        from sounding_anagrams.search.media import open_artifact_store

        open_artifact_store(args.artifact_store)
    check_stores(SearchSettings(runs_dir=args.runs, storage=args.storage, tracking_uri=args.tracking_uri))
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
        confirm=args.confirm,
    )
    runner = SearchRunner.open(
        study, models, scorers, settings, study_name=study_name_of(study.name, args.models)
    )
    # Ctrl-C and a plain `kill` (SIGTERM) only set the runner's stop flags, which it checks at every denoising
    # step and wait: the search drains, or on a second signal abandons, through its one stop path.
    with stop_on_signals(runner.stop_request):
        summary = runner.run()
    if summary.stopped_by is StopReason.INTERRUPTED:
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
    print(leaderboard_text(runner.optuna_study, top=5, width=terminal_width()))
    print(
        f"\nOptuna storage: {summary.storage}"
        f"\nMLflow: {runner.tracker.tracking_uri} (make ui RUNS={args.runs})"
        f"\nexport the best: sounding-anagrams export {args.study}{' --models tiny' if tiny else ''}"
        f" --runs {args.runs}"
    )
    gallery = runner.render_root / GALLERY_FILE
    if gallery.is_file():
        print(f"gallery, the top knob sets side by side: {gallery}")
    return 0


def run_confirm(args: argparse.Namespace) -> int:
    """``confirm``: the stored study's top knob sets rendered on held-out seeds, then the leaderboard."""
    import dataclasses
    import time

    from optuna.trial import TrialState

    from sounding_anagrams.commands.common import study_with_overrides
    from sounding_anagrams.search.study import Confirm

    study = study_with_overrides(args)
    for flag, value, low in (("--top", args.top, 1), ("--seeds", args.seeds, 2), ("--batch", args.batch, 1)):
        if value is not None and value < low:
            raise ConfigError(flag, value, f"must be at least {low}")
    spec = study.confirm or Confirm()
    spec = Confirm(top=args.top or spec.top, seeds=args.seeds or spec.seeds)
    study = dataclasses.replace(study, confirm=spec)
    name = study_name_of(study.name, args.models)
    stored = _open_study(argparse.Namespace(**{**vars(args), "study": name, "models": None}))
    if not stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError("study", name, "has no completed trial to confirm yet: run its search first")

    from sounding_anagrams.evaluation.evaluate import Scorers
    from sounding_anagrams.sampler.models import load_models_for
    from sounding_anagrams.search.confirmation import confirm_top
    from sounding_anagrams.search.opening import SearchSettings, check_stores, open_search
    from sounding_anagrams.search.report import leaderboard_text

    quiet_libraries()
    settings = SearchSettings(
        runs_dir=args.runs, storage=args.storage, tracking_uri=args.tracking_uri, progress=not args.quiet
    )
    check_stores(settings)
    opened = open_search(study, settings, name)
    models = load_models_for(study.render)
    scorers = Scorers.load(models="tiny" if args.models == "tiny" else None, device=str(models.device))
    opened.tracker.start_parent(
        f"confirm {time.strftime('%Y-%m-%d %H:%M:%S')}",
        {"top": spec.top, "held_out_seeds": spec.seeds},
        {"confirmation": "true"},
    )
    try:
        made = confirm_top(
            study,
            opened.optuna_study,
            opened.url,
            models,
            scorers,
            opened.tracker,
            opened.render_root,
            batch=args.batch or study.batch,
            progress=not args.quiet,
        )
    except BaseException:
        opened.tracker.end_parent("KILLED")
        raise
    opened.tracker.end_parent()
    already = "" if made else " (the top ones were confirmed already)"
    print(f"confirmed {len(made)} knob set(s) on {spec.seeds} held-out seeds{already}")
    print(leaderboard_text(opened.optuna_study, top=max(5, spec.top), width=terminal_width()))
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

    print(
        leaderboard_text(
            study,
            top=args.top,
            tracking_uri=args.tracking_uri,
            runs_dir=args.runs,
            format=args.format,
            width=terminal_width(),
            wide=args.wide,
        )
    )
    return 0


def terminal_width() -> int:
    """The terminal's columns; 100 when the output is no terminal (a pipe, a file): ``COLUMNS`` first, as
    :func:`shutil.get_terminal_size` reads it."""
    import shutil

    from sounding_anagrams.search.report import TERMINAL_WIDTH

    return shutil.get_terminal_size((TERMINAL_WIDTH, 24)).columns


def run_gallery(args: argparse.Namespace) -> int:
    """``gallery``: the stored study's gallery written (or refreshed) from its trials' files, no rendering;
    prints its path."""
    if args.top < 1:
        raise ConfigError("--top", args.top, "must be at least 1 (the number of knob sets shown)")
    study = _open_study(args)
    from sounding_anagrams.search.gallery import write_gallery
    from sounding_anagrams.search.locations import study_render_root

    root = study_render_root(study, args.runs)
    if root is None:
        raise ConfigError(
            "--runs",
            str(args.runs),
            f"holds no render folder of study {study.study_name} (were its trials rendered on another "
            "machine? give the --runs they wrote to)",
        )
    # (an archive mounted read-only: said before anything is drawn)
    check_writable(root, "--runs", "the gallery is written beside the renders: use a copy you can write")
    print(f"gallery of study {study.study_name}: {write_gallery(study, root, top=args.top)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    study = _open_study(args)
    from sounding_anagrams.search.prefer import export_preferred, is_preferential
    from sounding_anagrams.search.report import export_best
    from sounding_anagrams.search.stores import default_storage, open_storage

    out = args.out or args.runs / "exports"
    check_writable(out, "--out")
    storage = open_storage(args.storage or default_storage(args.runs), heartbeat=False)
    if is_preferential(storage, study.study_name):  # `prefer`'s study: the candidates the person preferred
        written, left_out = export_preferred(study, storage, out)
        for line in left_out:  # every candidate not exported, and why
            print(line, file=sys.stderr)
    else:
        written = export_best(
            study, out, cache=args.runs / "downloads", tracking_uri=args.tracking_uri, runs_dir=args.runs
        )
    for path in written:
        print(f"{path}    (sounding-anagrams render --config {path})")
    return 0
