"""What a person sees in a real browser (Debian's chromium, headless, driven by Playwright): ``make ui`` lands
on the study's leaderboard, and a trial's pictures and sound are a click away.

Screenshots go to ``$SOUNDING_ANAGRAMS_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from tests.designed_judges import JUDGED_STUDY as STUDY
from tests.designed_judges import designed_judges
from tests.processes import free_port, served
from tests.servers import missing
from tests.test_search import folder_state, runner_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SOUNDING_ANAGRAMS_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        missing(f"no chromium at {CHROMIUM} (`make browser` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def finished_search(tiny_models, tmp_path_factory) -> tuple[Path, optuna.Study]:
    """A finished tiny search (4 knob sets, a view balance among the knobs), its stores under a folder of its
    own."""
    runs = tmp_path_factory.mktemp("searched")
    space = {**STUDY["space"], "view_balance": {"type": "float", "low": 0.3, "high": 0.7}}
    study = {**STUDY, "budget": {"trials": 4}, "space": space}
    runner = runner_for(study, tiny_models, designed_judges(), runs)
    runner.run()
    return runs, runner.optuna_study


@pytest.mark.slow
def test_make_ui_lands_on_the_leaderboard_and_a_trial_shows_its_pictures_and_sound(
    finished_search, browser, tmp_path: Path
):
    runs, study = finished_search
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    ranked = [f"trial-{t.number:04d}" for t in sorted(complete, key=lambda t: -t.values[0])]
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sounding_anagrams.cli",
        "ui",
        "--runs",
        str(runs),
        "--port",
        str(port),
    ]
    shots = screenshots(tmp_path)
    with served(command, port, tmp_path / "ui.log") as printed:
        # The printed page is the study's leaderboard.
        assert printed.startswith("MLflow UI, study unit: http://127.0.0.1:")
        url = printed.split(": ", 1)[1].strip()
        assert url.endswith("/runs?viewStateShareKey=leaderboard")
        page = browser.new_page(viewport={"width": 2200, "height": 900})  # type: ignore[attr-defined]
        page.goto(url)
        page.get_by_text(ranked[0], exact=True).first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "mlflow-leaderboard.png"))
        headers = page.locator("[role=columnheader]").all_inner_texts()
        for column in ("Run Name", "Metrics", "Parameters", "objective", "objective/min", "clip/alignment"):
            assert column in headers, (column, headers)
        # Every searched knob under its study-file name, the balance too (it sets view_weights).
        for column in ("view_balance", "audio_weight", "image_guidance_scale"):
            assert column in headers, (column, headers)
        # Sorted by objective, best first: the rows read in the leaderboard's order; only trials, not the
        # search's own run (a row without metrics).
        names = [n for n in page.locator("a").all_inner_texts() if n.startswith("trial-")]
        assert [n for n in names if n in ranked] == ranked, names
        body = page.locator("body").inner_text()
        assert "search 20" not in body, body[:2000]  # the search run is named "search <date> <time>"
        # One click: the best trial, its artifacts, its card with pictures and sound.
        page.get_by_text(ranked[0], exact=True).first.click()
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("card.html", exact=True).first.click()
        card = _frame_with_images(page)
        page.screenshot(path=str(shots / "mlflow-trial-card.png"))
        pictures = card.evaluate("[...document.images].map(i => ({src: i.src, width: i.naturalWidth}))")
        assert pictures and all(p["width"] > 0 for p in pictures), pictures
        assert any("view0.png" in p["src"] for p in pictures) and any(
            "spectrogram" in p["src"] for p in pictures
        )
        sounds = card.evaluate("[...document.querySelectorAll('audio')].map(a => a.src)")
        assert sounds and all("audio0.wav" in src for src in sounds), sounds
        # The player's source is the WAV itself, served by the UI (fetched from the UI's page: the viewer's
        # frame is sandboxed).
        head = page.evaluate(
            "src => fetch(src).then(r => r.arrayBuffer()).then(b => new TextDecoder().decode(b.slice(0, 4)))",
            sounds[0],
        )
        assert head == "RIFF"


def _frame_with_images(page, timeout: float = 60):
    """The frame MLflow's artifact viewer shows an HTML artifact in, once its pictures have loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.frames:
            with contextlib.suppress(Exception):
                if frame.evaluate(
                    "document.images.length > 0 && document.querySelector('audio') !== null"
                    " && [...document.images].every(i => i.complete && i.naturalWidth > 0)"
                ):
                    return frame
        page.wait_for_timeout(500)
    raise AssertionError("the card's pictures never loaded in MLflow's artifact viewer")


def test_ui_without_a_search_says_what_to_do(tmp_path: Path, capsys):
    from sounding_anagrams.cli import main

    assert main(["ui", "--runs", str(tmp_path), "--port", str(free_port())]) == 2
    assert "holds no mlflow.db: run a search first" in capsys.readouterr().err


