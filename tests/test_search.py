"""The search loop for real: Optuna storage (sqlite, PostgreSQL), MLflow store, tiny models, real files."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from sounding_anagrams.cli import main
from sounding_anagrams.errors import ConfigError, DiskFullError
from sounding_anagrams.evaluation.evaluate import Scorers
from sounding_anagrams.numbers import readable, signed
from sounding_anagrams.sampler.pipeline import JointSampler
from sounding_anagrams.search.locations import seed_folders
from sounding_anagrams.search.loop import SearchRunner
from sounding_anagrams.search.opening import SearchSettings
from sounding_anagrams.search.report import seed_spread, single_renders
from sounding_anagrams.search.seeds import seed_bank, trial_seeds
from sounding_anagrams.search.stores import trial_record
from sounding_anagrams.search.study import load_study, parse_study
from sounding_anagrams.search.workers import ORPHANED
from tests.designed_judges import JUDGED_STUDY as STUDY
from tests.designed_judges import designed_judges
from tests.processes import kill_mid_trial, light_rotate
from tests.servers import postgres_url

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def designed_scorers() -> Scorers:
    return designed_judges()


def runner_for(study_dict, tiny_models, scorers, runs: Path, **settings) -> SearchRunner:
    study = parse_study(study_dict, source="test-study.yaml", tiny=True)
    return SearchRunner.open(
        study, tiny_models, scorers, SearchSettings(runs_dir=runs, progress=False, **settings)
    )


def mlflow_trial_runs(runs: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    all_runs = client.search_runs([found.experiment_id], max_results=1000)
    return client, [r for r in all_runs if "trial" in r.data.tags]


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (links not followed) with its size and modification time (ns)."""
    return {
        str(path.relative_to(folder)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in folder.rglob("*")
    }


def assert_tidy(runs: Path) -> None:
    """What a finished search leaves under ``runs``: every file readable by all (0644, as a shared disk or an
    MLflow server needs), no lock file, no empty folder."""
    for folder, subfolders, files in os.walk(runs):
        assert subfolders or files, f"empty folder {folder}"
        for name in files:
            path = Path(folder, name)
            assert not name.endswith(".lock"), f"lock file left behind: {path}"
            if not path.is_symlink():
                assert path.stat().st_mode & 0o777 == 0o644, (path, oct(path.stat().st_mode))


@pytest.mark.slow
def test_small_search_lands_every_trial_in_optuna_and_mlflow(tiny_models, designed_scorers, tmp_path: Path):
    study = {**STUDY, "start_points": [{"audio_weight": 0.75, "image_guidance_scale": 2.0}]}
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    summary = runner.run()
    assert [o.state for o in summary.outcomes] == [TrialState.COMPLETE] * 4
    trials = runner.optuna_study.get_trials(states=(TrialState.COMPLETE,))
    # Trial 0 is the hand-tuned baseline (the render: values), then the start points, then the sampler.
    assert trials[0].params == {"audio_weight": 0.5, "image_guidance_scale": 10.0}
    assert trials[0].user_attrs["start_point"] == "baseline"
    assert trials[1].params == {"audio_weight": 0.75, "image_guidance_scale": 2.0}
    assert trials[1].user_attrs["start_point"] == "start point 1"
    for trial in trials:
        # Paired seeds (the default): every trial renders the study's seed bank, never the sampler's choice,
        # and they are logged.
        assert "seed" not in trial.params
        assert trial.user_attrs["seeds"] == seed_bank(0, 2)
        per_seed = trial_record(trial, "seed_values")
        assert len(per_seed) == 2 and trial.values[0] == pytest.approx(np.mean([v[0] for v in per_seed]))
        for k, seed in enumerate(trial.user_attrs["seeds"]):
            config = yaml.safe_load(Path(seed_folders(trial)[k], "config.yaml").read_text())
            assert config["seed"] == seed and Path(trial.user_attrs["trial_folder"], f"seed-{k}").is_dir()
        best = trial.user_attrs["best_seed"]
        assert per_seed[best][0] == max(v[0] for v in per_seed)
        assert Path(seed_folders(trial)[best]) == Path(trial.user_attrs["trial_folder"], f"seed-{best}")
    client, runs = mlflow_trial_runs(tmp_path, "unit")
    assert sorted(int(r.data.tags["trial"]) for r in runs) == sorted(t.number for t in trials)
    parent_ids = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert parent_ids == {summary.parent_run_id}
    for run in runs:
        trial = next(t for t in trials if t.number == int(run.data.tags["trial"]))
        assert run.data.metrics["objective"] == pytest.approx(trial.values[0])
        per_seed = [run.data.metrics[f"seed{k}/objective"] for k in range(2)]
        assert per_seed == pytest.approx([v[0] for v in trial_record(trial, "seed_values")])
        assert run.data.metrics["objective/min"] == pytest.approx(min(per_seed))
        assert run.data.metrics["objective/max"] == pytest.approx(max(per_seed))
        assert {"seed0/clip/view0", "seed1/clap/audio0"} <= set(run.data.metrics)
        assert json.loads(run.data.params["seeds"]) == trial.user_attrs["seeds"]
        assert json.loads(run.data.tags["seeds"]) == trial.user_attrs["seeds"]
        assert {"clip/view0", "clip/view1", "clip/alignment", "clip/concealment", "clap/audio0"} <= set(
            run.data.metrics
        )
        assert run.data.params["audio_weight"] == str(trial.params["audio_weight"])
        assert run.data.params["views"] == '["identity", "flip"]'
        assert run.data.tags["state"] == "COMPLETE" and run.data.tags["study"] == "unit"
        assert "pending" not in run.data.tags  # a logging detail a person would not understand
        # MLflow's Duration is the trial's, from its ask to its tell, not the logging's.
        assert run.info.start_time == int(trial.datetime_start.timestamp() * 1000)
        assert run.info.end_time == int(trial.datetime_complete.timestamp() * 1000)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"seed-0", "seed-1", "card.html"}
        best = trial.user_attrs["best_seed"]
        for k in range(2):
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id, f"seed-{k}")}
            assert {
                f"seed-{k}/{name}"
                for name in (
                    "view0.png",
                    "view1.png",
                    "spectrogram.png",
                    "audio0.wav",
                    "config.yaml",
                )
            } <= artifacts
            # The clip is made once per trial: for its best seed.
            assert (f"seed-{k}/transition.mp4" in artifacts) == (k == best)
        # Stored once: MLflow's artifact folder of the run is the trial folder itself, not a copy.
        stored = Path(run.info.artifact_uri.removeprefix("file://"))
        assert stored.is_symlink() and stored.resolve() == Path(trial.user_attrs["trial_folder"]).resolve()
        card = Path(trial.user_attrs["trial_folder"], "card.html").read_text()
        # Every seed's two views, spectrogram and sound, linked and not embedded; the best seed first, with
        # its clip; in MLflow's viewer the links go to this run's artifacts.
        assert "base64" not in card and len(card) < 20_000
        assert card.count("<img src='seed-") == 6 and card.count("<audio src='seed-") == 2
        assert card.count(f"<video src='seed-{best}/transition.mp4'") == 1
        assert card.index(f"(best): {trial.user_attrs['seeds'][best]}") < card.index("<img src='seed-")
        assert json.dumps(run.info.run_id) in card
    study_pictures = {a.path for a in client.list_artifacts(summary.parent_run_id, "study")}
    assert {"study/history.png", "study/importances.png", "study/best.png"} <= study_pictures
    # Each objective is named in Optuna (the dashboard, the `optuna` CLI, trials_dataframe).
    assert runner.optuna_study.metric_names == STUDY["objectives"]
    assert_tidy(tmp_path)
    # The objective really is what the judges say: the brightest view0 ranks first.
    best = max(trials, key=lambda t: t.values[0])
    assert runner.optuna_study.best_trial.number == best.number


