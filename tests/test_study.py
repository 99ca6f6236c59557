"""Study files: the shipped ones load; bad ones are named by file, field and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from sounding_anagrams.cli import main
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.search.samplers import should_prune
from sounding_anagrams.search.study import load_study, parse_study

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "studies").glob("*.yaml"))
BASE = yaml.safe_load((REPO / "studies" / "rotate.yaml").read_text())
NOT_RACING = {"pruner": "none", "seeds_per_round": None}  # BASE races; these take it out


def test_the_shipped_studies_cover_the_seed_examples_and_per_view_audio():
    names = {path.stem for path in SHIPPED}
    assert {"rotate", "permute", "hybrid", "flip", "mirror-two-sounds"} <= names
    for path in SHIPPED:
        for tiny in (False, True):
            study = load_study(path, tiny=tiny)
            assert study.name == path.stem
            assert (study.render.image_model == "tiny") == tiny
    two_sounds = load_study(REPO / "studies" / "mirror-two-sounds.yaml")
    assert len(two_sounds.render.audio_prompts) == 2 and len(two_sounds.objectives) == 2
    for path in SHIPPED:
        study, tiny = load_study(path), load_study(path, tiny=True)
        # Single-objective studies race (docs/PERFORMANCE.md, 2026-12-06); racing tests one value.
        races = len(study.objectives) == 1
        assert study.races == tiny.races == races
        assert (study.seeds_per_trial, tiny.seeds_per_trial) == ((8, 6) if races else (4, 2))
        assert study.seeds == "paired" and study.confirm is not None
        assert not any(param.name == "seed" for param in study.space)
        # Trial 0 is the hand-tuned baseline: the render: values of every searched knob.
        assert study.baseline and study.start_points[0]["audio_weight"] == study.render.audio_weight


def test_tiny_section_makes_the_study_small():
    real, tiny = (
        load_study(REPO / "studies" / "rotate.yaml"),
        load_study(REPO / "studies" / "rotate.yaml", tiny=True),
    )
    assert real.render.num_inference_steps == 50 and tiny.render.num_inference_steps == 6
    assert tiny.budget.renders == 40 and tiny.trial_budget == 6 and tiny.batch == 4
    assert tiny.seeds_per_round == 2 and tiny.trials_per_call == 2  # rounds of 2 seeds per sampler call
    assert next(p for p in tiny.space if p.name == "image_start_step").high == 2


def test_candidate_config_applies_the_trial_params():
    study = load_study(REPO / "studies" / "rotate.yaml", tiny=True)
    config = study.candidate_config({"audio_weight": 0.3, "view_balance": 0.6})
    assert config.audio_weight == 0.3 and config.view_weights == (0.4, 0.6)
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
            r"space.image_guidance_scale.low='five': must be a finite number",
        ),
        ("render.views", ["identity", "rotat"], r"render: views='rotat': unknown view 'rotat'"),
        ("render.image_promts", ["a", "b"], r"render: image_promts=.*did you mean 'image_prompts'"),
        ("budget", {}, r"budget=\{\}: give trials, renders and/or minutes"),
        ("budget.trials", 0, r"budget.trials=0: must be an integer of at least 1"),
        ("batch", 0, r"batch=0: must be an integer of at least 1"),
        (
            "batch",
            5,
            r"batch=5: counts renders per sampler call and must be a multiple of seeds_per_round=2 .* 4 or 6",
        ),
        (
            "space.seed",
            {"type": "int", "low": 0, "high": 9999},
            r"space.seed=.*seeds are not searched.*set seeds_per_trial",
        ),
        ("seeds_per_trial", 0, r"seeds_per_trial=0: must be an integer from 1 to 64"),
        ("aggregate", "meen", r"aggregate='meen': unknown aggregate 'meen'; did you mean 'mean'"),
        ("sampler", "gpp", r"sampler='gpp': unknown sampler 'gpp'; did you mean 'gp'\?"),
        ("sampler", {"type": "nsga2", "population": 8}, r"sampler=.*bad options for nsga2: .*population"),
        (
            "start_points",
            [{"audio_wieght": 0.3}],
            r"start_points\[0\].audio_wieght=0.3: .*did you mean 'audio_weight'",
        ),
        (
            "start_points",
            [{"audio_weight": 0.9}],
            r"start_points\[0\].audio_weight=0.9: must be float in \[0.2, 0.7\]",
        ),
        ("start_points", {"audio_weight": 0.3}, r"start_points=.*give a list of knob sets"),
        (
            "render.audio_weight",
            0.9,
            r"render.audio_weight=0.9: is the baseline \(trial 0.*space.audio_weight is float in \[0.2, 0.7\]"
            r"; widen",
        ),
        ("previews", [1.5], r"previews=\[1.5\]: give a list of fractions"),
        ("pruner", "median", r"previews=\[\]: a pruner needs preview steps"),
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


def test_seeds_are_derived_not_proposed_and_differ_by_trial_and_index():
    from sounding_anagrams.search.seeds import trial_seeds

    seeds = trial_seeds(0, 7, 4)
    assert seeds == trial_seeds(0, 7, 4)  # deterministic: the export re-renders them
    assert len(set(seeds)) == 4 and all(0 <= s < 2**32 for s in seeds)
    assert trial_seeds(0, 8, 4) != seeds and trial_seeds(1, 7, 4) != seeds
    assert trial_seeds(0, 7, 2) == seeds[:2]  # seed k of a trial does not depend on M


def test_paired_seeds_are_one_bank_for_the_whole_study_and_apart_from_independent_ones():
    from sounding_anagrams.search.seeds import render_seeds, seed_bank, trial_seeds

    study = parse_study({**BASE, **NOT_RACING, "seeds_per_trial": 4, "batch": 4})
    assert study.seeds == "paired"  # the default
    bank = seed_bank(0, 4)
    assert render_seeds(study, 0) == render_seeds(study, 17) == bank  # every trial, the same seeds
    assert seed_bank(0, 2) == bank[:2] and seed_bank(1, 4) != bank and len(set(bank)) == 4
    # The bank's spawn keys are not any trial's: no paired seed is an independent one of trials 0..99.
    assert not set(bank) & {s for n in range(100) for s in trial_seeds(0, n, 4)}
    independent = parse_study(
        {**BASE, **NOT_RACING, "seeds_per_trial": 4, "batch": 4, "seeds": "independent"}
    )
    assert render_seeds(independent, 7) == trial_seeds(0, 7, 4) != render_seeds(independent, 8)
    with pytest.raises(ConfigError) as error:
        parse_study({**BASE, "seeds": "shared"}, source="s.yaml")
    assert str(error.value).startswith("s.yaml: seeds='shared'") and "'paired'" in str(error.value)


def test_sampler_options_and_the_gp_sampler():
    import optuna

    from sounding_anagrams.search.samplers import make_sampler

    study = parse_study(mutate("sampler", {"type": "gp", "n_startup_trials": 3}), source="s.yaml")
    sampler = make_sampler(study)
    assert isinstance(sampler, optuna.samplers.GPSampler) and sampler._n_startup_trials == 3
    population = parse_study(
        {**mutate("sampler", {"type": "nsga2", "population_size": 8}), **NOT_RACING}, source="s.yaml"
    )
    assert make_sampler(population)._population_size == 8


def test_baseline_can_be_switched_off_and_start_points_follow_it():
    data = {**mutate("start_points", [{"audio_weight": 0.3}, {"image_start_step": 4}]), "baseline": False}
    study = parse_study(data, source="s.yaml")
    assert study.start_points == ({"audio_weight": 0.3}, {"image_start_step": 4})
    with_baseline = parse_study(mutate("start_points", [{"audio_weight": 0.3}]), source="s.yaml")
    assert with_baseline.start_points[1:] == ({"audio_weight": 0.3},)
    assert with_baseline.start_points[0] == {
        "audio_weight": 0.4,
        "view_balance": 0.7,
        "image_guidance_scale": 10.0,
        "audio_guidance_scale": 10.0,
        "image_start_step": 2,
    }


def test_shipped_configs_and_studies_follow_the_seeds_own_settings():
    import torch

    from sounding_anagrams.config import RenderConfig
    from sounding_anagrams.sampler.views import build_views

    # Patch permute: the seed draws its 4x16 permutation with torch's generator seeded 42.
    permute = RenderConfig.from_yaml(REPO / "configs" / "permute.yaml")
    study = load_study(REPO / "studies" / "permute.yaml")
    assert permute.views[1] == study.render.views[1] == "patch_permute(patch=8,seed=42)"
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(42))
    assert torch.equal(build_views(permute.view_specs())[1].permutation(32, 128), expected)  # type: ignore[attr-defined]
    assert permute.view_weights == (0.4, 0.6) and permute.audio_weight == 0.4
    # Gaussian hybrid: the image model starts at step 10 of 100 (the seed's example).
    hybrid = RenderConfig.from_yaml(REPO / "configs" / "hybrid.yaml")
    assert hybrid.image_start == 10 and hybrid.num_inference_steps == 100
    assert (
        load_study(REPO / "studies" / "hybrid.yaml").render.image_start == 5
    )  # the same fraction at 50 steps
    # Tile rotate: weights [0.3, 0.7], audio weight 0.4 (the seed's README), the baseline of its study.
    rotate = load_study(REPO / "studies" / "rotate.yaml")
    assert rotate.start_points[0]["view_balance"] == 0.7 and rotate.start_points[0]["audio_weight"] == 0.4


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("name", "../../escaped", r"name='../../escaped': must be letters, digits"),
        ("name", "a/b", r"name='a/b': must be letters"),
        ("budget.minutes", float("nan"), r"budget.minutes=nan: must be a finite positive number"),
        ("budget.minutes", float("inf"), r"budget.minutes=inf: must be a finite positive number"),
        ("space.audio_weight.low", float("nan"), r"space.audio_weight.low=nan: must be a finite number"),
        ("space.audio_weight.step", float("inf"), r"space.audio_weight.step=inf: must be a finite positive"),
    ],
)
def test_names_that_leave_the_runs_folder_and_non_finite_numbers_are_refused(path, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_study(mutate(path, value), source="s.yaml")


def test_the_main_section_is_checked_even_when_the_tiny_section_overrides_it():
    data = mutate("render.image_start_step", 60)  # invalid at 50 steps; the tiny section sets it to 1
    data["tiny"]["render"]["image_start_step"] = 1
    with pytest.raises(ConfigError, match=r"image_start_step=60: must be in \[0, num_inference_steps\)"):
        parse_study(data, source="s.yaml", tiny=True)


def test_unknown_parameter_lists_only_searchable_knobs():
    with pytest.raises(ConfigError) as caught:
        parse_study(mutate("space.audio_wieght", {"type": "float", "low": 0, "high": 1}), source="s.yaml")
    available = str(caught.value).split("available: ")[1]
    assert "audio_weight" in available and "view_balance" in available
    assert "SHARED_FIELDS" not in available and "_KINDS" not in available and "seed," not in available


def test_the_pruner_sees_only_the_trials_finished_when_the_batch_was_asked():
    """A pruning decision never depends on how far the judge has got with the batch before."""
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )
    for value in (0.8, 0.9):
        done = study.ask()
        done.report(value, 40)
        study.tell(done, value)
    trial = study.ask()
    trial.report(0.1, 40)  # far below the median of the finished trials at that step
    assert trial.should_prune()
    assert should_prune(study, trial, frozenset({0, 1}))
    # Asked before any trial was finished: it sees none of them, and is kept (n_startup_trials=1).
    assert not should_prune(study, trial, frozenset())


def test_study_pictures_say_what_they_show(tmp_path: Path):
    """The contact sheet's columns name each view with its prompt, then the sound; Optuna's plots get a title
    that says what is drawn and axis names a person reads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sounding_anagrams.search.pictures import readable, sheet_headers

    (tmp_path / "config.yaml").write_text(
        "views: [identity, tile_rotate_cw]\nimage_prompts: [a garden, a helicopter]\n"
        "audio_prompts: [bird chirping]\n"
    )
    assert sheet_headers(tmp_path, 3) == [
        'view 0: identity\n"a garden"',
        'view 1: tile_rotate_cw\n"a helicopter"',
        'spectrogram (the sound)\n"bird chirping"',
    ]
    figure, axes = plt.subplots()
    axes.set_title("Hyperparameter Importances", loc="left")
    axes.set_xlabel("Hyperparameter Importance")
    axes.set_ylabel("Hyperparameter")
    readable(figure, "rotate: how much each knob moves the objective")
    assert axes.get_title(loc="left") == ""
    assert axes.get_title() == "rotate: how much each knob moves the objective"
    assert axes.get_ylabel() == "knob" and axes.get_xlabel().startswith("importance (PED-ANOVA")
    plt.close(figure)


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("tiny.colour", 1, r"^s.yaml: tiny.colour=1: unknown field 'colour'; available: batch, budget"),
        ("tiny.batch", 0, r"^s.yaml: tiny.batch=0: must be an integer of at least 1"),
        (
            "tiny.space.audio_wieght",
            {},
            r"^s.yaml: tiny.space.audio_wieght=\{\}: .*did you mean 'audio_weight'",
        ),
        (
            "tiny.render.audio_weight",
            3,
            r"^s.yaml, with its tiny section: render: audio_weight=3.0: must be in \[0, 1\]$",
        ),
        (
            "render.view_weights",
            [0.3, "a"],
            r"^s.yaml: render: view_weights=\[0.3, 'a'\]: every item must be a number, but got 'a'$",
        ),
        (
            "render.dtype",
            "fp16",
            r"^s.yaml: render: dtype='fp16': unknown dtype 'fp16'; did you mean 'float16'",
        ),
        ("space.audio_weight.typo", 1, r"^s.yaml: space.audio_weight.typo=1: .*did you mean 'type'"),
        ("budget.trials", 2.5, r"^s.yaml: budget.trials=2.5: must be an integer"),
        ("seed", -1, r"^s.yaml: seed=-1: must be in \[0, 2\*\*32\)$"),
        ("sampler", {3: 1}, r"^s.yaml: sampler=\{3: 1\}: has a key 3 that is not text"),
        (
            "render.vocoder",
            ["hifigan"],
            r"^s.yaml: render: vocoder=\['hifigan'\]: must be one of hifigan, griffin_lim$",
        ),
        (
            "space.audio_weight.low",
            float("nan"),
            r"^s.yaml: space.audio_weight.low=nan: must be a finite number$",
        ),
        ("objectives", ["clip/alignment", 3], r"pruning needs a single objective"),
        ("objectives", [3], r"^s.yaml: objectives=3: an objective is a metric name"),
        ("space", "x", r"^s.yaml: space='x': must be a mapping$"),
    ],
)
def test_errors_inside_sections_and_lists_say_where(path, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_study(mutate(path, value), source="s.yaml", tiny=path.startswith("tiny"))


def test_a_single_objective_may_be_written_without_a_list():
    study = parse_study(mutate("objectives", "min(clip/alignment, clap/audio0)"), source="s.yaml")
    assert [objective.spec for objective in study.objectives] == ["min(clip/alignment, clap/audio0)"]


def test_sections_left_empty_keep_their_defaults():
    """A section with every line commented out reads as null in YAML: render and tiny keep their defaults."""
    study = parse_study({**mutate("render", None), "space": {"audio_weight": BASE["space"]["audio_weight"]}})
    assert study.render.views == ("identity", "tile_rotate_cw") and study.render.audio_weight == 0.5
    assert parse_study(mutate("tiny", None), tiny=True).render.image_model == "tiny"
    # An empty tiny.space changes nothing of the main space.
    assert (
        parse_study(mutate("tiny.space", {}), tiny=False).space
        == load_study(REPO / "studies" / "rotate.yaml").space
    )
