"""The Optuna storage a search uses: opened one process at a time, checked before any work."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna

from sounding_anagrams.errors import ConfigError, database_reason, debugging, shown_url
from sounding_anagrams.files import machine_lock

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 300
# The first key of this project's PostgreSQL advisory locks (two 32-bit keys: this one and the scope's).
POSTGRES_LOCK_KEY = 731_052_210


def default_storage(runs_dir: Path) -> str:
    """The Optuna storage of a search without ``--storage``: a sqlite file under its ``--runs``."""
    return f"sqlite:///{runs_dir.resolve() / 'optuna.db'}"


def storage_url(url: str) -> Any:
    """``url`` parsed as SQLAlchemy's URL; one that is none is a :class:`ConfigError` saying how one reads."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        raise ConfigError(
            "--storage",
            url,
            "is not a database URL: write sqlite:///<folder>/optuna.db or "
            "postgresql+psycopg://<user>@<host>:5432/<database>",
        ) from None


def sqlite_file(url: str) -> Path | None:
    """The file of a sqlite URL (an Optuna storage or an MLflow store); None for another database."""
    parsed = storage_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def require_database(url: str) -> None:
    """For a command that only reads a study (``leaderboard``, ``export``, ``gallery``, ``dashboard``): a
    sqlite file that is not there is said, never made (opening it would create an empty database)."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        raise ConfigError(
            "--storage",
            shown_url(url),
            "no such database file: run a search first (it makes one), or give the --storage it used",
        )


def check_sqlite_file(url: str) -> None:
    """Refuse a sqlite storage whose file is damaged (``PRAGMA quick_check``), before it is used.

    Opening a damaged file succeeds and so may the first reads; the damage would surface mid-search, after the
    models loaded and with trials in flight. A missing or empty file is fine: the storage creates it.
    """
    path = sqlite_file(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as error:
        problems = [database_reason(error)]
    if problems != ["ok"]:
        reason = database_reason(sqlite3.DatabaseError(f"database disk image is malformed: {problems[0]}"))
        raise ConfigError("--storage", shown_url(url), f"cannot open this Optuna storage: {reason}")


@contextlib.contextmanager
def storage_lock(url: str, scope: str = "") -> Iterator[None]:
    """A lock every process using the storage at ``url`` shares, one per ``scope`` ("" for the schema).

    sqlite: a lock of the database file's (:func:`~sounding_anagrams.files.machine_lock`), so every process
    on the machine shares it, whatever its ``--runs``. PostgreSQL: a session advisory lock on the
    server (this project's key and the scope's CRC-32), shared by every machine. Other databases: none.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    parsed = storage_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database and has_shared_lock(url):
        with machine_lock(Path(parsed.database), scope):
            yield
    elif backend == "postgresql":
        keys = {"project": POSTGRES_LOCK_KEY, "scope": zlib.crc32(scope.encode()) - 2**31}
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:project, :scope)"), keys)
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:project, :scope)"), keys)
        finally:
            engine.dispose()
    else:
        yield


def schema_lock(url: str) -> contextlib.AbstractContextManager[None]:
    """Held while an Optuna storage is opened: the first opener creates its tables (and alembic's version
    row), and two openers at the same moment (workers started together, a leaderboard while a search starts)
    would both insert it (``UNIQUE constraint failed: alembic_version.version_num``)."""
    return storage_lock(url)


def has_shared_lock(url: str) -> bool:
    """Whether :func:`storage_lock` really excludes other processes for this storage (sqlite on a file,
    PostgreSQL); other databases get no lock."""
    parsed = storage_url(url)
    backend = parsed.get_backend_name()
    return backend == "postgresql" or (
        backend == "sqlite" and bool(parsed.database) and parsed.database != ":memory:"
    )


def ask_lock(url: str, study_name: str) -> contextlib.AbstractContextManager[None]:
    """Held by a worker while it counts a study's trials and asks new ones: workers on many machines then
    never ask more trials than the budget has left."""
    return storage_lock(url, f"ask:{study_name}")