# A study the median pruner prunes in, whose sampler models the history from the third trial on.
PRUNED_STUDY = {
    **STUDY,
    "seeds": "independent",  # each trial draws its own seeds (what studies did before pairing)
    "sampler": {"type": "tpe", "n_startup_trials": 2},
    "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    "previews": [0.5],
    "budget": {"trials": 8},
    "render": {**STUDY["render"], "num_inference_steps": 6},
}


def trials_of(runner: SearchRunner) -> list[tuple]:
    """What a rerun of the same study must reproduce: each trial's knobs, state, values and previews."""
    return [
        (t.number, t.state, t.params, t.values, t.intermediate_values)
        for t in runner.optuna_study.get_trials()
    ]


@pytest.fixture(scope="module")
def pruned_search(tiny_models, designed_scorers, tmp_path_factory) -> tuple[SearchRunner, Any, Path]:
    """One search of PRUNED_STUDY, shared by the tests that only read it: (runner, summary, runs folder)."""
    runs = tmp_path_factory.mktemp("pruned")
    runner = runner_for(PRUNED_STUDY, tiny_models, designed_scorers, runs)
    return runner, runner.run(), runs


@pytest.mark.slow
def test_pruned_candidates_stop_rendering_and_save_unet_work(
    tiny_models, designed_scorers, pruned_search, tmp_path: Path
):
    pruned_runner, pruned, pruned_runs = pruned_search
    plain = runner_for(
        {**PRUNED_STUDY, "pruner": "none", "previews": []}, tiny_models, designed_scorers, tmp_path / "plain"
    )
    unpruned = plain.run()
    states = [o.state for o in pruned.outcomes]
    assert TrialState.PRUNED in states, states
    for trial in pruned_runner.optuna_study.get_trials():  # seeds: independent
        assert trial.user_attrs["seeds"] == trial_seeds(0, trial.number, 2)
    for outcome in pruned.outcomes:
        if outcome.state == TrialState.PRUNED:
            # A pruned trial stops all its seeds mid-way; it keeps the x0 previews it was pruned on (no clip).
            for k in range(2):
                render = outcome.folder / f"seed-{k}"
                assert {"view0.png", "view1.png", "spectrogram.png", "audio0.wav", "config.yaml"} <= {
                    p.name for p in render.iterdir()
                }
                assert json.loads((render / "render.json").read_text())["preview_percent"] == 50
                assert not (render / "transition.mp4").exists()
            card = (outcome.folder / "card.html").read_text()
            assert "x0 previews the pruner judged" in card and card.count("<img src='seed-") == 6
    assert pruned.unet_samples < unpruned.unet_samples
    _, runs = mlflow_trial_runs(pruned_runs, "unit")
    pruned_run = next(r for r in runs if r.data.tags["state"] == "PRUNED")
    client = MlflowClient(f"sqlite:///{pruned_runs / 'mlflow.db'}")
    history = client.get_metric_history(pruned_run.info.run_id, "preview/clip/view0")
    assert [m.step for m in history] == [50]  # previews are reported at the percent of the schedule
    # The value a pruner judged is the aggregate (mean) over the trial's seeds.
    trial = next(
        t for t in pruned_runner.optuna_study.get_trials() if t.number == int(pruned_run.data.tags["trial"])
    )
    reported = client.get_metric_history(pruned_run.info.run_id, "preview/objective")
    assert [m.value for m in reported] == pytest.approx(list(trial.intermediate_values.values()))


