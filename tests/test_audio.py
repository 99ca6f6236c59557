"""Mel analysis, image <-> spectrogram mapping, Griffin-Lim and WAV I/O."""

from __future__ import annotations

import contextlib
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.sampler.audio import (
    MelConfig,
    griffin_lim,
    hz_to_mel,
    image_to_log_mel,
    log_mel_spectrogram,
    log_mel_to_image,
    mel_band_edges,
    mel_filterbank,
    mel_to_hz,
    read_wav,
    write_wav,
)

CFG = MelConfig()
SR = CFG.sample_rate


def _synthetic(n_samples: int) -> torch.Tensor:
    """Linear chirp 200 Hz -> 3 kHz plus two steady tones, shape (1, n_samples)."""
    t = torch.arange(n_samples, dtype=torch.float64) / SR
    dur = n_samples / SR
    chirp = torch.sin(2 * math.pi * (200 * t + 0.5 * (3000 - 200) / dur * t**2))
    x = 0.3 * chirp + 0.2 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 2500 * t)
    return x.float()[None]


# --------------------------------------------------------------------------- filterbank


def test_config_defaults_match_auffusion() -> None:
    assert (CFG.sample_rate, CFG.n_fft, CFG.win_length, CFG.hop_length, CFG.n_mels) == (
        16000,
        2048,
        1024,
        160,
        256,
    )
    assert (CFG.fmin, CFG.fmax) == (0.0, 8000.0)
    assert CFG.log_min == pytest.approx(math.log(1e-5))
    assert CFG.log_max == pytest.approx(math.log(200.0))


def test_filterbank_shape_and_structure() -> None:
    fb = mel_filterbank(CFG)
    assert fb.shape == (256, 1025)
    assert fb.dtype == torch.float32
    assert (fb >= 0).all()
    assert (fb.sum(dim=1) > 0).all(), "every mel band must cover at least one FFT bin"
    peaks = fb.argmax(dim=1)
    assert (peaks[1:] > peaks[:-1]).all()
    # Cached per config, but each call hands out its own tensor.
    assert fb.data_ptr() != mel_filterbank(CFG).data_ptr()
    assert torch.equal(fb, mel_filterbank(CFG))


def test_filterbank_slaney_area_normalisation() -> None:
    # Triangle height 2 / (f_{m+2} - f_m) and base (f_{m+2} - f_m): every band integrates to ~1 over Hz.
    # Sampled on 7.8 Hz FFT bins the narrow low bands (~23 Hz wide) deviate by up to ~11%, wide ones by <2%.
    fb = mel_filterbank(CFG).double()
    bin_hz = SR / CFG.n_fft
    areas = fb.sum(dim=1) * bin_hz
    assert torch.allclose(areas, torch.ones_like(areas), rtol=0.12)
    assert torch.allclose(areas[128:], torch.ones_like(areas[128:]), rtol=0.02)
    # Peak of band m is at its centre frequency edges[m + 1].
    edges = mel_band_edges(CFG)
    centre_bins = np.round(edges[1:-1] / bin_hz)
    assert np.abs(fb.argmax(dim=1).numpy() - centre_bins).max() <= 1


def test_slaney_mel_scale_known_values() -> None:
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(200.0 / 3.0)) == pytest.approx(1.0)  # linear part: 200/3 Hz per mel
    assert float(hz_to_mel(6400.0)) == pytest.approx(15.0 + 27.0)  # log part: 6.4x per 27 mels
    freqs = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4321.0, 8000.0])
    assert np.allclose(mel_to_hz(hz_to_mel(freqs)), freqs)
    edges = mel_band_edges(CFG)
    assert edges[0] == pytest.approx(0.0) and edges[-1] == pytest.approx(8000.0)


# --------------------------------------------------------------------------- analysis


def test_log_mel_frame_count() -> None:
    wave_ = torch.randn(2, 163840) * 0.1
    lm = log_mel_spectrogram(wave_, CFG)
    assert lm.shape == (2, 256, 1024)
    assert lm.dtype == torch.float32
    assert lm.min() >= math.log(1e-5) - 1e-6
    assert log_mel_spectrogram(torch.zeros(16000), CFG).shape == (256, 100)
    assert log_mel_spectrogram(wave_.half(), CFG).dtype == torch.float32


def test_log_mel_silence_is_floor() -> None:
    lm = log_mel_spectrogram(torch.zeros(1, 3200), CFG)
    assert torch.allclose(lm, torch.full_like(lm, math.log(1e-5)))


def test_log_mel_too_short_is_an_error() -> None:
    with pytest.raises(ConfigError, match="waveform length"):
        log_mel_spectrogram(torch.zeros(1, 500), CFG)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2750.0, 6000.0])
