"""What the loaders and the search share about paths (``sounding_anagrams.files``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sounding_anagrams.files import folder_bytes


def test_folder_bytes_counts_the_regular_files_once_and_no_links(tmp_path: Path):
    trial = tmp_path / "trial-0000"
    (trial / "seed-0").mkdir(parents=True)
    (trial / "seed-0" / "view0.png").write_bytes(b"x" * 1000)
    (trial / "card.html").write_bytes(b"y" * 24)
    # MLflow's artifact folder links the trial's folder and a file: neither counts again.
    (tmp_path / "mlartifacts").mkdir()
    (tmp_path / "mlartifacts" / "trial").symlink_to(trial, target_is_directory=True)
    (tmp_path / "mlartifacts" / "card.html").symlink_to(trial / "card.html")
    assert folder_bytes(trial) == 1024
    assert folder_bytes(tmp_path) == 1024
    assert folder_bytes(tmp_path / "mlartifacts") == 0
    assert folder_bytes(tmp_path / "nowhere") == 0


def test_folder_bytes_leaves_out_a_file_removed_while_it_counts(tmp_path: Path, monkeypatch):
    (tmp_path / "kept").write_bytes(b"k" * 10)
    (tmp_path / "removed").write_bytes(b"r" * 99)
    lstat = Path.lstat

    def cleaned_up_meanwhile(path: Path) -> os.stat_result:
        if path.name == "removed":
            path.unlink()
        return lstat(path)

    monkeypatch.setattr(Path, "lstat", cleaned_up_meanwhile)
    assert folder_bytes(tmp_path) == 10
    with pytest.raises(FileNotFoundError):  # the stand-in really removed it
        lstat(tmp_path / "removed")
