"""The study gallery (``gallery.html``): the top knob sets side by side, rewritten after each batch, logged on
the search's MLflow run, written by ``sounding-anagrams gallery`` and named by ``search`` and ``ui``; what a
person sees of it in a real browser (Debian's chromium, headless), opened from disk and inside MLflow's UI.

Screenshots go to ``$SOUNDING_ANAGRAMS_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from sounding_anagrams.cli import main
from sounding_anagrams.search import publishing
from sounding_anagrams.search.gallery import GALLERY_FILE, gallery_page, write_gallery
from sounding_anagrams.search.loop import SearchRunner
from sounding_anagrams.search.report import ranked_trials
from sounding_anagrams.search.stores import trial_record
from tests.designed_judges import JUDGED_STUDY as STUDY
from tests.designed_judges import designed_judges
from tests.processes import free_port, served
from tests.test_search import runner_for
from tests.test_ui import browser, screenshots  # noqa: F401  (the browser fixture)

ROW = re.compile(r"<tr data-trial='(\d+)'")


@dataclass
class Searched:
    runs: Path
    runner: SearchRunner
    rewrites: list[list[int]]  # the trials in the gallery after each batch the publisher published

    @property
    def study(self) -> optuna.Study:
        return self.runner.optuna_study

    @property
    def gallery(self) -> Path:
        return self.runner.render_root / GALLERY_FILE


def shown_trials(page: str) -> list[int]:
    """The trial numbers of the gallery's rows, top to bottom."""
    return [int(n) for n in ROW.findall(page)]


@pytest.fixture(scope="module")
def searched(tiny_models, tmp_path_factory) -> Searched:
    """A finished tiny search: 4 knob sets on 2 seeds each, in 2 batches of 2, and the gallery after each
    batch."""
    runs = tmp_path_factory.mktemp("gallery")
    rewrites: list[list[int]] = []
    publish = publishing.publish_gallery

    def recording(opened):
        path = publish(opened)
        rewrites.append(shown_trials(path.read_text(encoding="utf-8")) if path else [])
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publishing, "publish_gallery", recording)
        runner = runner_for({**STUDY, "budget": {"trials": 4}}, tiny_models, designed_judges(), runs)
        runner.run()
    return Searched(runs, runner, rewrites)


def test_the_gallery_is_rewritten_after_each_batch_and_is_the_search_runs_artifact(searched: Searched):
    # Batch by batch the page grows: 2 knob sets after the first batch, all 4 after the second.
    assert [len(trials) for trials in searched.rewrites] == [2, 4], searched.rewrites
    assert set(searched.rewrites[0]) < set(searched.rewrites[1])
    page = searched.gallery.read_text(encoding="utf-8")
    # The leaderboard's order, every complete knob set (the budget is under the default top 8).
    ranked = [r.trial.number for r in ranked_trials(searched.study)]
    assert shown_trials(page) == ranked and len(ranked) == 4
    # Media are linked, never embedded: the page stays small.
    assert "base64" not in page and len(page.encode()) < 20_000
    # The search's MLflow run carries the same page.
    client = MlflowClient(searched.runner.tracker.tracking_uri)
    parent = searched.runner.tracker.parent_run_id
    assert parent is not None
    assert f"study/{GALLERY_FILE}" in {a.path for a in client.list_artifacts(parent, "study")}
    stored = Path(client.download_artifacts(parent, f"study/{GALLERY_FILE}"))
    assert shown_trials(stored.read_text(encoding="utf-8")) == ranked
    # Each row names its trial's run, whose seed-<k>/ artifacts are that row's media in MLflow's viewer.
    for trial in searched.study.get_trials(states=(TrialState.COMPLETE,)):
        run_id, best = trial.user_attrs["mlflow_run_id"], trial.user_attrs["best_seed"]
        assert f"<tr data-trial='{trial.number}' data-run='{run_id}'" in page
        assert (
            f"src='trial-{trial.number:04d}/seed-{best}/view0.png' data-artifact='seed-{best}/view0.png'"
            in page
        )
        artifacts = {a.path for a in client.list_artifacts(run_id, f"seed-{best}")}
        assert {f"seed-{best}/view0.png", f"seed-{best}/audio0.wav"} <= artifacts


def test_numbers_are_read_at_4_significant_digits(searched: Searched):
    page = searched.gallery.read_text(encoding="utf-8")
    # What a person reads (the sort values of the rows are for the script, at full precision).
    shown = re.sub(r"data-values='[^']*'", "", page)
    numbers = re.findall(r"(?<!\d)\d+\.\d+", shown)
    assert numbers and all(len(n.replace(".", "").lstrip("0")) <= 4 for n in numbers), numbers
    best = searched.study.best_trial
    assert f"<b>{best.values[0]:.4g}</b>" in page
    assert f"<td>audio_weight</td><td>{best.params['audio_weight']:.4g}</td>" in page


