"""Hostile study and config files are refused in bounded time and memory: nesting, alias bombs, size."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.files import MAX_YAML_BYTES, MAX_YAML_DEPTH, read_yaml_mapping

REPO = Path(__file__).resolve().parents[1]
ROTATE = (REPO / "studies" / "rotate.yaml").read_text()


def alias_bomb(levels: int = 9) -> str:
    """A value of 10**levels strings, written in a few hundred bytes (each anchor repeats the last ten
    times)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]" for k in range(1, levels + 1)]
    return "\n".join(lines)


def bomb_in_a_start_point() -> str:
    """The shipped rotate study with the bomb as a start point's knob value."""
    bomb = alias_bomb().replace("\n", "\n  ")
    return f"{ROTATE}\nbombs:\n  {bomb}\nstart_points:\n  - {{audio_weight: *a9}}\n"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("name: deep\nrender: " + "[" * 5000 + "]" * 5000, f"is nested more than {MAX_YAML_DEPTH} lists"),
        (alias_bomb(), "holds more than 100,000 values once its aliases (*name) are expanded"),
        (bomb_in_a_start_point(), "holds more than 100,000 values once its aliases (*name) are expanded"),
        ("name: big\n" + "#" * (MAX_YAML_BYTES + 1), "bytes, more than the 1,048,576 a config or study file"),
    ],
    ids=["nested", "alias-bomb", "bomb-in-a-start-point", "too-large"],
)
def test_a_hostile_file_is_refused_at_once(text: str, said: str, tmp_path: Path):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as raised:
        read_yaml_mapping(path, "study")
    assert said in str(raised.value) and str(raised.value).startswith(f"study='{path}'")
    assert time.monotonic() - started < 10


def test_an_ordinary_file_with_aliases_still_reads(tmp_path: Path):
    path = tmp_path / "study.yaml"
    inside = MAX_YAML_DEPTH - 1  # the file's own mapping is the first level
    path.write_text("weights: &w [0.3, 0.7]\nagain: *w\nnested: " + "[" * inside + "]" * inside)
    data = read_yaml_mapping(path, "study")
    assert data["again"] == [0.3, 0.7]
    assert yaml.safe_dump(data)


def _cap_memory() -> None:
    cap = 1536 * 2**20  # 1.5 GiB of address space: a bomb expanded would need far more
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@pytest.mark.slow
def test_search_refuses_a_bomb_within_a_memory_cap(tmp_path: Path):
    """As a user runs it: `search` on a study whose start point is an alias bomb answers in one sentence and
    exit code 2, within 1.5 GiB of memory, and makes nothing under --runs."""
    study = tmp_path / "bomb.yaml"
    study.write_text(bomb_in_a_start_point())
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "sounding_anagrams.cli", "search", str(study), "--models", "tiny"]
    done = subprocess.run(
        [*command, "--runs", str(runs)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_cap_memory,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "holds more than 100,000 values" in done.stderr
    assert not runs.exists()
