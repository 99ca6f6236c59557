"""CLAP scoring: the resampler, the score formulas on a scorer whose answers are known, the tiny CLAP."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sounding_anagrams.errors import ConfigError, ModelLoadError
from sounding_anagrams.evaluation.clap import (
    CLAP_SAMPLE_RATE,
    TINY_CLAP_MARKER,
    AudioTextScorer,
    ClapScorer,
    ensure_tiny_clap,
    peak_normalise,
    resample,
    resample_16k_to_48k,
)
from sounding_anagrams.evaluation.metrics import concealment

RATE = 16_000


def sine(freq: float, seconds: float, rate: int = RATE, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# -- resampling ----------------------------------------------------------------------------------------------


def test_resample_16k_to_48k_is_exactly_three_times_longer() -> None:
    for n in (1, 7, 16_000, 158_720):
        assert resample_16k_to_48k(np.zeros(n, np.float32)).shape == (3 * n,)


def test_resampled_sine_keeps_its_pitch_and_amplitude() -> None:
    out = resample_16k_to_48k(sine(1000.0, 1.0, amplitude=0.5))
    assert out.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(out.size, 1 / CLAP_SAMPLE_RATE)
    assert freqs[spectrum.argmax()] == pytest.approx(1000.0, abs=1.0)
    # Away from the filter's start-up and tail, the peak is the sine's amplitude.
    interior = out[CLAP_SAMPLE_RATE // 10 : -CLAP_SAMPLE_RATE // 10]
    assert np.abs(interior).max() == pytest.approx(0.5, rel=0.01)
    assert np.sqrt(2 * np.mean(interior.astype(np.float64) ** 2)) == pytest.approx(0.5, rel=0.01)


def test_general_resample_ratio() -> None:
    # 22050 -> 48000 reduces to up 320, down 147: ceil(n * 320 / 147) samples.
    for n in (22_050, 1000, 147):
        assert resample(np.ones(n, np.float32), 22_050, 48_000).shape == (int(np.ceil(n * 320 / 147)),)
    same = np.linspace(-1, 1, 11, dtype=np.float32)
    np.testing.assert_array_equal(resample(same, 8000, 8000), same)
    assert resample(np.ones(300, np.float32), 48_000, 16_000).shape == (100,)


@pytest.mark.parametrize(("from_rate", "to_rate"), [(0, 48_000), (16_000, -1), (16_000.5, 48_000)])
def test_resample_refuses_bad_rates(from_rate: float, to_rate: int) -> None:
    with pytest.raises(ConfigError, match="positive whole number"):
        resample(np.ones(10, np.float32), from_rate, to_rate)  # type: ignore[arg-type]


def test_peak_normalise() -> None:
    wave = np.array([0.1, -0.4, 0.2], np.float32)
    out = peak_normalise(wave)
    assert np.abs(out).max() == pytest.approx(1.0)
    np.testing.assert_allclose(out, wave / 0.4)
    zero = peak_normalise(np.zeros(5, np.float32))
    assert np.all(zero == 0) and np.all(np.isfinite(zero))


# -- the score formulas, on a scorer whose right answers are known -------------------------------------------

LOW, HIGH, NOT_LOW = "a low hum", "a high whistle", "anything but a low hum"


class BandScorer(AudioTextScorer):
    """Audio embedding = (energy below 1 kHz, energy above); prompts map to fixed 2-D directions."""

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = temperature
        self.directions = {LOW: (1.0, 0.0), HIGH: (0.0, 1.0), NOT_LOW: (-1.0, 0.0)}
        self.audio_calls = 0

    def embed_audio(self, waves: Sequence[np.ndarray], sample_rate: int) -> torch.Tensor:
        self.audio_calls += 1
        rows = []
        for wave in waves:
            power = np.abs(np.fft.rfft(wave)) ** 2
            freqs = np.fft.rfftfreq(wave.size, 1 / sample_rate)
            rows.append([power[freqs < 1000].sum(), power[freqs >= 1000].sum()])
        # Not normalised on purpose: the base class must normalise what a subclass returns.
        return torch.tensor(rows, dtype=torch.float32)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        return F.normalize(torch.tensor([self.directions[p] for p in prompts]), dim=-1)


@pytest.fixture
def low() -> np.ndarray:
    return sine(200.0, 0.5)


@pytest.fixture
def high() -> np.ndarray:
    return sine(4000.0, 0.5)


def test_matching_prompts_score_above_swapped(low: np.ndarray, high: np.ndarray) -> None:
    scorer = BandScorer()
    similarity = scorer.similarity([low, high], [LOW, HIGH])
    assert similarity.shape == (2, 2)
    torch.testing.assert_close(similarity, torch.eye(2), atol=1e-3, rtol=0)
    matched = scorer.score([low, high], [LOW, HIGH])
    swapped = scorer.score([low, high], [HIGH, LOW])
    assert matched["clap/audio0"] == pytest.approx(1.0, abs=1e-3)
    assert matched["clap/alignment"] == pytest.approx(1.0, abs=1e-3)
    assert swapped["clap/audio0"] == pytest.approx(0.0, abs=1e-3)
    assert matched["clap/alignment"] > swapped["clap/alignment"] + 0.9
    assert matched["clap/concealment"] > swapped["clap/concealment"]


def test_negative_cosine_clamps_to_zero(low: np.ndarray) -> None:
    scorer = BandScorer()
    assert float(scorer.similarity([low], [NOT_LOW])[0, 0]) == pytest.approx(-1.0, abs=1e-3)
    assert scorer.score([low], [NOT_LOW]) == {"clap/audio0": 0.0}


def test_concealment_drops_when_both_waves_are_the_same_sound(low: np.ndarray, high: np.ndarray) -> None:
    scorer = BandScorer(temperature=0.1)
    distinct = scorer.score([low, high], [LOW, HIGH])
    same = scorer.score([low, low], [LOW, HIGH])
    assert distinct["clap/concealment"] > 0.99
    # Both rows alike: each column softmax is uniform and the rows' diagonal averages to 1/2.
    assert same["clap/concealment"] == pytest.approx(0.5, abs=1e-3)
    assert same["clap/alignment"] == pytest.approx(0.0, abs=1e-3)


def test_temperature_matters(low: np.ndarray, high: np.ndarray) -> None:
    sharp = BandScorer(temperature=0.01).score([low, high], [LOW, HIGH])["clap/concealment"]
    soft = BandScorer(temperature=1.0).score([low, high], [LOW, HIGH])["clap/concealment"]
    assert sharp > soft
    similarity = BandScorer().similarity([low, high], [LOW, HIGH])
    assert soft == pytest.approx(concealment(similarity, 1.0))
    assert soft == pytest.approx(np.e / (np.e + 1), abs=1e-3)


def test_score_batch_embeds_once_and_matches_score(low: np.ndarray, high: np.ndarray) -> None:
    scorer = BandScorer()
    candidates = [[low, high], [high, low], [low, low]]
    batch = scorer.score_batch(candidates, [LOW, HIGH])
    assert scorer.audio_calls == 1
    assert batch == [scorer.score(c, [LOW, HIGH]) for c in candidates]
    assert scorer.score_batch([], [LOW]) == []


# -- the tiny CLAP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> ClapScorer:
    # batch_size 3: four waves go in two chunks (3 + 1), so chunking is exercised too.
    return ClapScorer("tiny", device="cpu", batch_size=3)


def noise(seconds: float, seed: int) -> np.ndarray:
    """A non-stationary sound (noise under a rising envelope), so different crops give different features."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    return (0.3 * rng.standard_normal(n) * np.linspace(0.05, 1.0, n)).astype(np.float32)


