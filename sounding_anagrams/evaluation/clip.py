"""CLIP scores of pictures against prompts, in the anchors' protocols (docs/METHOD.md §4).

``ImageTextScorer`` turns pictures and prompts into the similarity matrix ``S[i, j]`` (view ``i`` against
prompt ``j``) and the Visual Anagrams figures (per-view score, alignment, concealment); subclasses only say
how to embed images and texts. ``ClipScorer`` embeds with open_clip: by default ``ViT-B-16`` with the
``openai`` weights, the model the images-that-sound evaluation used (``openai/clip-vit-base-patch16``).

Two protocols:

- ``windowed`` (images-that-sound): ``H x H`` windows slid along the width with stride ``H/8`` (25 on a
  256x1024 picture); their ``100 cos`` are averaged, the mean clamped at 0, ``/ 100``. In ``[0, 1]``.
- ``whole``: the cosine of the whole picture, letterboxed to a square with mid gray (0.5) first so that a wide
  picture is shrunk, not squashed. In ``[-1, 1]``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from torch import Tensor

from sounding_anagrams.devices import resolve_device
from sounding_anagrams.errors import ConfigError, ModelLoadError, did_you_mean, one_line, unknown_name_message
from sounding_anagrams.evaluation.metrics import alignment, concealment, sliding_windows, windowed_score

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "openai"
PROTOCOLS = ("windowed", "whole")

# The local-folder layout that open_clip's hf-hub export writes (and its ``local-dir:`` schema reads).
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Slack on the [0, 1] range: decoders and resamplers overshoot a little.
RANGE_TOLERANCE = 1e-3

TINY_CLIP_SEED = 4321
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,  # like OpenAI's weights
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    # The real vocabulary size, so that open_clip's packaged BPE tokenizer works offline.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
TINY_CLIP_PREPROCESS: dict = {
    "mean": list(OPENAI_MEAN),
    "std": list(OPENAI_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


class ImageTextScorer(ABC):
    """Scores pictures against prompts from L2-normalised embeddings; subclasses say how to embed.

    Attributes:
        name: prefix of the score keys (``"clip"`` -> ``"clip/view0"``...).
        temperature: softmax temperature of concealment, ``1 / exp(logit_scale)`` (CLIP: 1/100).
        batch_size: at most this many images go to one ``embed_images`` call.
    """

    name: str = "clip"
    temperature: float = 0.01
    batch_size: int = 64

    @abstractmethod
    def embed_images(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, D)`` unit vectors, float32 on the CPU."""

    @abstractmethod
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """``P`` prompts -> ``(P, D)`` unit vectors, float32 on the CPU."""

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """``embed_texts`` of ``prompts`` ``(P, D)``, each prompt embedded once per scorer: a search scores
        the same few prompts at every preview and every batch. Safe to call from several threads.

        The prompts missing from the cache are embedded together; a prompt's row does not depend on the
        others in its call beyond the kernels' rounding (the text tower sees each prompt alone).
        """
        # Made on first use: subclasses need not call an __init__ (dict.setdefault is atomic).
        lock = self.__dict__.setdefault("_text_lock", threading.Lock())
        with lock:
            cache: dict[str, Tensor] = self.__dict__.setdefault("_text_embeddings", {})
            missing = list(dict.fromkeys(p for p in prompts if p not in cache))
            if missing:
                embeddings = self.embed_texts(missing)
                if embeddings.ndim != 2 or embeddings.shape[0] != len(missing):
                    raise ValueError(
                        f"{type(self).__name__}.embed_texts returned shape {tuple(embeddings.shape)} for "
                        f"{len(missing)} prompts; expected (P, D)"
                    )
                for prompt, row in zip(missing, embeddings.float().cpu(), strict=True):
                    cache[prompt] = row
            return torch.stack([cache[p] for p in prompts])

    def similarity(
        self, images: Tensor | Sequence[Tensor], prompts: Sequence[str], protocol: str = "windowed"
    ) -> Tensor:
        """``(V, 3, H, W)`` in ``[0, 1]`` (or ``V`` pictures ``(3, H, W)``) -> ``(V, P)`` similarities.

        ``windowed``: the images-that-sound score of the per-window cosines; ``whole``: the cosine of the
        whole (letterboxed) picture.
        """
        _check_protocol(protocol)
        _check_prompts(prompts)
        pictures = _pictures(images, "images")
        return self._similarities(pictures, self.text_embeddings(prompts), protocol)

    def score(
        self, pictures: Tensor | Sequence[Tensor], prompts: Sequence[str], protocol: str = "windowed"
    ) -> dict[str, float]:
        """Scores of one candidate: ``pictures[i]`` ``(3, H, W)`` is what view ``i`` shows, ``prompts[i]`` its
        prompt.

        Returns ``{"clip/view0": S[0, 0], ..., "clip/alignment": min_i S[i, i], "clip/concealment": ...}``;
        with one view, alignment is view0's score and concealment is left out (it would always be 1).
        """
        return self.score_batch([pictures], prompts, protocol)[0]

    def score_batch(
        self,
        candidates: Sequence[Tensor | Sequence[Tensor]],
        prompts: Sequence[str],
        protocol: str = "windowed",
    ) -> list[dict[str, float]]:
        """``score`` of many candidates at once: every picture (and window) of every candidate goes through
        ``embed_images`` in one pass, in chunks of ``batch_size``, where they are (a GPU's pictures stay
        there); the prompts are embedded once per scorer (:meth:`text_embeddings`)."""
        _check_protocol(protocol)
        _check_prompts(prompts)
        groups = [_pictures(candidate, f"candidate {c}") for c, candidate in enumerate(candidates)]
        for c, group in enumerate(groups):
            if len(group) != len(prompts):
                raise ConfigError(
                    f"candidate {c}",
                    f"{len(group)} pictures",
                    f"got {len(group)} pictures but {len(prompts)} prompts; give one picture and one prompt "
                    "per view",
                )
        if not groups:
            return []
        similarities = self._similarities(
            [p for group in groups for p in group], self.text_embeddings(prompts), protocol
        )
        return [self._scores(matrix) for matrix in similarities.split(len(prompts))]

    def _scores(self, similarity: Tensor) -> dict[str, float]:
        """``(V, V)`` -> the score dictionary of one candidate."""
        scores = {f"{self.name}/view{i}": float(similarity[i, i]) for i in range(similarity.shape[0])}
        scores[f"{self.name}/alignment"] = alignment(similarity)
        if similarity.shape[0] > 1:
            scores[f"{self.name}/concealment"] = concealment(similarity, self.temperature)
        return scores

    def _similarities(self, pictures: list[Tensor], texts: Tensor, protocol: str) -> Tensor:
        """``N`` pictures ``(3, H, W)`` and ``(P, D)`` text embeddings -> ``(N, P)``."""
        if not pictures:
            return texts.new_zeros(0, texts.shape[0])
        if protocol == "windowed":
            inputs: Iterator[Tensor] = (sliding_windows(p.unsqueeze(0))[0] for p in pictures)
        else:
            inputs = (letterbox(p).unsqueeze(0) for p in pictures)
        rows = []
        for embeddings in self._embed_chunked(inputs):
            cos = embeddings @ texts.T  # (windows, P)
            rows.append(windowed_score(cos.T) if protocol == "windowed" else cos[0])
        return torch.stack(rows)

    def _embed_chunked(self, inputs: Iterable[Tensor]) -> list[Tensor]:
        """Groups of images ``(n_i, 3, h, w)`` -> ``(n_i, D)``, embedded as one stream cut in ``batch_size``s.

        Groups are made lazily, so at most about one chunk of windows is held at a time; a change of image
        size ends a chunk early (images of one chunk are stacked).
        """
        counts: list[int] = []
        outputs: list[Tensor] = []
        pending: list[Tensor] = []
        held = 0
        for group in inputs:
            if pending and group.shape[1:] != pending[0].shape[1:]:
                outputs.append(self._embed_checked(torch.cat(pending)))
                pending, held = [], 0
            counts.append(group.shape[0])
            pending.append(group)
            held += group.shape[0]
            if held >= self.batch_size:
                stream = torch.cat(pending)
                full = held - held % self.batch_size
                for start in range(0, full, self.batch_size):
                    outputs.append(self._embed_checked(stream[start : start + self.batch_size]))
                pending = [stream[full:].clone()] if full < held else []
                held -= full
        if pending:
            outputs.append(self._embed_checked(torch.cat(pending)))
        return list(torch.cat(outputs).split(counts))

    def _embed_checked(self, images: Tensor) -> Tensor:
        embeddings = self.embed_images(images)
        if embeddings.ndim != 2 or embeddings.shape[0] != images.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.embed_images returned shape {tuple(embeddings.shape)} for "
                f"{images.shape[0]} images; expected (N, D)"
            )
        return embeddings.float().cpu()