def test_pure_tone_peaks_at_nearest_mel_bin(freq: float) -> None:
    t = torch.arange(16000, dtype=torch.float64) / SR
    tone = (0.5 * torch.sin(2 * math.pi * freq * t)).float()[None]
    lm = log_mel_spectrogram(tone, CFG)
    profile = lm[0, :, 10:-10].mean(dim=1)
    centres = mel_band_edges(CFG)[1:-1]
    expected = int(np.argmin(np.abs(centres - freq)))
    # Bands overlap by half: a tone close to the midpoint of two centres may peak in the neighbour.
    assert abs(int(profile.argmax()) - expected) <= 1


# --------------------------------------------------------------------------- image <-> log-mel


def test_image_log_mel_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 256, 64, generator=gen)
    lm = image_to_log_mel(img, CFG)
    assert lm.shape == (2, 256, 64)
    back = log_mel_to_image(lm, CFG)
    assert back.shape == (2, 1, 256, 64)
    assert torch.allclose(back, img, atol=1e-5)
    # (B, H, W) input and the inverse direction too.
    assert torch.allclose(image_to_log_mel(img[:, 0], CFG), lm)
    lm2 = torch.empty(1, 256, 8).uniform_(CFG.log_min, CFG.log_max, generator=gen)
    assert torch.allclose(image_to_log_mel(log_mel_to_image(lm2, CFG), CFG), lm2, atol=1e-4)


def test_image_endpoints_and_clamping() -> None:
    assert torch.allclose(image_to_log_mel(torch.zeros(1, 4, 4)), torch.full((1, 4, 4), math.log(1e-5)))
    assert torch.allclose(image_to_log_mel(torch.ones(1, 4, 4)), torch.full((1, 4, 4), math.log(200.0)))
    out = log_mel_to_image(torch.tensor([[[-100.0], [100.0]]]))
    assert out.flatten().tolist() == [1.0, 0.0]  # flipped: bin 1 (100 -> 1.0) is on top


def test_top_row_is_highest_mel_bin() -> None:
    img = torch.zeros(1, 3, 256, 16)
    img[:, :, 0, :] = 1.0
    lm = image_to_log_mel(img, CFG)
    assert torch.allclose(lm[0, 255], torch.full((16,), math.log(200.0)))
    assert torch.allclose(lm[0, :255], torch.full((255, 16), math.log(1e-5)))
    assert torch.allclose(log_mel_to_image(lm, CFG)[0, 0, 0], torch.ones(16))


def test_three_channels_are_averaged() -> None:
    img = torch.zeros(1, 3, 4, 4)
    img[:, 0] = 0.9
    img[:, 1] = 0.3
    img[:, 2] = 0.0
    lm = image_to_log_mel(img, CFG)
    assert torch.allclose(lm, image_to_log_mel(torch.full((1, 1, 4, 4), 0.4), CFG))


def test_image_bad_shape() -> None:
    with pytest.raises(ConfigError, match="image channels"):
        image_to_log_mel(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ConfigError, match="image shape"):
        image_to_log_mel(torch.zeros(4, 4))


# --------------------------------------------------------------------------- Griffin-Lim


def test_griffin_lim_length_and_determinism() -> None:
    lm = log_mel_spectrogram(torch.randn(2, 160 * 37) * 0.1, CFG)
    assert lm.shape[-1] == 37
    a = griffin_lim(lm, CFG, n_iter=4, seed=1)
    assert a.shape == (2, 37 * 160)
    assert a.dtype == torch.float32
    assert torch.equal(a, griffin_lim(lm, CFG, n_iter=4, seed=1))
    assert not torch.equal(a, griffin_lim(lm, CFG, n_iter=4, seed=2))
    assert griffin_lim(lm[0], CFG, n_iter=1).shape == (37 * 160,)


def test_griffin_lim_full_canvas_length() -> None:
    lm = torch.full((1, 256, 1024), math.log(1e-3))
    assert griffin_lim(lm, CFG, n_iter=1).shape == (1, 163840)


def test_griffin_lim_reconstruction_quality() -> None:
    # 2 s of chirp + tones. Measured: spectral convergence of the mel magnitude 0.77 with the random initial
    # phases (n_iter=0), 0.05 after 64 fast-GL iterations; log-mel correlation 0.993. The bounds leave margin.
    x = _synthetic(160 * 200)
    lm = log_mel_spectrogram(x, CFG)

    def spectral_convergence(y: torch.Tensor) -> float:
        m, m2 = lm.exp(), log_mel_spectrogram(y, CFG).exp()
        return float((m - m2).norm() / m.norm())

    y = griffin_lim(lm, CFG, n_iter=64, seed=0)
    assert y.shape == x.shape
    sc0 = spectral_convergence(griffin_lim(lm, CFG, n_iter=0, seed=0))
    sc = spectral_convergence(y)
    assert sc0 > 0.5
    assert sc < 0.12
    lm_y = log_mel_spectrogram(y, CFG)
    corr = np.corrcoef(lm.flatten().numpy(), lm_y.flatten().numpy())[0, 1]
    assert corr > 0.98
    assert float((lm - lm_y).abs().mean()) < 0.3
    assert y.abs().max() < 1.5