def test_gallery_command_writes_the_page_and_prints_its_path(searched: Searched, capsys, tmp_path: Path):
    searched.gallery.unlink()
    assert main(["gallery", "unit", "--runs", str(searched.runs), "--top", "2"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"gallery of study unit: {searched.gallery}"
    assert len(shown_trials(searched.gallery.read_text(encoding="utf-8"))) == 2
    assert main(["gallery", "unit", "--runs", str(searched.runs)]) == 0
    assert len(shown_trials(searched.gallery.read_text(encoding="utf-8"))) == 4
    capsys.readouterr()
    # An unknown study: one line naming it, and the studies there are.
    assert main(["gallery", "nosuch", "--runs", str(searched.runs)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "'nosuch'" in error and "available: unit" in error, error
    assert main(["gallery", "unit", "--runs", str(tmp_path)]) == 2  # no search there
    assert "holds no optuna.db" in capsys.readouterr().err


def test_ui_prints_where_the_gallery_is(searched: Searched, capsys, monkeypatch):
    served_instead: list[list[str]] = []
    monkeypatch.setattr(
        "sounding_anagrams.search.fleet.supervise", lambda argv: served_instead.append(argv) or 0
    )
    port = free_port()
    assert main(["ui", "--runs", str(searched.runs), "--port", str(port)]) == 0
    assert served_instead, "the UI was not served"
    out = capsys.readouterr().out
    assert f"gallery, the top knob sets side by side: {searched.gallery}" in out
    run_id = searched.runner.tracker.parent_run_id
    assert f"in MLflow's UI: http://127.0.0.1:{port}/#/experiments/" in out
    assert f"/runs/{run_id}/artifacts/study/{GALLERY_FILE}" in out


def test_several_objectives_mark_the_pareto_set_and_raced_knob_sets_are_marked(searched: Searched, tmp_path):
    """A two-objective study (as mirror-two-sounds) made of the search's renders: the Pareto members are
    marked and each objective sorts; a raced knob set is marked; pruned and failed trials are not shown."""
    done = searched.study.get_trials(states=(TrialState.COMPLETE,))
    study = optuna.create_study(study_name="two", directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["clip/alignment", "clap/alignment"])
    values = [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.2, 0.2)]  # the first three: the Pareto set
    knob = FloatDistribution(0.2, 0.8)
    for trial, pair in zip(done, values, strict=True):
        attrs = {**trial.user_attrs, "seed_values": [list(pair), [pair[0] - 0.01, pair[1] + 0.01]]}
        if pair == (0.2, 0.2):
            attrs["raced"] = True
        study.add_trial(
            optuna.trial.create_trial(
                values=list(pair),
                params={"view_balance": 0.30000000000000004},
                distributions={"view_balance": knob},
                user_attrs=attrs,
            )
        )
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, params={}, distributions={}))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={}, distributions={}))
    page = write_gallery(study, tmp_path).read_text(encoding="utf-8")
    assert shown_trials(page) == [r.trial.number for r in ranked_trials(study)]
    assert sorted(shown_trials(page)) == [0, 1, 2, 3]  # not the pruned (4) nor the failed (5)
    rows = page.split("<tr data-trial=")[1:]
    pareto = [row for row in rows if "class='tag pareto'" in row]
    assert len(pareto) == 3 and all("0.2..0.21" not in row for row in pareto)
    raced = [row for row in rows if "class='tag raced'" in row]
    assert len(raced) == 1 and "raced out after 2 seeds" in raced[0]
    for name in ("clip/alignment", "clap/alignment"):
        assert f"data-sort='{name}' data-best='high'" in page
    assert "<td>view_balance</td><td>0.3</td>" in page  # the study file's name, read at 4 digits
    # The media are linked relative to the page's own folder, wherever the render folders are.
    sources = re.findall(r" src='([^']+)'", page)
    assert sources and all((tmp_path / source).is_file() for source in sources), sources


def _loaded_media(frame) -> dict:
    """What a person's browser got of the page's media: each picture's width, each sound's duration once its
    metadata loaded, each clip's poster and that poster's width."""
    return frame.evaluate(
        """async () => {
          const sounds = [...document.querySelectorAll('audio')];
          await Promise.all(sounds.map(a => new Promise(done => {
            if (a.readyState >= 1) return done();
            a.addEventListener('loadedmetadata', done);
            a.addEventListener('error', done);
            a.load();
          })));
          const posters = await Promise.all([...document.querySelectorAll('video')].map(v =>
            new Promise(done => {
              const picture = new Image();
              picture.onload = () => done([v.poster, picture.naturalWidth]);
              picture.onerror = () => done([v.poster, 0]);
              picture.src = v.poster;
            })));
          await Promise.all([...document.images].map(i => i.complete ? null : new Promise(done => {
            i.addEventListener('load', done);
            i.addEventListener('error', done);
          })));
          return {
            pictures: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]),
            sounds: sounds.map(a => a.duration),
            posters: posters,
            captions: [...document.querySelectorAll('figcaption')].map(c => c.innerText),
          };
        }"""
    )


