"""The one run config: a frozen pydantic model that is validated whole, logged whole and re-rendered exactly.

Everything is checked when the config is built, before any model is loaded, so a typo costs a second, not a
model load. Unknown keys are refused with a did-you-mean; ``configs/config.schema.json`` is its JSON Schema.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator

from sounding_anagrams.devices import DEVICE_CHOICES, DEVICE_PATTERN
from sounding_anagrams.errors import ConfigError
from sounding_anagrams.files import read_yaml_mapping
from sounding_anagrams.hub import AUFFUSION_ID, SD15_ID, TINY_MODELS
from sounding_anagrams.validation import NULL_IS_DEFAULT, Rule, StrictModel
from sounding_anagrams.viewspec import ViewSpec, check_view_weights, default_view_weights, parse_view_spec

Scheduler = Literal["ddim", "dpmsolver++"]
Vocoder = Literal["hifigan", "griffin_lim"]
# Any name on any machine (a config is written on one and run on another); the loader checks the machine.
Device = Annotated[str, Field(pattern=DEVICE_PATTERN), Rule(f"unknown device; {DEVICE_CHOICES}")]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
SCHEDULERS, VOCODERS, DTYPES = (get_args(kind) for kind in (Scheduler, Vocoder, Dtype))
# The default warm start of the image model, in percent of the schedule (docs/METHOD.md §1).
DEFAULT_IMAGE_START_PERCENT = 5


def _one_per_view(what: str) -> BeforeValidator:
    """YAML lists (and tuples) become tuples; a single value is refused, not wrapped, so a forgotten list is
    never silently one view."""

    def check(value: Any) -> Any:
        if value is None or isinstance(value, tuple):
            return value
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"must be a list of {what}, one per view (got a single {type(value).__name__})")
        return tuple(value)

    return BeforeValidator(check)


Texts = Annotated[tuple[str, ...], _one_per_view("strings")]
# A prompt says something: an empty or blank one would condition a view on nothing, silently.
Prompts = Annotated[
    tuple[Annotated[str, Field(pattern=r"\S")], ...],
    _one_per_view("strings"),
    Rule("give one prompt per view, each saying something (not empty or blank)"),
]
Weights = Annotated[tuple[float, ...] | None, _one_per_view("numbers"), NULL_IS_DEFAULT]
Scale = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]


class RenderConfig(StrictModel):
    """Everything that determines one rendered candidate (with the device it ran on).

    A batch of candidates shares ``SHARED_FIELDS`` (prompts, views, canvas, models); the sampler lets every
    other field differ per candidate.
    """

    image_prompts: Prompts = Field(
        default=(
            "painting of a garden, lithograph style, grayscale",
            "painting of a helicopter, lithograph style, grayscale",
        ),
        description="One image prompt per view: what the canvas looks like through each view.",
    )
    views: Texts = Field(
        default=("identity", "tile_rotate_cw"),
        description=(
            "The views, e.g. [identity, tile_rotate_cw]; a spec may carry parameters: jigsaw(seed=3)."
        ),
    )
    audio_prompts: Prompts = Field(
        default=("bird chirping",),
        description="One audio prompt, heard on the canvas itself, or one per view.",
    )
    image_negative_prompt: str = ""
    audio_negative_prompt: str = ""
    view_weights: Weights = Field(
        default=None,
        description="The image model's weight of each view (docs/METHOD.md §1); null: the views' default.",
    )
    audio_view_weights: Weights = Field(
        default=None,
        description=(
            "The audio model's weight of each audio prompt's view; null: the default ([1.0] for one)."
        ),
    )
    audio_weight: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = Field(
        default=0.5, description="How much of each step's noise estimate comes from the audio model."
    )
    image_guidance_scale: Scale = 10.0
    audio_guidance_scale: Scale = 10.0
    image_start_step: Annotated[int | None, Field(ge=0), NULL_IS_DEFAULT] = Field(
        default=None,
        description=(
            "The step the image model switches on; null: 5% of the steps, or 0 when the audio starts late."
        ),
    )
    audio_start_step: Annotated[int, Field(ge=0)] = Field(
        default=0, description="The step the audio model switches on; one of the two start steps must be 0."
    )
    num_inference_steps: Annotated[int, Field(ge=1, le=1000)] = 100
    scheduler: Scheduler = "ddim"
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    height: Annotated[int, Field(ge=64, le=4096, multiple_of=8)] = Field(
        default=256, description="Canvas height in pixels; the latent is (4, height / 8, width / 8)."
    )
    width: Annotated[int, Field(ge=64, le=4096, multiple_of=8)] = Field(
        default=1024, description="Canvas width in pixels."
    )
    vocoder: Vocoder = "hifigan"
    crop_right: Annotated[int, Field(ge=0)] = Field(
        default=32,
        description=(
            "Pixels cut from the right of the spectrogram and the sound (Auffusion leaves a dark strip)."
        ),
    )
    image_model: str = Field(
        default=SD15_ID,
        description='A hub id, a local folder, or "tiny" (small random models built offline).',
    )
    audio_model: str = Field(default=AUFFUSION_ID, description='A hub id, a local folder, or "tiny".')
    device: Device = Field(
        default="auto",
        description="auto (CUDA where present, else the CPU), cpu, cuda or cuda:N (N: a CUDA device index).",
    )
    dtype: Dtype = "auto"

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

    # -- validation, one concern each ------------------------------------------------------------------

    @field_validator("views")
    @classmethod
    def _canonical_views(cls, views: tuple[str, ...]) -> tuple[str, ...]:
        # Canonical specs, with their parameters, so that the exported config re-renders the exact views.
        if not views:
            raise ConfigError("views", list(views), "give at least one view, e.g. [identity, flip]")
        return tuple(parse_view_spec(spec).spec for spec in views)

    @field_validator("image_model", "audio_model")
    @classmethod
    def _model_named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("give a hub id, a local folder or 'tiny'")
        return name

    @model_validator(mode="after")
    def _check_together(self) -> RenderConfig:
        for view in self.view_specs():
            view.check_canvas(self.height // 8, self.width // 8)
        self._check_prompts()
        self._check_weights()
        self._check_schedule()
        if self.crop_right >= self.width:
            raise ConfigError("crop_right", self.crop_right, f"must be in [0, width) = [0, {self.width})")
        return self

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
        # Unset weights become the views' defaults here: the config is frozen once validated.
        views = self.view_specs()
        if self.view_weights is None:
            object.__setattr__(self, "view_weights", default_view_weights(views))
        assert self.view_weights is not None
        check_view_weights(views, self.view_weights, field="view_weights")
        audio_views = self.audio_view_specs()
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

    def _check_schedule(self) -> None:
        for name in ("image_start_step", "audio_start_step"):
            value = getattr(self, name)
            if value is not None and not value < self.num_inference_steps:
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

    # -- derived values ------------------------------------------------------------------------------

    def view_specs(self) -> tuple[ViewSpec, ...]:
        """The views' specs (no torch); ``sampler.views.build_views`` makes the views of them."""
        return tuple(parse_view_spec(spec) for spec in self.views)

    def audio_view_specs(self) -> tuple[ViewSpec, ...]:
        """The view each audio prompt is heard through: the canvas itself for a single prompt."""
        if len(self.audio_prompts) == 1:
            return (parse_view_spec("identity"),)
        return self.view_specs()

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
        return cls.validate_data(data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path, *, field: str = "--config") -> RenderConfig:
        """The config of a YAML file; ``field`` names where the path came from in errors about the file."""
        path = Path(path)
        return cls.from_dict(read_yaml_mapping(path, field), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (lists, not tuples), every field, weights resolved."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, **changes: Any) -> RenderConfig:
        """A copy with some fields changed, validated again.

        When the views change, their weights go back to the new views' defaults (and the audio view weights
        too, as when the number of audio prompts changes); other changes keep the weights given.
        """
        views, audio_prompts = changes.get("views"), changes.get("audio_prompts")
        views_changed = (
            isinstance(views, (list, tuple))
            and tuple(parse_view_spec(str(spec)).spec for spec in views) != self.views
        )
        audio_count_changed = isinstance(audio_prompts, (list, tuple)) and len(audio_prompts) != len(
            self.audio_prompts
        )
        if views_changed:
            changes.setdefault("view_weights", None)
        if views_changed or audio_count_changed:
            changes.setdefault("audio_view_weights", None)
        return self.validate_data({**dict(self), **changes})


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
