"""CLAP scores of sounds against audio prompts (images-that-sound's protocol, docs/METHOD.md §4).

Each 16 kHz wave is resampled to CLAP's 48 kHz with an exact polyphase filter, peak-normalised, turned
into log-mel features by the checkpoint's ``ClapFeatureExtractor`` and embedded by
``ClapModel.get_audio_features``; prompts go through its RoBERTa tokenizer and ``get_text_features``. With
``S[a, p]`` the cosine of wave ``a`` to prompt ``p`` and ``waves[a]`` meant to sound like prompt ``a``:

- ``clap/audio{a}`` = ``max(S[a, a], 0)`` (images-that-sound's CLAP score);
- with two or more prompts, ``clap/alignment`` = the smallest of those and ``clap/concealment`` =
  Visual Anagrams' concealment of ``S`` at the model's temperature ``1 / exp(logit_scale_a)``.

Audio longer than the model's window (10 s for the LAION checkpoints) is scored on its FIRST window: the
feature extractor's own ``rand_trunc`` would crop a random 10 s piece (and the ``fusion`` mode picks random
crops too), so the same canvas would score differently on every call. Shorter audio is padded the way the
checkpoint's feature extractor says (``repeatpad`` for the LAION models: repeated, then zero-padded).

CLAP comes from transformers (never the ``laion-clap`` package: it pins numpy<2, pulls wandb and
fetches tokenizers from the hub at import). ``"tiny"`` names a
small random offline CLAP built once into the cache and then loaded through the same ``from_pretrained`` path.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sounding_anagrams.devices import resolve_device
from sounding_anagrams.errors import ConfigError, ModelLoadError, one_line
from sounding_anagrams.evaluation.metrics import alignment, concealment
from sounding_anagrams.files import looks_like_path
from sounding_anagrams.sampler.tiny import ensure_built, tiny_cache_dir, write_byte_level_tokenizer

if TYPE_CHECKING:
    from transformers import ClapConfig

DEFAULT_CLAP_MODEL = "laion/clap-htsat-unfused"  # what images-that-sound used
CLAP_SAMPLE_RATE = 48_000
TINY_CLAP = "tiny"
# laion_clap tokenizes prompts to at most 77 tokens; longer prompts are cut the same way here.
CLAP_TEXT_MAX_TOKENS = 77
# Bump when the tiny model changes: the marker name changes with it, so stale cache folders are rebuilt.
TINY_CLAP_VERSION = 1
TINY_CLAP_MARKER = f"tiny_clap_v{TINY_CLAP_VERSION}_complete"
_TINY_CLAP_SEED = 2024
_TEXT_CACHE_SIZE = 1024


# -- signal preparation -------------------------------------------------------------------------------------


def _check_rate(rate: Any, field: str) -> int:
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, np.integer, float))
        or rate != int(rate)
        or rate <= 0
    ):
        raise ConfigError(field, rate, "must be a positive whole number of samples per second (Hz)")
    return int(rate)


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Rational polyphase resampling: ``(N,)`` at ``from_rate`` -> ``(ceil(N * up / down),)`` float32.

    ``up / down`` is ``to_rate / from_rate`` reduced by their gcd (22050 -> 48000 is 320 / 147), filtered by
    scipy's Kaiser-windowed anti-aliasing FIR, so a tone below both Nyquist rates keeps pitch and amplitude.
    """
    from scipy.signal import resample_poly

    from_rate = _check_rate(from_rate, "from_rate")
    to_rate = _check_rate(to_rate, "to_rate")
    samples = np.asarray(wave, dtype=np.float64)
    if from_rate == to_rate:
        return samples.astype(np.float32)
    common = math.gcd(from_rate, to_rate)
    # Filter in float64 so that long waves do not accumulate float32 rounding in the FIR sums.
    return resample_poly(samples, to_rate // common, from_rate // common).astype(np.float32)


def resample_16k_to_48k(wave: np.ndarray) -> np.ndarray:
    """Exact polyphase resampling (scipy.signal.resample_poly, up 3 down 1): ``len(out) == 3 * len(wave)``."""
    return resample(wave, 16_000, CLAP_SAMPLE_RATE)


def peak_normalise(wave: np.ndarray) -> np.ndarray:
    """``(N,)`` -> ``(N,)`` float32 divided by its largest ``|x|``; an all-zero (or empty) wave stays so."""
    samples = np.asarray(wave, dtype=np.float32)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak == 0.0:
        return samples.copy()
    return samples / peak


# -- input checks -------------------------------------------------------------------------------------------


def check_waves(waves: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A list of non-empty, finite, 1-D float32 waves (ConfigError naming the bad one otherwise)."""
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        raise ConfigError(
            "waves", f"one array of shape {waves.shape}", "must be a list of waves; wrap one in [...]"
        )
    checked = []
    for index, wave in enumerate(waves):
        samples = np.asarray(wave, dtype=np.float32)
        if samples.ndim != 1:
            raise ConfigError(f"waves[{index}] shape", samples.shape, "each wave must be 1-D (mono samples)")
        if samples.size == 0:
            raise ConfigError(f"waves[{index}] length", 0, "each wave must have at least one sample")
        bad = int(np.size(samples) - np.count_nonzero(np.isfinite(samples)))
        if bad:
            raise ConfigError(
                f"waves[{index}] non-finite samples", bad, "each wave must be finite (no NaN or inf)"
            )
        checked.append(samples)
    if not checked:
        raise ConfigError("waves", [], "need at least one wave")
    return checked


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A non-empty list of strings (a bare string is refused: it would read as one prompt per character)."""
    if isinstance(prompts, str):
        raise ConfigError("prompts", prompts, "must be a list of prompts; wrap one prompt in [...]")
    checked = list(prompts)
    if not checked:
        raise ConfigError("prompts", checked, "need at least one audio prompt")
    for index, prompt in enumerate(checked):
        if not isinstance(prompt, str):
            raise ConfigError(f"prompts[{index}]", prompt, "each prompt must be a string")
    return checked


def check_sample_rate(sample_rate: int) -> int:
    return _check_rate(sample_rate, "sample_rate")


def _check_counts(n_waves: int, n_prompts: int, candidate: int | None = None) -> None:
    if n_waves != n_prompts:
        where = f"candidate {candidate}: " if candidate is not None else ""
        raise ConfigError(
            f"{where}number of waves",
            n_waves,
            f"must equal the number of audio prompts ({n_prompts}): waves[a] should sound like prompt a",
        )


# -- scoring -------------------------------------------------------------------------------------------------


def _unit_rows(embeddings: Tensor, rows: int, what: str) -> Tensor:
    """``(rows, D)`` -> the same rows L2-normalised, float32 on the CPU (checks what a subclass returned)."""
    if embeddings.ndim != 2 or embeddings.shape[0] != rows:
        raise ValueError(f"{what} must be a ({rows}, D) tensor, but got shape {tuple(embeddings.shape)}")
    return F.normalize(embeddings.detach().float().cpu(), dim=-1)


class AudioTextScorer(ABC):
    """Scores sounds against prompts from L2-normalised embeddings; subclasses say how to embed.

    ``temperature`` is ``1 / exp(logit scale)`` of the model, the softmax temperature of its contrastive
    logits, used for concealment.
    """

    temperature: float

    @abstractmethod
    def embed_audio(self, waves: Sequence[np.ndarray], sample_rate: int) -> Tensor:
        """``A`` waves ``(N_a,)`` at ``sample_rate`` -> ``(A, D)`` unit vectors, float32 on the CPU."""

    @abstractmethod
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """``P`` prompts -> ``(P, D)`` unit vectors, float32 on the CPU."""

    def _embeddings(
        self, waves: list[np.ndarray], prompts: list[str], sample_rate: int
    ) -> tuple[Tensor, Tensor]:
        audio = _unit_rows(self.embed_audio(waves, sample_rate), len(waves), "embed_audio's result")
        text = _unit_rows(self.embed_texts(prompts), len(prompts), "embed_texts's result")
        if audio.shape[1] != text.shape[1]:
            raise ValueError(f"audio ({audio.shape[1]}) and text ({text.shape[1]}) embedding sizes differ")
        return audio, text

    def similarity(
        self, waves: Sequence[np.ndarray], prompts: Sequence[str], sample_rate: int = 16_000
    ) -> Tensor:
        """``(A, P)`` cosines of ``A`` waves to ``P`` prompts (any counts), float32 on the CPU."""
        checked_waves = check_waves(waves)
        checked_prompts = check_prompts(prompts)
        audio, text = self._embeddings(checked_waves, checked_prompts, check_sample_rate(sample_rate))
        return audio @ text.T

    def score(
        self, waves: Sequence[np.ndarray], prompts: Sequence[str], sample_rate: int = 16_000
    ) -> dict[str, float]:
        """One candidate: ``waves[a]`` is what audio prompt ``a`` should sound like.

        Returns ``{"clap/audio0": max(S[0, 0], 0), ...}``; with two or more prompts also
        ``"clap/alignment"`` (the smallest clamped diagonal entry) and ``"clap/concealment"``
        (``concealment(S, self.temperature)``).
        """
        return self.score_batch([waves], prompts, sample_rate)[0]

    def score_batch(
        self,
        candidates: Sequence[Sequence[np.ndarray]],
        prompts: Sequence[str],
        sample_rate: int = 16_000,
    ) -> list[dict[str, float]]:
        """``score`` for many candidates, each a list of ``P`` waves; one dict per candidate, in order.

        All waves of all candidates go to ``embed_audio`` at once (which batches them); prompts are embedded
        once.
        """
        checked_prompts = check_prompts(prompts)
        rate = check_sample_rate(sample_rate)
        flat: list[np.ndarray] = []
        for index, waves in enumerate(candidates):
            checked = check_waves(waves)
            _check_counts(len(checked), len(checked_prompts), index if len(candidates) > 1 else None)
            flat.extend(checked)
        if not flat:
            return []
        audio, text = self._embeddings(flat, checked_prompts, rate)
        n = len(checked_prompts)
        similarities = (audio @ text.T).reshape(-1, n, n)  # (candidates, waves, prompts)
        return [self._scores(matrix) for matrix in similarities]

    def _scores(self, similarity: Tensor) -> dict[str, float]:
        """``(P, P)`` similarity of one candidate -> its named scores."""
        diagonal = similarity.diagonal().clamp(min=0)
        scores = {f"clap/audio{index}": float(value) for index, value in enumerate(diagonal)}
        if similarity.shape[0] >= 2:
            scores["clap/alignment"] = alignment(similarity.clamp(min=0))
            scores["clap/concealment"] = concealment(similarity, self.temperature)
        return scores


# -- CLAP through transformers -------------------------------------------------------------------------------


def resolve_clap_source(model: str) -> str:
    """``"tiny"`` -> the cached tiny folder (built on first use); a folder -> its path; a hub id as it is."""
    if model == TINY_CLAP:
        return str(ensure_tiny_clap())
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                f"CLAP model folder {model!r} does not exist; give a folder written by "
                "ClapModel.save_pretrained and ClapProcessor.save_pretrained, a hub id such as "
                f"{DEFAULT_CLAP_MODEL!r}, or {TINY_CLAP!r}"
            )
        return str(folder)
    return model


def _load_error(model: str, source: str, error: Exception) -> ModelLoadError:
    if source == model and not looks_like_path(model):
        hint = (
            "Hub weights download into the Hugging Face cache on first use, which needs the network (and "
            "HF_HUB_OFFLINE unset); offline, give a local folder saved with save_pretrained (ClapModel and "
            f"ClapProcessor), or {TINY_CLAP!r} for a small random offline model."
        )
    else:
        hint = (
            "The folder must hold a ClapModel and a ClapProcessor saved with save_pretrained (config.json, "
            "weights, preprocessor/processor config and tokenizer files)."
        )
    return ModelLoadError(f"could not load the CLAP model {model!r}: {one_line(error)} {hint}")


def _pooled(output: Any) -> Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and a model output (``pooler_output``) in 5."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"unexpected CLAP feature output of type {type(output).__name__}")


class ClapScorer(AudioTextScorer):
    """CLAP (transformers ``ClapModel`` + ``ClapProcessor``) as an ``AudioTextScorer``.

    Args:
        model: a hub id (default ``laion/clap-htsat-unfused``, from the HF cache), a local folder in the
            ``save_pretrained`` layout, or ``"tiny"``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ... or a ``torch.device``.
        batch_size: waves per forward pass of the audio tower.

    Raises:
        ModelLoadError: the folder is missing, or the model cannot be loaded (e.g. offline and not cached).
        ValueError: ``batch_size < 1``.
    """

    def __init__(
        self, model: str = DEFAULT_CLAP_MODEL, *, device: str | torch.device = "auto", batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, but got {batch_size=}.")
        from transformers import ClapModel, ClapProcessor

        self.name = model
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.source = resolve_clap_source(model)
        try:
            clap = ClapModel.from_pretrained(self.source)
            processor = ClapProcessor.from_pretrained(self.source)
        except (OSError, ValueError, TypeError) as error:
            raise _load_error(model, self.source, error) from error
        # float32 whatever the checkpoint's dtype: scores are compared across runs and machines.
        self.model = clap.float().to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        # The model's window in samples (480 000 = 10 s at 48 kHz for the LAION checkpoints).
        self.max_samples = int(self.feature_extractor.nb_max_samples)
        self.temperature = float(1.0 / self.model.logit_scale_a.detach().float().exp().item())
        self._text_cache: dict[str, Tensor] = {}

    def prepare_wave(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """``(N,)`` at ``sample_rate`` -> ``(min(N', max_samples),)`` float32 at 48 kHz.

        Resampled, peak-normalised over the whole wave (as images-that-sound did), then cut to the model's
        first window (the determinism choice, see the module docstring).
        """
        return peak_normalise(resample(wave, sample_rate, self.sample_rate))[: self.max_samples]

    @torch.no_grad()
    def embed_audio(self, waves: Sequence[np.ndarray], sample_rate: int) -> Tensor:
        """``A`` waves ``(N_a,)`` at ``sample_rate`` -> ``(A, D)`` unit vectors (float32 CPU), in batches."""
        rate = check_sample_rate(sample_rate)
        prepared = [self.prepare_wave(wave, rate) for wave in check_waves(waves)]
        chunks = []
        for start in range(0, len(prepared), self.batch_size):
            features = self.feature_extractor(
                prepared[start : start + self.batch_size], sampling_rate=self.sample_rate, return_tensors="pt"
            )
            # Nothing is longer than the window after the cut; "fusion" extractors would otherwise mark a
            # random wave as longer (a training trick), which makes a wave's embedding depend on its batch.
            is_longer = torch.zeros_like(features["is_longer"], dtype=torch.bool)
            output = self.model.get_audio_features(
                input_features=features["input_features"].to(self.device, torch.float32),
                is_longer=is_longer.to(self.device),
            )
            chunks.append(F.normalize(_pooled(output).float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """``P`` prompts -> ``(P, D)`` unit vectors (float32 CPU); each distinct prompt is embedded once."""
        checked = check_prompts(prompts)
        missing = list(dict.fromkeys(prompt for prompt in checked if prompt not in self._text_cache))
        if missing:
            tokens = self.tokenizer(
                missing, padding=True, truncation=True, max_length=CLAP_TEXT_MAX_TOKENS, return_tensors="pt"
            )
            output = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
            if len(self._text_cache) + len(missing) > _TEXT_CACHE_SIZE:
                self._text_cache.clear()
            embeddings = F.normalize(_pooled(output).float(), dim=-1).cpu()
            self._text_cache.update(zip(missing, embeddings, strict=True))
        return torch.stack([self._text_cache[prompt] for prompt in checked])


# -- the tiny offline CLAP -----------------------------------------------------------------------------------


def _roberta_byte_vocab() -> dict[str, int]:
    """RoBERTa's special tokens at its ids (<s> 0, <pad> 1, </s> 2, <unk> 3), one token per byte, <mask>.

    Bytes are spelled with GPT-2's byte-to-unicode table (printable bytes as themselves, the others shifted to
    256+), which is what byte-level BPE expects; with no merges every byte stays its own token.
    """
    from sounding_anagrams.sampler.tiny import byte_level_chars

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({char: 4 + index for index, char in enumerate(byte_level_chars())})
    vocab["<mask>"] = len(vocab)
    return vocab


def tiny_clap_config(vocab_size: int) -> ClapConfig:
    """A ``ClapConfig`` of ~50 k parameters with the real model's input shapes.

    Text: RoBERTa-like, 2 layers, hidden 32. Audio: HTSAT/Swin with 2 stages of 1 block (patch embedding
    16 -> hidden 32), spec_size 256 and 64 mel bins as in the LAION checkpoints, so a 10 s, 48 kHz window
    (1001 frames x 64 mels) is reshaped exactly as in the real model. Projection 32.
    """
    from transformers import ClapConfig

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        # RoBERTa positions start after the padding index (1), so 77 tokens need 79 positions.
        "max_position_embeddings": CLAP_TEXT_MAX_TOKENS + 3,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    audio_config = {
        "spec_size": 256,
        "num_mel_bins": 64,
        "window_size": 8,
        "patch_size": 4,
        "patch_stride": (4, 4),
        "patch_embeds_hidden_size": 16,
        "hidden_size": 32,  # = patch_embeds_hidden_size * 2 ** (stages - 1), the audio tower's output width
        "depths": (1, 1),
        "num_attention_heads": (2, 4),
        "num_hidden_layers": 2,
        "num_classes": 8,
        "enable_fusion": False,
    }
    return ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=32)


def build_tiny_clap(folder: Path) -> None:
    """Save a tiny random ``ClapModel`` and its ``ClapProcessor`` to ``folder`` (save_pretrained layout).

    The feature extractor is the LAION unfused one (48 kHz, 64 mels, hop 480, window 1024, 50-14000 Hz, 10 s,
    rand_trunc / repeatpad); the tokenizer is byte-level BPE with no merges (vocab.json + merges.txt), loaded
    with ``RobertaTokenizer.from_pretrained`` as a real checkpoint's would be. The marker is written last.
    """
    from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab_size = write_byte_level_tokenizer(
        folder, _roberta_byte_vocab(), max_length=CLAP_TEXT_MAX_TOKENS, tokenizer_class="RobertaTokenizer"
    )
    tokenizer = RobertaTokenizer.from_pretrained(str(folder))
    feature_extractor = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=CLAP_SAMPLE_RATE,
        hop_length=480,
        max_length_s=10,
        fft_window_size=1024,
        frequency_min=50,
        frequency_max=14_000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(str(folder))
    # Fork the RNG so that building the cache does not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_CLAP_SEED)
        model = ClapModel(tiny_clap_config(vocab_size))
    model.save_pretrained(str(folder))
    (folder / TINY_CLAP_MARKER).write_text(f"tiny CLAP v{TINY_CLAP_VERSION}, seed {_TINY_CLAP_SEED}\n")


def ensure_tiny_clap() -> Path:
    """The tiny CLAP folder (``tiny_cache_dir() / "clap"``), built once under a lock on first use."""
    return ensure_built(tiny_cache_dir() / "clap", build_tiny_clap, marker=TINY_CLAP_MARKER)
