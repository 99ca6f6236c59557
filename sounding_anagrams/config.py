"""The one run config: a frozen dataclass that is validated whole, logged whole and re-rendered exactly.

Everything is checked in ``__post_init__``, before any model is loaded, so a typo costs a second, not a
model load. ``RenderConfig.from_dict`` rejects unknown keys with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from sounding_anagrams.errors import ConfigError, unknown_name_message
from sounding_anagrams.files import read_yaml_mapping
from sounding_anagrams.hub import AUFFUSION_ID, SD15_ID, TINY_MODELS
from sounding_anagrams.sampler.views import (
    View,
    check_view_weights,
    default_view_weights,
    parse_view,
)

__all__ = ["AUFFUSION_ID", "SD15_ID", "TINY_MODELS", "RenderConfig"]

SCHEDULERS = ("ddim", "dpmsolver++")
VOCODERS = ("hifigan", "griffin_lim")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Each field's expected kind, used to coerce YAML/CLI values and to reject wrong types by name.
_STR, _INT, _OPT_INT, _FLOAT = "str", "int", "opt_int", "float"
_STRS, _FLOATS, _OPT_FLOATS = "strs", "floats", "opt_floats"
# The default warm start of the image model, in percent of the schedule (docs/METHOD.md §1).
DEFAULT_IMAGE_START_PERCENT = 5


@dataclass(frozen=True)
class RenderConfig:
    """Everything that determines one rendered candidate (with the device it ran on).

    A batch of candidates shares ``SHARED_FIELDS`` (prompts, views, canvas, models); the sampler lets every
    other field differ per candidate.
    """

    # What to make: one image prompt per view; one audio prompt (heard on the canvas) or one per view.
    image_prompts: tuple[str, ...] = (
        "painting of a garden, lithograph style, grayscale",
        "painting of a helicopter, lithograph style, grayscale",
    )
    views: tuple[str, ...] = ("identity", "tile_rotate_cw")
    audio_prompts: tuple[str, ...] = ("bird chirping",)
    image_negative_prompt: str = ""
    audio_negative_prompt: str = ""
    # The knobs of the method (docs/METHOD.md §1). None means the method's default for these views.
    view_weights: tuple[float, ...] | None = None
    audio_view_weights: tuple[float, ...] | None = None
    audio_weight: float = 0.5
    image_guidance_scale: float = 10.0
    audio_guidance_scale: float = 10.0
    # Warm start: a term is on from its start step. None: the image model starts at 5% of the schedule (the
    # seed's 5 of 100 steps), or at 0 when the audio model starts late, so no default fights valid input.
    image_start_step: int | None = None
    audio_start_step: int = 0
    num_inference_steps: int = 100
    scheduler: str = "ddim"
    seed: int = 0
    # Canvas in pixels; the latent is (4, height / 8, width / 8).
    height: int = 256
    width: int = 1024
    # Sound: Auffusion leaves a dark strip at the right edge, cut from the spectrogram and the WAV.
    vocoder: str = "hifigan"
    crop_right: int = 32
    # Models: a hub id, a local folder, or "tiny" (small random models built offline).
    image_model: str = SD15_ID
    audio_model: str = AUFFUSION_ID
    device: str = "auto"
    dtype: str = "auto"

    SHARED_FIELDS: ClassVar[tuple[str, ...]] = (
        "image_prompts",
        "views",
        "audio_prompts",
        "image_negative_prompt",
        "audio_negative_prompt",
        "height",
        "width",
        "image_model",
        "audio_model",
        "device",
        "dtype",
    )
    _KINDS: ClassVar[dict[str, str]] = {
        "image_prompts": _STRS,
        "views": _STRS,
        "audio_prompts": _STRS,
        "image_negative_prompt": _STR,
        "audio_negative_prompt": _STR,
        "view_weights": _OPT_FLOATS,
        "audio_view_weights": _OPT_FLOATS,
        "audio_weight": _FLOAT,
        "image_guidance_scale": _FLOAT,
        "audio_guidance_scale": _FLOAT,
        "image_start_step": _OPT_INT,
        "audio_start_step": _INT,
        "num_inference_steps": _INT,
        "scheduler": _STR,
        "seed": _INT,
        "height": _INT,
        "width": _INT,
        "vocoder": _STR,
        "crop_right": _INT,
        "image_model": _STR,
        "audio_model": _STR,
        "device": _STR,
        "dtype": _STR,
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), self._KINDS[f.name]))
        self._check_canvas_and_views()
        self._check_prompts()
        self._check_weights()
        self._check_schedule()
        self._check_choices()

    # -- validation, one concern each ------------------------------------------------------------------

    def _check_canvas_and_views(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 64 or value > 4096 or value % 8:
                raise ConfigError(name, value, "must be a multiple of 8 between 64 and 4096 pixels")
        if not self.views:
            raise ConfigError("views", list(self.views), "give at least one view, e.g. [identity, flip]")
        parsed = self.parsed_views()
        for view in parsed:
            view.check_canvas(self.height // 8, self.width // 8)
        # Store canonical specs so that the exported config re-renders the exact same views.
        object.__setattr__(self, "views", tuple(view.spec for view in parsed))

    def _check_prompts(self) -> None:
        n_views = len(self.views)
        if len(self.image_prompts) != n_views:
            raise ConfigError(
                "image_prompts",
                list(self.image_prompts),
                f"give one image prompt per view: {n_views} views {list(self.views)} but "
                f"{len(self.image_prompts)} prompts",
            )
        if len(self.audio_prompts) not in (1, n_views):
            raise ConfigError(
                "audio_prompts",
                list(self.audio_prompts),
                f"give one audio prompt (heard on the canvas) or one per view ({n_views}), "
                f"not {len(self.audio_prompts)}",
            )

    def _check_weights(self) -> None:
        views = self.parsed_views()
        if self.view_weights is None:
            object.__setattr__(self, "view_weights", default_view_weights(views))
        assert self.view_weights is not None
        check_view_weights(views, self.view_weights, field="view_weights")
        audio_views = self.parsed_audio_views()
        if self.audio_view_weights is None:
            object.__setattr__(self, "audio_view_weights", default_view_weights(audio_views))
        assert self.audio_view_weights is not None
        if len(self.audio_prompts) == 1 and self.audio_view_weights != (1.0,):
            raise ConfigError(
                "audio_view_weights",
                list(self.audio_view_weights),
                "with one audio prompt the sound is heard on the canvas itself: leave it unset or give [1.0]",
            )
        check_view_weights(audio_views, self.audio_view_weights, field="audio_view_weights")
        _check_range("audio_weight", self.audio_weight, 0.0, 1.0)
        _check_range("image_guidance_scale", self.image_guidance_scale, 0.0, 100.0)
        _check_range("audio_guidance_scale", self.audio_guidance_scale, 0.0, 100.0)

    def _check_schedule(self) -> None:
        if not 1 <= self.num_inference_steps <= 1000:
            raise ConfigError("num_inference_steps", self.num_inference_steps, "must be between 1 and 1000")
        for name in ("image_start_step", "audio_start_step"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.num_inference_steps:
                raise ConfigError(
                    name, value, f"must be in [0, num_inference_steps) = [0, {self.num_inference_steps})"
                )
        # A term is on from its start step alone; before that the other term works alone with weight 1, even
        # when its audio_weight is 0 or 1 (docs/METHOD.md §1). Step 0 needs one of them.
        if min(self.image_start, self.audio_start_step) > 0:
            raise ConfigError(
                "image_start_step",
                self.image_start_step,
                f"image_start_step or audio_start_step (={self.audio_start_step}) must be 0: "
                "the first step needs a noise estimate",
            )
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", self.seed, "must be in [0, 2**63)")

    def _check_choices(self) -> None:
        for name, allowed in (
            ("scheduler", SCHEDULERS),
            ("vocoder", VOCODERS),
            ("device", DEVICES),
            ("dtype", DTYPES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(name, value, unknown_name_message(name, value, allowed))
        if not 0 <= self.crop_right < self.width:
            raise ConfigError("crop_right", self.crop_right, f"must be in [0, width) = [0, {self.width})")
        for name in ("image_model", "audio_model"):
            if not getattr(self, name).strip():
                raise ConfigError(name, getattr(self, name), "give a hub id, a local folder or 'tiny'")

    # -- derived values ------------------------------------------------------------------------------

    def parsed_views(self) -> list[View]:
        return [parse_view(spec) for spec in self.views]

    def parsed_audio_views(self) -> list[View]:
        """The view each audio prompt is heard through: the canvas itself for a single prompt."""
        if len(self.audio_prompts) == 1:
            return [parse_view("identity")]
        return self.parsed_views()

    @property
    def image_start(self) -> int:
        """The step the image term switches on: ``image_start_step``, or by default 5% of the schedule
        (floor: 100 steps -> 5, 50 -> 2, 3 -> 0), and 0 when the audio model starts late."""
        if self.image_start_step is not None:
            return self.image_start_step
        if self.audio_start_step > 0:
            return 0
        return self.num_inference_steps * DEFAULT_IMAGE_START_PERCENT // 100

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (4, self.height // 8, self.width // 8)

    # -- (de)serialisation ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> RenderConfig:
        """Build from a mapping (YAML); unknown keys are an error naming the key and the close one."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", data, "must be a mapping of field: value", source=source)
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ConfigError(
                    str(key), data[key], unknown_name_message("field", str(key), known), source=source
                )
        try:
            return cls(**dict(data))
        except ConfigError as error:
            if source is None:
                raise
            raise ConfigError(error.field, error.value, error.allowed, source=source) from None

    @classmethod
    def from_yaml(cls, path: str | Path, *, field: str = "--config") -> RenderConfig:
        """The config of a YAML file; ``field`` names where the path came from in errors about the file."""
        path = Path(path)
        return cls.from_dict(read_yaml_mapping(path, field), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, **changes: Any) -> RenderConfig:
        """A copy with some fields changed, validated again.

        When the views change, their weights go back to the new views' defaults (and the audio view weights
        too, as when the number of audio prompts changes); other changes keep the weights given.
        """
        views_changed = (
            "views" in changes
            and not isinstance(changes["views"], str)
            and tuple(parse_view(str(spec)).spec for spec in changes["views"]) != self.views
        )
        audio_count_changed = "audio_prompts" in changes and len(changes["audio_prompts"]) != len(
            self.audio_prompts
        )
        if views_changed:
            changes.setdefault("view_weights", None)
        if views_changed or audio_count_changed:
            changes.setdefault("audio_view_weights", None)
        return dataclasses.replace(self, **changes)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(name, value, f"must be in [{low:g}, {high:g}]")


