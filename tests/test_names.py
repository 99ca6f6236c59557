"""What a person reads: every knob and objective named in Optuna and MLflow, numbers at 4 significant
digits, files others can read."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import optuna
import pytest

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.files import write_text_atomic
from sounding_anagrams.numbers import readable, signed
from sounding_anagrams.search.opening import DEFINITION_ATTR, SearchSettings, open_search
from sounding_anagrams.search.report import leaderboard, short_names
from sounding_anagrams.search.study import balance_weights, parse_study
from sounding_anagrams.search.tracking import metric_name, objective_metrics
from tests.designed_judges import JUDGED_STUDY


def test_numbers_read_at_four_significant_digits():
    assert readable(0.6919126410238697) == "0.6919"
    assert readable(0.30000000000000004) == "0.3"
    assert readable([0.30000000000000004, 0.7]) == "[0.3, 0.7]"
    assert readable(12) == "12" and readable(None) == "-" and readable(float("nan")) == "-"
    assert signed(-0.000123456) == "-0.0001235" and signed(0.5) == "+0.5" and signed(float("nan")) == "-"


def test_a_balance_sets_weights_without_float_noise():
    assert balance_weights(0.7) == [0.3, 0.7]  # 1 - 0.7 is 0.30000000000000004 in floats
    weights = balance_weights(0.6919126410238697)
    assert weights[1] == 0.6919126410238697 and sum(weights) == pytest.approx(1.0, abs=1e-12)


def test_objectives_are_named_in_mlflow_metrics():
    assert objective_metrics([0.5], ["min(clip/alignment, clap/audio0)"]) == {"objective": 0.5}
    assert objective_metrics([0.5, 0.25], ["clip/alignment", "clap/alignment"]) == {
        "objective/clip/alignment": 0.5,
        "objective/clap/alignment": 0.25,
    }
    assert metric_name("mean(clip/view0, clap/audio0)") == "mean clip/view0 clap/audio0"
    assert objective_metrics([0.5, 0.25]) == {"objective0": 0.5, "objective1": 0.25}


def test_short_knob_names_are_initials_and_never_collide():
    names = ["audio_weight", "view_balance", "image_guidance_scale", "audio_view_balance", "very_big"]
    assert short_names(names) == {
        "audio_weight": "aw",
        "view_balance": "vb",
        "image_guidance_scale": "igs",
        "audio_view_balance": "avb",
        "very_big": "vb2",
    }


def test_an_opened_study_names_its_objectives_and_keeps_a_short_definition(tmp_path: Path):
    data = {**JUDGED_STUDY, "objectives": ["clip/alignment", "clap/audio0"]}
    study = parse_study(data, source="named.yaml", tiny=True)
    opened = open_search(study, SearchSettings(runs_dir=tmp_path, progress=False))
    optuna_study = opened.optuna_study
    assert optuna_study.metric_names == ["clip/alignment", "clap/audio0"]
    frame = optuna_study.trials_dataframe()
    assert frame.empty or "values_clip/alignment" in frame.columns
    # `optuna studies` prints the user attributes: the definition is a fingerprint there, whole elsewhere.
    fingerprint = optuna_study.user_attrs[DEFINITION_ATTR]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 12
    study_id = opened.storage.get_study_id_from_name(opened.name)
    assert (
        opened.storage.get_study_system_attrs(study_id)[DEFINITION_ATTR]["objectives"] == data["objectives"]
    )
    # The same name with another definition is refused, naming what differs.
    other = parse_study({**data, "aggregate": "median"}, source="other.yaml", tiny=True)
    with pytest.raises(ConfigError, match="aggregate: 'mean' there, 'median' here"):
        open_search(other, SearchSettings(runs_dir=tmp_path, progress=False))
    loaded = optuna.load_study(study_name=opened.name, storage=opened.settings.storage_url)
    assert loaded.metric_names == ["clip/alignment", "clap/audio0"]


def test_written_files_are_readable_by_all_under_the_usual_umask(tmp_path: Path):
    target = tmp_path / "card.html"
    write_text_atomic(target, "<p>hello</p>")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_text() == "<p>hello</p>" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("states", [[], [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED]])
def test_a_study_without_a_knob_set_gives_valid_csv_and_json_and_a_sentence(states):
    study = optuna.create_study(study_name="empty", directions=["maximize", "maximize"])
    study.set_user_attr("objectives", ["clip/alignment", "clap/alignment"])
    for state in states:
        trial = study.ask({"audio_weight": optuna.distributions.FloatDistribution(0.2, 0.8)})
        study.tell(trial, state=state)
    board = leaderboard(study)
    header = board.render("csv").splitlines()
    assert header[0].startswith("rank,pareto,trial,clip/alignment,clip/alignment min over seeds")
    assert ("audio_weight" in header[0]) == bool(states) and header[1:] == []
    data = json.loads(board.render("json"))
    assert data["knob_sets"] == [] and data["best_renders"] == []
    assert board.render().endswith("no completed trial yet")


def test_runs_that_is_a_file_or_cannot_be_written_is_one_sentence(tmp_path: Path, monkeypatch):
    import errno
    import tempfile

    from sounding_anagrams.files import writable_folder

    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--runs='.*runs': is a file, not a folder"):
        writable_folder(a_file, "--runs")

    # A read-only disk (root writes anywhere here, so the disk's refusal is played by mkstemp).
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=r"cannot be written \(Read-only file system\): give a folder you"):
        writable_folder(tmp_path / "elsewhere", "--runs")
