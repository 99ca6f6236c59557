"""Errors that the command line turns into a one-line message and an exit code, never a traceback."""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
from collections.abc import Iterable, Iterator
from typing import Any

DEBUG_VARIABLE = "SOUNDING_ANAGRAMS_DEBUG"


def debugging() -> bool:
    """Whether the person asked for tracebacks (``SOUNDING_ANAGRAMS_DEBUG=1``, or ``--debug``)."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def debugging_switched_on(on: bool) -> Iterator[None]:
    """Inside, with ``on`` (``--debug``): :func:`debugging` is true, here and in the processes started here
    (the variable is set); after, the variable is as it was (``main`` may run in a longer-lived process)."""
    before = os.environ.get(DEBUG_VARIABLE)
    if on:
        os.environ[DEBUG_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEBUG_VARIABLE, None)
        else:
            os.environ[DEBUG_VARIABLE] = before


class SoundingAnagramsError(Exception):
    """Base of every error meant for the user; the CLI prints it and exits with ``exit_code``."""

    exit_code = 2


class ConfigError(SoundingAnagramsError, ValueError):
    """A value the user gave is not allowed.

    The message names the field, the value and what is allowed, e.g.
    ``audio_weight=1.5: must be in [0, 1]``.
    """

    def __init__(self, field: str, value: Any, allowed: str, *, source: str | None = None) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{field}={value!r}: {allowed}")


class ModelLoadError(SoundingAnagramsError):
    """A model folder or checkpoint is missing or does not match what the loader expects."""

    exit_code = 3


class StoreError(SoundingAnagramsError):
    """A store failed while in use: a corrupt or full Optuna database, a server that went away."""

    exit_code = 1


class DiskFullError(SoundingAnagramsError):
    """A disk the tool writes to is full; what was finished is kept and the same command resumes."""

    exit_code = 4


def database_cause(error: BaseException) -> BaseException | None:
    """The database driver's error behind ``error`` (sqlite3, psycopg; through SQLAlchemy's and Optuna's
    wrappers), or None when no database error caused it."""
    seen: BaseException | None = error
    while seen is not None:
        driver = getattr(seen, "orig", None)  # SQLAlchemy keeps the driver's error here
        if isinstance(driver, BaseException):
            return driver
        if type(seen).__module__.split(".")[0] in ("sqlite3", "psycopg", "psycopg2"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def database_reason(error: BaseException) -> str:
    """One line saying what the database said, with a way out where there is one."""
    cause = database_cause(error) or error
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if "malformed" in reason or "not a database" in reason:
        reason += (
            " (the file is damaged: restore a copy, or rescue what is readable with "
            "`sqlite3 optuna.db .recover | sqlite3 recovered.db`)"
        )
    return reason


def shown_url(url: str) -> str:
    """A storage URL fit for messages and logs: a password in it is masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# A write that failed for want of room: the disk or the user's quota is full, or a file-size limit is hit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(error: BaseException) -> bool:
    """A full disk, said by the OS (ENOSPC, EDQUOT, EFBIG) or by a database on that disk (sqlite)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    cause = database_cause(error)
    return cause is not None and any(
        words in str(cause) for words in ("disk is full", "No space left", "could not extend file")
    )


# What a database driver says when the server went away or cannot be reached (psycopg, and sqlite's own).
CONNECTION_LOST_WORDS = (
    "connection refused",
    "server closed the connection",
    "connection failed",
    "could not connect",
    "terminating connection",
    "connection is closed",
    "connection timed out",
    "ssl syscall error",
    "consuming input failed",
    "unable to open database file",
)


def is_connection_lost(error: BaseException) -> bool:
    """The database behind ``error`` went away or cannot be reached (as opposed to refusing a statement)."""
    cause = database_cause(error)
    return cause is not None and any(words in str(cause).lower() for words in CONNECTION_LOST_WORDS)


def raise_if_connection_lost(error: BaseException) -> None:
    """Raise ``error`` again when its database went away. A best-effort step (an upload, a page) warns about
    its own failures and goes on; a storage that stopped answering stops the search instead, which says so
    once."""
    if is_connection_lost(error):
        raise error


def one_line(error: BaseException) -> str:
    """An error as one line for a message or a log: the database's own words where a database said it."""
    if database_cause(error) is not None:
        return database_reason(error)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'rotate_cw'? "`` when a close key exists, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_name_message(kind: str, name: str, available: Iterable[str]) -> str:
    """``unknown view 'rotat'; did you mean 'rotate_cw'? available: flip, identity, ...``."""
    keys = sorted(available)
    return f"unknown {kind} {name!r}; {did_you_mean(name, keys)}available: {', '.join(keys)}"