@pytest.mark.slow
def test_the_same_study_gives_the_same_trials_however_slow_the_host(
    tiny_models, designed_scorers, pruned_search, tmp_path: Path
):
    """The sampler asks, and the pruner decides, knowing the same finished trials on every run: a judge thread
    that lags far behind the device (a busy host) changes no proposal, prune or value."""
    runner = runner_for(PRUNED_STUDY, tiny_models, designed_scorers, tmp_path)
    judge = runner.judge.judge

    def lagging_judge(batch) -> None:
        time.sleep(3.0)
        judge(batch)

    runner.judge.judge = lagging_judge  # type: ignore[method-assign]
    runner.run()
    fast = trials_of(pruned_search[0])
    assert len(fast) == 8 and {t[1] for t in fast} >= {TrialState.COMPLETE, TrialState.PRUNED}
    assert trials_of(runner) == fast


@pytest.mark.slow
@pytest.mark.parametrize("with_previews", [False, True])
def test_a_nan_candidate_fails_with_its_reason_and_the_others_complete(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch, with_previews
):
    original = JointSampler.prepare_latents

    def poisoned(self, configs):
        latents = original(self, configs)
        latents[1] = float("nan")  # the second candidate of every batch
        return latents

    monkeypatch.setattr(JointSampler, "prepare_latents", poisoned)
    study = (
        {**STUDY, "previews": [0.5], "pruner": {"type": "median", "n_startup_trials": 1}}
        if with_previews
        else STUDY
    )
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    runner.run()
    trials = runner.optuna_study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # Render 1 of every batch is seed 1 of the batch's first trial: that knob set fails, the other one is
    # judged (complete, or pruned on its previews): a NaN seed never reaches the pruner or the objective.
    others = [t.state for t in trials if t.state != TrialState.FAIL]
    assert len(failed) == 2 and [t.number for t in failed] == [0, 2]
    assert TrialState.COMPLETE in others and set(others) <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in failed:
        seed = trial.user_attrs["seeds"][1]
        assert trial.user_attrs["fail_reason"].startswith(
            f"seed 1 (seed={seed}): non-finite latents at step 0"
        )


@pytest.mark.slow
def test_pictures_that_decode_to_nan_fail_the_candidate_not_the_study(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    import sounding_anagrams.render as render_module

    original = render_module.decode_latents

    def overflowing_audio_vae(model, latents):
        pixels = original(model, latents)
        return pixels * float("nan") if model is tiny_models.audio else pixels

    monkeypatch.setattr(render_module, "decode_latents", overflowing_audio_vae)
    runner = runner_for({**STUDY, "budget": {"trials": 2}}, tiny_models, designed_scorers, tmp_path)
    runner.run()
    trials = runner.optuna_study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("the decoded spectrogram are not finite" in t.user_attrs["fail_reason"] for t in trials)


@pytest.mark.slow
def test_resuming_proposes_new_candidates_and_refuses_changed_objectives(
    tiny_models, designed_scorers, tmp_path: Path
):
    runner_for({**STUDY, "budget": {"trials": 2}}, tiny_models, designed_scorers, tmp_path).run()
    resumed = runner_for(STUDY, tiny_models, designed_scorers, tmp_path)
    resumed.run()
    trials = resumed.optuna_study.get_trials()
    assert len(trials) == 4
    first, second = [t.params for t in trials[:2]], [t.params for t in trials[2:]]
    assert all(params not in first for params in second)  # a fresh sampler stream, not a replay
    with pytest.raises(
        ConfigError, match=r"objectives=.*was created with 1 objective\(s\) of other directions"
    ):
        runner_for(
            {**STUDY, "objectives": ["clip/view0", "clap/audio0"]}, tiny_models, designed_scorers, tmp_path
        )


@pytest.mark.slow
def test_an_invalid_knob_combination_is_a_failed_trial_not_a_crash(
    tiny_models, designed_scorers, tmp_path: Path
):
    # Each value is valid alone; both start steps at 2 leave the first steps without a term.
    study = {
        **STUDY,
        "sampler": "grid",
        "budget": {"trials": 4},
        "space": {
            "audio_start_step": {"type": "categorical", "choices": [0, 2]},
            "image_start_step": {"type": "categorical", "choices": [0, 2]},
        },
    }
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    runner.run()
    trials = runner.optuna_study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.params for t in failed] == [{"audio_start_step": 2, "image_start_step": 2}]
    assert (
        "invalid knobs: image_start_step=2: image_start_step or audio_start_step (=2) must be 0"
        in failed[0].user_attrs["fail_reason"]
    )
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3