def test_griffin_lim_rejects_wrong_mel_count() -> None:
    with pytest.raises(ConfigError, match="log-mel shape"):
        griffin_lim(torch.zeros(1, 128, 10), CFG)


# --------------------------------------------------------------------------- WAV


def test_wav_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 4000, generator=gen) * 2 - 1
    path = tmp_path / "a.wav"
    write_wav(path, x, 16000)
    y, sr = read_wav(path)
    assert sr == 16000
    assert y.dtype == np.float32 and y.shape == (4000,)
    assert np.abs(y - x[0].numpy()).max() <= 1 / 32768
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getnframes()) == (1, 2, 4000)


def test_wav_clips_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    write_wav(path, np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0, np.nan]), 22050)
    y, sr = read_wav(path)
    assert sr == 22050
    assert np.allclose(y, [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0, 0.0], atol=1 / 32768)
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_wav_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mono"):
        write_wav(tmp_path / "s.wav", np.zeros((2, 10)), 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not a wav file at all")
    with pytest.raises(ConfigError, match=r"junk\.wav'\: must be a WAV file \(Format not recognised"):
        read_wav(junk)
    flac = tmp_path / "sound.wav"
    soundfile.write(flac, np.zeros(100), 16000, format="FLAC")
    with pytest.raises(ConfigError, match="must be a WAV file, but it is FLAC"):
        read_wav(flac)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_wav_reads_every_sample_format_an_editor_writes(tmp_path: Path, subtype: str) -> None:
    """8/16/24/32-bit PCM and 32/64-bit float WAVs (Audacity's default is 32-bit float) read to the same
    samples, to within each format's step."""
    x = np.sin(np.linspace(0, 40 * np.pi, 4000)) * 0.8
    path = tmp_path / f"{subtype}.wav"
    soundfile.write(path, x, 22050, subtype=subtype)
    y, rate = read_wav(path)
    step = {"PCM_U8": 1 / 128, "PCM_16": 1 / 32768}.get(subtype, 1e-6)
    assert rate == 22050 and y.dtype == np.float32 and y.shape == (4000,)
    assert np.abs(y - x).max() <= step
    with wave.open(str(path), "rb") if subtype in ("PCM_U8", "PCM_16") else contextlib.nullcontext() as f:
        if f is not None:  # the stdlib reads the PCM ones: an independent look at the header
            assert f.getnframes() == 4000


def test_wav_stereo_is_averaged(tmp_path: Path) -> None:
    path = tmp_path / "st.wav"
    pcm = np.array([[1000, 3000], [-2000, 0]], dtype="<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())
    y, _ = read_wav(path)
    assert np.allclose(y, np.array([2000, -1000]) / 32768.0)  # libsndfile's scale: full scale is 2**15


# --------------------------------------------------------------------------- librosa as the oracle


def test_mel_filterbank_is_librosas_slaney_filterbank() -> None:
    """Ours is transformers' (cached, moved to the device as a tensor); librosa is the reference."""
    import librosa

    cfg = MelConfig()
    reference = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    ours = mel_filterbank(cfg).numpy()
    assert ours.shape == reference.shape == (256, 1025)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-9)


def test_log_mel_is_librosas_on_auffusions_framing() -> None:
    """The batched torch analysis equals librosa's STFT and mel spectrogram on the same framing: reflect
    padding of (n_fft - hop) / 2 each side, no centring, periodic Hann of win_length inside n_fft."""
    import librosa

    cfg = MelConfig()
    rng = np.random.default_rng(0)
    t = np.arange(cfg.sample_rate) / cfg.sample_rate
    wave_ = 0.5 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.05 * rng.standard_normal(t.shape)
    ours = log_mel_spectrogram(torch.from_numpy(wave_)).numpy()  # float64 in, float64 out
    padded = np.pad(wave_, cfg.pad, mode="reflect")
    spectrum = librosa.stft(
        padded,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window="hann",
        center=False,
    )
    magnitude = np.sqrt(np.abs(spectrum) ** 2 + 1e-9)
    mel = librosa.feature.melspectrogram(
        S=magnitude,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        power=1.0,
        htk=False,
        norm="slaney",
    )
    reference = np.log(np.maximum(mel, 1e-5))
    assert ours.shape == reference.shape == (cfg.n_mels, len(wave_) // cfg.hop_length)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
