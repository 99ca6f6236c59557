"""Bad files wherever a file is read, and writes that fail: one sentence naming the file, an exit code, and
nothing finished lost. Real files throughout: garbage bytes, cut-off YAML, folders, damaged sqlite pages."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from sounding_anagrams.cli import main
from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError, database_reason, is_disk_full
from sounding_anagrams.render import Decoded, write_render_folder
from sounding_anagrams.search.study import load_study

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "rotate.yaml"


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each way a YAML file can be bad -> (the file, what the one-line message must say)."""
    rng = random.Random(0)
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, content: bytes | None, says: str) -> None:
        path = folder / f"{name}.yaml"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        cases[name] = (path, says)

    case("binary", bytes(rng.randrange(256) for _ in range(4000)), "is a binary file (a NUL byte at offset")
    case("latin1", "name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 9)")
    case("empty", b"", "is empty")
    case("blank", b"  \n\n", "is empty")
    case("folder", None, "is a folder, not a file")
    case(
        "comments",
        b"# nothing but a note\n",
        "must be a mapping of 'field: value' lines, but it holds nothing",
    )
    case("scalar", b"rotate\n", "must be a mapping of 'field: value' lines, but it holds a str")
    case("listed", b"- views\n- space\n", "but it holds a list")
    # A file cut off mid-way (a copy interrupted): an unclosed flow list.
    cut = STUDY.read_bytes()
    cut = cut[: cut.index(b"[") + 8]
    case("truncated", cut, "is not valid YAML at line")
    return cases


@pytest.mark.parametrize(
    "kind", ["binary", "latin1", "empty", "blank", "folder", "comments", "scalar", "listed", "truncated"]
)
def test_a_bad_study_file_or_render_config_is_one_sentence_and_exit_2(kind: str, tmp_path: Path, capsys):
    path, says = _bad_files(tmp_path)[kind]
    for argv, field in (
        (["search", str(path), "--models", "tiny", "--runs", str(tmp_path / "runs")], "study"),
        (["render", "--config", str(path), "--models", "tiny", "--out", str(tmp_path / "out")], "--config"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {field}='{path}': ") and says in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs" / "optuna.db").exists()


def test_load_study_refuses_a_truncated_study_at_its_line(tmp_path: Path):
    path, _ = _bad_files(tmp_path)["truncated"]
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+, column \d+: "):
        load_study(path)


def _study_database(path: Path, trials: int = 30) -> None:
    """A real Optuna sqlite file of a finished study, big enough to span many pages."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="rotate-tiny", storage=f"sqlite:///{path}", direction="maximize")
    for _ in range(trials):
        trial = study.ask()
        trial.suggest_float("audio_weight", 0.0, 1.0)
        trial.set_user_attr("note", "x" * 2000)
        study.tell(trial, 0.5)


def _damage_pages(path: Path, first_fraction: float) -> None:
    """Scribble over the pages from ``first_fraction`` of the file on, keeping the sqlite header intact."""
    data = bytearray(path.read_bytes())
    page = sqlite3.connect(path).execute("pragma page_size").fetchone()[0]
    rng = random.Random(1)
    pages = len(data) // page
    for number in range(max(1, int(pages * first_fraction)), pages):
        for offset in range(number * page, (number + 1) * page, 5):
            data[offset] = rng.randrange(256)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "pages from the middle", "the last pages"])
def test_a_damaged_optuna_database_is_named_with_a_way_out(damage: str, tmp_path: Path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    database = runs / "optuna.db"
    if damage == "garbage":
        database.write_bytes(os.urandom(8192))
    else:
        _study_database(database)
        _damage_pages(database, 0.5 if damage == "pages from the middle" else 0.9)
    before = database.read_bytes()

    import sounding_anagrams.sampler.models as models_module

    def never(*args, **kwargs):
        raise AssertionError("models were loaded before the storage was checked")

    monkeypatch.setattr(models_module, "load_models", never)
    for argv in (
        ["leaderboard", "rotate", "--models", "tiny", "--runs", str(runs)],
        ["export", "rotate", "--models", "tiny", "--runs", str(runs)],
        ["search", str(STUDY), "--models", "tiny", "--runs", str(runs)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot open this Optuna storage: " in err and str(database) in err, err
        assert "malformed" in err or "not a database" in err
        assert "sqlite3 optuna.db .recover" in err  # the way out
        assert err.count("\n") == 1 and "Traceback" not in err and "[SQL:" not in err
    assert database.read_bytes() == before  # a damaged database is never written to


def test_database_errors_are_read_through_optunas_and_sqlalchemys_wrappers(tmp_path: Path):
    database = tmp_path / "optuna.db"
    _study_database(database, trials=10)
    _damage_pages(database, 0.3)
    with pytest.raises(Exception) as raised:
        _ = optuna.load_study(study_name="rotate-tiny", storage=f"sqlite:///{database}").trials
    reason = database_reason(raised.value)
    assert reason.startswith(("database disk image is malformed", "file is not a database")), reason
    assert "\n" not in reason and not is_disk_full(raised.value)
    full = sqlite3.OperationalError("database or disk is full")
    try:
        raise RuntimeError("commit failed") from full
    except RuntimeError as error:
        assert is_disk_full(error) and database_reason(error) == "database or disk is full"
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def _decoded() -> Decoded:
    rng = torch.Generator().manual_seed(0)
    pictures = [torch.rand(3, 64, 128, generator=rng) for _ in range(2)]
    return Decoded(pictures, torch.rand(64, 120, generator=rng), [np.zeros(800, np.float32)])


def test_a_render_folder_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch):
    import sounding_anagrams.render as render_module

    config = RenderConfig(height=64, width=128, crop_right=8)
    folder = tmp_path / "trial-0000" / "seed-0"

    def full_disk(path, wave, rate):
        Path(path).write_bytes(b"RIFF....")  # a few bytes got out before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(render_module, "write_wav", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_render_folder(folder, config, _decoded(), {"seed": 0})
    assert list(tmp_path.rglob("*")) == [tmp_path / "trial-0000"]  # no half-written file, no partial folder
    monkeypatch.undo()

    files = write_render_folder(folder, config, _decoded(), {"seed": 0})
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in files.values())
    assert [p.name for p in tmp_path.rglob("*.partial")] == []
    written = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="holds a finished render"):
        write_render_folder(folder, config.replace(seed=1), _decoded(), {"seed": 1})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == written
