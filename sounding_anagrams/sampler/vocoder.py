"""HiFi-GAN (v1 generator) vocoder: log-mel spectrogram -> waveform, loaded from Auffusion's checkpoint.

Auffusion ships ``vocoder/config.json`` and ``vocoder/vocoder.pt``; the latter holds
``{"generator": state_dict}`` saved with the old ``torch.nn.utils.weight_norm`` (each conv weight stored
as ``weight_g`` and ``weight_v``). The network is transformers' ``SpeechT5HifiGan`` (the same HiFi-GAN v1
generator); this module keeps Auffusion's checkpoint format: the weight norm is folded into plain ``weight``
tensors when loading (:func:`fuse_weight_norm`) and split again when writing (:func:`split_weight_norm`), and
the key names are mapped (:func:`from_checkpoint_keys`, :func:`to_checkpoint_keys`), so checkpoints we write
have Auffusion's layout.

Measured before switching (fp32, CPU, random weights of Auffusion's config: rates 5,4,4,2, kernels 11,8,8,4,
512 channels, resblock "1" with kernels 3,7,11 and dilations 1,3,5; saved by the hand-written generator's
save_vocoder in Auffusion's layout, loaded by this module; a random (2, 256, 1024) log-mel): max abs diff
4.1e-8 against the hand-written generator on outputs up to 0.037, 8.1e-7 with the last conv scaled by 30
(outputs up to 0.95); the same speed (36 s each on a busy 2-core CPU). What SpeechT5HifiGan cannot build, and
this module rejects: resblock "2" (HiFi-GAN v3's two-conv block) and an odd ``kernel - rate`` (its padding
``(k - u) // 2`` then gives ``L * u + 1`` samples; the hand-written one added an output_padding). Auffusion's
vocoder uses neither.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from sounding_anagrams.errors import ConfigError, ModelLoadError

__all__ = [
    "HiFiGANConfig",
    "HiFiGANGenerator",
    "from_checkpoint_keys",
    "fuse_weight_norm",
    "load_vocoder",
    "save_vocoder",
    "split_weight_norm",
    "to_checkpoint_keys",
    "vocode",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "vocoder.pt"
_LAYOUT_HINT = (
    f"expected {CONFIG_NAME} and {WEIGHTS_NAME}, the layout of auffusion/auffusion-full-no-adapter's vocoder/"
)
_LRELU_SLOPE = 0.1


@dataclass(frozen=True)
class HiFiGANConfig:
    """Architecture of a HiFi-GAN v1-style generator (the keys of HiFi-GAN's ``config.json``).

    ``resblock`` must be ``"1"`` (three dilated + three plain convs per block, Auffusion's); HiFi-GAN v3's
    ``"2"`` is rejected, as SpeechT5HifiGan cannot build it. Stage ``i`` upsamples by ``upsample_rates[i]``
    with kernel ``upsample_kernel_sizes[i]`` (``kernel - rate`` even) and halves the channels; each stage has
    one residual block per entry of ``resblock_kernel_sizes``.
    """

    resblock: str
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_mels: int = 256
    sampling_rate: int = 16000

    def __post_init__(self) -> None:
        problems = []
        if self.resblock == "2":
            problems.append(
                "resblock='2' (HiFi-GAN v3's two-conv block) is not supported: the vocoder runs on "
                "transformers' SpeechT5HifiGan, which builds resblock '1' only (Auffusion's)"
            )
        elif self.resblock != "1":
            problems.append(f"resblock={self.resblock!r} must be '1'")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            problems.append(
                f"upsample_rates {list(self.upsample_rates)} and upsample_kernel_sizes "
                f"{list(self.upsample_kernel_sizes)} must be non-empty and of the same length"
            )
        if any(k < u for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=False)):
            problems.append("every upsample kernel size must be >= its upsample rate")
        odd = [
            (u, k)
            for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes, strict=False)
            if (k - u) % 2
        ]
        if odd:
            problems.append(
                f"upsample (rate, kernel) pairs {odd} have an odd kernel - rate: SpeechT5HifiGan pads by "
                "(kernel - rate) // 2, which gives L * rate + 1 samples instead of L * rate"
            )
        if (
            len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes)
            or not self.resblock_kernel_sizes
        ):
            problems.append(
                f"resblock_kernel_sizes {list(self.resblock_kernel_sizes)} and resblock_dilation_sizes "
                f"{[list(d) for d in self.resblock_dilation_sizes]} must be non-empty and of the same length"
            )
        if any(len(d) != 3 for d in self.resblock_dilation_sizes):
            problems.append("resblock '1' needs exactly 3 dilations per kernel size")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)) != 0:
            problems.append(
                f"upsample_initial_channel={self.upsample_initial_channel} must be divisible by "
                f"2**{len(self.upsample_rates)} (channels halve at every stage)"
            )
        if problems:
            raise ModelLoadError("invalid HiFi-GAN config: " + "; ".join(problems))

    @property
    def hop_length(self) -> int:
        """Waveform samples per spectrogram frame: the product of the upsample rates."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HiFiGANConfig:
        """Build from a HiFi-GAN ``config.json`` dict; unknown keys (batch_size, n_fft...) are ignored.

        Raises:
            ModelLoadError: a required key is missing or a value has the wrong type.
        """
        required = [f.name for f in fields(cls) if f.name not in ("num_mels", "sampling_rate")]
        missing = [k for k in required if k not in data]
        if missing:
            raise ModelLoadError(
                f"HiFi-GAN config is missing required key(s) {missing}; found keys {sorted(data)}"
            )
        try:
            kwargs: dict[str, Any] = {
                "resblock": str(data["resblock"]),
                "upsample_rates": tuple(int(v) for v in data["upsample_rates"]),
                "upsample_kernel_sizes": tuple(int(v) for v in data["upsample_kernel_sizes"]),
                "upsample_initial_channel": int(data["upsample_initial_channel"]),
                "resblock_kernel_sizes": tuple(int(v) for v in data["resblock_kernel_sizes"]),
                "resblock_dilation_sizes": tuple(
                    tuple(int(v) for v in d) for d in data["resblock_dilation_sizes"]
                ),
            }
            for key in ("num_mels", "sampling_rate"):
                if key in data:
                    kwargs[key] = int(data[key])
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"HiFi-GAN config has a value of the wrong type: {err}") from err
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with HiFi-GAN's key names (tuples become lists)."""
        return {
            "resblock": self.resblock,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "num_mels": self.num_mels,
            "sampling_rate": self.sampling_rate,
        }

    @classmethod
    def tiny(cls) -> HiFiGANConfig:
        """A few-thousand-parameter generator with hop 160 and 256 mels, for tests and the tiny preset.

        Auffusion's rates and kernels, with 32 channels and two residual kernels instead of 512 and three.
        """
        return cls(
            resblock="1",
            upsample_rates=(5, 4, 4, 2),
            upsample_kernel_sizes=(11, 8, 8, 4),
            upsample_initial_channel=32,
            resblock_kernel_sizes=(3, 7),
            resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
            num_mels=256,
            sampling_rate=16000,
        )


class HiFiGANGenerator(nn.Module):
    """HiFi-GAN v1 generator: transformers' ``SpeechT5HifiGan`` built from a :class:`HiFiGANConfig`.

    ``forward``: log-mel ``(B, num_mels, T)`` -> waveform ``(B, T * hop_length)`` in [-1, 1]. Its state dict
    has the keys of ``SpeechT5HifiGan`` under ``hifigan.``; :func:`to_checkpoint_keys` names them as
    Auffusion's checkpoint does.
    """

    def __init__(self, config: HiFiGANConfig) -> None:
        super().__init__()
        self.config = config
        self.hifigan = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=config.num_mels,
                sampling_rate=config.sampling_rate,
                upsample_initial_channel=config.upsample_initial_channel,
                upsample_rates=list(config.upsample_rates),
                upsample_kernel_sizes=list(config.upsample_kernel_sizes),
                resblock_kernel_sizes=list(config.resblock_kernel_sizes),
                resblock_dilation_sizes=[list(d) for d in config.resblock_dilation_sizes],
                leaky_relu_slope=_LRELU_SLOPE,
                normalize_before=False,  # Auffusion's vocoder takes the log-mel as it is
            )
        )
        # transformers draws conv weights with std 0.01: a random generator (the tiny preset's) is then silent
        # (rms 1e-7, against 0.09 before). PyTorch's own fan-in initialisation keeps it audible.
        for module in self.hifigan.modules():
            if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
                module.reset_parameters()

    def forward(self, mel: Tensor) -> Tensor:
        """(B, num_mels, T) log-mel -> (B, T * hop_length) waveform."""
        return self.hifigan(mel.transpose(1, 2))  # SpeechT5HifiGan takes (B, T, num_mels)


