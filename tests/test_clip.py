"""CLIP scoring: the protocols on a designed scorer whose answers are known, and the tiny open_clip model."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import Tensor

from sounding_anagrams.errors import ConfigError, ModelLoadError
from sounding_anagrams.evaluation.clip import (
    CONFIG_FILE,
    TINY_CLIP_CONFIG,
    WEIGHT_FILES,
    ClipScorer,
    ImageTextScorer,
    ensure_tiny_clip,
    letterbox,
)

# Prompts as unit vectors on the circle: a picture of mean brightness b embeds at angle pi * b.
PROMPT_ANGLES = {"dark": 0.0, "bright": math.pi, "gray": math.pi / 2}


class AngleScorer(ImageTextScorer):
    """Designed scorer: image -> [cos(pi b), sin(pi b)], b its mean brightness; prompts by ``PROMPT_ANGLES``.

    A black picture matches "dark" (cos 1), a white one "bright", and every cosine is known by hand.
    Records the size of every ``embed_images`` call.
    """

    def __init__(self, temperature: float = 0.01, batch_size: int = 64) -> None:
        self.temperature = temperature
        self.batch_size = batch_size
        self.calls: list[int] = []

    def embed_images(self, images: Tensor) -> Tensor:
        self.calls.append(images.shape[0])
        angle = math.pi * images.mean(dim=(1, 2, 3))
        return torch.stack([angle.cos(), angle.sin()], dim=1)

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        angles = torch.tensor([PROMPT_ANGLES[p] for p in prompts])
        return torch.stack([angles.cos(), angles.sin()], dim=1)


def flat(brightness: float, height: int = 8, width: int = 16) -> Tensor:
    return torch.full((3, height, width), brightness)


def test_window_counts_reach_embed_images():
    scorer = AngleScorer(batch_size=1000)
    scorer.score([flat(0.0, 256, 1024)], ["dark"])
    scorer.score([flat(0.0, 256, 992)], ["dark"])
    assert scorer.calls == [25, 24]


def test_all_candidates_are_embedded_in_one_chunked_pass():
    scorer = AngleScorer(batch_size=64)
    candidates = [[flat(0.0, 256, 1024), flat(1.0, 256, 1024)] for _ in range(2)]
    scores = scorer.score_batch(candidates, ["dark", "bright"])
    assert scorer.calls == [64, 36]  # 2 candidates x 2 views x 25 windows
    assert scores[0] == scores[1] == scorer.score(candidates[0], ["dark", "bright"])
    assert scorer.score_batch([], ["dark"]) == []


def test_a_matching_prompt_ranks_above_a_swapped_one():
    scorer = AngleScorer()
    views = [flat(0.1), flat(0.9)]
    right = scorer.score(views, ["dark", "bright"])
    swapped = scorer.score(views, ["bright", "dark"])
    assert set(right) == {"clip/view0", "clip/view1", "clip/alignment", "clip/concealment"}
    assert right["clip/alignment"] > swapped["clip/alignment"]
    assert right["clip/concealment"] > 0.99 > 0.01 > swapped["clip/concealment"]


def test_alignment_is_the_worst_view():
    scores = AngleScorer().score([flat(0.0), flat(0.9)], ["dark", "bright"])
    assert scores["clip/view0"] == pytest.approx(1.0)
    assert scores["clip/view1"] == pytest.approx(math.cos(0.1 * math.pi))
    assert scores["clip/alignment"] == min(scores["clip/view0"], scores["clip/view1"])


def test_concealment_drops_when_both_views_show_the_same_thing():
    scorer = AngleScorer()
    distinct = scorer.score([flat(0.0), flat(1.0)], ["dark", "bright"])["clip/concealment"]
    same = scorer.score([flat(0.0), flat(0.0)], ["dark", "bright"])["clip/concealment"]
    assert distinct == pytest.approx(1.0, abs=1e-6)
    assert same == pytest.approx(0.5, abs=1e-6)


def test_a_lower_temperature_brings_a_good_anagram_closer_to_full_concealment():
    # Cosines of only +-0.31: how sharp the softmax is depends on the temperature.
    views = [flat(0.4, 8, 8), flat(0.6, 8, 8)]
    cool = AngleScorer(temperature=0.01).score(views, ["dark", "bright"], protocol="whole")[
        "clip/concealment"
    ]
    warm = AngleScorer(temperature=1.0).score(views, ["dark", "bright"], protocol="whole")["clip/concealment"]
    assert warm == pytest.approx(1 / (1 + math.exp(-2 * math.cos(0.4 * math.pi))), abs=1e-6)
    assert 0.5 < warm < cool
    assert cool == pytest.approx(1.0, abs=1e-6)


def test_one_view_has_no_concealment():
    assert AngleScorer().score([flat(0.0)], ["dark"]) == {"clip/view0": 1.0, "clip/alignment": 1.0}


class CornerScorer(AngleScorer):
    """Like ``AngleScorer`` but reads the brightness of each window's top-left pixel only."""

    def embed_images(self, images: Tensor) -> Tensor:
        return super().embed_images(images[:, :, :1, :1])


