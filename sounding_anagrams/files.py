"""Reading the files a user hands the tool: each way a file can be bad becomes one sentence naming it.

A study file, a ``config.yaml`` given to ``render --config`` or found by ``evaluate``, and a PNG of a render
folder may be missing, a folder, empty, binary, cut short or not what they claim. The readers here turn each
of those into a :class:`ConfigError` (``<field>='<path>': <what is wrong>``), never a traceback.

Also what the loaders and the search share about paths: whether a model name is a folder, a folder's size.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from sounding_anagrams.errors import ConfigError

CLIP_FILE = "transition.mp4"  # a render's clip: its views turning while its sound plays
MLFLOW_FILE = "mlflow.db"  # the default MLflow store, in the runs folder
MLFLOW_ARTIFACTS = "mlartifacts"  # that store's artifacts, in the runs folder
# Limits of a config or study file (they are a few kilobytes): a hostile file is refused in bounded time and
# memory, before anything is built from it.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32  # lists and mappings inside each other
MAX_YAML_NODES = 100_000  # values, counting every alias as the values it repeats


def read_text(path: Path, field: str, *, hint: str = "", limit: int | None = None) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable, binary, empty or (over ``limit`` bytes) too large
    file is a ConfigError."""
    try:
        if limit is not None and path.is_file() and path.stat().st_size > limit:
            raise ConfigError(
                field,
                str(path),
                f"is {path.stat().st_size:,} bytes, more than the {limit:,} a config or study file may be",
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(field, str(path), f"no such file{hint}") from None
    except IsADirectoryError:
        raise ConfigError(field, str(path), "is a folder, not a file") from None
    except OSError as error:  # no permission, an I/O error of the disk
        raise ConfigError(field, str(path), f"cannot be read: {error.strerror or error}") from None
    if b"\x00" in raw:
        raise ConfigError(
            field, str(path), f"is a binary file (a NUL byte at offset {raw.index(0)}), not text"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            field, str(path), f"is not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start})"
        ) from None
    if not text.strip():
        raise ConfigError(field, str(path), "is empty")
    return text


def read_yaml_mapping(path: Path, field: str, *, hint: str = "") -> Mapping[str, Any]:
    """A YAML file that must hold a mapping of ``field: value``; anything else is a ConfigError."""
    text = read_text(path, field, hint=hint, limit=MAX_YAML_BYTES)
    try:
        check_yaml_size(text, field, str(path))
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(field, str(path), f"is not valid YAML{where}: {problem}") from None
    if not isinstance(data, Mapping):
        held = "nothing but comments" if data is None else f"a {type(data).__name__}"
        raise ConfigError(field, str(path), f"must be a mapping of 'field: value' lines, but it holds {held}")
    return data


def check_yaml_size(text: str, field: str, where: str) -> None:
    """Refuse YAML nested deeper than :data:`MAX_YAML_DEPTH` or holding more than :data:`MAX_YAML_NODES`
    values once its aliases are expanded (a "billion laughs" file), from its event stream: nothing is built,
    nothing recurses, and an alias costs its anchor's size without being copied."""
    sizes: dict[str, int] = {}  # anchor -> the values its node holds, expanded
    open_counts: list[list[Any]] = [[None, 0]]  # per open collection: its anchor, the values in it so far
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            open_counts[-1][1] += sizes.get(event.anchor or "", 1)
        elif isinstance(event, yaml.ScalarEvent):
            open_counts[-1][1] += 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            open_counts.append([event.anchor, 1])
            if len(open_counts) - 1 > MAX_YAML_DEPTH:
                raise ConfigError(
                    field, where, f"is nested more than {MAX_YAML_DEPTH} lists or mappings deep"
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, count = open_counts.pop()
            if anchor:
                sizes[anchor] = count
            open_counts[-1][1] += count
        if sum(count for _, count in open_counts) > MAX_YAML_NODES:  # every value so far, expanded
            raise ConfigError(
                field,
                where,
                f"holds more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded: refused",
            )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a full disk never leaves half a file behind. The file
    gets the mode any new file gets here (0644 under the usual umask), not the temporary file's 0600: an
    MLflow server or a colleague on a shared disk reads it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def writable_folder(path: Path, field: str) -> Path:
    """``path`` as a folder this process can write in, made if missing; a file in its place, or a folder
    that cannot be made or written (no permission, a read-only disk), is a :class:`ConfigError` saying so."""
    if path.exists() and not path.is_dir():
        raise ConfigError(field, str(path), "is a file, not a folder: give a folder (it is made if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(
            field,
            str(path),
            f"cannot be written ({error.strerror or error}): give a folder you can write in, e.g. on another "
            "disk",
        ) from None
    return path


def check_writable(path: Path, field: str, advice: str = "give another folder") -> None:
    """Refuse a folder that could not be written (no permission, a read-only disk) before any work, without
    making or writing anything: ``path`` itself if it exists, else the nearest folder above it."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(field, str(path), f"{existing} is a file, not a folder: give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            field,
            str(path),
            f"{existing} cannot be written (read-only, or no permission): {advice}",
        )


def machine_lock(path: Path, scope: str = "") -> FileLock:
    """A lock every process of this machine shares for ``path`` (by its resolved path) and ``scope``, its
    file kept in the temporary folder (``$TMPDIR/sounding-anagrams-locks-<uid>/``), not beside ``path``: a
    clean exit leaves no lock file in the user's folders."""
    folder = Path(tempfile.gettempdir()) / f"sounding-anagrams-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    key = hashlib.sha256(f"{path.resolve()}\0{scope}".encode()).hexdigest()[:32]
    return FileLock(str(folder / f"{key}.lock"))


@cache
def current_umask() -> int:
    """The process's umask, read once (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def looks_like_path(name: str) -> bool:
    """Whether a model name is a folder rather than a hub id (``owner/name``): an existing path, a leading
    '/', '.' or '~', more than one slash, or a backslash."""
    return (
        Path(name).expanduser().exists()
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def folder_bytes(folder: Path) -> int:
    """The bytes of the regular files under ``folder``.

    Links count nothing (MLflow links a trial's folder; following it would count the files twice), and a file
    removed while the folder is walked (another worker cleaning up) is left out rather than raising.
    """
    total = 0
    for path in folder.rglob("*"):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total
