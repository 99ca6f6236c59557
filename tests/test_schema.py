"""The JSON Schemas that editors read: shipped, current, named by every study and config, and in agreement
with the tool's own checks on what they can express."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.schema import SCHEMAS, main, stale_schemas
from sounding_anagrams.search.study import parse_study

REPO = Path(__file__).resolve().parents[1]
STUDY_SCHEMA = json.loads((REPO / "studies" / "study.schema.json").read_text())
CONFIG_SCHEMA = json.loads((REPO / "configs" / "config.schema.json").read_text())
BASE = yaml.safe_load((REPO / "studies" / "rotate.yaml").read_text())


def schema_errors(schema: dict, data: object) -> list[str]:
    """What an editor would underline: each error's path in the file."""
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(
        ".".join(str(part) for part in error.absolute_path) for error in validator.iter_errors(data)
    )


def test_the_shipped_schemas_are_what_the_models_give():
    assert stale_schemas(REPO) == [], "run `make schema` and commit the schemas"
    for relative in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(json.loads((REPO / relative).read_text()))


def test_check_names_an_out_of_date_schema_and_make_schema_fixes_it(tmp_path: Path, capsys):
    for relative in SCHEMAS:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("{}\n")
    assert main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "studies/study.schema.json is out of date: run `make schema`" in err
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "studies" / "study.schema.json").read_text() == (
        REPO / "studies" / "study.schema.json"
    ).read_text()


@pytest.mark.parametrize(
    ("folder", "schema_file", "schema"),
    [("studies", "study.schema.json", STUDY_SCHEMA), ("configs", "config.schema.json", CONFIG_SCHEMA)],
)
def test_every_shipped_file_names_its_schema_and_passes_it(folder, schema_file, schema):
    files = sorted((REPO / folder).glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        first_line = path.read_text().splitlines()[0]
        assert first_line == f"# yaml-language-server: $schema={schema_file}", path
        assert schema_errors(schema, yaml.safe_load(path.read_text())) == [], path


def mutate(path: str, value: object) -> dict:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "underlined"),
    [
        ("render.audio_wieght", 0.4, "render"),
        ("render.scheduler", "ddmi", "render.scheduler"),
        ("render.audio_weight", 1.5, "render.audio_weight"),
        ("render.height", 250, "render.height"),
        ("render.views", "identity", "render.views"),
        ("space.seed", {"type": "int", "low": 0, "high": 9}, "space"),
        ("space.audio_weight.type", "flaot", "space.audio_weight.type"),
        ("space.audio_weight.step", 0, "space.audio_weight.step"),
        ("sampler", "tpee", "sampler"),
        ("pruner", {"type": "medain"}, "pruner"),
        ("previews", [1.5], "previews.0"),
        ("seeds_per_trial", 65, "seeds_per_trial"),
        ("budget.trials", 0, "budget.trials"),
        ("aggregate", "meen", "aggregate"),
        ("tiny.render.image_promts", ["a", "b"], "tiny.render"),
        ("tiny.batch", 0, "tiny.batch"),
        ("colour", "blue", ""),
    ],
)
def test_the_schema_underlines_what_the_tool_refuses(path, value, underlined):
    """An editor flags the same mistakes the tool does, at the same place."""
    data = mutate(path, value)
    assert underlined in schema_errors(STUDY_SCHEMA, data)
    with pytest.raises(ConfigError):
        parse_study(data, source="s.yaml", tiny=path.startswith("tiny"))


def test_the_schema_accepts_every_form_the_tool_accepts():
    data = mutate("sampler", {"type": "gp", "n_startup_trials": 8})
    data["pruner"] = "none"
    data["seeds_per_round"] = None
    data["render"]["image_start_step"] = None
    data["space"]["scheduler"] = {"type": "categorical", "choices": ["ddim", "dpmsolver++"]}
    data["start_points"] = [{"audio_weight": 0.3}]
    assert schema_errors(STUDY_SCHEMA, data) == []
    assert parse_study(data, source="s.yaml").sampler_options == {"n_startup_trials": 8}
    # Every default of the render config is valid under its schema, and the schema says the defaults.
    assert schema_errors(CONFIG_SCHEMA, RenderConfig().to_dict()) == []
    properties = CONFIG_SCHEMA["properties"]
    assert properties["num_inference_steps"]["default"] == 100
    assert properties["scheduler"]["enum"] == ["ddim", "dpmsolver++"]
    assert "noise estimate" in properties["audio_weight"]["description"]


def test_the_schema_takes_every_device_the_config_takes():
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"):
        assert schema_errors(CONFIG_SCHEMA, {"device": name}) == [], name
        assert RenderConfig(device=name).device == name
    for name in ("gpu", "cuda:", "cuda:01", "cuda:-1", "CPU", "cuda:1 "):
        assert schema_errors(CONFIG_SCHEMA, {"device": name}) == ["device"], name
        with pytest.raises(ConfigError, match="unknown device"):
            RenderConfig(device=name)


@pytest.mark.parametrize(
    "name",
    ["rotate", " rotate ", "a.b_c-1", "7", "x" * 100, "../escaped", "a/b", " ", "", "-a", ".a", "x" * 101],
)
def test_the_schema_and_the_tool_agree_on_study_names(name):
    """One source of rules: the schema accepts a study name exactly when the tool does."""
    data = mutate("name", name)
    try:
        parse_study(data, source="s.yaml")
        accepted = True
    except ConfigError:
        accepted = False
    assert (schema_errors(STUDY_SCHEMA, data) == []) == accepted, (name, accepted)
    assert accepted == (name.strip() in ("rotate", "a.b_c-1", "7", "x" * 100))