# Auffusion's key prefixes (HiFi-GAN's) -> HiFiGANGenerator's; the first that matches applies.
_KEY_PREFIXES = (("ups.", "hifigan.upsampler."), ("", "hifigan."))
# SpeechT5's input normalisation buffers (unused: normalize_before=False); Auffusion's checkpoint has none.
_NORMALISATION_KEYS = ("hifigan.mean", "hifigan.scale")


def from_checkpoint_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Auffusion's key names (``conv_pre.weight``, ``ups.0.bias``, ``resblocks.3.convs1.2.weight`` ...) ->
    :class:`HiFiGANGenerator`'s (``hifigan.conv_pre.weight``, ``hifigan.upsampler.0.bias`` ...)."""
    out = {}
    for key, value in state_dict.items():
        theirs, ours = next((t, o) for t, o in _KEY_PREFIXES if key.startswith(t))
        out[ours + key[len(theirs) :]] = value
    return out


def to_checkpoint_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`from_checkpoint_keys`; SpeechT5's unused normalisation buffers are left out."""
    out = {}
    for key, value in state_dict.items():
        if key in _NORMALISATION_KEYS:
            continue
        theirs, ours = next((t, o) for t, o in _KEY_PREFIXES if key.startswith(o))
        out[theirs + key[len(ours) :]] = value
    return out


