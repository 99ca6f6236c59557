"""A trial's pictures, clip and sound as Optuna artifacts, so that optuna-dashboard's trial page shows the
views and the spectrogram, plays the clip and plays the sound.

Optuna attaches an artifact to a trial through the trial's system attributes, which a finished trial no longer
takes: the media are uploaded while the trial runs, after its files are written and before it is told. The
store lies next to the study's storage (``<runs>/optuna-artifacts`` for the local SQLite file); a study shared
by machines needs a store they all reach: a shared folder, or ``s3://bucket`` (the ``[s3]`` extra).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from sounding_anagrams.errors import ConfigError, one_line, raise_if_connection_lost
from sounding_anagrams.files import CLIP_FILE

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

ARTIFACTS_FOLDER = "optuna-artifacts"
# The study attribute naming its artifact store, read by `dashboard` and `prefer`.
STORE_ATTR = "artifact_store"
MIMETYPES = {".png": "image/png", ".wav": "audio/wav", ".mp4": "video/mp4"}


class ArtifactStore(Protocol):
    """What ``upload_artifact`` and optuna-dashboard ask of an artifact store, which Optuna's folder and S3
    stores are. Written here because Optuna's own protocol is private (``optuna.artifacts._protocol``)."""

    def open_reader(self, artifact_id: str) -> BinaryIO: ...

    def write(self, artifact_id: str, content_body: BinaryIO) -> None: ...

    def remove(self, artifact_id: str) -> None: ...


def default_location(runs_dir: Path) -> str:
    return str((runs_dir / ARTIFACTS_FOLDER).resolve())


def open_artifact_store(location: str, *, field: str = "--artifact-store") -> ArtifactStore:
    """Optuna's store for ``location``: a folder (made if missing) or ``s3://bucket`` (boto3's usual
    credentials; ``AWS_ENDPOINT_URL`` for MinIO)."""
    from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore

    if location.startswith("s3://"):
        bucket = location.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(field, location, "must be s3://<bucket> (Optuna's S3 store takes no prefix)")
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise ConfigError(field, location, "needs boto3: pip install 'sounding-anagrams[s3]'") from None
        return Boto3ArtifactStore(bucket)
    if "://" in location:
        raise ConfigError(field, location, "must be a folder or s3://<bucket>")
    folder = Path(location)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(field, location, f"cannot be made: {error.strerror or error}") from None
    return FileSystemArtifactStore(str(folder))


def media_files(folder: Path) -> dict[str, Path]:
    """The media of one render folder, by name, in the order a person looks at them: the views, the
    spectrogram, the clip, the sounds."""
    files = {path.stem: path for path in sorted(folder.glob("view*.png"))}
    if (folder / "spectrogram.png").is_file():
        files["spectrogram"] = folder / "spectrogram.png"
    if (folder / CLIP_FILE).is_file():
        files["clip"] = folder / CLIP_FILE
    files.update({path.stem: path for path in sorted(folder.glob("audio*.wav"))})
    return files


def upload_media(store: ArtifactStore, trial: optuna.Trial, folder: Path) -> dict[str, str]:
    """Upload the media of ``folder`` as artifacts of the running ``trial``; returns name -> artifact id
    (Optuna keeps the ids and file names: ``optuna.artifacts.get_all_artifact_meta``). The dashboard is a
    view of the files: an upload that fails is logged, and the trial is judged either way (unless the Optuna
    storage stopped answering: that is raised)."""
    from optuna.artifacts import upload_artifact

    uploaded: dict[str, str] = {}
    try:
        for name, path in media_files(folder).items():
            uploaded[name] = upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype=MIMETYPES[path.suffix],
            )
    except Exception as error:
        raise_if_connection_lost(error)  # (the ids go into the Optuna storage)
        logger.warning(
            "trial %d: its media were not uploaded to the dashboard's store: %s",
            trial.number,
            one_line(error),
        )
    return uploaded
