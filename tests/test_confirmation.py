"""The confirmation stage: the top knob sets rendered on held-out seeds, the leaderboard's and export's use
of them, and `sounding-anagrams confirm`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sounding_anagrams.cli import main
from sounding_anagrams.numbers import readable
from sounding_anagrams.search.confirmation import stored_confirmations
from sounding_anagrams.search.loop import SearchRunner
from sounding_anagrams.search.opening import SearchSettings
from sounding_anagrams.search.seeds import held_out_seeds, seed_bank, trial_seeds
from sounding_anagrams.search.study import parse_study
from tests.designed_judges import JUDGED_STUDY, designed_judges

CONFIRMED = {**JUDGED_STUDY, "confirm": {"top": 2, "seeds": 2}, "budget": {"trials": 4}}


@pytest.fixture(scope="module")
def confirmed_search(tiny_models, tmp_path_factory):
    """One tiny search that confirms its top 2 knob sets on 2 held-out seeds: (runner, runs folder)."""
    runs = tmp_path_factory.mktemp("confirmed")
    study = parse_study(CONFIRMED, source="test-study.yaml", tiny=True)
    runner = SearchRunner.open(
        study, tiny_models, designed_judges(), SearchSettings(runs_dir=runs, progress=False)
    )
    runner.run()
    return runner, runs


def test_held_out_seeds_are_no_trials_seeds():
    held = held_out_seeds(0, 8)
    assert held == held_out_seeds(0, 8) and len(set(held)) == 8 and held_out_seeds(0, 3) == held[:3]
    assert not set(held) & set(seed_bank(0, 64))
    assert not set(held) & {s for n in range(200) for s in trial_seeds(0, n, 8)}


@pytest.mark.slow
def test_the_search_confirms_its_top_knob_sets_on_held_out_seeds(confirmed_search):
    runner, runs = confirmed_search
    study = runner.optuna_study
    confirmations = stored_confirmations(study)
    best_two = sorted(study.get_trials(), key=lambda t: -t.values[0] if t.values else math.inf)[:2]
    assert set(confirmations) == {t.number for t in best_two}
    held = held_out_seeds(0, 2)
    for number, confirmation in confirmations.items():
        assert confirmation.seeds == held  # the same held-out seeds for every knob set, none a trial's
        assert not set(held) & set(study.trials[number].user_attrs["seeds"])
        assert len(confirmation.values) == 2 and all(math.isfinite(v[0]) for v in confirmation.values)
        assert confirmation.mean[0] == pytest.approx(np.mean([v[0] for v in confirmation.values]))
        assert confirmation.ci95[0] > 0
        for k, seed in enumerate(held):
            folder = Path(confirmation.folder) / f"seed-{k}"
            assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == seed
            assert {"view0.png", "view1.png", "audio0.wav"} <= {p.name for p in folder.iterdir()}
            # The trial's knobs, rendered again.
            config = yaml.safe_load((folder / "config.yaml").read_text())
            for name, value in study.trials[number].params.items():
                assert config[name] == pytest.approx(value)
    # Each is an MLflow run tagged as the confirmation of its trial, under the search's run; not a trial.
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    logged = client.search_runs([runner.tracker.experiment_id], max_results=100)
    confirmation_runs = [r for r in logged if "confirmation_of" in r.data.tags]
    assert {int(r.data.tags["confirmation_of"]) for r in confirmation_runs} == set(confirmations)
    for run in confirmation_runs:
        confirmation = confirmations[int(run.data.tags["confirmation_of"])]
        assert "trial" not in run.data.tags and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == runner.tracker.parent_run_id
        assert run.data.metrics["objective"] == pytest.approx(confirmation.mean[0])
        assert json.loads(run.data.tags["seeds"]) == held
    assert len([r for r in logged if "trial" in r.data.tags]) == 4
    assert not study.user_attrs.get("confirmation_claims")  # released once stored


@pytest.mark.slow
def test_leaderboard_and_export_name_the_confirmed_winner(confirmed_search, tmp_path: Path, capsys):
    runner, runs = confirmed_search
    confirmations = stored_confirmations(runner.optuna_study)
    winner = max(confirmations.values(), key=lambda c: c.mean[0])
    assert main(["leaderboard", "unit", "--runs", str(runs), "--format", "json"]) == 0
    board = json.loads(capsys.readouterr().out)
    rows = {row["trial"]: row for row in board["knob_sets"]}
    objective = runner.optuna_study.user_attrs["objectives"][0]
    for number, confirmation in confirmations.items():
        assert rows[number][f"{objective} held-out"] == pytest.approx(confirmation.mean[0])
        assert rows[number][f"{objective} held-out ci95"] == pytest.approx(confirmation.ci95[0])
        assert rows[number]["held-out seeds"] == 2
    assert all(row["held-out seeds"] == 0 for n, row in rows.items() if n not in confirmations)
    assert main(["leaderboard", "unit", "--runs", str(runs)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("rank"))
    assert "held-out" in header.split() and f"{readable(winner.mean[0])} ±" in table
    assert main(["export", "unit", "--runs", str(runs), "--out", str(tmp_path)]) == 0
    exported = tmp_path / f"unit-trial-{winner.trial:04d}.yaml"
    assert str(exported) in capsys.readouterr().out
    header = exported.read_text()
    assert "confirmed on 2 held-out seeds (no trial rendered them)" in header
    assert f"# held-out seeds: {held_out_seeds(0, 2)}" in header
    assert f"{readable(winner.mean[0])} ±{readable(winner.ci95[0])}" in header
    assert "the confirmed winner of 2 knob set(s) confirmed" in header


@pytest.mark.slow
def test_confirm_command_confirms_what_is_not_confirmed_yet(tmp_path: Path, capsys):
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({**CONFIRMED, "name": "later", "budget": {"trials": 3}}))
    runs = ["--models", "tiny", "--runs", str(tmp_path / "runs")]
    assert main(["search", str(study_file), *runs, "--quiet", "--no-confirm"]) == 0
    capsys.readouterr()

    def knob_sets() -> list[dict]:
        assert main(["leaderboard", "later", *runs, "--format", "json"]) == 0
        return json.loads(capsys.readouterr().out)["knob_sets"]

    assert not any("held-out seeds" in row for row in knob_sets())  # --no-confirm: nothing confirmed
    assert main(["confirm", str(study_file), *runs, "--quiet"]) == 0
    assert "confirmed 2 knob set(s) on 2 held-out seeds" in capsys.readouterr().out
    assert main(["confirm", str(study_file), *runs, "--quiet"]) == 0
    assert "confirmed 0 knob set(s) on 2 held-out seeds (the top ones were confirmed already)" in (
        capsys.readouterr().out
    )
    assert main(["confirm", str(study_file), *runs, "--quiet", "--top", "3"]) == 0
    assert "confirmed 1 knob set(s)" in capsys.readouterr().out
    assert sorted(row["held-out seeds"] for row in knob_sets()) == [2, 2, 2]
    assert main(["confirm", str(study_file), *runs, "--top", "0"]) == 2
    assert "--top=0: must be at least 1" in capsys.readouterr().err
