"""RenderConfig: defaults, coercion, every bad input named, YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sounding_anagrams.config import RenderConfig, check_shared_fields
from sounding_anagrams.errors import ConfigError


def test_defaults_are_the_seed_rotate_example_with_resolved_weights():
    config = RenderConfig()
    assert config.views == ("identity", "tile_rotate_cw")
    assert config.view_weights == (0.5, 0.5)
    assert config.audio_view_weights == (1.0,)
    assert config.latent_shape == (4, 32, 128)
    assert (config.audio_weight, config.image_guidance_scale, config.num_inference_steps) == (0.5, 10.0, 100)


@pytest.mark.parametrize(("steps", "start"), [(100, 5), (50, 2), (20, 1), (19, 0), (3, 0), (1, 0)])
def test_the_default_warm_start_scales_with_the_steps(steps, start):
    # The seed's 5 of 100 steps as a fraction: no step count that is valid alone fails for the default.
    config = RenderConfig(num_inference_steps=steps)
    assert config.image_start_step is None and config.image_start == start
    # With a late audio start the image model starts at once: the default never makes step 0 empty.
    if steps > 1:
        assert RenderConfig(num_inference_steps=steps, audio_start_step=1).image_start == 0
    assert RenderConfig(num_inference_steps=steps, image_start_step=0).image_start == 0


def test_warm_starts_switch_on_by_their_step_whatever_the_audio_weight():
    # Audio-only warm-up, then image only (audio_weight 0); and the mirror case (audio_weight 1).
    audio_first = RenderConfig(audio_weight=0.0, image_start_step=5)
    image_first = RenderConfig(audio_weight=1.0, image_start_step=0, audio_start_step=4)
    assert (audio_first.image_start, audio_first.audio_start_step) == (5, 0)
    assert (image_first.image_start, image_first.audio_start_step) == (0, 4)


def test_hybrid_views_default_to_weight_one_each():
    config = RenderConfig(views=["low_pass", "high_pass"], image_prompts=["a", "b"])
    assert config.view_weights == (1.0, 1.0)


def test_per_view_audio_prompts_get_their_own_weights():
    config = RenderConfig(audio_prompts=["bird chirping", "bell ringing"], audio_view_weights=[0.3, 0.7])
    assert config.audio_view_weights == (0.3, 0.7)
    assert [v.name for v in config.audio_view_specs()] == ["identity", "tile_rotate_cw"]
    assert [v.name for v in RenderConfig().audio_view_specs()] == ["identity"]


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"image_prompts": "a castle"}, r"image_prompts='a castle': must be a list of strings, one per view"),
        ({"audio_prompts": "bird chirping"}, r"audio_prompts='bird chirping': must be a list of strings"),
        (
            {"image_prompts": ["only one"]},
            r"image_prompts=\['only one'\]: give one image prompt per view: 2 views",
        ),
        (
            {"audio_prompts": ["a", "b", "c"]},
            r"audio_prompts=.*one audio prompt .* or one per view \(2\), not 3",
        ),
        ({"views": ["identity", "rotat"]}, r"unknown view 'rotat'; did you mean"),
        ({"views": ["identity", "rotate_cw"]}, r"tile_rotate_cw"),
        ({"views": []}, r"views=\[\]: give at least one view"),
        ({"view_weights": [0.3, 0.3]}, r"view_weights=.*"),
        ({"view_weights": [1.0]}, r"view_weights=.*"),
        ({"audio_view_weights": [0.5]}, r"audio_view_weights=\[0.5\]: with one audio prompt"),
        ({"audio_weight": 1.5}, r"audio_weight=1.5: must be in \[0, 1\]"),
        ({"audio_weight": float("nan")}, r"audio_weight=nan: must be in \[0, 1\]"),
        ({"audio_weight": "0.5"}, r"audio_weight='0.5': must be a number"),
        ({"image_guidance_scale": -1}, r"image_guidance_scale=-1.0: must be in \[0, 100\]"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0: must be between 1 and 1000"),
        ({"num_inference_steps": 2.5}, r"num_inference_steps=2.5: must be an integer"),
        ({"seed": True}, r"seed=True: must be an integer"),
        ({"image_start_step": 100}, r"image_start_step=100: must be in \[0, num_inference_steps\)"),
        ({"image_start_step": 3, "audio_start_step": 2}, r"image_start_step=3: .* must be 0"),
        ({"image_start_step": 1.5}, r"image_start_step=1.5: must be an integer \(or null for the default\)"),
        (
            {"num_inference_steps": 3, "image_start_step": 5},
            r"image_start_step=5: must be in \[0, .* \[0, 3\)",
        ),
        ({"scheduler": "ddmi"}, r"scheduler='ddmi': unknown scheduler 'ddmi'; did you mean 'ddim'\?"),
        ({"vocoder": "hifi"}, r"vocoder='hifi': unknown vocoder .* available: griffin_lim, hifigan"),
        ({"height": 250}, r"height=250: must be a multiple of 8"),
        ({"width": 1020}, r"width=1020: must be a multiple of 8"),
        ({"width": 1000}, r"views=.tile_rotate_cw.: .*256x1000 pixels"),
        ({"crop_right": 1024}, r"crop_right=1024: must be in \[0, width\)"),
        ({"image_model": " "}, r"image_model=' ': give a hub id, a local folder or 'tiny'"),
        ({"device": "tpu"}, r"device='tpu': unknown device"),
        (
            {"device": "cuda:01"},
            r"device='cuda:01': unknown device; must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        ),
        ({"device": "gpu"}, r"device='gpu': unknown device"),
    ],
)
def test_bad_input_names_field_value_and_rule(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RenderConfig(**changes)


def test_from_dict_rejects_unknown_keys_with_did_you_mean():
    with pytest.raises(
        ConfigError,
        match=r"study.yaml: audio_wieght=0.4: unknown field 'audio_wieght'; did you mean 'audio_weight'",
    ):
        RenderConfig.from_dict({"audio_wieght": 0.4}, source="study.yaml")


def test_yaml_round_trip_is_exact(tmp_path: Path):
    config = RenderConfig(
        views=["identity", "patch_permute"],
        image_prompts=["trees", "castles"],
        view_weights=[0.4, 0.6],
        audio_prompts=["bell ringing"],
        audio_weight=0.4,
        seed=123,
        scheduler="dpmsolver++",
    )
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    loaded = RenderConfig.from_yaml(path)
    assert loaded == config
    # Views are stored canonically, with their parameters, so a re-render uses the same permutation.
    assert "(" in loaded.views[1]


def test_yaml_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("views: identity\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: views='identity': must be a list"):
        RenderConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match=r"--config=.*missing.yaml.*no such file"):
        RenderConfig.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("views: [identity\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        RenderConfig.from_yaml(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        RenderConfig.from_yaml(listed)


def test_replace_revalidates_and_resets_default_weights_for_new_views():
    config = RenderConfig()
    hybrid = config.replace(views=["low_pass", "high_pass"])
    assert hybrid.view_weights == (1.0, 1.0)
    with pytest.raises(ConfigError, match="audio_weight"):
        config.replace(audio_weight=2.0)


def test_replace_keeps_tuned_weights_unless_what_they_weigh_changes():
    tuned = RenderConfig(view_weights=[0.3, 0.7])
    assert tuned.replace(audio_prompts=["bell ringing"]).view_weights == (0.3, 0.7)
    assert tuned.replace(views=["identity", "tile_rotate_cw"], seed=3).view_weights == (0.3, 0.7)
    assert tuned.replace(views=["identity", "flip"]).view_weights == (0.5, 0.5)
    two = tuned.replace(audio_prompts=["a", "b"])
    assert two.audio_view_weights == (0.5, 0.5) and two.view_weights == (0.3, 0.7)


def test_batch_must_share_fields():
    check_shared_fields([RenderConfig(seed=1), RenderConfig(seed=2, audio_weight=0.2)])
    with pytest.raises(ConfigError, match=r"height=512: candidate 1 differs"):
        check_shared_fields([RenderConfig(), RenderConfig(height=512)])


def test_any_cuda_device_is_a_device_whatever_this_machine_has():
    """A config names the device it runs on, written on one machine and run on another: the config takes
    every CUDA index, the loader checks the machine (tests/test_models.py)."""
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"):
        config = RenderConfig(device=name)
        assert (
            config.device == name and RenderConfig.from_dict(yaml.safe_load(config.to_yaml())).device == name
        )


@pytest.mark.parametrize("field", ["image_prompts", "audio_prompts"])
@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_or_blank_prompt_is_refused_naming_the_field(field, blank):
    prompts = [blank, "a car"] if field == "image_prompts" else [blank]
    with pytest.raises(ConfigError) as raised:
        RenderConfig(**{field: prompts})
    assert str(raised.value).startswith(f"{field}=") and "each saying something" in str(raised.value)
