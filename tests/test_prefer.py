"""``prefer``: a person compares candidates in optuna-dashboard (a real browser clicks "worst"), each shown
as one captioned clip (prompts, knobs, a poster), and the preferential GP proposes the next knob set from
those choices; Ctrl-C and SIGTERM leave no candidate RUNNING; every candidate no click ranked below another
exports (or the export says why not); candidates and choices reach MLflow; Optuna's own clients read the
study right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from optuna_dashboard.preferential import create_study as create_preferential_study
from PIL import Image

from sounding_anagrams.cli import main
from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.render import MEL, write_clip
from sounding_anagrams.sampler.audio import write_wav
from sounding_anagrams.search.candidate_clip import (
    CANDIDATE_CLIP,
    JUDGED,
    PAPER,
    POSTER,
    Caption,
    ClipFrames,
    Layout,
    lay_out,
    write_candidate_clip,
)
from sounding_anagrams.search.prefer import (
    CLIP_KEY,
    PREFERENCE_METRIC,
    label_study,
    settle_left_candidates,
    stopped_before_shown,
)
from sounding_anagrams.search.stores import open_storage
from tests.processes import free_port, served
from tests.test_ui import browser, screenshots  # noqa: F401  (the browser fixture)

REPO = Path(__file__).resolve().parents[1]
STUDY_NAME = "rotate-tiny-prefer"


def prefer_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    """The prefer study's trials now ([] before `prefer` made it). Opened as `prefer` opens it (under the
    storage's lock): never racing its schema creation."""
    if not Path(storage.removeprefix("sqlite:///")).exists():  # `prefer` has not made its --runs yet
        return []
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=open_storage(storage, heartbeat=False))
    except KeyError:  # the study is not created yet
        return []
    except ConfigError as error:
        if "does not exist" in str(error):  # nor its database
            return []
        raise
    return study.get_trials()