@pytest.mark.slow
def test_export_then_render_reproduces_the_best_candidate(
    tiny_models, designed_scorers, tmp_path: Path, capsys, monkeypatch
):
    runner = runner_for(STUDY, tiny_models, designed_scorers, tmp_path)
    runner.run()
    best = runner.optuna_study.best_trial
    before = folder_state(tmp_path)
    assert main(["leaderboard", "unit", "--runs", str(tmp_path), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "clip/alignment" in wide and "clap/audio0" in wide and f"trial-{best.number:04d}" in wide
    # The table fits the terminal (100 columns when piped): the searched knobs by short names, a legend.
    for columns in (120, 72):
        monkeypatch.setenv("COLUMNS", str(columns))
        assert main(["leaderboard", "unit", "--runs", str(tmp_path)]) == 0
        narrow = capsys.readouterr().out
        assert max(len(line) for line in narrow.splitlines()) <= columns, narrow
        assert "knobs: aw = audio_weight, igs = image_guidance_scale" in narrow
    monkeypatch.delenv("COLUMNS")
    assert main(["leaderboard", "unit", "--runs", str(tmp_path)]) == 0
    board = capsys.readouterr().out
    # Knob sets with their spread over seeds, then the best single renders (trial, seed).
    knob_sets, renders = board.split("best single renders")
    spread = seed_spread(best)[0]
    best_row = next(line for line in knob_sets.splitlines() if line.startswith("1 "))
    assert f"{readable(spread['min'])}..{readable(spread['max'])}" in best_row
    assert "min..max over seeds" in knob_sets
    best_seed = best.user_attrs["best_seed"]
    top_render = single_renders(runner.optuna_study)[0]
    assert renders.splitlines()[1].split()[:4] == ["rank", "trial", "seed", "index"]
    assert renders.splitlines()[2].split()[:4] == [
        "1",
        str(top_render.trial.number),
        str(top_render.seed_index),
        str(top_render.seed),
    ]
    # The same tables for programs: CSV (the knob sets), JSON (both, numbers as numbers), Markdown.
    objective = runner.optuna_study.user_attrs["objectives"][0]
    assert main(["leaderboard", "unit", "--runs", str(tmp_path), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert table["trial"].iloc[0] == best.number
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert table[objective].iloc[0] == pytest.approx(best.values[0])
    assert table[f"{objective} min over seeds"].iloc[0] == pytest.approx(spread["min"])
    assert all(column.isascii() for column in table.columns), list(table.columns)
    assert table["where"].iloc[0] == best.user_attrs["trial_folder"]
    assert main(["leaderboard", "unit", "--runs", str(tmp_path), "--format", "json"]) == 0
    board_json = json.loads(capsys.readouterr().out)
    assert board_json["knob_sets"][0]["trial"] == best.number and board_json["seeds_per_trial"] == 2
    assert board_json["best_renders"][0]["seed"] == top_render.seed
    # Paired seeds: each knob set's mean difference to the leader on the seeds both rendered.
    second = board_json["knob_sets"][1]
    other = runner.optuna_study.trials[second["trial"]]
    pairs = zip(trial_record(other, "seed_values"), trial_record(best, "seed_values"), strict=True)
    paired = [a[0] - b[0] for a, b in pairs]
    assert second["vs leader"] == pytest.approx(np.mean(paired)) and second["vs leader seeds"] == 2
    assert second["vs leader ci95"] > 0 and board_json["knob_sets"][0]["vs leader"] == 0
    assert "vs leader, same seeds" in knob_sets
    second_row = next(line for line in knob_sets.splitlines() if line.startswith("2 "))
    assert f"{signed(float(np.mean(paired)))} ±" in second_row
    assert main(["leaderboard", "unit", "--runs", str(tmp_path), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "### knob sets, ranked by the mean over their seeds" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("|"))
    assert [cell.strip() for cell in header.strip("|").split("|")][:3] == ["rank", "trial", "objective"]
    assert f"objective = {objective}, the mean over seeds" in markdown
    assert main(["leaderboard", "unit", "--runs", str(tmp_path), "--format", "xml"]) == 2
    assert "--format='xml': unknown format 'xml'" in capsys.readouterr().err
    # A read-only command: every format above left the runs folder as it was, byte for byte.
    assert folder_state(tmp_path) == before
    # The search run carries the same knob sets as a table artifact.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([runner.tracker.experiment_id]) if "trial" not in r.data.tags)
    logged = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "study/leaderboard.json", str(tmp_path))
        ).read_text()
    )
    logged_frame = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert logged_frame["trial"].tolist() == table["trial"].tolist()
    assert main(["export", "unit", "--runs", str(tmp_path), "--out", str(tmp_path / "exports")]) == 0
    exported = tmp_path / "exports" / f"unit-trial-{best.number:04d}.yaml"
    assert str(exported) in capsys.readouterr().out
    # The export is the best knob set at its best seed.
    assert yaml.safe_load(exported.read_text())["seed"] == best.user_attrs["seeds"][best_seed]
    assert main(["render", "--config", str(exported), "--quiet", "--out", str(tmp_path / "again")]) == 0
    original = Path(seed_folders(best)[best_seed])
    assert (tmp_path / "again" / "config.yaml").read_text() == (original / "config.yaml").read_text()
    for name in ("view0.png", "view1.png", "spectrogram.png"):
        again = np.asarray(Image.open(tmp_path / "again" / name), dtype=int)
        first = np.asarray(Image.open(original / name), dtype=int)
        # The search rendered it in a batch of 4; alone, float sums run in another order: <= 1 grey level.
        assert np.abs(again - first).max() <= 1, name
    # More seeds of the same knob set: seed, seed+1, ... in one batch.
    more = tmp_path / "more"
    assert main(["render", "--config", str(exported), "--quiet", "--num-seeds", "2", "--out", str(more)]) == 0
    seed = best.user_attrs["seeds"][best_seed]
    assert [
        yaml.safe_load((more / f"seed{s}" / "config.yaml").read_text())["seed"] for s in (seed, seed + 1)
    ] == [
        seed,
        seed + 1,
    ]


def test_leaderboard_and_export_of_an_unknown_study_say_what_exists(tmp_path: Path, capsys):
    optuna.create_study(study_name="rotate-tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert main(["leaderboard", "rotat", "--runs", str(tmp_path)]) == 2
    assert "unknown study 'rotat'; did you mean 'rotate-tiny'?" in capsys.readouterr().err
    assert main(["export", "rotate-tiny", "--runs", str(tmp_path)]) == 2
    assert "has no completed trial to export yet" in capsys.readouterr().err
    assert main(["leaderboard", "x", "--runs", str(tmp_path / "empty")]) == 2
    assert "holds no optuna.db" in capsys.readouterr().err


def _search_command(runs: Path, trials: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sounding_anagrams.cli",
        "search",
        str(light_rotate(runs)),
        "--models",
        "tiny",
        "--runs",
        str(runs),
        "--trials",
        str(trials),
        "--batch",
        "2",  # one trial (2 seeds) per sampler call
        "--quiet",
    ]


def _finished(runs: Path, name: str = "rotate-tiny") -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'optuna.db'}")
    except KeyError:  # the database file exists but the study row is not written yet
        return []
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def _wait_for_a_finished_trial(process: subprocess.Popen, runs: Path, timeout: float = 240) -> None:
    """Wait until one trial has finished, while the search process is still running.

    A trial's ``card.html`` is written when it is logged to MLflow, after Optuna was told: only then is the
    study opened here, so this poller never races the search's own creation of the sqlite schema.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(runs.glob("renders/*/trial-*/card.html")) and _finished(runs):
            return
        assert process.poll() is None, "the search ended before it could be stopped"
        time.sleep(0.5)
    raise AssertionError(f"no trial finished within {timeout} s")


@pytest.mark.slow
def test_killed_search_keeps_finished_trials_and_the_rerun_continues(tmp_path: Path):
    process = subprocess.Popen(
        _search_command(tmp_path, 6),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        _wait_for_a_finished_trial(process, tmp_path)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    kept = {t.number: t.values for t in _finished(tmp_path)}
    assert kept, "no trial had finished before the kill"
    assert len(kept) < 6
    result = subprocess.run(
        _search_command(tmp_path, len(kept) + 1),
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    after = {t.number: t.values for t in _finished(tmp_path)}
    assert all(after[number] == values for number, values in kept.items())
    # The killed process's trial in flight is failed at once (its pid is gone) and uses none of the budget.
    trials = _study(tmp_path).get_trials()
    assert all(t.state != TrialState.RUNNING for t in trials)
    died = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("its worker died")]
    assert len(after) - len(died) == len(kept) + 1
    # Whatever the kill cut short after a tell (a clip, a card, an MLflow run) was completed by the rerun:
    # every told trial has exactly one ended MLflow run.
    _client, runs = mlflow_trial_runs(tmp_path, "rotate-tiny")
    logged = sorted(int(r.data.tags["trial"]) for r in runs)
    assert logged == sorted(after) and all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.slow
def test_ctrl_c_fails_in_flight_trials_keeps_finished_ones_and_exits_130(tmp_path: Path):
    process = subprocess.Popen(
        _search_command(tmp_path, 8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    _wait_for_a_finished_trial(process, tmp_path)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: finished trials are kept" in err and "run the same command to resume" in err
    # The trials judged before the Ctrl-C were drained: their files and MLflow runs are finished.
    assert "drained: every told trial has its files and MLflow run" in err, err
    study = optuna.load_study(study_name="rotate-tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states
    assert TrialState.COMPLETE in states
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        assert trial.user_attrs["fail_reason"] == "interrupted"


@pytest.mark.slow
def test_two_workers_one_killed_mid_trial_lose_and_duplicate_nothing(tmp_path: Path):
    """Two workers start together on a fresh sqlite study; one is SIGKILLed while it renders a trial.
    The survivor fails that trial, retries its knob set once, completes the budget exactly, and when it ends
    nothing of the dead worker still looks alive."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    budget = 5
    workers = [
        subprocess.Popen(
            _search_command(tmp_path, budget),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    victim, survivor = workers
    try:
        killed = kill_mid_trial(victim, f"sqlite:///{tmp_path / 'optuna.db'}", "rotate-tiny")
    finally:
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    trials = _study(tmp_path).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert all(t.state not in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    dead = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("its worker died")]
    # The trials it had in flight died with it. A pipelined worker may also have just asked the next one: if
    # it had named itself on it, that one died too (its seeds not chosen yet); if not, it is an orphan with
    # no name and no knobs, failed and not counted.
    assert set(killed) <= {t.number for t in dead}
    assert all("seeds" not in t.user_attrs for t in dead if t.number not in killed)
    orphans = [t for t in trials if t.user_attrs.get("fail_reason") == ORPHANED]
    assert all(t.state == TrialState.FAIL and not t.params and "worker" not in t.user_attrs for t in orphans)
    for trial in dead:
        assert trial.user_attrs["worker"]["pid"] == victim.pid
        assert f"its worker died (pid {victim.pid} on " in trial.user_attrs["fail_reason"]
        # Its knob set (what it had of it) and seeds were retried once by the survivor; the budget counts
        # knob sets exactly.
        retry = [t for t in trials if t.user_attrs.get("retry_of") == trial.number]
        assert len(retry) == 1 and trial.params.items() <= retry[0].params.items()
        assert retry[0].user_attrs["seeds"] == trial.user_attrs.get("seeds", retry[0].user_attrs["seeds"])
        assert retry[0].user_attrs["seeds"] == seed_bank(0, 2)  # studies/rotate.yaml pairs its seeds
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) - len(dead) - len(orphans) == budget
    folders = [t.user_attrs.get("trial_folder") for t in finished if "trial_folder" in t.user_attrs]
    assert len(set(folders)) == len(folders)
    _client, runs = mlflow_trial_runs(tmp_path, "rotate-tiny")
    logged = [int(r.data.tags["trial"]) for r in runs]
    assert len(logged) == len(set(logged)) and set(logged) <= {t.number for t in finished}
    retried = {t.number: t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    assert all(
        r.data.tags["retry_of"] == str(retried[int(r.data.tags["trial"])])
        for r in runs
        if int(r.data.tags["trial"]) in retried
    )


def test_a_trial_left_nameless_by_a_worker_killed_inside_its_ask_does_not_hold_the_search(tmp_path: Path):
    """A worker SIGKILLed between Optuna's ask and naming itself on the trial leaves it RUNNING with no knobs,
    no heartbeat and no worker: the next worker fails it at its next ask and completes the budget, where it
    used to wait for that trial forever."""
    study = load_study(REPO / "studies" / "rotate.yaml", tiny=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stored = optuna.create_study(study_name="rotate-tiny", storage=storage, directions=study.directions)
    # It had taken a start point from the queue: that knob set goes back into the queue and is rendered.
    stored.enqueue_trial({"audio_weight": 0.33}, user_attrs={"start_point": "start point 1"})
    orphan = stored.ask()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen(_search_command(tmp_path, 2), stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = worker.communicate(timeout=600)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    trials = _study(tmp_path).get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[orphan.number].user_attrs["fail_reason"] == ORPHANED and not trials[orphan.number].params
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 2
    assert f"trial {orphan.number}: {ORPHANED}; failed" in err
    requeued = [t for t in done if t.user_attrs.get("start_point") == "start point 1"]
    assert len(requeued) == 1 and requeued[0].params["audio_weight"] == 0.33


def _study(runs: Path) -> optuna.Study:
    return optuna.load_study(study_name="rotate-tiny", storage=f"sqlite:///{runs / 'optuna.db'}")


@pytest.mark.slow
def test_search_on_postgresql_storage(tiny_models, designed_scorers, tmp_path: Path):
    url = postgres_url()
    name = f"unit-pg-{os.getpid()}-{time.time_ns()}"
    runner = runner_for(
        {**STUDY, "name": name, "budget": {"trials": 2}}, tiny_models, designed_scorers, tmp_path, storage=url
    )
    try:
        runner.run()
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_another_study_under_an_existing_name_is_refused_with_what_to_do(
    tiny_models, designed_scorers, tmp_path: Path
):
    runner_for(STUDY, tiny_models, designed_scorers, tmp_path)
    other_prompts = {**STUDY, "render": {**STUDY["render"], "image_prompts": ["dark", "bright"]}}
    with pytest.raises(ConfigError) as caught:
        runner_for(other_prompts, tiny_models, designed_scorers, tmp_path)
    message = str(caught.value)
    assert "name='unit': a study of this name in sqlite:///" in message
    assert "image_prompts: ['bright', 'dark'] there, ['dark', 'bright'] here" in message
    assert "give this study another name, or use another --runs or --storage" in message
    wider = {**STUDY, "space": {**STUDY["space"], "audio_weight": {"type": "float", "low": 0.0, "high": 1.0}}}
    with pytest.raises(ConfigError, match=r"space: "):
        runner_for(wider, tiny_models, designed_scorers, tmp_path)
    # What may change between runs of one study: the budget, the batch, the sampler.
    runner_for(
        {**STUDY, "budget": {"trials": 9}, "sampler": "random"}, tiny_models, designed_scorers, tmp_path
    )


def test_studies_of_one_name_on_two_storages_never_share_render_folders(
    tiny_models, designed_scorers, tmp_path: Path
):
    first = runner_for(STUDY, tiny_models, designed_scorers, tmp_path)
    other = runner_for(
        STUDY, tiny_models, designed_scorers, tmp_path, storage=f"sqlite:///{tmp_path / 'other.db'}"
    )
    again = runner_for(STUDY, tiny_models, designed_scorers, tmp_path)  # the first study, resumed
    assert first.render_root == again.render_root == tmp_path / "renders" / "unit"
    assert other.render_root != first.render_root and other.render_root.name.startswith("unit-")
    assert (other.render_root / ".study").read_text().strip() == other.optuna_study.user_attrs["uid"]
    assert other.opened.trial_folder(0) != first.opened.trial_folder(0)


def test_the_stores_are_checked_before_any_model_loads(tmp_path: Path, capsys, monkeypatch):
    import socket

    import sounding_anagrams.sampler.models as models_module

    def never(*args, **kwargs):
        raise AssertionError("models were loaded before the stores were checked")

    monkeypatch.setattr(models_module, "load_models", never)
    study = str(REPO / "studies" / "rotate.yaml")
    bad_storage = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    assert main(["search", study, "--models", "tiny", "--runs", str(tmp_path), "--storage", bad_storage]) == 2
    assert f"error: --storage='{bad_storage}': cannot open this Optuna storage" in capsys.readouterr().err
    with socket.socket() as free:  # a loopback port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert main(["search", study, "--models", "tiny", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"MLFLOW_TRACKING_URI='http://127.0.0.1:{port}': no MLflow server answers there" in err
    assert time.monotonic() - started < 30  # seconds, not minutes of retries


@pytest.mark.slow
def test_a_full_disk_fails_the_trial_being_written_keeps_the_finished_and_stops_cleanly(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    import sounding_anagrams.render as render_module

    original = render_module.write_wav
    writes = {"n": 0}

    def filling_disk(path, wave, rate):
        writes["n"] += 1
        if writes["n"] > 2:  # the first trial's 2 seeds fit; then the disk is full
            Path(path).write_bytes(b"RIFF")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, wave, rate)

    monkeypatch.setattr(render_module, "write_wav", filling_disk)
    study = {**STUDY, "batch": 2, "budget": {"trials": 2}}  # one trial (2 seeds) per sampler call
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    with pytest.raises(DiskFullError, match=r"is full .*free some space and run the same command to resume"):
        runner.run()
    trials = runner.optuna_study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    for trial in trials[1:]:
        reason = trial.user_attrs["fail_reason"]
        assert reason.startswith("disk full: seed 0 (seed=") and "[Errno 28] No space left" in reason
        assert not Path(trial.user_attrs["trial_folder"], "seed-0").exists()  # nothing half-written
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))
    finished = {
        path: path.read_bytes() for folder in seed_folders(trials[0]) for path in Path(folder).iterdir()
    }
    client, runs = mlflow_trial_runs(tmp_path, "unit")
    assert all(r.info.status != "RUNNING" for r in runs)
    parent = client.search_runs([runs[0].info.experiment_id], "tags.kind = 'search'")[0]
    assert parent.info.status == "FAILED"

    monkeypatch.setattr(render_module, "write_wav", original)  # space was freed
    rerun = runner_for(study, tiny_models, designed_scorers, tmp_path)
    rerun.run()
    after = rerun.optuna_study.get_trials()
    # The cut-short trial judged nothing: the budget of 2 is met by 2 completed knob sets.
    assert [t.state for t in after] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert {path: path.read_bytes() for path in finished} == finished  # the finished renders, untouched


@pytest.mark.slow
def test_a_batch_the_disk_has_no_room_for_is_not_started(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    import shutil

    import sounding_anagrams.search.asking as asking_module

    runner = runner_for(STUDY, tiny_models, designed_scorers, tmp_path)
    written = runner.render_root / "trial-0000" / "seed-0"  # as if a trial had been written before
    written.mkdir(parents=True)
    (written / "view0.png").write_bytes(b"\0" * 3_000_000)
    per_trial = 3_000_000
    usage = shutil.disk_usage(tmp_path)
    almost_full = type(usage)(usage.total, usage.used, asking_module.ROOM_FOR_STORES + per_trial)
    monkeypatch.setattr(asking_module.shutil, "disk_usage", lambda path: almost_full)
    needs = r"the next batch of 2 trial\(s\) and the 0 in flight need about 22 MiB \(2.9 MiB a trial, as"
    with pytest.raises(DiskFullError, match=rf"only \d+ MiB are free under .*{needs}"):
        runner.run()
    # No trial was started for nothing: only the baseline waits, enqueued when the study was made.
    assert [t.state for t in runner.optuna_study.get_trials()] == [TrialState.WAITING]
    assert runner.unet_samples == 0


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    return subprocess.run(command, capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_search_on_a_real_full_disk_stops_with_exit_4_and_resumes_once_there_is_room(tmp_path: Path):
    """``--runs`` on a 22 MiB tmpfs, a budget of 4 trials of about 4 MB each (two renders and a clip): once a
    trial is written, the room for the next ones and the 16 MiB kept for the stores is gone."""
    runs = tmp_path / "runs"
    if not _mount_tmpfs(runs, "22m"):
        pytest.skip(
            "mounting a small tmpfs needs root (CAP_SYS_ADMIN); the injected full disk is tested above"
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        full = subprocess.run(_search_command(runs, 4), capture_output=True, text=True, env=env, timeout=600)
        assert full.returncode == 4, full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "free some space and run the same command to resume" in last
        assert "Traceback" not in full.stderr
        kept = _finished(runs)
        judged = [t for t in kept if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert 1 <= len(judged) < 4
        # Any other trial was cut short by the full disk (judged nothing, done again later).
        reasons = [t.user_attrs.get("fail_reason", "") for t in kept if t not in judged]
        assert all(reason.startswith("disk full") for reason in reasons), reasons
        complete = [t for t in judged if t.state == TrialState.COMPLETE]  # the first two are never pruned
        folders = {p: p.read_bytes() for p in Path(complete[0].user_attrs["trial_folder"]).rglob("*.png")}
        assert folders
        assert not list(runs.rglob("*.partial"))

        subprocess.run(["mount", "-o", "remount,size=200m", str(runs)], check=True)  # space was freed
        rerun = subprocess.run(_search_command(runs, 4), capture_output=True, text=True, env=env, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        states = [t.state for t in _finished(runs)]
        assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 4, states
        assert {p: p.read_bytes() for p in folders} == folders
        client, _ = mlflow_trial_runs(runs, "rotate-tiny")
        experiment = client.get_experiment_by_name("rotate-tiny")
        everything = client.search_runs([experiment.experiment_id])
        running = [(r.info.run_name, r.data.tags) for r in everything if r.info.status == "RUNNING"]
        assert not running, running  # nothing of the first run looks alive
    finally:
        subprocess.run(["umount", "-l", str(runs)], capture_output=True)


@pytest.mark.slow
def test_a_writer_error_fails_that_trial_with_its_reason_and_the_search_goes_on(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    import sounding_anagrams.render as render_module

    original = render_module.write_wav

    def refused_once(path, wave, rate):
        # The first seed of the second trial, by its folder: writer threads write seeds in any order.
        if "trial-0001" in str(path) and ".seed-0." in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        original(path, wave, rate)

    monkeypatch.setattr(render_module, "write_wav", refused_once)
    study = {**STUDY, "batch": 2, "budget": {"trials": 3}}
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    runner.run()
    trials = runner.optuna_study.get_trials()
    # The failed trial is judged nothing; the budget of 3 counts it (a permission error is not a full disk).
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    reason = trials[1].user_attrs["fail_reason"]
    assert reason.startswith("seed 0 (seed=") and "[Errno 13] Permission denied" in reason
    _client, runs = mlflow_trial_runs(tmp_path, "unit")
    failed = next(r for r in runs if r.data.tags["trial"] == "1")
    assert failed.info.status == "FAILED" and "Permission denied" in failed.data.tags["fail_reason"]


@pytest.mark.slow
def test_told_trials_a_stopped_search_did_not_publish_are_completed_at_the_next_start(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch
):
    import sounding_anagrams.search.lifecycle as lifecycle_module
    from sounding_anagrams.search.publishing import Publisher

    # The search is stopped between telling Optuna and making the clips, cards and MLflow runs.
    monkeypatch.setattr(Publisher, "publish", lambda self, batch: None)
    first = runner_for({**STUDY, "budget": {"trials": 2}}, tiny_models, designed_scorers, tmp_path)
    first.run()
    told = first.optuna_study.get_trials(states=(TrialState.COMPLETE,))
    assert len(told) == 2
    assert not list(tmp_path.glob("renders/unit/trial-*/card.html"))
    monkeypatch.undo()
    # Its process is gone (here: said to be), so the next start completes what it left.
    monkeypatch.setattr(lifecycle_module, "worker_is_dead", lambda worker: True)
    second = runner_for({**STUDY, "budget": {"trials": 2}}, tiny_models, designed_scorers, tmp_path)
    second.run()
    _client, runs = mlflow_trial_runs(tmp_path, "unit")
    assert sorted(int(r.data.tags["trial"]) for r in runs) == [t.number for t in told]
    for run, trial in zip(sorted(runs, key=lambda r: int(r.data.tags["trial"])), told, strict=True):
        assert run.info.status == "FINISHED" and run.data.tags["reconciled"] == "true"
        assert run.data.metrics["objective"] == pytest.approx(trial.values[0])
        folder = Path(trial.user_attrs["trial_folder"])
        assert (folder / "card.html").exists()
        best = folder / f"seed-{trial.user_attrs['best_seed']}"
        assert (best / "transition.mp4").stat().st_size > 1000  # made again from the pictures


@pytest.mark.slow
def test_out_of_memory_in_a_preview_costs_that_preview_only(
    tiny_models, designed_scorers, tmp_path: Path, monkeypatch, caplog
):
    """The first batch's previews run out of memory: its two trials go on unpruned and complete with no
    intermediate value; the batch, and the next one with its previews, are judged as usual."""
    import torch

    import sounding_anagrams.search.sampling as sampling_module

    decode = sampling_module.decode_candidates
    calls: list[int] = []

    def short_of_memory(latents, *args, **kwargs):
        calls.append(len(latents))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(sampling_module, "decode_candidates", short_of_memory)
    study = {**STUDY, "previews": [0.5], "pruner": {"type": "median", "n_startup_trials": 1}}
    runner = runner_for(study, tiny_models, designed_scorers, tmp_path)
    runner.run()
    trials = runner.optuna_study.get_trials()
    assert calls == [4, 4]  # each batch's 2 trials x 2 seeds, in one preview call
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.intermediate_values for t in trials[:2]] == [{}, {}]
    assert all(t.intermediate_values.keys() == {50} for t in trials[2:]), [
        t.intermediate_values for t in trials
    ]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials[2:])
    assert (
        "out of memory scoring the x0 previews of 2 trial(s); they go on without this preview" in caplog.text
    )
