"""Log-mel analysis, image <-> spectrogram mapping, Griffin-Lim and WAV input/output.

The mel geometry is Auffusion's (16 kHz, n_fft 2048, window 1024, hop 160, 256 Slaney mels from 0 to
8 kHz, magnitude, natural log clamped at 1e-5). A 256 x 1024 picture is one 10.24 s spectrogram:
row 0 of the picture is the highest mel bin.

The analysis is torch (batched, on the device, Auffusion's non-centred framing); its Slaney filterbank is
transformers' and, with the log-mel, is tested against librosa. WAV files go through soundfile (libsndfile).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.audio_utils import hertz_to_mel, mel_filter_bank, mel_to_hertz

from sounding_anagrams.errors import ConfigError

__all__ = [
    "MelConfig",
    "griffin_lim",
    "hz_to_mel",
    "image_to_log_mel",
    "log_mel_spectrogram",
    "log_mel_to_image",
    "mel_band_edges",
    "mel_filterbank",
    "mel_to_hz",
    "read_wav",
    "write_wav",
]


@dataclass(frozen=True)
class MelConfig:
    """STFT and mel parameters of the spectrograms (Auffusion's defaults).

    ``log_min`` / ``log_max`` are the log-mel values that pixel values 0 and 1 map to.
    """

    sample_rate: int = 16000
    n_fft: int = 2048
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 256
    fmin: float = 0.0
    fmax: float = 8000.0
    log_min: float = math.log(1e-5)
    log_max: float = math.log(200.0)

    @property
    def n_freqs(self) -> int:
        """Number of one-sided STFT bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    @property
    def pad(self) -> int:
        """Reflect padding on each side of the waveform before the (non-centred) STFT."""
        return (self.n_fft - self.hop_length) // 2


# --------------------------------------------------------------------------- mel scale

# The Slaney scale and filterbank are transformers' (a runtime dependency already). Measured against the
# hand-written numpy version they replace, for the shipped MelConfig: the float32 matrices are identical (max
# abs difference 0; largest weight 0.085); in float64, librosa's ``filters.mel(norm="slaney")``, the tests'
# oracle, is 2e-15 away. (transformers places the FFT bins up to ``sample_rate // 2``: the same as librosa's
# ``sample_rate / 2`` for an even rate.)


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """Frequency in Hz -> Slaney mel (float64 array of the same shape)."""
    f = np.asarray(freq, dtype=np.float64)
    # transformers assigns into its result by a mask: give it a 1-D array, not a 0-d one.
    return np.asarray(hertz_to_mel(f.reshape(-1), mel_scale="slaney")).reshape(f.shape)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Slaney mel -> frequency in Hz (float64 array of the same shape); inverse of :func:`hz_to_mel`."""
    m = np.asarray(mel, dtype=np.float64)
    return np.asarray(mel_to_hertz(m.reshape(-1), mel_scale="slaney")).reshape(m.shape)


def mel_band_edges(cfg: MelConfig) -> np.ndarray:
    """The ``n_mels + 2`` band edge frequencies in Hz, equally spaced on the Slaney mel scale.

    Band ``m`` rises from edge ``m``, peaks at edge ``m + 1`` (its centre) and falls to edge ``m + 2``.
    """
    mels = np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(cfg.fmax), cfg.n_mels + 2)
    return mel_to_hz(mels)


@functools.lru_cache(maxsize=8)
def _mel_filterbank_np(cfg: MelConfig) -> np.ndarray:
    """``(n_mels, n_freqs)`` float32; computed in float64 (transformers' float32 option rounds before the
    Slaney normalisation, 7e-9 away), and transposed: transformers' is ``(n_freqs, n_mels)``."""
    weights = mel_filter_bank(
        num_frequency_bins=cfg.n_freqs,
        num_mel_filters=cfg.n_mels,
        min_frequency=cfg.fmin,
        max_frequency=cfg.fmax,
        sampling_rate=cfg.sample_rate,
        norm="slaney",  # every triangle has the same area, so wide high bands are not louder
        mel_scale="slaney",
        dtype=np.dtype(np.float64),
    )
    return np.ascontiguousarray(weights.T, dtype=np.float32)


def mel_filterbank(cfg: MelConfig | None = None) -> Tensor:
    """Slaney-style mel filterbank, shape ``(n_mels, n_fft // 2 + 1)``, float32 on the CPU.

    transformers' ``mel_filter_bank(norm="slaney", mel_scale="slaney")``: the same matrix as librosa's default
    ``filters.mel`` (htk=False, norm="slaney"). Cached per config; a fresh tensor is returned each call so
    callers may modify it.
    """
    cfg = cfg or MelConfig()
    return torch.from_numpy(_mel_filterbank_np(cfg).copy())


@functools.lru_cache(maxsize=8)
def _mel_pinv_np(cfg: MelConfig) -> np.ndarray:
    return np.linalg.pinv(_mel_filterbank_np(cfg).astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- STFT


def _window(cfg: MelConfig, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Periodic Hann of ``win_length`` zero-padded (centred) to ``n_fft``, as ``torch.stft`` lays it out."""
    win = torch.hann_window(cfg.win_length, periodic=True, dtype=dtype, device=device)
    left = (cfg.n_fft - cfg.win_length) // 2
    return F.pad(win, (left, cfg.n_fft - cfg.win_length - left))


def _stft(wave_: Tensor, cfg: MelConfig) -> Tensor:
    """Complex STFT of the reference analysis: (B, N) -> (B, n_fft // 2 + 1, N // hop)."""
    if wave_.shape[-1] <= cfg.pad:
        raise ConfigError(
            "waveform length",
            int(wave_.shape[-1]),
            f"must be longer than the reflect padding of {cfg.pad} samples",
        )
    padded = F.pad(wave_.unsqueeze(1), (cfg.pad, cfg.pad), mode="reflect").squeeze(1)
    return torch.stft(
        padded,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=torch.hann_window(cfg.win_length, periodic=True, dtype=padded.dtype, device=padded.device),
        center=False,
        return_complex=True,
    )


def _istft(spec: Tensor, cfg: MelConfig, window: Tensor, norm: Tensor) -> Tensor:
    """Least-squares inverse of :func:`_stft` (ignoring the reflect padding): (B, F, T) -> (B, T * hop).

    Weighted overlap-add in the padded coordinates, divided by the summed squared window, then the
    padding is cut off. ``norm`` is that window sum over the kept samples, shape ``(T * hop,)``.
    """
    n_frames = spec.shape[-1]
    frames = torch.fft.irfft(spec, n=cfg.n_fft, dim=1) * window[None, :, None]  # (B, n_fft, T)
    total = cfg.n_fft + cfg.hop_length * (n_frames - 1)
    signal = F.fold(
        frames, output_size=(1, total), kernel_size=(1, cfg.n_fft), stride=(1, cfg.hop_length)
    ).reshape(spec.shape[0], total)
    return signal[:, cfg.pad : cfg.pad + n_frames * cfg.hop_length] / norm


def _window_norm(cfg: MelConfig, n_frames: int, window: Tensor) -> Tensor:
    """Sum of squared windows over the samples :func:`_istft` keeps, shape ``(n_frames * hop,)``."""
    total = cfg.n_fft + cfg.hop_length * (n_frames - 1)
    sq = (window**2)[None, :, None].expand(1, cfg.n_fft, n_frames)
    env = F.fold(sq, output_size=(1, total), kernel_size=(1, cfg.n_fft), stride=(1, cfg.hop_length))
    env = env.reshape(total)[cfg.pad : cfg.pad + n_frames * cfg.hop_length]
    # Every kept sample lies under at least two frames; the floor only guards odd configs.
    return env.clamp(min=1e-8)


def log_mel_spectrogram(wave_: Tensor, cfg: MelConfig | None = None) -> Tensor:
    """Natural-log mel magnitude spectrogram of a waveform.

    Args:
        wave_: ``(B, N)`` or ``(N,)`` waveform in [-1, 1].
        cfg: mel parameters (default: Auffusion's).

    Returns:
        ``(B, n_mels, N // hop)`` log-mel (``(n_mels, N // hop)`` for 1-D input), in the input's float
        dtype (float32 for integer or half input) and device.
        For N a multiple of hop there is one frame per hop.
    """
    cfg = cfg or MelConfig()
    squeeze = wave_.dim() == 1
    x = wave_.unsqueeze(0) if squeeze else wave_
    if x.dim() != 2:
        raise ConfigError("waveform shape", tuple(wave_.shape), "must be (B, N) or (N,)")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # the STFT needs float32/64 (half is not supported on every device)
    spec = _stft(x, cfg)
    mag = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    basis = mel_filterbank(cfg).to(device=mag.device, dtype=mag.dtype)
    log_mel = torch.log(torch.clamp(basis @ mag, min=1e-5))
    return log_mel[0] if squeeze else log_mel


# --------------------------------------------------------------------------- image <-> spectrogram


def image_to_log_mel(image: Tensor, cfg: MelConfig | None = None) -> Tensor:
    """Picture with values in [0, 1] -> log-mel spectrogram.

    Args:
        image: ``(B, 3, H, W)`` (channels are averaged to gray), ``(B, 1, H, W)`` or ``(B, H, W)``.
        cfg: gives the log range that pixel values 0 and 1 map to.

    Returns:
        ``(B, H, W)`` log-mel where row ``H - 1 - r`` of the picture is mel bin ``r`` (picture row 0 is
        the highest bin). Values outside [0, 1] are mapped linearly too (no clamping).
    """
    cfg = cfg or MelConfig()
    if image.dim() == 4:
        if image.shape[1] not in (1, 3):
            raise ConfigError("image channels", int(image.shape[1]), "must be 1 or 3")
        gray = image.mean(dim=1)
    elif image.dim() == 3:
        gray = image
    else:
        raise ConfigError(
            "image shape", tuple(image.shape), "must be (B, 3, H, W), (B, 1, H, W) or (B, H, W)"
        )
    gray = torch.flip(gray, dims=[1])
    return gray * (cfg.log_max - cfg.log_min) + cfg.log_min


def log_mel_to_image(log_mel: Tensor, cfg: MelConfig | None = None) -> Tensor:
    """Log-mel spectrogram ``(B, H, W)`` -> gray picture ``(B, 1, H, W)`` in [0, 1] (highest bin on top).

    Exact inverse of :func:`image_to_log_mel` for values in the pixel range; values outside the log range
    are clamped.
    """
    cfg = cfg or MelConfig()
    if log_mel.dim() != 3:
        raise ConfigError("log-mel shape", tuple(log_mel.shape), "must be (B, n_mels, T)")
    p = ((log_mel - cfg.log_min) / (cfg.log_max - cfg.log_min)).clamp(0.0, 1.0)
    return torch.flip(p, dims=[1]).unsqueeze(1)


# --------------------------------------------------------------------------- Griffin-Lim


def _mel_to_linear(mel: Tensor, cfg: MelConfig, n_iter: int = 32) -> Tensor:
    """Non-negative least-squares-ish inversion of ``mel = basis @ mag``: (B, n_mels, T) -> (B, F, T).

    Starts from the pseudo-inverse (clamped, floored so multiplicative updates can move every entry),
    then runs Lee-Seung multiplicative updates, which keep ``mag >= 0`` and decrease
    ``||basis @ mag - mel||``.
    """
    basis = mel_filterbank(cfg).to(device=mel.device, dtype=mel.dtype)
    pinv = torch.from_numpy(_mel_pinv_np(cfg)).to(device=mel.device, dtype=mel.dtype)
    mag = (pinv @ mel).clamp(min=0.0)
    mag = mag + 1e-3 * mag.mean(dim=1, keepdim=True) + 1e-10
    bt_mel = basis.T @ mel
    btb = basis.T @ basis
    for _ in range(n_iter):
        mag = mag * bt_mel / (btb @ mag + 1e-12)
    return mag


def griffin_lim(
    log_mel: Tensor,
    cfg: MelConfig | None = None,
    n_iter: int = 64,
    seed: int = 0,
    momentum: float = 0.99,
) -> Tensor:
    """Waveform from a log-mel spectrogram by (fast) Griffin-Lim phase reconstruction.

    The mel magnitude is first brought back to a linear-frequency magnitude (non-negative least squares
    against the filterbank); then the phase is estimated with the momentum variant of Griffin-Lim
    (Perraudin et al., 2013) using the analysis's own STFT geometry, so that
    ``log_mel_spectrogram(griffin_lim(x))`` is close to ``x``.

    Args:
        log_mel: ``(B, n_mels, T)`` (or ``(n_mels, T)``) natural-log mel magnitudes.
        cfg: mel parameters.
        n_iter: Griffin-Lim iterations.
        seed: seeds the random initial phases (drawn on the CPU, so results do not depend on the device).
        momentum: 0 gives plain Griffin-Lim; 0.99 converges much faster.

    Returns:
        ``(B, T * hop)`` float32 waveform on the input's device (``(T * hop,)`` for 2-D input), roughly in
        [-1, 1] when the spectrogram came from such a signal.
    """
    cfg = cfg or MelConfig()
    squeeze = log_mel.dim() == 2
    lm = log_mel.unsqueeze(0) if squeeze else log_mel
    if lm.dim() != 3 or lm.shape[1] != cfg.n_mels:
        raise ConfigError("log-mel shape", tuple(log_mel.shape), f"must be (B, {cfg.n_mels}, T)")
    device = lm.device
    lm = lm.to(torch.float32)
    batch, _, n_frames = lm.shape

    mag = _mel_to_linear(torch.exp(lm), cfg)
    window = _window(cfg, device, torch.float32)
    norm = _window_norm(cfg, n_frames, window)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase0 = torch.rand((batch, cfg.n_freqs, n_frames), generator=gen) * (2 * math.pi)
    angles = torch.polar(torch.ones_like(phase0), phase0).to(device)

    prev = torch.zeros_like(angles)
    for _ in range(n_iter):
        rebuilt = _stft(_istft(mag * angles, cfg, window, norm), cfg)
        # Momentum step on the consistent spectrogram, then keep only its phase.
        accel = rebuilt + momentum * (rebuilt - prev)
        prev = rebuilt
        angles = accel / accel.abs().clamp(min=1e-16)
    out = _istft(mag * angles, cfg, window, norm)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------- WAV files


def write_wav(path: str | Path, wave_: np.ndarray | Tensor, sample_rate: int) -> None:
    """Write a mono 16-bit PCM WAV file (soundfile).

    Args:
        path: destination file (its folder must exist).
        wave_: ``(N,)`` or ``(1, N)`` samples in [-1, 1]; values outside are clipped, NaN becomes 0.
        sample_rate: in Hz.
    """
    import soundfile

    if isinstance(wave_, Tensor):
        data = wave_.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        data = np.asarray(wave_, dtype=np.float64)
    if data.ndim == 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 1:
        raise ConfigError("waveform shape", tuple(data.shape), "write_wav takes a mono (N,) or (1, N) array")
    data = np.clip(np.nan_to_num(data, nan=0.0), -1.0, 1.0)
    soundfile.write(str(path), data, int(sample_rate), subtype="PCM_16", format="WAV")


# libsndfile reads what a cut-short file holds and notes the length its header announced.
_ANNOUNCED_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV file of any sample format an audio editor writes (8/16/24/32-bit PCM, 32/64-bit float),
    through soundfile (libsndfile).

    Returns:
        ``(samples, sample_rate)`` with samples float32 in [-1, 1], shape ``(N,)``; several channels are
        averaged to mono.

    Raises:
        ConfigError: the file is not a WAV file, holds no samples, or is cut short.
    """
    import soundfile

    try:
        info = soundfile.info(str(path))
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as err:
        raise ConfigError("wav file", str(path), f"must be a WAV file ({err.error_string})") from None
    except OSError as err:  # a folder, no permission
        raise ConfigError("wav file", str(path), f"cannot be read: {err.strerror or err}") from None
    if info.format != "WAV":
        raise ConfigError("wav file", str(path), f"must be a WAV file, but it is {info.format_info}")
    # A file cut short would otherwise be scored as whatever samples remain: a wrong score, worse than none.
    announced = _ANNOUNCED_DATA.search(info.extra_info)
    if announced is not None and int(announced.group(1)) > int(announced.group(2)):
        bytes_per_frame = info.channels * _SAMPLE_BYTES.get(info.subtype, 2)
        raise ConfigError(
            "wav file",
            str(path),
            f"is truncated: its header announces {int(announced.group(1)) // bytes_per_frame} frames but the "
            f"file holds {len(samples)}",
        )
    if len(samples) == 0:
        raise ConfigError("wav file", str(path), "holds no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return np.clip(mono, -1.0, 1.0).astype(np.float32), int(rate)


_SAMPLE_BYTES = {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
