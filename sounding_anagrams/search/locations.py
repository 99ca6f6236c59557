"""Where a study's files are, seen from this machine: its trials' render folders (where they were written, or
under a runs folder that was moved or copied since, an archive), and the MLflow store and runs to download
them from when they are elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from sounding_anagrams.errors import SoundingAnagramsError, one_line, shown_url
from sounding_anagrams.files import MLFLOW_FILE
from sounding_anagrams.search.stores import sqlite_file, trial_record
from sounding_anagrams.search.tracking import is_server, run_link


def tracking_uri_of(
    study: optuna.Study, given: str | None = None, runs_dir: Path | None = None
) -> str | None:
    """The MLflow store the study's trials were logged to: ``given`` (``--tracking-uri``), else
    ``MLFLOW_TRACKING_URI``, else the one the search recorded on the study; a recorded sqlite file that is
    not here is ``<runs_dir>/mlflow.db`` when the runs folder was moved or copied (an archive)."""
    chosen = given or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return chosen
    recorded = study.user_attrs.get("tracking_uri")
    written = sqlite_file(recorded) if recorded else None
    moved = runs_dir / MLFLOW_FILE if runs_dir is not None else None
    if written is not None and not written.is_file() and moved is not None and moved.is_file():
        return f"sqlite:///{moved.resolve()}"
    return recorded


def study_render_root(study: optuna.Study, runs_dir: Path | None) -> Path | None:
    """The study's render root on this machine: the folder its trial folders are in, or the folder under
    ``<runs>/renders`` whose ``.study`` file names the study (see ``opening.claim_render_root``; the runs
    folder was moved or copied). None when neither is here (the trials were rendered on other machines)."""
    uid = str(study.user_attrs.get("uid") or "")
    recorded = [
        Path(str(t.user_attrs["trial_folder"])).parent
        for t in study.get_trials(deepcopy=False)
        if "trial_folder" in t.user_attrs
    ][:1]
    moved = sorted(p.parent for p in (runs_dir / "renders").glob("*/.study")) if runs_dir is not None else []
    for root in [*recorded, *moved]:
        marker = root / ".study"
        if uid and marker.is_file() and marker.read_text(encoding="utf-8").strip() == uid:
            return root
    return None


def found_here(recorded: str | None, render_root: Path | None) -> Path | None:
    """A trial's recorded folder (``<root>/trial-NNNN`` or one of its ``seed-<k>``) on this machine: where it
    was written, else at the same place under ``render_root`` (a moved or copied runs folder); None when
    neither is here."""
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_dir():
        return path
    parts = path.parts
    starts = [i for i, part in enumerate(parts) if part.startswith("trial-")]
    if render_root is None or not starts:
        return None
    moved = render_root.joinpath(*parts[starts[-1] :])
    return moved if moved.is_dir() else None


def seed_folders(trial: FrozenTrial) -> list[str]:
    """A trial's render folders, one per seed rendered: ``<trial_folder>/seed-<k>`` (older studies listed
    them as ``render_folders``); none for a trial without a folder."""
    attrs = trial.user_attrs
    if "render_folders" in attrs:
        return list(attrs["render_folders"])
    if "trial_folder" not in attrs:
        return []
    rendered = len(trial_record(trial, "seed_values") or attrs.get("seeds", []))
    return [str(Path(attrs["trial_folder"]) / f"seed-{k}") for k in range(rendered)]


def trial_location(
    study: optuna.Study,
    trial: FrozenTrial,
    seed_index: int | None = None,
    *,
    tracking_uri: str | None = None,
    render_root: Path | None = None,
) -> str:
    """Where a person finds a trial's (or one seed's) files from this machine: its folder when it is here
    (:func:`found_here`), else its run's page on the MLflow server, else its artifact URI."""
    attrs = trial.user_attrs
    folders = seed_folders(trial)
    local: str | None
    if seed_index is not None and seed_index < len(folders):
        local = folders[seed_index]
    else:
        local = attrs.get("trial_folder", attrs.get("render_folder"))
    here = found_here(local, render_root)
    if here is not None:
        return str(here)
    run_id, uri = attrs.get("mlflow_run_id"), tracking_uri_of(study, tracking_uri)
    inside = f" (seed-{seed_index}/)" if seed_index is not None else ""
    if run_id and uri and is_server(uri) and study.user_attrs.get("mlflow_experiment_id"):
        return run_link(uri, study.user_attrs["mlflow_experiment_id"], run_id) + inside
    artifact_uri = trial_record(trial, "artifact_uri")
    if artifact_uri:
        return str(artifact_uri) + inside
    return str(local or "-")


def render_files(
    study: optuna.Study,
    trial: FrozenTrial,
    seed_index: int,
    cache: Path,
    *,
    tracking_uri: str | None = None,
    render_root: Path | None = None,
) -> Path:
    """A render folder of a trial on this machine: its own folder if it is here (:func:`found_here`), else
    downloaded once from the trial's MLflow run (``<cache>/<run id>/seed-<k>``), so any machine can export and
    re-render it."""
    attrs = trial.user_attrs
    folders = seed_folders(trial) or [attrs.get("render_folder", "")]
    recorded = str(folders[seed_index]) if seed_index < len(folders) else ""
    local = found_here(recorded, render_root) or Path(recorded)
    if (local / "config.yaml").is_file():
        return local
    run_id, uri = attrs.get("mlflow_run_id"), tracking_uri_of(study, tracking_uri)
    if not run_id or not uri:
        raise SoundingAnagramsError(
            f"trial {trial.number}: its render folder {local} is not on this machine and the trial names no "
            "MLflow run to download it from (a search older than runs on a tracking server?)"
        )
    missing = sqlite_file(uri)
    if missing is not None and not missing.is_file():  # (MLflow would make an empty one there)
        raise SoundingAnagramsError(
            f"trial {trial.number}: its render folder {local} is not on this machine, nor the MLflow store "
            f"{missing} it was logged to: give the --runs that holds them (or --tracking-uri)"
        )
    target = cache / str(run_id) / f"seed-{seed_index}"
    if not (target / "config.yaml").is_file():
        import mlflow.artifacts

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.artifacts.download_artifacts(
                run_id=str(run_id), artifact_path=target.name, dst_path=str(target.parent), tracking_uri=uri
            )
        except Exception as error:  # the server's and the store's many kinds; the user needs the where
            raise SoundingAnagramsError(
                f"trial {trial.number}: its render folder {local} is not on this machine and downloading "
                f"{target.name}/ of MLflow run {run_id} from {shown_url(uri)} failed: {one_line(error)}"
            ) from None
    if not (target / "config.yaml").is_file():
        raise SoundingAnagramsError(
            f"trial {trial.number}: MLflow run {run_id} at {shown_url(uri)} holds no "
            f"{target.name}/config.yaml"
        )
    return target


# Score columns of the leaderboard, first these (when present), then the others.