def ensure_database(url: str, *, field: str) -> None:
    """Create the PostgreSQL database ``url`` names if the server says it does not exist (a first worker, a
    first server on a fresh PostgreSQL), and say so. Anything else is left to the store's own opening, which
    says what is wrong."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    parsed = storage_url(url)
    if parsed.get_backend_name() != "postgresql" or not parsed.database:
        return
    engine = create_engine(parsed, poolclass=NullPool)
    try:
        engine.connect().close()
        return
    except Exception as error:
        if "does not exist" not in str(error):
            return
    finally:
        engine.dispose()
    admin = create_engine(parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    keys = {"project": POSTGRES_LOCK_KEY, "scope": zlib.crc32(b"create database") - 2**31}
    try:
        with admin.connect() as connection:
            # Workers started together all find it missing: one creates it, the others then see it.
            connection.execute(text("SELECT pg_advisory_lock(:project, :scope)"), keys)
            found = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            ).first()
            if found is None:
                connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
            connection.execute(text("SELECT pg_advisory_unlock(:project, :scope)"), keys)
    except Exception as error:
        raise ConfigError(
            field,
            shown_url(url),
            f"database {parsed.database!r} does not exist and could not be created: {database_reason(error)}",
        ) from None
    finally:
        admin.dispose()
    if found is None:
        print(f"created PostgreSQL database {parsed.database!r} on {parsed.host}", file=sys.stderr)


def trial_id_of(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of study ``study_name``: the key of the storage's per-trial
    methods (``get_trial``, ``record_heartbeat``, ``set_trial_state_values``, ...), found through the
    storage's public look-ups (Optuna keeps ``trial._trial_id`` and ``study._storage`` private)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


class StorageErrorsSaidOnce(logging.Filter):
    """Optuna logs a storage error, SQL statement and all, just before it raises it; the command says the
    raised error once, in one sentence (``--debug`` keeps Optuna's log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Caught an error from sqlalchemy")


def say_storage_errors_once() -> None:
    """Put :class:`StorageErrorsSaidOnce` on the handlers of Optuna's logger (once), unless debugging."""
    if debugging():
        return
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, StorageErrorsSaidOnce) for f in handler.filters):
            handler.addFilter(StorageErrorsSaidOnce())


def open_storage(
    url: str,
    *,
    on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    heartbeat: bool = True,
) -> optuna.storages.RDBStorage:
    """An RDB storage (sqlite for one machine, PostgreSQL for many) with heartbeats for killed workers,
    opened under :func:`schema_lock`. ``on_stale_trial`` is called with each trial whose heartbeats stopped,
    once it is failed (Optuna's ``heartbeat_stale_trial_callback``). Without ``heartbeat`` (a preferential
    study, whose trials wait for a person), no trial is ever stale."""
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Heartbeats are "experimental" in Optuna; so are the stale-trial checks and plots that use them.
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    say_storage_errors_once()
    try:
        with schema_lock(url):
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_SECONDS if heartbeat else None,
                grace_period=GRACE_SECONDS if heartbeat else None,
                heartbeat_stale_trial_callback=on_stale_trial if heartbeat else None,
            )
    except Exception as error:  # sqlalchemy raises many kinds; the user needs the URL and the reason
        raise ConfigError(
            "--storage", shown_url(url), f"cannot open this Optuna storage: {database_reason(error)}"
        ) from None


# A trial's long records, kept as Optuna system attributes, which no client lists: optuna-dashboard's trial
# page showed each user attribute on one line, and these made it 3,726 px wide. Short facts (seeds, best seed,
# folders, MLflow run) stay user attributes, where a person reads them.
TRIAL_RECORDS = ("scores", "seed_values", "seed_scores", "artifact_uri")


def trial_record(trial: optuna.trial.FrozenTrial, key: str) -> Any:
    """A trial's record ``key`` (one of :data:`TRIAL_RECORDS`): its system attribute, else the user attribute
    a study recorded before kept it in; ``None`` when neither."""
    return trial.system_attrs.get(key, trial.user_attrs.get(key))
