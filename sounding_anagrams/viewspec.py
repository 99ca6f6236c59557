"""View specs: what a view is called, its parameters, its kind and the weight rules, without torch.

A view is written as a spec string, ``"name"`` or ``"name(key=value,...)"``; :func:`parse_view_spec` reads it
into a :class:`ViewSpec` (missing parameters take their defaults, every value is checked) and
:attr:`ViewSpec.spec` writes the canonical form back. The config, the study files and the command line check
views here, before torch loads (seconds): a bad view is refused at once. The transforms themselves live in
:mod:`sounding_anagrams.sampler.views`; each implementation names the :class:`ViewEntry` of this module it
implements, so the two cannot drift apart.

Two kinds of views:

- ``"permutation"``: orthogonal, exactly invertible maps (rearrangements of cells, sign flips). Their
  inverse is their adjoint, which the sampler relies on; their weights sum to 1.
- ``"hybrid"``: frequency bands. ``view`` is the identity and ``inverse_view`` keeps one band
  (low-pass, high-pass, band-pass); the bands of one anagram must add up to the identity and each
  gets weight 1.

Canvas sizes are in latent cells: one cell covers an 8x8 pixel block of the decoded picture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sounding_anagrams.errors import ConfigError, did_you_mean, unknown_name_message

__all__ = [
    "HYBRID",
    "LATENT_SCALE",
    "PERMUTATION",
    "VIEW_ENTRIES",
    "HasViewSpec",
    "ViewEntry",
    "ViewSpec",
    "available_views",
    "check_view_weights",
    "default_view_weights",
    "inner_circle_disk",
    "parse_view_spec",
    "skew_shifts",
]

#: Pixels per latent cell along each axis (Stable Diffusion's VAE downsamples by 8).
LATENT_SCALE = 8
PERMUTATION = "permutation"
HYBRID = "hybrid"

_FIELD = "views"
_WEIGHT_SUM_TOL = 1e-6

ParamValue = int | float
ParamCheck = Callable[["ViewSpec"], "str | None"]
CanvasCheck = Callable[["ViewSpec", int, int], "str | None"]


def _canvas_text(h: int, w: int) -> str:
    """``"256x1024 pixels (32x128 latent cells)"``."""
    return f"{h * LATENT_SCALE}x{w * LATENT_SCALE} pixels ({h}x{w} latent cells)"


def _format_spec(name: str, params: Mapping[str, ParamValue]) -> str:
    if not params:
        return name
    return f"{name}({','.join(f'{key}={value!r}' for key, value in params.items())})"


def _common_divisors(h: int, w: int) -> list[int]:
    return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0 and (h // p) * (w // p) >= 2]


# --------------------------------------------------------------------------------------------------
# Entries (one per view name) and specs (one view with its parameters)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ViewEntry:
    """One view as the spec language knows it: name, kind, parameters with defaults and their checks.

    ``check_params`` and ``check_canvas`` return why a spec is refused (None: fine); ``band`` gives a hybrid
    view's ``(lo, hi)`` blur sigmas in latent cells (``0`` and ``inf`` allowed).
    """

    name: str
    kind: str
    parameters: tuple[tuple[str, ParamValue], ...] = ()
    check_params: ParamCheck | None = None
    check_canvas: CanvasCheck | None = None
    band: Callable[[ViewSpec], tuple[float, float]] | None = None

    @property
    def defaults(self) -> dict[str, ParamValue]:
        """Parameters with their defaults, in canonical order (the type of a default is the parameter's)."""
        return dict(self.parameters)


#: The views by name, in the order they are defined below.
VIEW_ENTRIES: dict[str, ViewEntry] = {}


def _entry(
    name: str,
    kind: str,
    parameters: Mapping[str, ParamValue] | None = None,
    *,
    params: ParamCheck | None = None,
    canvas: CanvasCheck | None = None,
    band: Callable[[ViewSpec], tuple[float, float]] | None = None,
) -> ViewEntry:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name in VIEW_ENTRIES:
        raise TypeError(f"view name {name!r} must be a new lowercase identifier")
    if kind not in (PERMUTATION, HYBRID) or (band is not None) != (kind == HYBRID):
        raise TypeError(f"view {name!r}: kind must be {PERMUTATION!r} or {HYBRID!r}, with a band iff hybrid")
    entry = ViewEntry(name, kind, tuple((parameters or {}).items()), params, canvas, band)
    VIEW_ENTRIES[name] = entry
    return entry


def available_views() -> list[str]:
    """Sorted names of the views."""
    return sorted(VIEW_ENTRIES)


@dataclass(frozen=True, repr=False)
class ViewSpec:
    """One view with all its parameters, e.g. ``ViewSpec("patch_permute", (("patch", 8), ("seed", 0)))``.

    Build it with :func:`parse_view_spec`. Specs are immutable and hashable; equal specs are the same view.
    Construction checks the parameters (:class:`ConfigError` on field ``views``), so every spec is valid.
    """

    name: str
    params: tuple[tuple[str, ParamValue], ...] = ()

    def __post_init__(self) -> None:
        entry = VIEW_ENTRIES.get(self.name)
        if entry is None or tuple(key for key, _ in self.params) != tuple(entry.defaults):
            raise TypeError(f"{self.name!r} with parameters {self.params} is not a view; use parse_view_spec")
        reason = entry.check_params(self) if entry.check_params is not None else None
        if reason is not None:
            raise ConfigError(_FIELD, self.spec, reason)

    @property
    def entry(self) -> ViewEntry:
        return VIEW_ENTRIES[self.name]

    @property
    def kind(self) -> str:
        """``"permutation"`` or ``"hybrid"``."""
        return self.entry.kind

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"identity"`` or ``"patch_permute(patch=8,seed=0)"``."""
        return _format_spec(self.name, dict(self.params))

    @property
    def view_spec(self) -> ViewSpec:
        """The spec itself (a view object has the same attribute: the weight rules take either)."""
        return self

    def __getitem__(self, key: str) -> ParamValue:
        return dict(self.params)[key]

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"ViewSpec({self.spec!r})"

    @property
    def band(self) -> tuple[float, float]:
        """``(lo, hi)`` blur sigmas in latent cells bounding a hybrid band (``0`` and ``inf`` allowed)."""
        if self.entry.band is None:
            raise TypeError(f"{self.spec} is a {self.kind} view, not a frequency band")
        return self.entry.band(self)

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        """Raise :class:`ConfigError` when this view cannot work on a latent of that size."""
        if latent_height < 1 or latent_width < 1:
            raise ConfigError(
                _FIELD, self.spec, f"the latent must be at least 1x1, got {latent_height}x{latent_width}"
            )
        check = self.entry.check_canvas
        reason = check(self, latent_height, latent_width) if check is not None else None
        if reason is not None:
            raise ConfigError(_FIELD, self.spec, reason)


class HasViewSpec(Protocol):
    """Anything that carries a view spec: a :class:`ViewSpec`, or a view built from one."""

    @property
    def view_spec(self) -> ViewSpec: ...


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


_SPEC_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?", re.DOTALL)
_SPEC_SYNTAX = "a view is written as name or name(key=value,...), e.g. patch_permute(patch=8,seed=0)"


def _parse_number(text: str) -> ParamValue | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_view_spec(spec: str | ViewSpec) -> ViewSpec:
    """Read a spec string: ``"flip"``, ``"patch_permute(patch=8, seed=3)"``.

    Whitespace is ignored around names, keys and values; missing parameters take their defaults.
    A :class:`ViewSpec` is returned as is. Errors are :class:`ConfigError` on field ``views``.
    """
    if isinstance(spec, ViewSpec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(_FIELD, spec, _SPEC_SYNTAX)
    match = _SPEC_RE.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(_FIELD, spec, _SPEC_SYNTAX)
    name, arg_text = match.group(1), match.group(2)
    entry = VIEW_ENTRIES.get(name)
    if entry is None:
        raise ConfigError(_FIELD, spec, unknown_name_message("view", name, available_views()))
    defaults = entry.defaults
    allowed = ", ".join(f"{key}={value!r}" for key, value in defaults.items()) or "none"
    kwargs: dict[str, ParamValue] = {}
    if arg_text is not None and arg_text.strip():
        for item in arg_text.split(","):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not key or not raw:
                raise ConfigError(
                    _FIELD, spec, f"parameter {item.strip()!r} is not key=value; {_SPEC_SYNTAX}"
                )
            if key not in defaults:
                raise ConfigError(
                    _FIELD,
                    spec,
                    f"{name} has no parameter {key!r}; {did_you_mean(key, defaults)}"
                    f"allowed parameters (with defaults): {allowed}",
                )
            if key in kwargs:
                raise ConfigError(_FIELD, spec, f"parameter {key!r} is given twice")
            value = _parse_number(raw)
            expected = type(defaults[key])
            if value is None or (expected is int and not isinstance(value, int)):
                kind = "an integer" if expected is int else "a finite number"
                raise ConfigError(_FIELD, spec, f"{name} parameter {key}={raw!r} must be {kind}")
            kwargs[key] = float(value) if expected is float else value
    return ViewSpec(name, tuple((key, kwargs.get(key, default)) for key, default in defaults.items()))


# --------------------------------------------------------------------------------------------------
# The views: parameters, their checks and the canvases each one works on
# --------------------------------------------------------------------------------------------------


def skew_shifts(factor: float, w: int) -> list[int]:
    """Downward shift in cells of each of the ``w`` latent columns: ``round(factor * (x - w/2))``, half up.

    Float64 arithmetic in the same order as the tensor version would do it, so both agree exactly.
    """
    return [math.floor(factor * (x - w / 2) + 0.5) for x in range(w)]


def inner_circle_disk(radius: float, h: int) -> list[list[bool]]:
    """The cells ``(h, h)`` of a tile whose centres lie within ``radius * h / 2`` cells of its centre."""
    centred = [i + 0.5 - h / 2 for i in range(h)]
    limit = (radius * h / 2) ** 2
    return [[r * r + c * c <= limit for c in centred] for r in centred]


def _square_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    if h == w:
        return None
    tile = h * LATENT_SCALE
    hint = f"; use tile_{spec.name} to turn each {tile}x{tile} tile in place" if w % h == 0 else ""
    return (
        f"{spec.name} turns the whole canvas and needs a square canvas, but the canvas is "
        f"{_canvas_text(h, w)}{hint}"
    )


def _tile_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    if w % h:
        return (
            f"{spec.name} turns square tiles as tall as the canvas, so the width must be a multiple of "
            f"the height, but the canvas is {_canvas_text(h, w)}"
        )
    return None


def _patch_params(spec: ViewSpec) -> str | None:
    return "patch must be >= 1" if spec["patch"] < 1 else None


def _patch_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    p = int(spec["patch"])
    if h % p or w % p or (h // p) * (w // p) < 2:
        fits = ", ".join(map(str, _common_divisors(h, w)))
        return (
            f"patch={p} cells ({p * LATENT_SCALE} px) must divide both sides of the canvas "
            f"{_canvas_text(h, w)} into at least 2 patches; patch sizes that fit: "
            f"{fits}"
        )
    return None


def _jigsaw_params(spec: ViewSpec) -> str | None:
    if spec["piece"] < 4:
        return "piece must be >= 4 cells (room for tabs)"
    if spec["rotate"] not in (0, 1):
        return "rotate must be 0 (only shuffle) or 1 (shuffle and turn pieces)"
    return None


def _jigsaw_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    p = int(spec["piece"])
    if h % p or w % p or h // p < 2 or w // p < 2:
        fits = [q for q in _common_divisors(h, w) if q >= 4]
        fits = [q for q in fits if h // q >= 2 and w // q >= 2]
        return (
            f"piece={p} cells ({p * LATENT_SCALE} px) must divide both sides of the canvas "
            f"{_canvas_text(h, w)} into at least 2 pieces each way; piece sizes "
            f"that fit: {', '.join(map(str, fits)) or 'none'}"
        )
    return None


def _inner_circle_params(spec: ViewSpec) -> str | None:
    return None if 0.0 < spec["radius"] <= 1.0 else "radius must be in (0, 1]"


def _inner_circle_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    if w % h:
        return (
            f"{spec.name} works on square tiles as tall as the canvas, so the width must be a multiple "
            f"of the height, but the canvas is {_canvas_text(h, w)}"
        )
    if sum(map(sum, inner_circle_disk(spec["radius"], h))) < 2:
        return f"radius={spec['radius']} leaves no disk to turn on a {h}-cell tile"
    return None


def _skew_params(spec: ViewSpec) -> str | None:
    return None if math.isfinite(spec["factor"]) else "factor must be finite"


def _skew_canvas(spec: ViewSpec, h: int, w: int) -> str | None:
    factor = spec["factor"]
    if not any(shift % h for shift in skew_shifts(factor, w)):
        return (
            f"factor={factor} moves no column of the canvas "
            f"{_canvas_text(h, w)}; use |factor| >= {1.0 / w:.3g}"
        )
    return None


def _sigma_params(*keys: str) -> ParamCheck:
    def check(spec: ViewSpec) -> str | None:
        for key in keys:
            if not (math.isfinite(spec[key]) and spec[key] > 0):
                return f"{key} must be a finite number > 0 (in latent cells)"
        if len(keys) == 2 and not spec[keys[0]] < spec[keys[1]]:
            return f"{keys[0]} must be smaller than {keys[1]}"
        return None

    return check


IDENTITY = _entry("identity", PERMUTATION)
FLIP = _entry("flip", PERMUTATION)
MIRROR = _entry("mirror", PERMUTATION)
ROTATE_180 = _entry("rotate_180", PERMUTATION)
ROTATE_CW = _entry("rotate_cw", PERMUTATION, canvas=_square_canvas)
ROTATE_CCW = _entry("rotate_ccw", PERMUTATION, canvas=_square_canvas)
TILE_ROTATE_CW = _entry("tile_rotate_cw", PERMUTATION, canvas=_tile_canvas)
TILE_ROTATE_CCW = _entry("tile_rotate_ccw", PERMUTATION, canvas=_tile_canvas)
PATCH_PERMUTE = _entry(
    "patch_permute", PERMUTATION, {"patch": 8, "seed": 0}, params=_patch_params, canvas=_patch_canvas
)
JIGSAW = _entry(
    "jigsaw",
    PERMUTATION,
    {"piece": 8, "seed": 0, "rotate": 1},
    params=_jigsaw_params,
    canvas=_jigsaw_canvas,
)
INNER_CIRCLE = _entry(
    "inner_circle", PERMUTATION, {"radius": 0.75}, params=_inner_circle_params, canvas=_inner_circle_canvas
)
SKEW = _entry("skew", PERMUTATION, {"factor": 0.125}, params=_skew_params, canvas=_skew_canvas)
NEGATE = _entry("negate", PERMUTATION)
LOW_PASS = _entry(
    "low_pass",
    HYBRID,
    {"sigma": 2.0},
    params=_sigma_params("sigma"),
    band=lambda spec: (float(spec["sigma"]), math.inf),
)
HIGH_PASS = _entry(
    "high_pass",
    HYBRID,
    {"sigma": 2.0},
    params=_sigma_params("sigma"),
    band=lambda spec: (0.0, float(spec["sigma"])),
)
BAND_PASS = _entry(
    "band_pass",
    HYBRID,
    {"sigma1": 1.0, "sigma2": 4.0},
    params=_sigma_params("sigma1", "sigma2"),
    band=lambda spec: (float(spec["sigma1"]), float(spec["sigma2"])),
)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _specs(views: Sequence[ViewSpec | HasViewSpec]) -> list[ViewSpec]:
    return [view.view_spec for view in views]


def _hybrid_split_error(views: Sequence[ViewSpec]) -> str | None:
    """Why these hybrid views do not split the latent into bands that add up to it, or None."""
    bands = sorted((v.band for v in views if v.kind == HYBRID), key=lambda band: band)
    edge = 0.0
    for low, high in bands:
        if low < edge:
            return f"two parts overlap between sigma {low:g} and {edge:g}"
        if low > edge:
            return (
                "no part keeps the finest details (add high_pass)"
                if edge == 0
                else f"no part covers sigma {edge:g} to {low:g}"
            )
        edge = high
    return None if edge == math.inf else f"no part keeps what is coarser than sigma {edge:g} (add low_pass)"


def _is_nonnegative_number(value: object) -> bool:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number >= 0


def _check_kinds(views: Sequence[ViewSpec]) -> str:
    if not views:
        raise ConfigError(_FIELD, [], "at least one view is needed")
    kinds = {v.kind for v in views}
    if len(kinds) > 1:
        raise ConfigError(
            _FIELD,
            [v.spec for v in views],
            "hybrid views (low_pass/high_pass/band_pass) cannot be mixed with permutation views "
            "(rearrangements, negate): use only hybrids, weights 1 each, or only permutations, "
            "weights summing to 1",
        )
    return kinds.pop()


def check_view_weights(
    views: Sequence[ViewSpec | HasViewSpec], weights: Sequence[float], field: str = "view_weights"
) -> None:
    """Check the method's weight rules for one anagram; raise :class:`ConfigError` naming ``field``.

    One weight per view, each >= 0. Permutation views: weights sum to 1. Hybrid views: the bands split
    the latent completely (e.g. ``low_pass(sigma=2.0)`` + ``high_pass(sigma=2.0)``), each weight exactly 1.
    Hybrid and permutation views cannot be mixed. ``views`` are specs or views built from them.
    """
    specs = _specs(views)
    values = list(weights)
    if len(values) != len(specs):
        raise ConfigError(
            field,
            values,
            f"{len(values)} weights for {len(specs)} views ({', '.join(v.spec for v in specs)}); "
            "give exactly one weight per view",
        )
    kind = _check_kinds(specs)
    bad = [w for w in values if not _is_nonnegative_number(w)]
    if bad:
        raise ConfigError(field, values, f"every weight must be a finite number >= 0 (got {bad})")
    if kind == PERMUTATION:
        total = math.fsum(float(w) for w in values)
        if abs(total - 1.0) > _WEIGHT_SUM_TOL:
            example = ", ".join(f"{w:g}" for w in default_view_weights(specs))
            raise ConfigError(
                field,
                values,
                f"weights of permutation views must sum to 1, they sum to {total:g} (e.g. [{example}])",
            )
        return
    reason = _hybrid_split_error(specs)
    if reason is not None:
        raise ConfigError(
            _FIELD,
            [v.spec for v in specs],
            f"{reason}; hybrid views must split the latent into bands that add up to it: low_pass(sigma=s) + "
            "high_pass(sigma=s) with the same sigma, or low_pass(sigma=b) + band_pass(sigma1=a,sigma2=b) + "
            "high_pass(sigma=a)",
        )
    if any(float(w) != 1.0 for w in values):
        raise ConfigError(
            field, values, "each hybrid view's weight must be exactly 1 (the bands add up to eps)"
        )


def default_view_weights(views: Sequence[ViewSpec | HasViewSpec]) -> tuple[float, ...]:
    """Equal weights summing to 1 for permutation views; 1 each for hybrid views."""
    if _check_kinds(_specs(views)) == HYBRID:
        return tuple(1.0 for _ in views)
    return tuple(1.0 / len(views) for _ in views)