def _assert_person_sees_everything(media: dict, rows: int) -> None:
    assert len(media["pictures"]) == rows * 3, media["pictures"]  # 2 views and the spectrogram
    assert all(width > 0 for _, width in media["pictures"]), media["pictures"]
    assert len(media["sounds"]) == rows and all(0 < d < float("inf") for d in media["sounds"]), media[
        "sounds"
    ]
    assert len(media["posters"]) == rows, media["posters"]
    assert all("view0.png" in poster and width > 0 for poster, width in media["posters"]), media["posters"]
    for caption in ("view 0 (identity): bright", "view 1 (flip): dark", "sound 0: loud"):
        assert media["captions"].count(caption) == rows, (caption, media["captions"])


def _shown_order(page) -> list[int]:
    return [int(n) for n in page.eval_on_selector_all("#rows > tr", "rows => rows.map(r => r.dataset.trial)")]


@pytest.mark.slow
def test_gallery_opened_from_disk_shows_and_plays_every_knob_set_and_sorts(
    searched: Searched,
    browser,  # noqa: F811
    tmp_path: Path,
):
    assert main(["gallery", "unit", "--runs", str(searched.runs)]) == 0
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(searched.gallery.resolve().as_uri())
    media = _loaded_media(page)
    _assert_person_sees_everything(media, rows=4)
    assert all(not src.startswith(("data:", "/")) for src, _ in media["pictures"])  # relative links
    page.wait_for_timeout(1500)  # the players' loading spinners fade (the README's screenshot)
    page.screenshot(path=str(screenshots(tmp_path) / "study-gallery.png"))
    ranked = [r.trial.number for r in ranked_trials(searched.study)]
    assert _shown_order(page) == ranked
    # Sorting by a score: best first, and a second click the other way; ties keep the leaderboard's order.
    complete = {t.number: t for t in searched.study.get_trials(states=(TrialState.COMPLETE,))}
    for score in ("clip/view1", "clip/view0"):
        values = {n: trial_record(complete[n], "scores")[score] for n in ranked}
        page.get_by_role("button", name=score, exact=True).click()
        assert _shown_order(page) == sorted(ranked, key=lambda n: (-values[n], ranked.index(n)))
        page.get_by_role("button", name=f"{score} \u25bc", exact=True).click()
        assert _shown_order(page) == sorted(ranked, key=lambda n: (values[n], ranked.index(n)))
        # What a person reads in the first row is that score's best (or worst) value, at 4 digits.
        first = page.locator("#rows > tr").first.inner_text()
        assert f"{score}\t{min(values.values()):.4g}" in first, first
    page.get_by_role("button", name="rank", exact=True).click()
    assert _shown_order(page) == ranked


@pytest.mark.slow
def test_gallery_in_mlflows_artifact_viewer_loads_every_rows_media_from_its_trials_run(
    searched: Searched,
    browser,  # noqa: F811
    tmp_path: Path,
):
    port = free_port()
    command = [sys.executable, "-m", "sounding_anagrams.cli", "ui", "--runs", str(searched.runs)]
    with served([*command, "--port", str(port)], port, tmp_path / "ui.log"):
        client = MlflowClient(searched.runner.tracker.tracking_uri)
        experiment = searched.runner.tracker.experiment_id
        url = gallery_page(client, f"http://127.0.0.1:{port}", experiment)
        assert url is not None
        page = browser.new_page(viewport={"width": 1800, "height": 1000})
        page.goto(url)
        viewer = _frame_with_rows(page)
        media = _loaded_media(viewer)
        _assert_person_sees_everything(media, rows=4)
        page.screenshot(path=str(screenshots(tmp_path) / "mlflow-study-gallery.png"))
        # Each row's media come from its own trial's run, through the UI's artifact endpoint.
        for trial_number, run_id in viewer.eval_on_selector_all(
            "#rows > tr", "rows => rows.map(r => [r.dataset.trial, r.dataset.run])"
        ):
            sources = viewer.eval_on_selector_all(
                f"#rows > tr[data-trial='{trial_number}'] [data-artifact]", "els => els.map(e => e.src)"
            )
            assert sources and all(
                "get-artifact?path=seed-" in s and f"run_uuid={run_id}" in s for s in sources
            )
        before = _shown_order(viewer)
        viewer.get_by_role("button", name="clip/view1", exact=True).click()
        assert sorted(_shown_order(viewer)) == sorted(before)  # the script runs in the viewer's frame too


def _frame_with_rows(page, timeout: float = 90):
    """The frame MLflow's artifact viewer shows the gallery in, once it has its rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.frames:
            with contextlib.suppress(Exception):
                if frame.evaluate("document.querySelectorAll('#rows > tr').length > 0"):
                    return frame
        page.wait_for_timeout(500)
    raise AssertionError("MLflow's artifact viewer never showed the gallery")