def test_tiny_clap_is_built_and_loaded_through_from_pretrained(tiny: ClapScorer) -> None:
    folder = ensure_tiny_clap()
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", TINY_CLAP_MARKER} <= names
    assert names & {"processor_config.json", "preprocessor_config.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "clap" and config["projection_dim"] == 32
    assert Path(tiny.source) == folder
    assert type(tiny.processor).__name__ == "ClapProcessor"
    assert type(tiny.tokenizer).__name__.startswith("RobertaTokenizer")
    assert tiny.sample_rate == CLAP_SAMPLE_RATE and tiny.max_samples == 10 * CLAP_SAMPLE_RATE
    assert tiny.temperature == pytest.approx(0.07, rel=1e-5)
    assert not tiny.model.training
    ids = tiny.tokenizer("a dog")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 2 + len("a dog")  # <s> one byte each </s>


def test_tiny_embeddings_are_unit_vectors(tiny: ClapScorer) -> None:
    audio = tiny.embed_audio([noise(9.92, 0), noise(3.0, 1)], RATE)
    text = tiny.embed_texts(["a dog barking", "a bell", "a dog barking"])
    assert audio.shape == (2, 32) and text.shape == (3, 32)
    assert audio.dtype == torch.float32 and audio.device.type == "cpu"
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text[0], text[2])


def test_tiny_batch_equals_one_by_one(tiny: ClapScorer) -> None:
    prompts = ["a dog barking", "church bells ringing"]
    candidates = [[noise(9.92, 1), noise(9.92, 2)], [noise(10.24, 3), noise(4.0, 4)]]
    batch = tiny.score_batch(candidates, prompts)
    for scores, candidate in zip(batch, candidates, strict=True):
        alone = tiny.score(candidate, prompts)
        assert scores.keys() == alone.keys()
        np.testing.assert_allclose(list(scores.values()), list(alone.values()), atol=1e-5, rtol=0)


