"""``prefer``: a person compares candidates in optuna-dashboard (a real browser clicks "worst"), and the
preferential GP proposes the next knob set from those choices; the preferred one exports and re-renders."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

from sounding_anagrams.cli import main
from tests.processes import free_port, served
from tests.test_ui import browser, screenshots  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
STUDY_NAME = "rotate-tiny-prefer"


def shown_candidates(storage: str, count: int, timeout: float = 600) -> list[optuna.trial.FrozenTrial]:
    """Wait until ``count`` candidates carry their clip (rendered and uploaded), on a loaded machine too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials()
        except KeyError:  # not created yet
            trials = []
        shown = [t for t in trials if "clip" in t.user_attrs]
        if len(shown) >= count:
            return shown
        time.sleep(1)
    raise AssertionError(f"{count} candidates were not shown within {timeout} s")


@pytest.mark.slow
def test_a_person_picks_the_worst_in_the_browser_and_the_sampler_proposes_from_it(
    browser,  # noqa: F811
    tmp_path: Path,
    capsys,
):
    runs = tmp_path / "runs"
    storage = f"sqlite:///{runs / 'optuna.db'}"
    port = free_port()
    command = [sys.executable, "-m", "sounding_anagrams.cli", "prefer", str(REPO / "studies" / "rotate.yaml")]
    command += ["--models", "tiny", "--runs", str(runs), "--candidates", "2", "--trials", "3"]
    command += ["--port", str(port), "--quiet"]
    shots = screenshots(tmp_path)
    with served(command, port, tmp_path / "prefer.log", ready="/api/meta") as printed:
        assert printed.startswith(f"choose in optuna-dashboard, study {STUDY_NAME}: http://127.0.0.1:{port}/")
        url = printed.split(": ", 1)[1].strip()
        first = shown_candidates(storage, 2)
        # The first candidate is the study's hand-tuned baseline; nothing was chosen yet: random start.
        assert first[0].user_attrs["start_point"] == "baseline"
        assert [t.user_attrs["choices_seen"] for t in first if t.number > 0] == [0]
        page = browser.new_page(viewport={"width": 1400, "height": 800})  # type: ignore[attr-defined]
        page.goto(url)
        page.get_by_text("Which trial is the worst?").wait_for(timeout=120_000)
        page.wait_for_function("document.querySelectorAll('video source').length == 2", timeout=60_000)
        page.screenshot(path=str(shots / "optuna-dashboard-prefer.png"))
        # Side by side: each candidate's clip, which is its views turning and its sound.
        sources = page.evaluate("[...document.querySelectorAll('video source')].map(s => [s.type, s.src])")
        assert [kind for kind, _ in sources] == ["video/mp4", "video/mp4"]
        header = page.evaluate(
            "src => fetch(src).then(r => r.arrayBuffer()).then(b => new TextDecoder().decode(b.slice(4, 8)))",
            sources[0][1],
        )
        assert header == "ftyp"
        assert page.locator("video").first.evaluate("v => v.readyState >= 1 && v.duration > 5")
        # The person clicks "worst" under candidate 0: the dashboard posts the choice.
        page.get_by_role("button", name="Worst").first.click()
        third = next(t for t in shown_candidates(storage, 3) if t.number == 2)
    # The next candidate was proposed by the preferential GP, fitted on that one choice.
    assert third.user_attrs["choices_seen"] == 1
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    assert study.get_trials()[0].state == optuna.trial.TrialState.COMPLETE  # chosen: no longer shown
    assert capsys.readouterr().out == ""
    # The preferred candidate exports and re-renders like any search's best.
    argv = ["export", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--prefer", "--runs"]
    assert main([*argv, str(runs), "--out", str(tmp_path / "exports")]) == 0
    exported = tmp_path / "exports" / f"{STUDY_NAME}-trial-0001.yaml"
    text = exported.read_text()
    assert text.startswith(f"# study {STUDY_NAME}, candidate 1: preferred by a person to candidate(s) 0\n")
    original = Path(study.get_trials()[1].user_attrs["render_folder"])
    assert yaml.safe_load(text) == yaml.safe_load((original / "config.yaml").read_text())
    again = tmp_path / "again"
    assert main(["render", "--config", str(exported), "--quiet", "--out", str(again)]) == 0
    for name in ("view0.png", "spectrogram.png"):
        # prefer rendered it in a batch of 2; alone, float sums run in another order: <= 1 grey level.
        difference = np.abs(
            np.asarray(Image.open(again / name), dtype=int)
            - np.asarray(Image.open(original / name), dtype=int)
        )
        assert difference.max() <= 1, name


def test_prefer_without_botorch_names_the_extra(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard.preferential.samplers.gp", None)
    argv = ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "prefer needs BoTorch" in err and "pip install 'sounding-anagrams[prefer]'" in err
    assert not (tmp_path / "optuna.db").exists()  # nothing made before the check


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--candidates", "1"], "--candidates=1: must be at least 2"),
        (["--candidates", "3", "--trials", "2"], "--trials=2: must be at least --candidates (3)"),
        (["--port", "0"], "--port=0: must be a TCP port"),
    ],
)
def test_prefer_bad_input_names_the_flag(extra: list[str], pattern: str, tmp_path: Path, capsys):
    argv = ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path)]
    assert main([*argv, *extra]) == 2
    assert pattern in capsys.readouterr().err
