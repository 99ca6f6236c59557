"""Racing: seeds rendered in rounds, a knob set stopped once Optuna's WilcoxonPruner finds it significantly
worse than the leader on the paired seeds so far, its value the mean of the seeds it rendered; the render
budget that racing stretches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from sounding_anagrams.cli import main
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.search.loop import SearchRunner
from sounding_anagrams.search.opening import SearchSettings
from sounding_anagrams.search.report import leaderboard
from sounding_anagrams.search.samplers import SettledStudy
from sounding_anagrams.search.seeds import held_out_seeds, seed_bank
from sounding_anagrams.search.stores import trial_record
from sounding_anagrams.search.study import parse_study
from tests.designed_judges import JUDGED_STUDY, designed_judges

RACING = {
    **JUDGED_STUDY,
    "render": {**JUDGED_STUDY["render"], "height": 64, "width": 256},
    "pruner": {"type": "wilcoxon", "p_threshold": 0.1},
    "seeds_per_trial": 6,  # rounds of 2: the race can decide after 4 seeds (2**-4 < 0.1)
    "batch": 4,  # two rounds per sampler call
    "budget": {"renders": 40},
    "confirm": {"top": 2, "seeds": 2},
}


def racing_search(runs: Path, tiny_models) -> SearchRunner:
    study = parse_study(RACING, source="racing.yaml", tiny=True)
    runner = SearchRunner.open(
        study, tiny_models, designed_judges(), SearchSettings(runs_dir=runs, progress=False)
    )
    runner.run()
    return runner


@pytest.fixture(scope="module")
def raced(tiny_models, tmp_path_factory):
    runs = tmp_path_factory.mktemp("racing")
    return racing_search(runs, tiny_models), runs


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"seeds_per_trial": 4}, "seeds_per_trial", "can never stop a trial"),
        ({"pruner": {"type": "wilcoxon", "p_threshold": 0.01}}, "seeds_per_trial", "at least 9 seeds"),
        ({"seeds_per_round": 4}, "seeds_per_round", "must divide seeds_per_trial=6"),
        ({"batch": 3}, "batch", "multiple of seeds_per_round=2"),
        ({"pruner": "median", "previews": [0.5], "seeds_per_round": 2}, "seeds_per_round", "for racing"),
        ({"budget": {"renders": 9}}, "budget.renders", "at least 10"),
        ({"pruner": {"type": "wilcoxon", "p_threshold": 2}}, "pruner", "p_threshold"),
    ],
)
def test_a_race_that_cannot_work_is_refused_naming_the_field(changes, field, says):
    with pytest.raises(ConfigError) as caught:
        parse_study({**RACING, **changes}, source="racing.yaml")
    assert caught.value.field == field and says in str(caught.value)


def test_racing_needs_no_previews_and_rounds_default_to_two():
    study = parse_study(RACING, source="racing.yaml")
    assert study.races and study.seeds_per_round == 2 and study.trials_per_call == 2 and not study.previews
    plain = parse_study({**RACING, "pruner": "none", "batch": 6}, source="racing.yaml")
    assert not plain.races and plain.seeds_per_round == 6


def test_the_leader_of_a_race_is_complete_on_all_its_seeds():
    """A raced-out trial with a high mean over its few seeds never becomes the leader others race."""
    study = optuna.create_study(direction="maximize")
    full = {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}
    study.add_trial(optuna.trial.create_trial(value=0.5, intermediate_values=full))
    study.add_trial(
        optuna.trial.create_trial(value=0.9, intermediate_values={0: 0.9, 1: 0.9}, user_attrs={"raced": True})
    )
    study.add_trial(optuna.trial.create_trial(value=0.4, intermediate_values=full))
    assert SettledStudy(study, frozenset({0, 1, 2})).best_trial.number == 0
    assert SettledStudy(study, frozenset({1, 2})).best_trial.number == 2  # only what was visible
    with pytest.raises(ValueError):
        _ = SettledStudy(study, frozenset({1})).best_trial


@pytest.mark.slow
def test_a_racing_search_stops_losers_after_their_first_rounds(raced):
    runner, runs = raced
    study = runner.optuna_study
    trials = study.get_trials()
    bank = seed_bank(0, 6)
    raced_out = [t for t in trials if t.user_attrs.get("raced")]
    assert raced_out, "no trial was raced out: the designed judges rank these knob sets apart"
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE
        rendered = len(trial_record(trial, "seed_values"))
        # Paired seeds: every trial renders the bank's first seeds, in rounds of 2, each reported at its
        # seed index.
        assert trial.user_attrs["seeds"] == bank[:rendered]
        assert sorted(trial.intermediate_values) == list(range(rendered))
        assert trial.values[0] == pytest.approx(np.mean([v[0] for v in trial_record(trial, "seed_values")]))
        folders = sorted(p.name for p in Path(trial.user_attrs["trial_folder"]).glob("seed-*"))
        assert folders == [f"seed-{k}" for k in range(rendered)]  # the loser's later seeds never rendered
        if trial.user_attrs.get("raced"):
            assert rendered in (2, 4) and rendered < 6
            # Raced out against a leader complete on all 6 seeds that it trails on the shared seeds.
            leaders = [t for t in trials if not t.user_attrs.get("raced") and t.number < trial.number]
            assert any(
                all(t.intermediate_values[k] > trial.intermediate_values[k] for k in range(rendered))
                for t in leaders
            )
        else:
            assert rendered == 6
    # The render budget (40) covers the trials and the confirmation (2 x 2), and is spent up to less than
    # one trial's seeds: a raced-out trial's unrendered seeds go back to it.
    spent = sum(len(trial_record(t, "seed_values")) for t in trials)
    assert 40 - 4 - 6 < spent <= 40 - 4
    # MLflow marks the raced-out trials.
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    runs_logged = client.search_runs([runner.tracker.experiment_id], "tags.trial != ''", max_results=100)
    assert {int(r.data.tags["trial"]) for r in runs_logged if r.data.tags.get("raced") == "true"} == {
        t.number for t in raced_out
    }


@pytest.mark.slow
def test_raced_knob_sets_rank_below_complete_ones_and_are_never_confirmed(raced, capsys):
    runner, runs = raced
    board = leaderboard(runner.optuna_study, top=20)
    frame = board.knob_sets
    assert list(frame["raced"]) == sorted(frame["raced"])  # the complete knob sets first
    assert set(frame.loc[frame["raced"], "seeds rendered"]) <= {2, 4}
    confirmed = runner.optuna_study.user_attrs["confirmations"]
    trials = runner.optuna_study.trials
    assert confirmed and not any(trials[int(n)].user_attrs.get("raced") for n in confirmed)
    for record in confirmed.values():
        assert record["seeds"] == held_out_seeds(0, 2)
    assert main(["leaderboard", "unit", "--runs", str(runs), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["knob_sets"]
    assert any(row["raced"] for row in rows) and all(
        (row["held-out seeds"] == 2) == (str(row["trial"]) in confirmed) for row in rows
    )
    assert main(["leaderboard", "unit", "--runs", str(runs)]) == 0
    table = capsys.readouterr().out
    # The seeds column says how many seeds a raced knob set was judged on.
    assert "4 raced" in table or "2 raced" in table


@pytest.mark.slow
def test_the_same_racing_study_races_the_same_way(raced, tiny_models, tmp_path):
    """Rounds are scheduled by a fixed rule (a round's next one two batches later, or at once when the batch
    would be empty), so a second run renders the same rounds and races out the same trials."""
    first = raced[0].optuna_study.get_trials()
    again = racing_search(tmp_path, tiny_models).optuna_study.get_trials()
    assert [(t.number, t.values, t.user_attrs.get("raced")) for t in again] == [
        (t.number, t.values, t.user_attrs.get("raced")) for t in first
    ]


def _study_of(values_of_x, seed_std: float) -> optuna.Study:
    """A study of 12 trials on x in [0, 1] whose values are ``values_of_x(x)``, each the mean of 4 seeds
    spread by ``seed_std``."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    for x in np.linspace(0.0, 1.0, 12):
        value = values_of_x(x)
        seeds = [[value + seed_std * d] for d in (-1.5, -0.5, 0.5, 1.5)]
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": float(x)},
                distributions={"x": distribution},
                value=value,
                user_attrs={"seed_values": seeds},
            )
        )
    return study


def test_the_terminator_stops_a_flat_study_and_lets_a_steep_one_go_on():
    from sounding_anagrams.search.samplers import nothing_left_to_find, seed_noise

    flat = _study_of(lambda x: 0.5 + 1e-4 * x, seed_std=0.05)
    assert seed_noise(flat) == pytest.approx(np.std([-1.5, -0.5, 0.5, 1.5], ddof=1) * 0.05 / 2)
    assert nothing_left_to_find(flat, min_trials=8, seed=0)
    steep = _study_of(lambda x: float(np.sin(6 * x)), seed_std=1e-4)
    assert not nothing_left_to_find(steep, min_trials=8, seed=0)
    assert not nothing_left_to_find(flat, min_trials=20, seed=0)  # too few trials yet


def test_terminate_is_off_unless_asked():
    assert parse_study(RACING, source="racing.yaml").terminate is None
    on = parse_study({**RACING, "terminate": True}, source="racing.yaml")
    assert on.terminate is not None and on.terminate.min_trials == 8
    with pytest.raises(ConfigError) as caught:
        parse_study({**RACING, "terminate": {"min_trials": 1}}, source="racing.yaml")
    assert caught.value.field == "terminate.min_trials"
