"""Opening a search: its stores checked, its Optuna study created or resumed, its render root and MLflow
experiment claimed. Everything here runs once per invocation, before any batch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, SoundingAnagramsError, shown_url
from sounding_anagrams.files import machine_lock, writable_folder
from sounding_anagrams.search.lifecycle import retry_dead_workers_trial
from sounding_anagrams.search.media import STORE_ATTR, default_location, open_artifact_store
from sounding_anagrams.search.samplers import make_pruner, make_sampler
from sounding_anagrams.search.stores import (
    check_sqlite_file,
    default_storage,
    ensure_database,
    open_storage,
    storage_url,
)
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.tracking import Tracker, default_tracking_uri, objective_metrics

logger = logging.getLogger(__name__)
# Score columns of the leaderboard view in MLflow's UI, beside the objective(s) and the searched knobs.
LEADERBOARD_SCORES = ("clip/alignment", "clip/concealment", "clap/audio0")
# The study's definition (what makes two runs one experiment): whole as a study system attribute, its
# fingerprint as a user attribute.
DEFINITION_ATTR = "definition"


@dataclass
class SearchSettings:
    runs_dir: Path
    storage: str | None = None
    trials: int | None = None
    minutes: float | None = None
    batch: int | None = None
    progress: bool = True
    tracking_uri: str | None = None
    # Optuna's artifact store of the trials' media (optuna-dashboard): default <runs>/optuna-artifacts.
    artifact_store: str | None = None
    max_unet_batch: int | None = None
    # Judge and publish batch k while batch k+1 is sampled; False runs them in series (for measurements).
    overlap: bool = True
    # Run the study's confirmation stage once the budget is spent (False: `sounding-anagrams confirm` later).
    confirm: bool = True

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage(self.runs_dir)


@dataclass
class OpenedSearch:
    """The stores of one search invocation, opened: what every stage works against."""

    study: StudyConfig
    settings: SearchSettings
    name: str  # the Optuna study's name (``<name>-tiny`` for tiny models)
    storage: RDBStorage
    optuna_study: optuna.Study
    artifact_store: Any  # Optuna's artifact store of the trials' media
    render_root: Path  # <runs>/renders/<name>
    tracker: Tracker

    @property
    def url(self) -> str:
        return self.settings.storage_url

    @cached_property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.name)

    def trial_id(self, number: int) -> int:
        """The storage's id of trial ``number`` (as :func:`stores.trial_id_of`, the study's id looked up
        once)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def trial_folder(self, number: int) -> Path:
        return self.render_root / f"trial-{number:04d}"

    def render_folder(self, number: int, seed_index: int) -> Path:
        """One render of a trial: ``<runs>/renders/<study>/trial-0007/seed-2`` (its seed in config.yaml)."""
        return self.trial_folder(number) / f"seed-{seed_index}"


def check_stores(settings: SearchSettings) -> None:
    """Open the Optuna storage and reach the MLflow store before any model loads; refuse to start if not.

    The search refuses rather than running with Optuna alone: MLflow is where a person looks and listens, and
    a trial logged nowhere browsable would have to be logged again by hand.
    """
    storage_url(settings.storage_url)  # a --storage that is no URL is refused before anything is made
    writable_folder(settings.runs_dir, "--runs")
    with machine_lock(settings.runs_dir, "optuna"):
        check_sqlite_file(settings.storage_url)
        ensure_database(settings.storage_url, field="--storage")
        open_storage(settings.storage_url)
    uri = settings.tracking_uri or default_tracking_uri(settings.runs_dir)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(
                "--tracking-uri" if settings.tracking_uri else "MLFLOW_TRACKING_URI",
                uri,
                f"no MLflow server answers there ({type(error).__name__}); start it (sounding-anagrams "
                "server) or leave out --tracking-uri and MLFLOW_TRACKING_URI for the store under --runs",
            ) from None