def shown_candidates(storage: str, count: int, timeout: float = 600) -> list[optuna.trial.FrozenTrial]:
    """Wait until ``count`` candidates carry their clip (rendered and uploaded), on a loaded machine too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = [t for t in prefer_trials(storage) if CLIP_KEY in t.user_attrs]
        if len(shown) >= count:
            return shown
        time.sleep(1)
    raise AssertionError(f"{count} candidates were not shown within {timeout} s")


# Per video of the comparison page: its card's title, its frame size, its box on the page, and the frame it
# shows before play (the poster), drawn at 256 px wide as grey levels.
SHOWN_FRAMES = """() => [...document.querySelectorAll('video')].map(v => {
  const canvas = document.createElement('canvas');
  canvas.width = 256;
  canvas.height = Math.round(256 * v.videoHeight / v.videoWidth);
  const context = canvas.getContext('2d');
  context.drawImage(v, 0, 0, canvas.width, canvas.height);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const gray = [];
  for (let i = 0; i < rgba.length; i += 4) gray.push(rgba[i]);
  const card = v.closest('.MuiCard-root');
  return {title: card.querySelector('h5').textContent, header: card.querySelector('h6').textContent,
          size: [v.videoWidth, v.videoHeight], box: v.getBoundingClientRect().toJSON(),
          gray: gray, shape: [canvas.height, canvas.width]};
})"""


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
        page = browser.new_page(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
        page.goto(url)
        page.get_by_text("Which trial is the worst?").wait_for(timeout=120_000)
        # Before anything plays, each video shows its first frame, the poster (loaded: no spinner over it).
        page.wait_for_function(
            "(() => { const v = [...document.querySelectorAll('video')];"
            " return v.length == 2 && v.every(x => x.readyState >= 3 && x.networkState != 2); })()",
            timeout=120_000,
        )
        page.wait_for_timeout(2000)  # for the screenshot only: Chromium's loading spinner fades out slowly
        page.screenshot(path=str(shots / "optuna-dashboard-prefer.png"))
        # Side by side: each candidate's captioned clip, which is its views, their turn and its sound.
        sources = page.evaluate("[...document.querySelectorAll('video source')].map(s => [s.type, s.src])")
        assert [kind for kind, _ in sources] == ["video/mp4", "video/mp4"]
        header = page.evaluate(
            "src => fetch(src).then(r => r.arrayBuffer()).then(b => new TextDecoder().decode(b.slice(4, 8)))",
            sources[0][1],
        )
        assert header == "ftyp"
        assert page.locator("video").first.evaluate("v => v.readyState >= 2 && v.duration > 5")
        videos = page.evaluate(SHOWN_FRAMES)
        assert sorted(v["title"] for v in videos) == ["Trial 0", "Trial 1"]
        for video in videos:
            number = int(video["title"].split()[1])
            folder = Path(first[number].user_attrs["render_folder"])
            poster = Image.open(folder / POSTER)
            assert video["header"] == f"({CANDIDATE_CLIP})"
            # Large: the card's whole width (368 px, fixed by the dashboard) and taller than it is wide, where
            # the render's own 512x128 clip showed at 368x92.
            assert video["size"] == list(poster.size)
            assert video["box"]["width"] >= 360 and video["box"]["height"] >= 1.3 * video["box"]["width"]
            # What the person sees before play is the poster: the views under their prompts, the knobs.
            shown = np.asarray(video["gray"], dtype=float).reshape(video["shape"])
            expected = np.asarray(poster.resize(video["shape"][::-1], Image.Resampling.BILINEAR), dtype=float)
            assert np.abs(shown - expected).mean() < 8, f"candidate {number}: not its poster"
        # The person clicks "worst" under candidate 0: the dashboard posts the choice.
        page.locator(".MuiCard-root", has_text="Trial 0").get_by_role("button", name="Worst").click()
        third = next(t for t in shown_candidates(storage, 3) if t.number == 2)
    # `served` ended it with SIGTERM: the stop path left nothing RUNNING.
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    assert TrialState.RUNNING not in {t.state for t in study.get_trials()}
    # The next candidate was proposed by the preferential GP, fitted on that one choice.
    assert third.user_attrs["choices_seen"] == 1
    # The choice is in MLflow, on both candidates' runs.
    candidates = candidate_runs(runs)
    assert candidates[0].data.tags["judged_worst_against"] == "1"
    assert candidates[1].data.tags["preferred_to"] == "0"
    assert candidates[1].data.metrics["choices/preferred_to"] == 1
    assert capsys.readouterr().out == ""
    # The preferred candidate, and the one never compared, export and re-render like any search's best.
    argv = ["export", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--prefer", "--runs"]
    assert main([*argv, str(runs), "--out", str(tmp_path / "exports")]) == 0
    assert "left out, judged worse than another: candidate(s) 0" in capsys.readouterr().err
    never = (tmp_path / "exports" / f"{STUDY_NAME}-trial-0002.yaml").read_text()
    assert never.startswith(f"# study {STUDY_NAME}, candidate 2: never compared by a person")
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


def candidate_runs(runs: Path) -> dict[int, Any]:
    """The prefer study's MLflow runs, by candidate number."""
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY_NAME)
    assert experiment is not None, "no MLflow experiment for the prefer study"
    found = client.search_runs([experiment.experiment_id], "tags.kind = 'prefer-candidate'")
    return {int(run.data.tags["candidate"]): run for run in found}


def test_prefer_without_botorch_names_the_extra(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard.preferential.samplers.gp", None)
    argv = ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path)]
    assert main([*argv, "--port", str(free_port())]) == 2
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


# -- what a person sees: the captioned clip ---------------------------------------------------------------


