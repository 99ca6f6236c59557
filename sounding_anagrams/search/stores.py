"""The Optuna storage a search uses: opened one process at a time, checked before any work."""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock

from sounding_anagrams.errors import ConfigError, database_reason, shown_url

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 300
# A PostgreSQL advisory-lock key of this project's own: who opens an Optuna storage holds it meanwhile.
POSTGRES_SCHEMA_LOCK = 7_310_522_108


def check_sqlite_file(url: str) -> None:
    """Refuse a sqlite storage whose file is damaged (``PRAGMA quick_check``), before it is used.

    Opening a damaged file succeeds and so may the first reads; the damage would surface mid-search, after the
    models loaded and with trials in flight. A missing or empty file is fine: the storage creates it.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    path = Path(parsed.database)
    if not path.is_file() or path.stat().st_size == 0:
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
def schema_lock(url: str) -> Iterator[None]:
    """Held while an Optuna storage is opened: the first opener creates its tables (and alembic's version
    row), and two openers at the same moment (workers started together, a leaderboard while a search starts)
    would both insert it (``UNIQUE constraint failed: alembic_version.version_num``).

    sqlite: a lock file beside the database file (``optuna.db.lock``), so every process on the machine
    shares it, whatever its ``--runs``. PostgreSQL: a session advisory lock on the server, shared by every
    machine. Other databases: none.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        with FileLock(f"{Path(parsed.database).resolve()}.lock"):
            yield
    elif backend == "postgresql":
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": POSTGRES_SCHEMA_LOCK})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": POSTGRES_SCHEMA_LOCK})
        finally:
            engine.dispose()
    else:
        yield


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage (sqlite for one machine, PostgreSQL for many) with heartbeats for killed workers,
    opened under :func:`schema_lock`."""
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Heartbeats are "experimental" in Optuna; so are the stale-trial checks and plots that use them.
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    try:
        with schema_lock(url):
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS
            )
    except Exception as error:  # sqlalchemy raises many kinds; the user needs the URL and the reason
        raise ConfigError(
            "--storage", shown_url(url), f"cannot open this Optuna storage: {database_reason(error)}"
        ) from None