def open_search(study: StudyConfig, settings: SearchSettings, name: str | None = None) -> OpenedSearch:
    """Create or resume the study (by ``name``, default the study file's) and open every store it uses.

    Creating the tables and the study is done by one process at a time (workers start together). The process
    that creates the study samples from the study's seed; a resumed run or a second worker gets its own
    stream, else it would propose the very same candidates again.
    """
    name = name or study.name
    url = settings.storage_url
    # Optuna warns at each ask that heartbeats are meant for study.optimize; this search sends them itself.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed", category=UserWarning)
    writable_folder(settings.runs_dir, "--runs")
    with machine_lock(settings.runs_dir, "optuna"):
        storage = open_storage(url, on_stale_trial=retry_dead_workers_trial)
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        seed = (
            study.seed if name not in existing else (hash((study.seed, time.time_ns(), os.getpid())) % 2**31)
        )
        optuna_study = optuna.create_study(
            study_name=name,
            storage=storage,
            load_if_exists=True,
            directions=study.directions,
            sampler=make_sampler(study, seed),
            pruner=make_pruner(study),
        )
        if name not in existing and study.sampler != "grid":
            # Trial 0 is the hand-tuned baseline, then the study's start points: the search starts from what
            # a person would try first and can only improve on it. (A grid visits its own points.)
            for index, point in enumerate(study.start_points):
                label = "baseline" if study.baseline and index == 0 else f"start point {index}"
                optuna_study.enqueue_trial(dict(point), user_attrs={"start_point": label})
    check_directions(optuna_study, study, url)
    # optuna-dashboard, the `optuna` CLI and trials_dataframe() name each objective by its expression.
    optuna_study.set_metric_names(study.objective_names)
    check_definition(optuna_study, study, url, storage)
    for key, value in {
        "study_file": study.source,
        "runs_dir": str(settings.runs_dir.resolve()),
        "objectives": [o.spec for o in study.objectives],
        "seeds_per_trial": study.seeds_per_trial,
        "aggregate": study.aggregate,
        "seeds": study.seeds,
    }.items():
        optuna_study.set_user_attr(key, value)
    artifact_store = open_media_store(optuna_study, settings)
    render_root = claim_render_root(settings.runs_dir, name, optuna_study)
    tracker = Tracker(settings.runs_dir, name, tracking_uri=settings.tracking_uri)
    # Where every worker's trials are browsed and downloaded from (leaderboard, export, on any machine).
    optuna_study.set_user_attr("tracking_uri", shown_url(tracker.tracking_uri))
    optuna_study.set_user_attr("mlflow_experiment_id", tracker.experiment_id)
    metrics = list(objective_metrics([0.0] * len(study.objectives), study.objective_names))
    tracker.set_leaderboard_view(
        [
            *(f"metrics.`{metric}`" for metric in metrics),
            *(f"metrics.`{metrics[0]}/{end}`" for end in ("min", "max")),
            *(f"metrics.`{score}`" for score in LEADERBOARD_SCORES),
            *(f"params.`{param.name}`" for param in study.space),
            "tags.`state`",
        ],
        order_by=metrics[0],
        ascending=study.directions[0] == "minimize",
    )
    return OpenedSearch(study, settings, name, storage, optuna_study, artifact_store, render_root, tracker)


def check_directions(optuna_study: optuna.Study, study: StudyConfig, url: str) -> None:
    wanted = [
        optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
        for d in study.directions
    ]
    if list(optuna_study.directions) != wanted:
        raise ConfigError(
            "objectives",
            [o.spec for o in study.objectives],
            f"study {optuna_study.study_name!r} in {url} was created with "
            f"{len(optuna_study.directions)} objective(s) of other directions; give the study a new "
            "name or use another --runs folder",
            source=study.source,
        )


def study_definition(study: StudyConfig) -> dict[str, Any]:
    """What makes two runs the same experiment (JSON): fixed render fields, objectives, space, seeds."""
    render = study.render.to_dict()
    return {
        **{name: render[name] for name in RenderConfig.SHARED_FIELDS if name not in ("device", "dtype")},
        "objectives": [o.spec for o in study.objectives],
        "space": [
            {
                "name": p.name,
                "type": p.type,
                "low": p.low,
                "high": p.high,
                "step": p.step,
                "log": p.log,
                "choices": list(p.choices),
            }
            for p in study.space
        ],
        "seeds_per_trial": study.seeds_per_trial,
        "aggregate": study.aggregate,
        "seed": study.seed,
        "seeds": study.seeds,
    }


