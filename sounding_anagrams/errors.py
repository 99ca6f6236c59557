"""Errors that the command line turns into a one-line message and an exit code, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


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


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'rotate_cw'? "`` when a close key exists, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_name_message(kind: str, name: str, available: Iterable[str]) -> str:
    """``unknown view 'rotat'; did you mean 'rotate_cw'? available: flip, identity, ...``."""
    keys = sorted(available)
    return f"unknown {kind} {name!r}; {did_you_mean(name, keys)}available: {', '.join(keys)}"