def test_windowed_score_averages_the_windows_then_clamps_the_mean_at_zero():
    # 8x16: 9 windows of side 8 at offsets 0..8 (stride 1); window x sees pixel (0, x) as its corner.
    corners = [0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.0, 0.0, 0.0]
    picture = torch.zeros(3, 8, 16)
    picture[:, 0, :9] = torch.tensor(corners)
    # cos to "dark" per window: 1, cos(pi/4), 0, -cos(pi/4), -1, 1, 1, 1, 1. The bad windows pull the mean
    # down (clamping each window at 0 first would hide them: (5 + cos(pi/4)) / 9).
    by_hand = (1 + math.cos(math.pi / 4) + 0 - math.cos(math.pi / 4) - 1 + 4) / 9
    scorer = CornerScorer()
    assert scorer.score([picture], ["dark"])["clip/view0"] == pytest.approx(by_hand, abs=1e-6)
    assert scorer.calls == [9]
    # A picture whose windows average below 0 scores exactly 0, not a negative number.
    inverted = picture.clone()
    inverted[:, 0, :9] = 1 - torch.tensor(corners)
    assert scorer.score([inverted], ["dark"])["clip/view0"] == 0.0


def test_letterbox_keeps_the_picture_and_pads_with_mid_gray():
    picture = torch.rand(3, 4, 16)
    boxed = letterbox(picture)
    assert boxed.shape == (3, 16, 16)
    assert torch.equal(boxed[:, 6:10], picture)
    assert bool((boxed[:, :6] == 0.5).all()) and bool((boxed[:, 10:] == 0.5).all())


# --- the tiny open_clip model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip() -> ClipScorer:
    return ClipScorer("tiny", device="cpu")


def pictures(seed: int, count: int, height: int = 256, width: int = 1024) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, height, width, generator=generator) for _ in range(count)]


PROMPTS = ["x", "y"]  # with the tiny model's seed these give positive windowed scores, so nothing is all zero


def test_tiny_clip_is_built_into_the_cache_and_loaded_as_a_local_folder(tiny_clip: ClipScorer):
    folder = ensure_tiny_clip()
    assert folder.parent.name.startswith("tiny-v") and folder.name == "clip"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHT_FILES[0]])
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["model_cfg"] == TINY_CLIP_CONFIG and "mean" in config["preprocess_cfg"]
    assert tiny_clip.image_size == (64, 64)
    assert tiny_clip.temperature == pytest.approx(0.01)
    # The folder given by path loads the same model as "tiny".
    again = ClipScorer(str(folder), device="cpu")
    views = pictures(0, 2)
    assert again.score(views, PROMPTS) == tiny_clip.score(views, PROMPTS)


@pytest.mark.parametrize("protocol", ["windowed", "whole"])
def test_tiny_clip_batch_matches_one_by_one(tiny_clip: ClipScorer, protocol: str):
    candidates = [pictures(1, 2), pictures(2, 2)]
    batched = tiny_clip.score_batch(candidates, PROMPTS, protocol=protocol)
    for candidate, scores in zip(candidates, batched, strict=True):
        alone = tiny_clip.score(candidate, PROMPTS, protocol=protocol)
        assert list(scores) == ["clip/view0", "clip/view1", "clip/alignment", "clip/concealment"]
        assert all(math.isfinite(v) for v in scores.values())
        assert torch.allclose(
            torch.tensor(list(scores.values())), torch.tensor(list(alone.values())), atol=1e-5
        )
    if protocol == "windowed":
        assert any(scores["clip/view0"] > 0 for scores in batched)


def test_tiny_clip_is_deterministic(tiny_clip: ClipScorer):
    views = pictures(3, 2)
    assert tiny_clip.score(views, PROMPTS) == tiny_clip.score(views, PROMPTS)
    assert torch.equal(tiny_clip.embed_texts(PROMPTS), tiny_clip.embed_texts(PROMPTS))
    embeddings = tiny_clip.embed_images(torch.stack(views))
    assert embeddings.dtype == torch.float32 and embeddings.shape == (2, TINY_CLIP_CONFIG["embed_dim"])
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2))
    assert tiny_clip.embed_images(torch.empty(0, 3, 64, 64)).shape == (0, TINY_CLIP_CONFIG["embed_dim"])


def test_tiny_clip_counts_windows(tiny_clip: ClipScorer, monkeypatch: pytest.MonkeyPatch):
    sizes: list[int] = []
    embed = tiny_clip.embed_images

    def spy(images: Tensor) -> Tensor:
        sizes.append(images.shape[0])
        return embed(images)

    monkeypatch.setattr(tiny_clip, "embed_images", spy)
    monkeypatch.setattr(tiny_clip, "batch_size", 1000)
    tiny_clip.score(pictures(4, 1, 256, 1024), ["x"])
    tiny_clip.score(pictures(4, 1, 256, 992), ["x"])
    assert sizes == [25, 24]