def _coerce(name: str, value: Any, kind: str) -> Any:
    """Accept YAML/CLI values of the right type (lists, ints for floats); reject the rest by name."""
    if kind == _STR:
        if not isinstance(value, str):
            raise ConfigError(name, value, "must be a string")
        return value
    if kind == _OPT_INT and value is None:
        return None
    if kind in (_INT, _OPT_INT):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                name, value, "must be an integer" + (" (or null for the default)" if kind == _OPT_INT else "")
            )
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "must be a number")
        return float(value)
    if kind == _OPT_FLOATS and value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        what = "strings" if kind == _STRS else "numbers"
        raise ConfigError(
            name, value, f"must be a list of {what}, one per view (got a single {type(value).__name__})"
        )
    items = list(value)
    if kind == _STRS:
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(name, items, f"every item must be a string, but got {item!r}")
        return tuple(items)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ConfigError(name, items, f"every item must be a number, but got {item!r}")
    return tuple(float(item) for item in items)


def check_shared_fields(configs: Sequence[RenderConfig]) -> None:
    """A batch of candidates must share prompts, views, canvas and models; the knobs may differ."""
    if not configs:
        raise ConfigError("configs", [], "give at least one candidate config")
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in RenderConfig.SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ConfigError(
                    name,
                    getattr(config, name),
                    f"candidate {index} differs from candidate 0 ({getattr(first, name)!r}); a batch shares "
                    f"{', '.join(RenderConfig.SHARED_FIELDS)}",
                )


__all__ = [
    "AUFFUSION_ID",
    "SD15_ID",
    "TINY_MODELS",
    "RenderConfig",
    "check_shared_fields",
]