def test_tiny_scores_are_deterministic_beyond_the_window(tiny: ClapScorer) -> None:
    long = noise(10.24, 5)  # 491 520 samples at 48 kHz: longer than the 480 000-sample window
    long[100] = 1.0  # the peak lies in the first 10 s, so cutting first does not change the normalisation
    prompts = ["a dog barking"]
    np.random.seed(0)
    first = tiny.score([long], prompts)
    np.random.seed(1)  # rand_trunc would draw its crop from numpy's global RNG
    second = tiny.score([long], prompts)
    assert first == second
    # The choice: the first 10 s (480 000 samples at 48 kHz) are scored. Cut after resampling, as the scorer
    # does: cutting at 16 kHz first would change the resampling filter's tail.
    window = resample_16k_to_48k(long)[: 10 * CLAP_SAMPLE_RATE]
    assert tiny.score([window], prompts, sample_rate=CLAP_SAMPLE_RATE) == pytest.approx(first, abs=1e-6)
    # ... and the crop matters for this sound, so a random crop would have shown.
    assert tiny.score([long[RATE // 4 :]], prompts)["clap/audio0"] != pytest.approx(
        first["clap/audio0"], abs=1e-6
    )


def test_tiny_score_keys_and_values(tiny: ClapScorer) -> None:
    one = tiny.score([noise(9.92, 6)], ["a dog barking"])
    assert list(one) == ["clap/audio0"]
    two = tiny.score([noise(9.92, 7), np.zeros(RATE, np.float32)], ["a dog barking", "rain"])
    assert list(two) == ["clap/audio0", "clap/audio1", "clap/alignment", "clap/concealment"]
    for scores in (one, two):
        assert all(np.isfinite(value) for value in scores.values())
        assert all(value >= 0 for key, value in scores.items() if key.startswith("clap/audio"))
    assert two["clap/alignment"] == min(two["clap/audio0"], two["clap/audio1"])
    assert 0 < two["clap/concealment"] <= 1


# -- bad inputs ----------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_clear_messages(low: np.ndarray) -> None:
    scorer = BandScorer()
    with pytest.raises(ConfigError, match=r"number of waves=3: must equal the number of audio prompts \(2\)"):
        scorer.score([low, low, low], [LOW, HIGH])
    with pytest.raises(ConfigError, match=r"candidate 1: number of waves=1"):
        scorer.score_batch([[low, low], [low]], [LOW, HIGH])
    with pytest.raises(ConfigError, match=r"waves\[1\] shape=\(2, 8000\): each wave must be 1-D"):
        scorer.score([low, np.zeros((2, 8000), np.float32)], [LOW, HIGH])
    nan = low.copy()
    nan[3] = np.nan
    with pytest.raises(ConfigError, match=r"waves\[0\] non-finite samples=1: .*finite"):
        scorer.score([nan], [LOW])
    with pytest.raises(ConfigError, match=r"waves\[0\] length=0"):
        scorer.score([np.zeros(0, np.float32)], [LOW])
    with pytest.raises(ConfigError, match=r"sample_rate=0: must be a positive"):
        scorer.score([low], [LOW], sample_rate=0)
    with pytest.raises(ConfigError, match=r"prompts=\[\]: need at least one audio prompt"):
        scorer.similarity([low], [])
    with pytest.raises(ConfigError, match=r"list of prompts"):
        scorer.similarity([low], LOW)
    with pytest.raises(ConfigError, match=r"must be a list of waves"):
        scorer.similarity(low, [LOW])  # type: ignore[arg-type]


def test_tiny_refuses_bad_waves_too(tiny: ClapScorer) -> None:
    with pytest.raises(ConfigError, match=r"non-finite"):
        tiny.embed_audio([np.full(100, np.inf, np.float32)], RATE)
    with pytest.raises(ConfigError, match=r"sample_rate=-1"):
        tiny.embed_audio([np.zeros(100, np.float32)], -1)


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"batch_size must be at least 1, but got batch_size=0\."):
        ClapScorer("tiny", batch_size=0)


def test_missing_local_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"folder .*no-such-clap.* does not exist"):
        ClapScorer(str(tmp_path / "no-such-clap"), device="cpu")


def test_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"could not load the CLAP model .*ClapProcessor"):
        ClapScorer(str(tmp_path), device="cpu")


def test_uncached_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub read both at import time.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(
        ModelLoadError, match=r"'sounding-anagrams-test/no-such-clap'.*first use.*local folder"
    ):
        ClapScorer("sounding-anagrams-test/no-such-clap", device="cpu")