# --------------------------------------------------------------------------- weight norm <-> plain weights

_G_SUFFIXES = ("weight_g", "parametrizations.weight.original0")
_V_SUFFIXES = ("weight_v", "parametrizations.weight.original1")


def _norm_except_dim0(v: Tensor) -> Tensor:
    """L2 norm over every dim but the first, shaped ``(shape[0], 1, ..., 1)``."""
    return v.flatten(1).norm(dim=1).reshape(v.shape[0], *([1] * (v.dim() - 1)))


def _split_key(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key == suffix or key.endswith("." + suffix):
            return key[: len(key) - len(suffix)]
    return None


def fuse_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace every ``X.weight_g`` / ``X.weight_v`` pair by ``X.weight = g * v / ||v||`` (norm over dims 1:).

    Also accepts the newer parametrization names (``X.parametrizations.weight.original0/1``). Other keys are
    kept as they are. The fused weight keeps ``v``'s dtype (computed in float32 at least).

    Raises:
        ModelLoadError: a ``g`` has no matching ``v`` or the other way round.
    """
    gs: dict[str, Tensor] = {}
    vs: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if (prefix := _split_key(key, _G_SUFFIXES)) is not None:
            gs[prefix] = value
        elif (prefix := _split_key(key, _V_SUFFIXES)) is not None:
            vs[prefix] = value
        else:
            out[key] = value
    unpaired = sorted(set(gs) ^ set(vs))
    if unpaired:
        described = [f"{p}weight_{'g' if p in gs else 'v'}" for p in unpaired[:10]]
        raise ModelLoadError(
            f"weight-norm tensors without their pair ({len(unpaired)}): {described}; "
            "each weight_g needs a weight_v and vice versa"
        )
    for prefix, g in gs.items():
        v = vs[prefix]
        compute = torch.promote_types(v.dtype, torch.float32)
        v32 = v.to(compute)
        fused = g.to(compute).reshape(v.shape[0], *([1] * (v.dim() - 1))) * v32 / _norm_except_dim0(v32)
        out[prefix + "weight"] = fused.to(v.dtype)
    return out


def split_weight_norm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`fuse_weight_norm`: each conv ``X.weight`` -> ``X.weight_g``, ``X.weight_v``.

    ``weight_v`` is the weight itself and ``weight_g`` its norm over dims 1.. with shape ``(shape[0], 1, 1)``,
    as ``torch.nn.utils.weight_norm`` initialises them; biases and other keys are kept.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        is_weight = key == "weight" or key.endswith(".weight")
        if is_weight and value.dim() >= 2:
            prefix = key[: len(key) - len("weight")]
            out[prefix + "weight_g"] = _norm_except_dim0(value.float()).to(value.dtype)
            out[prefix + "weight_v"] = value
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- save / load


def save_vocoder(generator: HiFiGANGenerator, folder: str | Path) -> None:
    """Write ``config.json`` and ``vocoder.pt`` (``{"generator": weight-normed state dict}``) to ``folder``.

    The folder is created if needed; the state dict is saved in the old weight-norm layout.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(generator.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().cpu().clone() for k, v in to_checkpoint_keys(generator.state_dict()).items()}
    torch.save({"generator": split_weight_norm(state)}, folder / WEIGHTS_NAME)


# A hub repo id: "name" or "owner/name" (letters, digits, - _ .), not starting with "." or "/".
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _resolve_local(path: Path, subfolder: str | None) -> tuple[Path, Path]:
    folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        # Name the folder actually searched; when the subfolder is absent, say so.
        where = f"{folder}" + (f" (it has no {subfolder}/ subfolder)" if subfolder and folder == path else "")
        raise ModelLoadError(f"vocoder folder {where} lacks {', '.join(missing)}: {_LAYOUT_HINT}")
    return folder / CONFIG_NAME, folder / WEIGHTS_NAME


def _resolve_hub(repo_id: str, subfolder: str | None) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = f"{repo_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    pattern = f"{subfolder}/*" if subfolder else "*"
    paths = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(Path(hf_hub_download(repo_id, name, subfolder=subfolder)))
        except LocalEntryNotFoundError as err:
            raise ModelLoadError(
                f"vocoder file {name} of {where} is not in the Hugging Face cache and cannot be downloaded "
                "(HF_HUB_OFFLINE is set or the hub is unreachable). Download it where there is network "
                f"access (e.g. `hf download {repo_id} --include '{pattern}'`) or pass "
                f"a local folder instead: {_LAYOUT_HINT}"
            ) from err
        except Exception as err:  # the hub raises many kinds (missing repo, missing file, HTTP, ...)
            raise ModelLoadError(
                f"could not get vocoder file {name} of {where}: {type(err).__name__}: {err}. "
                f"It is not a local folder either; {_LAYOUT_HINT}"
            ) from err
    return paths[0], paths[1]


def _read_config(path: Path) -> HiFiGANConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read vocoder config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"vocoder config {path} must hold a JSON object, got {type(data).__name__}")
    return HiFiGANConfig.from_dict(data)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message starts with advice to turn weights_only off; keep only the reason.
        text = str(err)
        reason = (
            text.split("WeightsUnpickler error:", 1)[-1]
            .split("Check the documentation", 1)[0]
            .split("Please use", 1)[0]
        )
        reason = " ".join(reason.split()) or "unreadable pickle"
        raise ModelLoadError(
            f"cannot load vocoder checkpoint {path} with weights_only=True: it is not a torch checkpoint of "
            f"plain tensors and containers (arbitrary pickled objects are refused, never executed): {reason}"
        ) from err
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"cannot load vocoder checkpoint {path} (weights_only=True): {type(err).__name__}: {first}"
        ) from err
    if not isinstance(ckpt, dict) or "generator" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelLoadError(
            f"vocoder checkpoint {path} has no 'generator' entry; top-level keys found: {found}"
        )
    state = ckpt["generator"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"'generator' in {path} must be a state dict of tensors")
    return fuse_weight_norm(state)


def _check_state_dict(model: HiFiGANGenerator, state: Mapping[str, Tensor], source: Path) -> None:
    """Compare in Auffusion's key names, the ones a user's checkpoint has."""
    expected = to_checkpoint_keys(model.state_dict())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {shapes[:10]}")
    raise ModelLoadError(
        f"vocoder checkpoint {source} does not match the generator built from its config.json "
        f"(after fusing weight norm): " + "; ".join(parts)
    )


def load_vocoder(
    name_or_path: str | Path,
    subfolder: str | None = "vocoder",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HiFiGANGenerator:
    """Load a HiFi-GAN generator from a local folder or a Hugging Face hub repo.

    Args:
        name_or_path: a folder holding ``config.json`` + ``vocoder.pt`` (directly or in ``subfolder``),
            or a hub repo id such as ``auffusion/auffusion-full-no-adapter``.
        subfolder: where the two files are inside the repo/folder (``None``: at the top).
        device, dtype: where the returned module lives.

    Only the two files are fetched from the hub (``hf_hub_download``, so ``HF_HUB_OFFLINE`` and the cache
    apply). The weight norm is folded into plain weights and the state dict must match exactly.

    Returns:
        The generator in eval mode with ``requires_grad`` off.

    Raises:
        ModelLoadError: missing folder/files, unreadable or unsafe checkpoint, or a mismatching state dict.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_path, weights_path = _resolve_local(path, subfolder)
    elif path.exists():
        raise ModelLoadError(f"vocoder path {path} is a file, not a folder: {_LAYOUT_HINT}")
    elif isinstance(name_or_path, str) and _REPO_ID.match(name_or_path):
        config_path, weights_path = _resolve_hub(name_or_path, subfolder)
    else:
        raise ModelLoadError(f"vocoder folder {path} does not exist: {_LAYOUT_HINT}")

    config = _read_config(config_path)
    state = _read_state_dict(weights_path)
    generator = HiFiGANGenerator(config)
    _check_state_dict(generator, state, weights_path)
    own = generator.state_dict()
    normalisation = {k: own[k] for k in _NORMALISATION_KEYS}
    generator.load_state_dict(from_checkpoint_keys(state) | normalisation, strict=True)
    generator.to(device=device, dtype=dtype)
    generator.eval()
    generator.requires_grad_(False)
    return generator


@torch.no_grad()
def vocode(generator: HiFiGANGenerator, log_mel: Tensor, *, to_host: bool = True) -> Tensor:
    """Waveform from a natural-log mel spectrogram.

    Args:
        generator: a loaded :class:`HiFiGANGenerator`.
        log_mel: ``(B, num_mels, T)`` log-mel (any float dtype/device; moved to the generator's).
        to_host: copy the waveform to the CPU; False leaves it on the generator's device (a caller that
            copies many things back at once).

    Returns:
        ``(B, T * hop_length)`` float32 waveform on the CPU (``to_host=False``: on the generator's device).

    Raises:
        ConfigError: the tensor is not 3-D or its mel count differs from the vocoder's ``num_mels``.
    """
    n_mels = generator.config.num_mels
    if log_mel.dim() != 3:
        raise ConfigError("log-mel shape", tuple(log_mel.shape), f"must be (B, {n_mels}, T)")
    if log_mel.shape[1] != n_mels:
        raise ConfigError(
            "height",
            int(log_mel.shape[1]),
            f"the vocoder expects {n_mels} mel bins; resize the spectrogram to {n_mels} rows first",
        )
    param = next(generator.parameters())
    wave = generator(log_mel.to(device=param.device, dtype=param.dtype)).float()
    return wave.cpu() if to_host else wave