@pytest.mark.slow
def test_make_dashboard_shows_a_trials_pictures_clip_and_sound(finished_search, browser, tmp_path: Path):
    runs, study = finished_search
    best = study.best_trial
    # Each trial shown carries its media: the best seed's views, spectrogram, clip and sound.
    storage = optuna.storages.RDBStorage(f"sqlite:///{runs / 'optuna.db'}")
    media = {meta.filename for meta in get_all_artifact_meta(best, storage=storage)}
    assert {"view0.png", "view1.png", "spectrogram.png", "transition.mp4", "audio0.wav"} <= media, media
    pruned_or_complete = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert all(get_all_artifact_meta(t, storage=storage) for t in pruned_or_complete)
    port = free_port()
    command = [sys.executable, "-m", "sounding_anagrams.cli", "dashboard", "--runs", str(runs)]
    command += ["--port", str(port)]
    shots = screenshots(tmp_path)
    with served(command, port, tmp_path / "dashboard.log", ready="/api/meta") as printed:
        assert printed.startswith(
            f"optuna-dashboard, study unit (best trial {best.number}): http://127.0.0.1:"
        )
        url = printed.split(": ", 1)[1].strip()
        assert url.endswith(f"/trials?numbers={best.number}")
        page = browser.new_page(viewport={"width": 1500, "height": 1000})  # type: ignore[attr-defined]
        page.goto(url)
        page.get_by_text("Artifacts", exact=True).first.wait_for(timeout=120_000)
        page.locator("audio source").first.wait_for(state="attached", timeout=60_000)
        page.wait_for_function(
            "[...document.images].some(i => i.complete && i.naturalWidth >= 256)", timeout=60_000
        )
        page.screenshot(path=str(shots / "optuna-dashboard-trial.png"))
        # A person sees the views and the spectrogram (pictures that loaded), a clip and a sound to play.
        names = page.locator("body").inner_text()
        for name in ("view0.png", "view1.png", "spectrogram.png", "transition.mp4", "audio0.wav"):
            assert name in names, name
        sizes = page.evaluate(
            "[...document.images].filter(i => i.complete).map(i => [i.naturalWidth, i.naturalHeight])"
        )
        assert [256, 64] in sizes or any(w >= 256 for w, _ in sizes), sizes
        sources = page.evaluate(
            "[...document.querySelectorAll('audio source, video source')].map(s => [s.type, s.src])"
        )
        assert {kind for kind, _ in sources} >= {"audio/wav", "video/mp4"}, sources
        # The player's source is the WAV, served by the dashboard from the artifact store.
        wav = next(src for kind, src in sources if kind == "audio/wav")
        head = page.evaluate(
            "src => fetch(src).then(r => r.arrayBuffer()).then(b => new TextDecoder().decode(b.slice(0, 4)))",
            wav,
        )
        assert head == "RIFF"
        # The study page names the objective by its expression on the history plot.
        page.goto(url.split("/trials?")[0])
        objective = study.metric_names[0]
        page.get_by_text(objective).first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "optuna-dashboard-history.png"), full_page=True)
        assert "Objective 0" not in page.locator("body").inner_text()
        # The trial page stays in the window: no one-line attribute widens it past the viewport.
        page.goto(url)
        page.get_by_text("Artifacts", exact=True).first.wait_for(timeout=120_000)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 1500, f"the trial page is {width} px wide in a 1500 px window"


def read_only(command: list[str], folder: Path) -> list[str]:
    """``command`` run with ``folder`` mounted read-only (a private mount namespace: nothing else sees it).
    Root writes through file modes, so only a read-only mount makes a folder truly read-only here."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing(f"no private mount namespace for a read-only folder: {probe.stderr.strip()}")
    remount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", remount, str(folder), *command]


@pytest.mark.slow
def test_an_archived_runs_folder_is_browsed_and_exported_read_only_and_left_as_it_was(
    tiny_models, tmp_path: Path
):
    """A runs folder moved elsewhere (an archive) and mounted read-only: ``leaderboard`` and ``export`` find
    its files at their new place, ``ui`` serves its runs with their files, and nothing is written, there or
    where the folder was."""
    import requests

    written = tmp_path / "written" / "runs"
    runner_for({**STUDY, "budget": {"trials": 2}}, tiny_models, designed_judges(), written).run()
    archive = tmp_path / "archive" / "runs"
    archive.parent.mkdir()
    written.rename(archive)
    before = folder_state(archive)
    cli = [sys.executable, "-m", "sounding_anagrams.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    board = subprocess.run(
        read_only([*cli, "leaderboard", "unit", "--runs", str(archive), "--format", "json"], archive),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert board.returncode == 0, board.stderr
    places = [row["where"] for row in json.loads(board.stdout)["knob_sets"]]
    assert places and all(Path(p).is_dir() and Path(p).is_relative_to(archive) for p in places), places
    exported = subprocess.run(
        read_only([*cli, "export", "unit", "--runs", str(archive), "--out", str(tmp_path / "best")], archive),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    (config,) = (tmp_path / "best").glob("unit-trial-*.yaml")
    assert "image_prompts" in config.read_text(encoding="utf-8")
    # Commands that write beside the archive's files say so before any work.
    for command, field in ((["export", "unit"], "--out"), (["gallery", "unit"], "--runs")):
        refused = subprocess.run(
            read_only([*cli, *command, "--runs", str(archive)], archive),
            capture_output=True,
            text=True,
            env=env,
        )
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: {field}="), refused.stderr
        assert "cannot be written (read-only" in refused.stderr, refused.stderr
    assert "the gallery is written beside the renders: use a copy you can write" in refused.stderr

    port = free_port()
    ui = read_only([*cli, "ui", "--runs", str(archive), "--port", str(port)], archive)
    with served(ui, port, tmp_path / "ui.log") as printed:
        assert printed.startswith("MLflow UI, study unit: http://127.0.0.1:"), printed
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow"
        runs = requests.post(
            f"{api}/runs/search", json={"experiment_ids": [printed.split("/experiments/")[1].split("/")[0]]}
        ).json()["runs"]
        trial_run = next(r for r in runs if any(t["key"] == "trial" for t in r["data"].get("tags", [])))
        listed = requests.get(
            f"{api}/artifacts/list", params={"run_id": trial_run["info"]["run_id"], "path": "seed-0"}
        ).json()
        assert "view0.png" in {Path(f["path"]).name for f in listed.get("files", [])}, listed
    assert folder_state(archive) == before  # nothing written in the archive
    assert not written.exists()  # nor where it was (no empty store made there)