def letterbox(picture: Tensor, fill: float = 0.5) -> Tensor:
    """``(3, H, W)`` -> ``(3, L, L)`` with ``L = max(H, W)``: the picture centred on mid gray, undistorted."""
    _, height, width = picture.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return F.pad(picture, (left, side - width - left, top, side - height - top), value=fill)


class ClipScorer(ImageTextScorer):
    """``ImageTextScorer`` with an open_clip model; keep one per process, loading is not cached.

    ``model`` is one of:

    - an open_clip architecture name (``ViT-B-16``) with a ``pretrained`` tag (``openai``) or checkpoint file;
      tagged weights come from the Hugging Face hub cache and are downloaded on first use;
    - ``hf-hub:org/repo``, an open_clip export on the hub (``pretrained`` is ignored);
    - a local folder (or ``local-dir:<folder>``) holding ``open_clip_config.json`` (``model_cfg``, optionally
      ``preprocess_cfg``) and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``;
    - ``"tiny"``: a small random model built once into the tiny cache and loaded as a local folder.

    Pictures are preprocessed as tensors: resized to the model's input size (bicubic, antialiased), clamped,
    normalised with the model's mean/std. On CUDA the model runs under fp16 autocast; embeddings come back
    float32 on the CPU.
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, but got {batch_size=}.")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.source = model
        spec = _resolve_source(model, pretrained)
        # An open_clip CLIP / CustomTextCLIP (untyped: its towers are attributes of nn.Module).
        self.model: Any
        self.tokenizer: Callable[[list[str]], Tensor]
        self.model, self.tokenizer = _load(spec, self.device)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = self.model.visual.image_size
        self.image_size: tuple[int, int] = (
            (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        interpolation = cfg.get("interpolation", "bicubic")
        # F.interpolate antialiases only these two modes.
        self.interpolation = interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"
        self._mean = torch.tensor(cfg.get("mean") or OPENAI_MEAN, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(cfg.get("std") or OPENAI_STD, device=self.device).view(1, -1, 1, 1)
        self.temperature = float(1 / self.model.logit_scale.detach().float().exp().reshape(-1)[0])

    def __repr__(self) -> str:
        return f"ClipScorer({self.source!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    def preprocess(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, 3, h, w)`` model input on the scorer's device."""
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(
                x, size=self.image_size, mode=self.interpolation, antialias=True, align_corners=False
            )
        # Bicubic overshoots; the model was trained on pictures in [0, 1].
        return (x.clamp(0, 1) - self._mean) / self._std

    def embed_images(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, D)`` unit vectors, float32 on the CPU."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError("images", tuple(images.shape), "must be an (N, 3, H, W) tensor")
        chunks = []
        with torch.no_grad(), self._autocast():
            for start in range(0, images.shape[0], self.batch_size):
                features = self.model.encode_image(self.preprocess(images[start : start + self.batch_size]))
                chunks.append(F.normalize(features.float(), dim=-1).cpu())
        if not chunks:  # no images: (0, D), D read off a text embedding (towers differ in where they keep it)
            return torch.empty(0, self.embed_texts([""]).shape[1])
        return torch.cat(chunks)

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """``P`` prompts -> ``(P, D)`` unit vectors, float32 on the CPU (longer than 77 tokens: truncated)."""
        _check_prompts(prompts)
        chunks = []
        with torch.no_grad(), self._autocast():
            for start in range(0, len(prompts), self.batch_size):
                tokens = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(chunks)

    def _autocast(self) -> AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()


