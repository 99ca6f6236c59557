"""`sounding-anagrams evaluate` on real render folders with the tiny judges; broken folders do not stop it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sounding_anagrams.cli import main
from sounding_anagrams.sampler.audio import read_wav, write_wav

FAST = ["--models", "tiny", "--device", "cpu", "--steps", "2", "--image-start-step", "1", "--quiet"]


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    assert main(["render", *FAST, "--num-seeds", "3", "--out", str(root / "batch")]) == 0
    return root / "batch"


@pytest.mark.slow
def test_evaluate_scores_folders_writes_scores_json_and_summarises(renders: Path, tmp_path: Path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(renders / "seed0", broken)
    (broken / "audio0.wav").unlink()
    resampled = tmp_path / "resampled"
    shutil.copytree(renders / "seed1", resampled)
    wave, _ = read_wav(resampled / "audio0.wav")
    write_wav(resampled / "audio0.wav", wave, 22050)

    code = main(
        ["evaluate", "--models", "tiny", "--device", "cpu", str(renders), str(broken), str(resampled)]
    )
    captured = capsys.readouterr()
    assert code == 1  # some folders could not be scored; the others were
    assert "missing audio0.wav (1 audio prompts in config.yaml)" in captured.err
    assert "audio0.wav is 22050 Hz; renders are 16000 Hz" in captured.err
    for seed in (0, 1, 2):
        scores = json.loads((renders / f"seed{seed}" / "scores.json").read_text())
        assert set(scores["scores"]) == {
            "clip/view0",
            "clip/view1",
            "clip/alignment",
            "clip/concealment",
            "clap/audio0",
        }
        assert all(np.isfinite(v) for v in scores["scores"].values())
        assert scores["judges"] == {"clip": "tiny", "clap": "tiny", "protocol": "windowed"}
    assert not (broken / "scores.json").exists()
    for label in ("mean ± 95% CI", "p90 (best-of-N)", "p95 (best-of-N)"):
        assert label in captured.out
    assert "ERROR" in captured.out


@pytest.mark.slow
def test_evaluate_gives_the_same_scores_twice_and_whole_protocol_differs(renders: Path, capsys):
    assert main(["evaluate", "--models", "tiny", "--device", "cpu", str(renders / "seed2")]) == 0
    first = (renders / "seed2" / "scores.json").read_text()
    assert main(["evaluate", "--models", "tiny", "--device", "cpu", str(renders / "seed2")]) == 0
    assert (renders / "seed2" / "scores.json").read_text() == first
    assert (
        main(
            ["evaluate", "--models", "tiny", "--device", "cpu", "--protocol", "whole", str(renders / "seed2")]
        )
        == 0
    )
    whole = json.loads((renders / "seed2" / "scores.json").read_text())
    assert whole["judges"]["protocol"] == "whole"
    assert whole["scores"]["clip/view0"] != json.loads(first)["scores"]["clip/view0"]
    capsys.readouterr()


def test_evaluate_bad_input(tmp_path: Path, capsys):
    assert main(["evaluate", "--models", "tiny", "--protocol", "windowd", str(tmp_path)]) == 2
    assert "unknown protocol 'windowd'; did you mean 'windowed'?" in capsys.readouterr().err
    assert main(["evaluate", "--models", "tiny", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_truncated_wav_is_an_error_not_a_score_and_spares_the_good_folders(
    renders: Path, tmp_path: Path, capsys
):
    good, broken, empty = (tmp_path / name for name in ("good", "broken", "empty"))
    for folder in (good, broken, empty):
        shutil.copytree(renders / "seed0", folder)
        (folder / "scores.json").unlink(missing_ok=True)  # scored by an earlier test of this module
    wav = broken / "audio0.wav"
    wav.write_bytes(wav.read_bytes()[: len(wav.read_bytes()) // 2 + 1])  # cut mid-sample
    (empty / "audio0.wav").write_bytes((renders / "seed0" / "audio0.wav").read_bytes()[:44])  # header only
    assert main(["evaluate", "--models", "tiny", str(good), str(broken), str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"wav file='{wav}': is truncated: its header announces 158720 frames but the file holds" in err
    assert f"wav file='{empty / 'audio0.wav'}': is truncated" in err or "holds no samples" in err
    assert "Traceback" not in err
    assert (good / "scores.json").exists()
    assert not (broken / "scores.json").exists() and not (empty / "scores.json").exists()


@pytest.mark.slow
def test_bad_configs_and_pictures_are_named_their_stale_scores_set_aside_and_the_good_scored(
    renders: Path, tmp_path: Path, capsys
):
    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(renders / "seed0", folder)
        (folder / "scores.json").write_text('{"scores": {"clip/view0": 0.99}}\n')  # scored before it broke
        return folder

    good = copy("good")
    (good / "scores.json").unlink()
    broken = {
        "binary config": copy("binary-config"),
        "empty config": copy("empty-config"),
        "config folder": copy("config-folder"),
        "truncated png": copy("truncated-png"),
        "not an image": copy("not-an-image"),
        "jpeg": copy("jpeg"),
        "resized": copy("resized"),
    }
    (broken["binary config"] / "config.yaml").write_bytes(bytes(range(256)) * 4)
    (broken["empty config"] / "config.yaml").write_bytes(b"")
    (broken["config folder"] / "config.yaml").unlink()
    (broken["config folder"] / "config.yaml").mkdir()
    png = (broken["truncated png"] / "view1.png").read_bytes()
    (broken["truncated png"] / "view1.png").write_bytes(png[: len(png) // 2])
    (broken["not an image"] / "view0.png").write_bytes(b"\x89PNG but not really " * 50)
    picture = Image.open(renders / "seed0" / "view0.png")
    picture.convert("RGB").save(broken["jpeg"] / "view0.png", format="JPEG")
    picture.resize((picture.width // 2, picture.height // 2)).save(broken["resized"] / "view0.png")

    assert main(["evaluate", "--models", "tiny", str(good), *map(str, broken.values())]) == 1
    err = capsys.readouterr().err
    says = {
        "binary config": "config='{}/config.yaml': is a binary file (a NUL byte at offset 0), not text",
        "empty config": "config='{}/config.yaml': is empty",
        "config folder": "config='{}/config.yaml': is a folder, not a file",
        "truncated png": "{}: view1.png cannot be read",
        "not an image": "{}: view0.png is not an image",
        "jpeg": "{}: view0.png is a JPEG file, not a PNG",
        "resized": "{}: view0.png is 512x128 pixels; config.yaml renders 1024x256",
    }
    lines = err.strip().splitlines()
    assert len(lines) == len(broken) and "Traceback" not in err
    for kind, folder in broken.items():
        line = next(line for line in lines if line.startswith(f"error: {folder}:"))
        assert says[kind].format(folder) in line, line
        # The old score described other files: set aside (never deleted), and said so.
        assert not (folder / "scores.json").exists()
        assert json.loads((folder / "scores.stale.json").read_text())["scores"]["clip/view0"] == 0.99
        assert line.endswith("its old scores.json no longer describes the folder: moved to scores.stale.json")
    scored = json.loads((good / "scores.json").read_text())
    assert set(scored["inputs"]) == {"config.yaml", "view0.png", "view1.png", "audio0.wav"}
    assert scored["inputs"]["view1.png"] == hashlib.sha256((good / "view1.png").read_bytes()).hexdigest()