@pytest.mark.parametrize("size", [(256, 1024), (512, 512)])
def test_tiny_clip_whole_protocol(tiny_clip: ClipScorer, size: tuple[int, int]):
    views = pictures(5, 2, *size)
    similarity = tiny_clip.similarity(torch.stack(views), ["x", "y", "z"], protocol="whole")
    assert similarity.shape == (2, 3) and similarity.dtype == torch.float32
    assert bool(similarity.abs().le(1).all())
    scores = tiny_clip.score(views, PROMPTS, protocol="whole")
    assert scores["clip/view1"] == pytest.approx(float(similarity[1, 1]), abs=1e-5)


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_unknown_protocol_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown protocol 'windowd'; did you mean 'windowed'\?"):
        AngleScorer().score([flat(0.0)], ["dark"], protocol="windowd")


def test_picture_and_prompt_counts_must_match():
    with pytest.raises(ConfigError, match=r"got 2 pictures but 3 prompts"):
        AngleScorer().score([flat(0.0), flat(1.0)], ["dark", "bright", "gray"])
    with pytest.raises(ConfigError, match=r"at least one prompt"):
        AngleScorer().score([flat(0.0)], [])


def test_pictures_must_be_rgb_in_unit_range():
    with pytest.raises(ConfigError, match=r"shape=\(1, 8, 16\): must be \(3, H, W\)"):
        AngleScorer().score([torch.zeros(1, 8, 16)], ["dark"])
    with pytest.raises(ConfigError, match=r"value range=.*must lie in \[0, 1\]"):
        AngleScorer().score([flat(1.5)], ["dark"])
    # A decoder's small overshoot is accepted (and clamped).
    assert AngleScorer().score([flat(1.0005)], ["bright"])["clip/view0"] == pytest.approx(1.0)


def test_missing_local_folder(tmp_path: Path):
    with pytest.raises(
        ModelLoadError, match=r"nowhere' does not exist; a local CLIP folder holds open_clip_config"
    ):
        ClipScorer(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG_FILE).write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    with pytest.raises(ModelLoadError, match=r"has no weights; .*open_clip_model\.safetensors"):
        ClipScorer(str(tmp_path / "half"), device="cpu")


def test_uncached_pretrained_tag_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(
        ModelLoadError, match=r"'ViT-B-16 / openai \(hub repo timm/.*downloaded on first use.*local folder"
    ):
        ClipScorer("ViT-B-16", "openai", device="cpu")


def test_unknown_names_and_batch_size():
    with pytest.raises(ModelLoadError, match=r"did you mean 'openai'\?"):
        ClipScorer("ViT-B-16", "opena", device="cpu")
    with pytest.raises(ModelLoadError, match=r"unknown CLIP model 'ViT-B-61'; did you mean"):
        ClipScorer("ViT-B-61", device="cpu")
    with pytest.raises(ValueError, match=r"batch_size must be at least 1, but got batch_size=0\."):
        ClipScorer("tiny", batch_size=0)


def test_tiny_clip_embeds_each_prompt_once_per_scorer_from_any_thread(monkeypatch: pytest.MonkeyPatch):
    """The prompts' text embeddings are cached: a second scoring of the same prompts runs no text tower and
    gives the same scores; a new prompt is embedded alone; two threads asking at once embed it once."""
    scorer = ClipScorer("tiny", device="cpu")  # its own: a fresh cache
    texts: list[int] = []
    encode_text = scorer.model.encode_text

    def counted(tokens, *args, **kwargs):
        texts.append(len(tokens))
        return encode_text(tokens, *args, **kwargs)

    monkeypatch.setattr(scorer.model, "encode_text", counted)
    views = pictures(4, 2, width=512)
    first = scorer.score_batch([views, views], PROMPTS)
    second = scorer.score(views, PROMPTS)
    assert texts == [2] and second == first[0]
    scorer.score(views, [PROMPTS[1], "z"])
    assert texts == [2, 1]  # only "z"
    uncached = torch.cat([scorer.embed_texts([p]) for p in [*PROMPTS, "z"]])
    torch.testing.assert_close(scorer.text_embeddings([*PROMPTS, "z"]), uncached, atol=1e-6, rtol=0)

    barrier = threading.Barrier(2)

    def score_new_prompts() -> dict[str, float]:
        barrier.wait()
        return scorer.score(views, ["u", "v"])

    with ThreadPoolExecutor(2) as pool:
        results = [job.result() for job in [pool.submit(score_new_prompts) for _ in range(2)]]
    assert results[0] == results[1]
    assert texts == [2, 1, 1, 1, 1, 2]  # the 3 uncached embed_texts above, then "u" and "v" once


def test_judges_take_any_cuda_device_and_say_when_it_is_missing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device='cuda:1': no CUDA device is present on this machine"):
        ClipScorer("tiny", device="cuda:1")
    with pytest.raises(ConfigError, match=r"^device='cuda:01': must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        ClipScorer("tiny", device="cuda:01")
