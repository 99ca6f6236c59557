"""``dashboard``: optuna-dashboard over a search's storage and its artifact store, on loopback by default.

The page printed first is the study's best trial: its knobs, its value, and its media (the views, the
spectrogram, the clip and the sound, see :mod:`sounding_anagrams.search.media`).
"""

from __future__ import annotations

import argparse
import os

from sounding_anagrams.commands.common import check_port, study_name_of
from sounding_anagrams.errors import ConfigError, shown_url
from sounding_anagrams.search.media import STORE_ATTR, default_location, open_artifact_store


def dashboard_url(host: str, port: int, study_id: int, trial_number: int | None = None) -> str:
    """The dashboard's page of a study's trials (one trial's, with ``trial_number``)."""
    page = f"http://{host}:{port}/dashboard/studies/{study_id}/trials"
    return page if trial_number is None else f"{page}?numbers={trial_number}"


def run_dashboard(args: argparse.Namespace) -> int:
    check_port(args.host, args.port, expose=args.expose)
    if args.storage is None and not (args.runs / "optuna.db").is_file():
        raise ConfigError("--runs", str(args.runs), "holds no optuna.db: run a search first, or give --runs")

    import optuna
    from optuna.trial import TrialState

    from sounding_anagrams.search.report import load_study_from_storage
    from sounding_anagrams.search.stores import default_storage, open_storage, require_database

    storage = args.storage or default_storage(args.runs)
    require_database(storage)  # one that is no URL, or a sqlite file not there, is said (and never made)
    if args.study:
        study = load_study_from_storage(study_name_of(str(args.study), args.models), storage)
    else:
        summaries = optuna.get_all_study_summaries(storage)
        started = [s for s in summaries if s.datetime_start is not None]
        if not started:
            raise ConfigError("--runs", str(args.runs), "holds no search with a trial yet: run one first")
        last = max(started, key=lambda s: s.datetime_start)  # type: ignore[arg-type, return-value]
        study = load_study_from_storage(last.study_name, storage)
    location = args.artifact_store or study.user_attrs.get(STORE_ATTR) or default_location(args.runs)
    store = open_artifact_store(location)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = None
    if complete and len(study.directions) == 1:
        best = study.best_trial.number
    study_id = open_storage(storage, heartbeat=False).get_study_id_from_name(study.study_name)
    page = dashboard_url(args.host, args.port, study_id, best)
    what = f"best trial {best}" if best is not None else "trials"
    print(
        f"optuna-dashboard, study {study.study_name} ({what}): {page}\n"
        f"  (storage {shown_url(storage)}, media {location}; Ctrl-C stops it)",
        flush=True,
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from optuna_dashboard import run_server

    run_server(storage, host=args.host, port=args.port, artifact_store=store)
    return 0
