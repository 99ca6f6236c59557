"""Study files: the shipped ones load; bad ones are named by file, field and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sounding_anagrams.cli import main
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.search.study import load_study, parse_study

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "studies").glob("*.yaml"))
BASE = yaml.safe_load((REPO / "studies" / "rotate.yaml").read_text())


def test_the_shipped_studies_cover_the_seed_examples_and_per_view_audio():
    names = {path.stem for path in SHIPPED}
    assert {"rotate", "permute", "hybrid", "flip", "mirror-two-sounds"} <= names
    for path in SHIPPED:
        for tiny in (False, True):
            study = load_study(path, tiny=tiny)
            assert study.name == path.stem
            assert (study.render.image_model == "tiny") == tiny
    two_sounds = load_study(REPO / "studies" / "mirror-two-sounds.yaml")
    assert len(two_sounds.render.audio_prompts) == 2 and two_sounds.sampler == "nsga2"
    assert len(two_sounds.objectives) == 2


def test_tiny_section_makes_the_study_small():
    real, tiny = (
        load_study(REPO / "studies" / "rotate.yaml"),
        load_study(REPO / "studies" / "rotate.yaml", tiny=True),
    )
    assert real.render.num_inference_steps == 50 and tiny.render.num_inference_steps == 6
    assert tiny.budget.trials == 6 and tiny.batch == 3
    assert next(p for p in tiny.space if p.name == "image_start_step").high == 2


def test_candidate_config_applies_the_trial_params():
    study = load_study(REPO / "studies" / "rotate.yaml", tiny=True)
    config = study.candidate_config({"audio_weight": 0.3, "view_balance": 0.6, "seed": 12})
    assert config.audio_weight == 0.3 and config.view_weights == (0.4, 0.6) and config.seed == 12
    assert config.views == study.render.views


def mutate(path: str, value):
    data = copy.deepcopy(BASE)
    keys = path.split(".")
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("sampler", "tpee", r"sampler='tpee': unknown sampler 'tpee'; did you mean 'tpe'\?"),
        ("pruner", "medain", r"pruner.type='medain': unknown pruner 'medain'; did you mean 'median'\?"),
        (
            "objectives",
            ["min(clip/alignmnet, clap/audio0)"],
            r"unknown metric 'clip/alignmnet'; did you mean",
        ),
        ("objectives", [], r"give at least one objective"),
        (
            "space.audio_wieght",
            {"type": "float", "low": 0, "high": 1},
            r"space.audio_wieght=.*unknown searchable parameter 'audio_wieght'; did you mean 'audio_weight'",
        ),
        ("space.audio_weight.type", "flaot", r"space.audio_weight.type='flaot': unknown type 'flaot'"),
        ("space.audio_weight.high", 0.1, r"space.audio_weight.high=0.1: must be greater than low=0.2"),
        (
            "space.audio_weight.high",
            1.5,
            r"space.audio_weight=1.5: gives an invalid render config: "
            r"audio_weight=1.5: must be in \[0, 1\]",
        ),
        (
            "space.image_start_step.high",
            60,
            r"space.image_start_step=60: .*must be in \[0, num_inference_steps\)",
        ),
        (
            "space.image_guidance_scale.low",
            "five",
            r"space.image_guidance_scale.low='five': must be a number",
        ),
        ("render.views", ["identity", "rotat"], r"render: views='rotat': unknown view 'rotat'"),
        ("render.image_promts", ["a", "b"], r"render: image_promts=.*did you mean 'image_prompts'"),
        ("budget", {}, r"budget=\{\}: give trials and/or minutes"),
        ("budget.trials", 0, r"budget.trials=0: must be an integer of at least 1"),
        ("batch", 0, r"batch=0: must be an integer of at least 1"),
        ("previews", [1.5], r"previews=\[1.5\]: give a list of fractions"),
        ("previews", [], r"previews=\[\]: a pruner needs preview steps"),
        ("name", KeyError, r"name=None: give the study a name"),
        ("colour", "blue", r"colour='blue': unknown field 'colour'"),
    ],
)
def test_bad_study_files_name_file_field_and_rule(tmp_path: Path, path, value, pattern):
    study_file = tmp_path / "bad.yaml"
    study_file.write_text(yaml.safe_dump(mutate(path, value)))
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_study(study_file)
    assert str(study_file) in str(caught.value)


def test_balance_needs_two_permutation_views():
    data = yaml.safe_load((REPO / "studies" / "hybrid.yaml").read_text())
    data["space"]["view_balance"] = {"type": "float", "low": 0.3, "high": 0.7}
    with pytest.raises(ConfigError, match=r"space.view_balance=.*exactly two permutation views"):
        parse_study(data, source="hybrid.yaml")


def test_pruning_and_grid_rules():
    multi = mutate("objectives", ["clip/alignment", "clap/audio0"])
    with pytest.raises(ConfigError, match="pruning needs a single objective"):
        parse_study(multi, source="s.yaml")
    grid = mutate("sampler", "grid")
    with pytest.raises(ConfigError, match=r"space.audio_weight.step=None: a grid search needs a step"):
        parse_study(grid, source="s.yaml")


def test_search_command_reports_a_bad_study_file_and_exits_2(tmp_path: Path, capsys):
    study_file = tmp_path / "typo.yaml"
    study_file.write_text(yaml.safe_dump(mutate("sampler", "tpee")))
    assert main(["search", str(study_file), "--models", "tiny", "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {study_file}: sampler='tpee'") and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started
    assert main(["search", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file; studies live in studies/*.yaml" in capsys.readouterr().err