def fake_render(folder: Path, config: RenderConfig) -> None:
    """A render folder as `render` writes it (views, spectrogram, sounds, the clip), of random pictures: the
    captioned clip is made from these files alone."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    pictures = []
    for index in range(len(config.views)):
        gray = rng.integers(40, 200, (config.height, config.width), dtype=np.uint8)
        Image.fromarray(gray).convert("RGB").save(folder / f"view{index}.png")
        pictures.append(torch.from_numpy(gray.astype(np.float32) / 255).expand(3, -1, -1))
    spectrogram = rng.integers(0, 120, (config.height, config.width - config.crop_right), dtype=np.uint8)
    Image.fromarray(spectrogram).save(folder / "spectrogram.png")
    samples = round(MEL.sample_rate * 9.92)
    for index in range(len(config.audio_prompts)):
        write_wav(
            folder / f"audio{index}.wav", rng.uniform(-0.3, 0.3, samples).astype(np.float32), MEL.sample_rate
        )
    write_clip(folder, config, pictures)


def ink_in(poster: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    left, top, right, bottom = box
    return bool((poster[top:bottom, left:right] < 128).any())


def test_the_candidate_clip_shows_each_prompt_and_knob_over_a_poster(tmp_path: Path):
    config = RenderConfig(views=("identity", "tile_rotate_cw"), num_inference_steps=3, seed=7)
    folder = tmp_path / "candidate-0003"
    fake_render(folder, config)
    knobs = {"view_balance": 0.30000000000000004, "audio_weight": 0.41176470588235, "image_start_step": 2}
    caption = Caption(3, "proposed from 2 choice(s)", knobs, 7)
    clip = write_candidate_clip(folder, config, caption)
    assert clip == folder / CANDIDATE_CLIP
    layout = lay_out(folder, config, caption)
    drawn = " ".join(text for text, _ in layout.texts)
    # The prompts, in full (a long one wraps onto the next line), and the knobs a person reads.
    for prompt in (*config.image_prompts, *config.audio_prompts):
        assert prompt in drawn, prompt
    for item in ("view_balance 0.3", "audio_weight 0.4118", "image_start_step 2", "seed 7"):
        assert item in drawn, item
    assert "candidate 3 · proposed from 2 choice(s)" in drawn and JUDGED in drawn
    assert "0.30000000000000004" not in drawn
    # The poster is the clip's first frame: every caption drawn in it, over the pictures.
    poster = np.asarray(Image.open(folder / POSTER))
    assert poster.shape == layout.poster.shape and poster.shape[1] == 1024
    assert all(ink_in(poster, box) for _, box in layout.texts)
    with av.open(str(clip)) as container:
        video = container.streams.video[0]
        sound = container.streams.audio[0]
        assert (video.width, video.height) == (poster.shape[1], poster.shape[0])
        assert float(sound.duration * sound.time_base) == pytest.approx(9.92, abs=0.1)
        frames = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    assert len(frames) >= 9.9 * 12
    assert np.abs(frames[0].astype(int) - poster).mean() < 4  # H.264 changes a few grey levels
    # View 0's picture stands under its caption, at the frame's full width.
    left, top, width, height = layout.turn_box
    assert (width, height) == (1024, 256)
    # While the sound plays, a playhead crosses the spectrogram (halfway through: about the middle).
    left, top, width, height = layout.spectrogram_box
    middle = frames[len(frames) // 2][top + 8 : top + height - 8, left : left + width].astype(int)
    brightest = int(np.argmax(middle.mean(axis=0)))
    assert abs(brightest - width * (len(frames) // 2) / 12 / 9.92) < width * 0.1


def test_with_two_sounds_the_clip_plays_both_and_marks_the_one_playing():
    poster = np.full((100, 64), PAPER, dtype=np.uint8)
    poster[10:20, 4:40] = 0  # sound 0's caption
    poster[30:40, 4:40] = 0  # sound 1's caption
    poster[70:90] = 0  # the spectrogram
    layout = Layout(poster, (0, 50, 64, 16), (0, 70, 64, 20), [(10, 20), (30, 40)])
    turn = [np.zeros((16, 64), np.uint8)] * 12
    frames = ClipFrames(layout, turn, [(0.0, 2.0, 1), (2.5, 4.5, 0)])
    assert len(frames) == 54  # as long as both sounds: the turn loops
    during_second = frames[36]  # 3 s
    assert (during_second[30:40, 4:40] == PAPER).all() and (during_second[10:20, 4:40] == 0).all()
    assert not (during_second[70:90] == PAPER).all(axis=0).any()  # no playhead: its time is not the canvas's
    during_first = frames[12]  # 1 s
    assert (during_first[10:20, 4:40] == PAPER).all()
    assert np.flatnonzero((during_first[70:90] == PAPER).all(axis=0)).tolist() == [32, 33, 34]  # halfway
    mirrored = ClipFrames(layout, turn, [(0.0, 2.0, -1)])[6]  # a quarter through, heard backwards
    assert np.flatnonzero((mirrored[70:90] == PAPER).all(axis=0)).tolist() == [48, 49, 50]
    with pytest.raises(IndexError):
        frames[len(frames)]


# -- the study in Optuna's own clients, a killed run's candidates, the export ---------------------------


def preferential_study(runs: Path) -> tuple[str, optuna.Study]:
    """A prefer study as `prefer` leaves it, made by hand (no models): labelled, with no candidate yet."""
    runs.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{runs / 'optuna.db'}"
    preferential = create_preferential_study(
        n_generate=3,
        storage=open_storage(storage, heartbeat=False),
        sampler=optuna.samplers.RandomSampler(0),
        study_name=STUDY_NAME,
    )
    label_study(preferential._study)
    return storage, preferential._study


def shown(study: optuna.Study, folder: Path) -> optuna.trial.FrozenTrial:
    """A candidate shown as `prefer` shows one: its render folder and clip noted, then COMPLETE."""
    trial = study.ask({"view_balance": optuna.distributions.FloatDistribution(0.3, 0.7)})
    (folder / f"candidate-{trial.number}").mkdir(parents=True)
    (folder / f"candidate-{trial.number}" / "config.yaml").write_text(f"seed: {trial.number}\n")
    trial.set_user_attr("render_folder", str(folder / f"candidate-{trial.number}"))
    trial.set_user_attr(CLIP_KEY, f"artifact-{trial.number}")
    return study.tell(trial, 0.0)


def test_the_optuna_cli_and_trials_dataframe_say_the_values_are_no_objective(tmp_path: Path):
    storage, study = preferential_study(tmp_path)
    shown(study, tmp_path / "renders")
    listed = subprocess.run(
        [str(Path(sys.executable).with_name("optuna")), "studies", "--storage", storage, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [row] = json.loads(listed.stdout)
    assert row["name"] == STUDY_NAME and row["n_trials"] == 1
    # The direction Optuna insists on and the 0.0 optuna-dashboard writes are said to mean nothing.
    assert "a person compares" in row["user_attrs"]["objective"]
    assert "direction means nothing" in row["user_attrs"]["objective"]
    assert len(row["user_attrs"]["objective"]) <= 100  # one short line of `optuna studies`
    frame = optuna.load_study(study_name=STUDY_NAME, storage=storage).trials_dataframe()
    assert f"value_{PREFERENCE_METRIC}" in frame.columns and "value" not in frame.columns


def test_a_killed_runs_candidates_are_settled_at_the_next_start(tmp_path: Path):
    """SIGKILL leaves what it was making RUNNING: a candidate it showed is COMPLETE like any shown one, one it
    never showed is failed (a fresh one takes its place)."""
    storage, study = preferential_study(tmp_path)
    made = study.ask()
    made.set_user_attr(CLIP_KEY, "artifact-0")
    study.ask()
    settle_left_candidates(open_storage(storage, heartbeat=False), study)
    first, second = study.get_trials()
    assert (first.state, first.values) == (TrialState.COMPLETE, [0.0])
    assert (
        second.state == TrialState.FAIL
        and second.user_attrs["fail_reason"] == "cut short before it was shown"
    )
    # Never made, it does not count against --trials (as an interrupted trial of a search).
    assert stopped_before_shown(second) and not stopped_before_shown(first)


def test_export_prefer_writes_every_candidate_no_click_put_below_another_and_says_why_not(
    tmp_path: Path, capsys
):
    from optuna_dashboard.preferential import PreferentialStudy
    from optuna_dashboard.preferential._system_attrs import report_skip

    _, study = preferential_study(tmp_path)
    renders = tmp_path / "renders"
    zero, one, two = (shown(study, renders) for _ in range(3))
    PreferentialStudy(study).report_preference([one, two], zero)  # a click: 0 is the worst of the three
    never = shown(study, renders)  # shown after the click: never compared
    failed = study.ask()
    failed.set_user_attr("fail_reason", "interrupted (SIGTERM) before it was shown")
    study.tell(failed, state=TrialState.FAIL)
    running = study.ask()
    skipped = shown(study, renders)
    report_skip(study._study_id, skipped._trial_id, study._storage)
    out = tmp_path / "exports"
    assert main(["export", STUDY_NAME, "--prefer", "--runs", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [
        f"{STUDY_NAME}-trial-{n:04d}.yaml" for n in (one.number, two.number, never.number)
    ]
    headers = {p.name: p.read_text().splitlines()[0] for p in out.iterdir()}
    assert headers[f"{STUDY_NAME}-trial-0001.yaml"].endswith("preferred by a person to candidate(s) 0")
    assert headers[f"{STUDY_NAME}-trial-0003.yaml"].endswith(
        "never compared by a person (shown; no choice ranked it below another)"
    )
    assert printed.err.splitlines() == [
        f"candidate {failed.number} failed: interrupted (SIGTERM) before it was shown",
        f"candidate {running.number} is not shown yet (RUNNING: being made, or its process was killed: "
        "the next `prefer` fails it)",
        f"candidate {skipped.number} was skipped in the dashboard",
        "left out, judged worse than another: candidate(s) 0",
    ]


# -- Ctrl-C and SIGTERM: one stop path, nothing left RUNNING ----------------------------------------------


def start_prefer(runs: Path, log: Path, spawned: list[subprocess.Popen]) -> subprocess.Popen:
    """`prefer` without its dashboard (as on a GPU machine, the dashboard served elsewhere): 2 candidates at a
    time, 3 in all; in ``spawned``, so that it is killed if the test fails before it ends."""
    command = [sys.executable, "-m", "sounding_anagrams.cli", "prefer", str(REPO / "studies" / "rotate.yaml")]
    command += ["--models", "tiny", "--runs", str(runs), "--candidates", "2", "--trials", "3"]
    command += ["--no-dashboard", "--quiet"]
    with log.open("w") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    spawned.append(process)
    return process


def asked_not_shown(storage: str) -> list[int]:
    """The candidates asked (their seed chosen) and not yet shown: rendering, or rendered and not uploaded."""
    return [
        t.number
        for t in prefer_trials(storage)
        if t.state == TrialState.RUNNING and "seeds" in t.user_attrs and CLIP_KEY not in t.user_attrs
    ]


def signal_while_asked(
    process: subprocess.Popen, storage: str, signum: int, timeout: float = 600
) -> list[int]:
    """Send ``signum`` while `prefer` holds candidates asked and not shown. It is stopped first (SIGSTOP), so
    the candidates seen are certainly in flight when the signal lands. Returns their numbers."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "prefer ended before it could be signalled"
        assert time.monotonic() < deadline, f"no candidate in flight within {timeout} s"
        if asked_not_shown(storage):
            process.send_signal(signal.SIGSTOP)
            numbers = asked_not_shown(storage)
            if numbers:
                process.send_signal(signum)
                process.send_signal(signal.SIGCONT)
                return numbers
            process.send_signal(signal.SIGCONT)
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_while_candidates_render_fails_them_and_leaves_nothing_running(
    tmp_path: Path, capsys, spawned: list[subprocess.Popen]
):
    runs = tmp_path / "runs"
    storage = f"sqlite:///{runs / 'optuna.db'}"
    log = tmp_path / "prefer.err"
    process = start_prefer(runs, log, spawned)
    in_flight = signal_while_asked(process, storage, signal.SIGTERM)
    assert process.wait(timeout=300) == 130  # the exit code of an interrupted command
    err = log.read_text()
    assert "Traceback" not in err, err
    trials = prefer_trials(storage)
    assert TrialState.RUNNING not in {t.state for t in trials}
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert set(in_flight) <= set(failed) and failed == [t.number for t in trials]
    reason = "interrupted (SIGTERM) before it was shown"
    for number in failed:
        assert trials[number].user_attrs["fail_reason"] == reason
        assert f"candidate {number} failed: {reason}" in err
    assert f"interrupted (SIGTERM): {len(failed)} candidate(s) not yet shown were failed" in err
    # MLflow: each one's run, ended KILLED, saying why.
    runs_of = candidate_runs(runs)
    assert sorted(runs_of) == failed
    assert {(r.info.status, r.data.tags["fail_reason"]) for r in runs_of.values()} == {("KILLED", reason)}
    # Nothing to export, and the export says why, candidate by candidate.
    assert main(["export", STUDY_NAME, "--prefer", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert f"study {STUDY_NAME} has no candidate to export: candidate 0 failed: {reason}" in said


@pytest.mark.slow
def test_ctrl_c_while_the_person_chooses_keeps_the_shown_candidates_logged_and_exportable(
    tmp_path: Path, capsys, spawned: list[subprocess.Popen]
):
    runs = tmp_path / "runs"
    storage = f"sqlite:///{runs / 'optuna.db'}"
    log = tmp_path / "prefer.err"
    process = start_prefer(runs, log, spawned)
    shown_candidates(storage, 2)  # both shown: it waits for a choice in a dashboard elsewhere
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    err = log.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted (Ctrl-C): 0 candidate(s) not yet shown were failed" in err
    trials = prefer_trials(storage)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # shown, none RUNNING
    # One MLflow run per candidate: its knobs under their study-file names, its seed, its files, its tags.
    runs_of = candidate_runs(runs)
    for trial in trials:
        run = runs_of[trial.number]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"candidate-{trial.number:04d}"
        assert run.data.params["view_balance"] == str(trial.params["view_balance"])
        assert run.data.params["seed"] == str(trial.user_attrs["seeds"][0])
        assert run.data.tags["state"] == "shown" and run.data.tags["study"] == STUDY_NAME
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        artifacts = {
            a.path for a in MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").list_artifacts(run.info.run_id)
        }
        assert {CANDIDATE_CLIP, POSTER, "config.yaml", "view0.png", "audio0.wav"} <= artifacts
    assert runs_of[0].data.tags["origin"] == "baseline" and runs_of[1].data.tags["origin"] == "random start"
    # Never compared, both export.
    out = tmp_path / "out"
    assert main(["export", STUDY_NAME, "--prefer", "--runs", str(runs), "--out", str(out)]) == 0
    assert len(list(out.glob("*.yaml"))) == 2
    assert capsys.readouterr().err == ""


def test_prefer_refuses_a_name_an_automatic_study_holds(tmp_path: Path, capsys):
    """`<study>-prefer` made by an automatic search (a study file named so) is said, not a database error,
    and the prefer run adds nothing to it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize")
    argv = ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path)]
    assert main([*argv, "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: study='{STUDY_NAME}': a study of this name in sqlite:///")
        and err.count("\n") == 1
    )
    assert "is not a prefer study" in err
    assert optuna.load_study(study_name=STUDY_NAME, storage=storage).user_attrs == {}


def test_prefer_from_a_search_that_is_not_there_is_said_before_any_study_is_made(tmp_path: Path, capsys):
    argv = ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(tmp_path)]
    assert main([*argv, "--no-dashboard", "--from-search"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --from-search='rotate-tiny': no such study in this storage: run `search` first, or leave "
        "it out"
    )
    assert optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}") == []  # no empty study