def build_tiny_clip(folder: Path) -> None:
    """Write a small random CLIP (``TINY_CLIP_CONFIG``, fixed seed) to ``folder`` in the local-folder layout.

    Its ``logit_scale`` is set to ``log(100)``, so its temperature is CLIP's 1/100. ``open_clip_config.json``
    is written last: it marks the folder complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_CLIP_SEED)
        model = open_clip.CLIP(**json.loads(json.dumps(TINY_CLIP_CONFIG)))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
        _add_shared_direction(model, strength=0.2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHT_FILES[0]))
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": TINY_CLIP_PREPROCESS}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _add_shared_direction(model: open_clip.CLIP, strength: float) -> None:
    """Give image and text embeddings a common component, as trained CLIP towers have.

    Random towers give image/text cosines scattered round 0, which the windowed protocol clamps to 0: every
    candidate would score 0 and a tiny search could rank nothing. With the final layer norms' bias at 0.5
    every feature has a constant sum, which a rank-1 term of the projections maps onto one shared axis;
    cosines then sit round 0.05-0.2 (real CLIP: 0.2-0.35) and still move with the picture and the prompt.
    """
    axis = torch.zeros(model.visual.proj.shape[1])
    axis[0] = strength
    model.visual.ln_post.bias.fill_(0.5)
    model.ln_final.bias.fill_(0.5)
    model.visual.proj.add_(torch.ones(model.visual.proj.shape[0], 1) * axis)
    model.text_projection.add_(torch.ones(model.text_projection.shape[0], 1) * axis)


def ensure_tiny_clip() -> Path:
    """The tiny CLIP folder in the tiny cache, built on first use."""
    # Imported here: the sampler's module pulls in diffusers, which scoring alone does not need.
    from sounding_anagrams.sampler.tiny import ensure_built, tiny_cache_dir

    return ensure_built(tiny_cache_dir() / "clip", build_tiny_clip, marker=CONFIG_FILE)


@dataclass(frozen=True)
class _Source:
    """What to hand open_clip: a model name (maybe with a schema), a pretrained tag or file, QuickGELU."""

    name: str
    pretrained: str | None
    quick_gelu: bool
    shown: str


def _resolve_source(model: str, pretrained: str | None) -> _Source:
    if model == "tiny":
        return _local_source(ensure_tiny_clip())
    if model.startswith("hf-hub:"):
        return _Source(model, None, False, model)
    if model.startswith("local-dir:"):
        return _local_source(Path(model.removeprefix("local-dir:")).expanduser())
    path = Path(model).expanduser()
    if path.is_dir():
        return _local_source(path)
    architecture = model.replace("/", "-")  # open_clip writes ViT-B/16 as ViT-B-16
    if architecture in open_clip.list_models():
        return _tagged_source(architecture, pretrained)
    if model.startswith(("/", ".", "~")) or os.sep in model or "/" in model:
        raise ModelLoadError(f"CLIP model folder {model!r} does not exist; {_FOLDER_HELP}")
    raise ModelLoadError(
        f"unknown CLIP model {model!r}; {did_you_mean(architecture, open_clip.list_models())}give an "
        "open_clip architecture (see open_clip.list_models()) with a pretrained tag, 'hf-hub:org/repo', a "
        "local folder or 'tiny'"
    )


def _tagged_source(architecture: str, pretrained: str | None) -> _Source:
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained is None:
        raise ModelLoadError(
            f"CLIP architecture {architecture!r} needs pretrained weights: a tag "
            f"({', '.join(tags) or 'none known'}) or a checkpoint file"
        )
    if pretrained in tags:
        tag_cfg = open_clip.get_pretrained_cfg(architecture, pretrained) or {}
        # OpenAI's weights were trained with QuickGELU; open_clip 3 only warns when the config lacks it.
        repo = str(tag_cfg.get("hf_hub", "")).rstrip("/")
        shown = f"{architecture} / {pretrained}" + (f" (hub repo {repo})" if repo else "")
        return _Source(architecture, pretrained, bool(tag_cfg.get("quick_gelu")), shown)
    if Path(pretrained).expanduser().is_file():
        return _Source(
            architecture, str(Path(pretrained).expanduser()), False, f"{architecture} / {pretrained}"
        )
    raise ModelLoadError(
        f"pretrained={pretrained!r} is neither a checkpoint file nor a tag of {architecture!r}: "
        f"{unknown_name_message('pretrained tag', pretrained, tags)}"
    )


_FOLDER_HELP = (
    f"a local CLIP folder holds {CONFIG_FILE} (with 'model_cfg' and optionally 'preprocess_cfg', as "
    f"open_clip's hf-hub export writes it) and the weights {' or '.join(WEIGHT_FILES)}"
)


def _local_source(folder: Path) -> _Source:
    if not folder.is_dir():
        raise ModelLoadError(f"CLIP model folder {str(folder)!r} does not exist; {_FOLDER_HELP}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"CLIP model folder {str(folder)!r} has no {CONFIG_FILE}; {_FOLDER_HELP}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not read {str(config_path)!r}: {error}; {_FOLDER_HELP}") from error
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ModelLoadError(f"{str(config_path)!r} has no 'model_cfg'; {_FOLDER_HELP}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"CLIP model folder {str(folder)!r} has no weights; {_FOLDER_HELP}")
    # open_clip's own local-dir schema reads the config, the preprocess config and the preferred weight file.
    return _Source(f"local-dir:{folder.resolve()}", None, False, str(folder))


def _load(spec: _Source, device: torch.device) -> tuple[Any, Callable[[list[str]], Tensor]]:
    try:
        model = open_clip.create_model_from_pretrained(
            spec.name,
            pretrained=spec.pretrained,
            device=device,
            force_quick_gelu=spec.quick_gelu,
            return_transform=False,
        )
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as error:
        reason = one_line(error).rstrip(".")
        where = ""
        if not spec.name.startswith("local-dir:"):
            offline = (
                " (HF_HUB_OFFLINE is set: it must be there already)" if hf_constants.HF_HUB_OFFLINE else ""
            )
            where = (
                f" Weights are downloaded on first use into the Hugging Face cache "
                f"{hf_constants.HF_HUB_CACHE}{offline}; or give a local folder: {_FOLDER_HELP}."
            )
        raise ModelLoadError(f"could not load CLIP model {spec.shown!r}: {reason}.{where}") from error
    model.eval().requires_grad_(False)
    return model, tokenizer


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", protocol, unknown_name_message("protocol", protocol, PROTOCOLS))


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise ConfigError("prompts", prompts, "must be a list of prompts, not one string")
    if len(prompts) == 0:
        raise ConfigError("prompts", list(prompts), "give at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ConfigError("prompt", prompt, "must be a string")


def _pictures(pictures: Tensor | Sequence[Tensor], where: str) -> list[Tensor]:
    """``(V, 3, H, W)`` or ``V`` tensors ``(3, H, W)`` -> checked float pictures clamped to ``[0, 1]``, on the
    device they are on (their ranges come back to the host in one copy)."""
    if isinstance(pictures, Tensor) and pictures.ndim != 4:
        raise ConfigError(
            where, tuple(pictures.shape), "must be a (V, 3, H, W) tensor or a list of (3, H, W) ones"
        )
    checked = []
    for i, picture in enumerate(pictures):
        name = f"{where}, picture {i}"
        if not isinstance(picture, Tensor):
            raise ConfigError(name, type(picture).__name__, "must be a torch tensor (3, H, W)")
        if picture.ndim != 3 or picture.shape[0] != 3 or picture.shape[1] == 0 or picture.shape[2] == 0:
            raise ConfigError(
                f"{name} shape",
                tuple(picture.shape),
                "must be (3, H, W); repeat a grayscale channel 3 times",
            )
        checked.append(picture.float())
    if not checked:
        return []
    # One wait for the device per candidate, not two per picture.
    ranges = torch.stack([torch.stack(torch.aminmax(p)) for p in checked]).tolist()
    for i, (low, high) in enumerate(ranges):
        name = f"{where}, picture {i}"
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"{name} values", (low, high), "must be finite")
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise ConfigError(f"{name} value range", (round(low, 4), round(high, 4)), "must lie in [0, 1]")
    return [p.clamp(0, 1) for p in checked]
