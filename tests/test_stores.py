"""Several processes open one fresh Optuna storage at the same moment: workers started together, or a
leaderboard while a search starts. Each must get the storage, none an IntegrityError of the schema."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from sounding_anagrams.search.stores import open_storage, trial_id_of
from tests.servers import postgres_url

REPO = Path(__file__).resolve().parents[1]
OPENERS = 6

OPENER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sounding_anagrams.search.stores import open_storage

    url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():  # all openers start at once
        time.sleep(0.001)
    storage = open_storage(url)
    print(len(storage.get_all_studies()))
    """
)


def open_all_at_once(url: str, tmp_path: Path) -> list[subprocess.CompletedProcess[str]]:
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{k}" for k in range(OPENERS)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, url, str(flag), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 300  # imports on a loaded 2-core machine
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.05)
    go.touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def test_openers_started_together_share_a_fresh_sqlite_storage(tmp_path: Path):
    database = tmp_path / "optuna.db"
    results = open_all_at_once(f"sqlite:///{database}", tmp_path)
    assert [r.returncode for r in results] == [0] * OPENERS, [r.stderr[-2000:] for r in results]
    assert [r.stdout.strip() for r in results] == ["0"] * OPENERS
    with sqlalchemy.create_engine(f"sqlite:///{database}").connect() as connection:
        assert connection.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_openers_started_together_share_a_fresh_postgresql_storage(tmp_path: Path):
    admin = sqlalchemy.make_url(postgres_url())
    name = f"sa_fresh_{os.getpid()}_{time.time_ns()}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    fresh = admin.set(database=name)
    try:
        results = open_all_at_once(fresh.render_as_string(hide_password=False), tmp_path)
        assert [r.returncode for r in results] == [0] * OPENERS, [r.stderr[-2000:] for r in results]
        with sqlalchemy.create_engine(fresh).connect() as connection:
            versions = connection.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar()
        assert versions == 1
    finally:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def test_trial_id_of_finds_a_trial_by_its_study_and_number(tmp_path: Path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=False)
    first = optuna.create_study(storage=storage, study_name="first")
    first.ask()
    first.ask()
    second = optuna.create_study(storage=storage, study_name="second")
    trial = second.ask()  # number 0 of its study, the third trial of the storage
    trial_id = trial_id_of(storage, "second", trial.number)
    assert storage.get_trial(trial_id).number == 0 and trial_id != 0
    storage.set_trial_user_attr(trial_id, "seen", True)  # what the storage's per-trial methods take
    assert second.get_trials()[0].user_attrs == {"seen": True}
    with pytest.raises(KeyError):
        trial_id_of(storage, "second", 1)


@pytest.mark.parametrize("command", ["search", "leaderboard", "dashboard"])
def test_a_storage_that_is_no_url_is_one_sentence_and_leaves_nothing(command, tmp_path: Path, capsys):
    from sounding_anagrams.cli import main

    runs = tmp_path / "runs"
    study = [str(Path(__file__).resolve().parents[1] / "studies" / "rotate.yaml")]
    argv = [command, *(study if command != "dashboard" else []), "--storage", "notaurl", "--runs", str(runs)]
    assert main([*argv, *(["--models", "tiny"] if command == "search" else [])]) == 2
    said = capsys.readouterr().err.strip()
    assert said == (
        "error: --storage='notaurl': is not a database URL: write sqlite:///<folder>/optuna.db or "
        "postgresql+psycopg://<user>@<host>:5432/<database>"
    )
    assert not runs.exists()


@pytest.mark.parametrize("command", ["leaderboard", "export", "gallery", "dashboard"])
def test_a_read_only_command_on_a_missing_sqlite_file_says_so_and_makes_nothing(
    command, tmp_path: Path, capsys
):
    """A mistyped --storage is said; the commands that only read never make a folder or an empty database."""
    from sounding_anagrams.cli import main

    storage = f"sqlite:///{tmp_path / 'typo' / 'optuna.db'}"
    argv = [command, *([] if command == "dashboard" else ["rotate"]), "--storage", storage]
    assert main([*argv, "--runs", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --storage='{storage}': no such database file: run a search first (it makes one), or give "
        "the --storage it used"
    )
    assert list(tmp_path.iterdir()) == []


STORAGE_ERROR_SCRIPT = """
import sqlite3, sys
import optuna
from sounding_anagrams.search.stores import open_storage
url = sys.argv[1]
storage = open_storage(url)
study = optuna.create_study(storage=storage, study_name="broken")
trial = study.ask()
sqlite3.connect(url.removeprefix("sqlite:///")).execute("DROP TABLE trial_user_attributes")
try:
    study.get_trials()
except Exception as error:
    print(f"raised: {type(error).__name__}", file=sys.stderr)
"""


@pytest.mark.parametrize("debug", ["0", "1"])
def test_optuna_logs_a_storage_error_it_raises_only_under_debug(debug: str, tmp_path: Path):
    """Optuna logs a storage error with its SQL before raising it: the command says the raised error once;
    ``--debug`` (SOUNDING_ANAGRAMS_DEBUG=1) keeps Optuna's log too."""
    done = subprocess.run(
        [sys.executable, "-c", STORAGE_ERROR_SCRIPT, f"sqlite:///{tmp_path / 'optuna.db'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOUNDING_ANAGRAMS_DEBUG": debug},
    )
    assert "raised: StorageInternalError" in done.stderr, done.stderr
    assert ("no such table: trial_user_attributes" in done.stderr) == (debug == "1"), done.stderr
