"""Checks of the stores a search uses, made before any work: a damaged database is named at once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sounding_anagrams.errors import ConfigError, database_reason, shown_url


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