def definition_fingerprint(definition: dict[str, Any]) -> str:
    """A short, stable name of a study definition: ``sha256:`` and 12 hex digits of its canonical JSON."""
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def check_definition(
    optuna_study: optuna.Study, study: StudyConfig, url: str, storage: optuna.storages.BaseStorage
) -> None:
    """Refuse to add this study file's trials to a stored study of the same name defined otherwise.

    What defines a study (the fixed render fields, objectives, space, seeds and aggregate) is recorded when
    it is created; budget, batch, sampler and pruner may change between runs.
    """
    definition = study_definition(study)
    study_id = storage.get_study_id_from_name(optuna_study.study_name)
    stored = storage.get_study_system_attrs(study_id).get(DEFINITION_ATTR)
    if stored is None and isinstance(optuna_study.user_attrs.get(DEFINITION_ATTR), dict):
        stored = optuna_study.user_attrs[DEFINITION_ATTR]  # recorded as a user attribute before
    if stored is None:
        # The whole definition where no client shows it; a short fingerprint where every client does
        # (`optuna studies` printed rows of 1,500 characters with the whole of it).
        storage.set_study_system_attr(study_id, DEFINITION_ATTR, definition)
        optuna_study.set_user_attr(DEFINITION_ATTR, definition_fingerprint(definition))
        return
    stored = {"seeds": "independent", **stored}  # recorded before `seeds:` existed: each trial had its own
    differs = sorted(key for key in {*stored, *definition} if stored.get(key) != definition.get(key))
    if differs:
        shown = "; ".join(
            f"{key}: {stored.get(key)!r} there, {definition.get(key)!r} here" for key in differs
        )
        raise ConfigError(
            "name",
            optuna_study.study_name,
            f"a study of this name in {url} was made from another study file ({shown}); its trials would mix "
            "two experiments: give this study another name, or use another --runs or --storage",
            source=study.source,
        )


def open_media_store(optuna_study: optuna.Study, settings: SearchSettings) -> Any:
    """The store of the trials' media, named on the study for `dashboard` (the first worker's choice stands:
    a worker given another store says so)."""
    location = settings.artifact_store or default_location(settings.runs_dir)
    store = open_artifact_store(location)
    recorded = optuna_study.user_attrs.get(STORE_ATTR)
    if recorded is None:
        optuna_study.set_user_attr(STORE_ATTR, location)
    elif recorded != location:
        logger.warning(
            "study %s keeps its media in %s; this worker's go to %s, which `dashboard` does not read",
            optuna_study.study_name,
            recorded,
            location,
        )
    return store


def claim_render_root(runs_dir: Path, name: str, study: optuna.Study) -> Path:
    """The folder of this study's render folders under ``runs_dir``: ``renders/<name>``, unless another study
    of that name (another storage sharing this --runs) holds it; then ``renders/<name>-<id>``. A ``.study``
    file in the folder says whose it is, so no finished render of another study is ever written over."""
    uid = study.user_attrs.get("uid")
    if uid is None:
        uid = uuid.uuid4().hex
        study.set_user_attr("uid", uid)
    renders = runs_dir / "renders"
    with machine_lock(runs_dir, "renders"):
        for root in (renders / name, renders / f"{name}-{uid[:12]}"):
            marker = root / ".study"
            if marker.exists() and marker.read_text(encoding="utf-8").strip() == uid:
                return root
            if not root.exists() or not any(root.iterdir()):
                root.mkdir(parents=True, exist_ok=True)
                marker.write_text(uid + "\n", encoding="utf-8")
                return root
    raise SoundingAnagramsError(
        f"{renders / name}-{uid[:12]} belongs to another study; remove it or use another --runs"
    )
