"""The :class:`View` base class, the registry of implementations, building views from specs, and the index
helpers the permutation views share."""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.sampler.transfer import to_device
from sounding_anagrams.viewspec import (
    LATENT_SCALE,
    VIEW_ENTRIES,
    ParamValue,
    ViewEntry,
    ViewSpec,
    parse_view_spec,
)

# Canvas sizes x scales x devices one view keeps index tensors for (pixel-scale indices of a 256x1024 canvas
# take 2 MiB each); a long-lived process that sees many canvas sizes starts over past that.
_INDEX_CACHE_MAX = 16


def _latent_size_of_pixels(pixels: Tensor, cell: int = LATENT_SCALE) -> tuple[int, int]:
    """Latent ``(h, w)`` of a picture ``(..., H, W)`` of ``cell`` pixels per latent cell (8: decoded size);
    H and W must be multiples of ``cell``."""
    if pixels.dim() < 2:
        raise ConfigError("pixels", tuple(pixels.shape), "expected a picture of shape (B, C, H, W)")
    height, width = pixels.shape[-2:]
    if cell < 1 or height % cell or width % cell:
        raise ConfigError(
            "canvas",
            f"{height}x{width}",
            f"picture height and width must be multiples of {cell} pixels (one latent cell each)",
        )
    return height // cell, width // cell


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``out[..., q] = x[..., index[q]]`` over the flattened last two dims; ``x`` is ``(..., h, w)``."""
    # As rows of a 2-D tensor: torch's CPU index_select along the last dim of a 3-D one is ~9x slower.
    return x.reshape(-1, x.shape[-2] * x.shape[-1]).index_select(1, index).view(x.shape)


def _check_latent(x: Tensor) -> tuple[int, int]:
    if x.dim() < 2:
        raise ConfigError("latent", tuple(x.shape), "expected a latent of shape (B, C, h, w)")
    return int(x.shape[-2]), int(x.shape[-1])


def _grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Row and column index of every position, flattened: two ``(height*width,)`` long tensors."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return rows, cols


# --------------------------------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------------------------------


class View(ABC):
    """A transform of latents ``(B, C, h, w)`` (any leading dims, any C, all channels alike).

    Subclasses set ``entry`` to the :class:`~sounding_anagrams.viewspec.ViewEntry` they implement, which
    gives them ``name`` (registry key) and ``kind`` (``"permutation"`` or ``"hybrid"``); they are built from
    a checked :class:`~sounding_anagrams.viewspec.ViewSpec` and read their parameters from it. A view holds
    no state but caches of index tensors, so equal specs make interchangeable views.
    """

    entry: ClassVar[ViewEntry]
    name: ClassVar[str]
    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        entry = cls.__dict__.get("entry")
        if isinstance(entry, ViewEntry):
            cls.name, cls.kind = entry.name, entry.kind

    def __init__(self, spec: ViewSpec) -> None:
        if spec.entry is not getattr(type(self), "entry", None):
            raise TypeError(f"{type(self).__name__} does not implement {spec.spec}")
        self._view_spec = spec

    # -- identity of a view ------------------------------------------------------------------------

    @property
    def view_spec(self) -> ViewSpec:
        """The spec this view was built from."""
        return self._view_spec

    @property
    def params(self) -> dict[str, ParamValue]:
        """The view's parameters, in canonical order."""
        return dict(self._view_spec.params)

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"identity"`` or ``"patch_permute(patch=8,seed=0)"``."""
        return self._view_spec.spec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return type(self) is type(other) and self._view_spec == other._view_spec

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._view_spec))

    def __repr__(self) -> str:
        return f"View({self.spec!r})"

    # -- the transform -----------------------------------------------------------------------------

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        """Raise :class:`ConfigError` when this view cannot work on a latent of that size (spec's rules)."""
        self._view_spec.check_canvas(latent_height, latent_width)

    @abstractmethod
    def view(self, x: Tensor) -> Tensor:
        """The latent the image model sees: ``(B, C, h, w)`` -> ``(B, C, h, w)``."""

    @abstractmethod
    def inverse_view(self, x: Tensor) -> Tensor:
        """Map a noise estimate made on ``view(z)`` back onto ``z``'s frame: ``(B, C, h, w)``."""

    @abstractmethod
    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        """The picture this view shows, from a picture ``(B, C, H, W)`` in [-1, 1] of ``cell`` pixels per
        latent cell: ``H = 8h`` as decoded, or smaller (an animation made at its output size, ``cell=4``)."""

    def animate_pixels(self, pixels: Tensor, t: float, *, cell: int = LATENT_SCALE) -> Tensor:
        """Frame ``t`` in [0, 1] of the transition from ``pixels`` (t=0) to ``view_pixels(pixels)`` (t=1).

        ``pixels`` is ``(B, C, H, W)`` in [-1, 1] with ``cell`` pixels per latent cell; the frame has the same
        shape. The endpoints are exact.
        """
        if not math.isfinite(t) or not 0.0 <= t <= 1.0:
            raise ConfigError("t", t, "animation time must be in [0, 1]")
        if t == 0.0:
            return pixels.clone()
        if t == 1.0:
            return self.view_pixels(pixels, cell=cell)
        return self._animate(pixels, t, cell)

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        """Intermediate frame, ``0 < t < 1``; the default is a linear crossfade."""
        return torch.lerp(pixels, self.view_pixels(pixels, cell=cell), t)


ViewT = TypeVar("ViewT", bound=type[View])

#: The implementation of each view, by name: exactly the names of ``sounding_anagrams.viewspec``.
VIEW_REGISTRY: dict[str, type[View]] = {}


def register_view(cls: ViewT) -> ViewT:
    """Class decorator adding a :class:`View` subclass to :data:`VIEW_REGISTRY` under its entry's name.

    The entry must be one of :data:`~sounding_anagrams.viewspec.VIEW_ENTRIES`: a new view is declared there
    first (name, kind, parameters and their checks), then implemented here.
    """
    entry = cls.__dict__.get("entry")
    if not isinstance(entry, ViewEntry) or VIEW_ENTRIES.get(entry.name) is not entry:
        raise TypeError(
            f"{cls.__name__}.entry must be an entry of sounding_anagrams.viewspec.VIEW_ENTRIES, got {entry!r}"
        )
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} is abstract and cannot implement {entry.name!r}")
    if entry.name in VIEW_REGISTRY and VIEW_REGISTRY[entry.name] is not cls:
        raise TypeError(
            f"view name {entry.name!r} is already registered by {VIEW_REGISTRY[entry.name].__name__}"
        )
    VIEW_REGISTRY[entry.name] = cls
    return cls


@functools.lru_cache(maxsize=256)
def _build(spec: ViewSpec) -> View:
    cls = VIEW_REGISTRY.get(spec.name)
    if cls is None:
        raise NotImplementedError(f"view {spec.name!r} has a spec but no implementation")
    return cls(spec)


def build_view(spec: ViewSpec | str) -> View:
    """The view of a spec (or spec string, checked as in a config).

    Equal specs give the same object: the index tensors a view builds on first use (per canvas size and
    device) are then built once per process, although a search asks for the same views for every candidate.
    """
    return _build(parse_view_spec(spec))


def build_views(specs: Iterable[ViewSpec | str]) -> tuple[View, ...]:
    """The views of specs, e.g. ``build_views(config.view_specs())``."""
    return tuple(build_view(spec) for spec in specs)


def parse_view(spec: str | ViewSpec | View) -> View:
    """Build a view from its spec string: ``"flip"``, ``"patch_permute(patch=8, seed=3)"``.

    Whitespace is ignored around names, keys and values; missing parameters take their defaults.
    A :class:`View` is returned as is. Errors are :class:`ConfigError` on field ``views``.
    """
    return spec if isinstance(spec, View) else build_view(spec)


# --------------------------------------------------------------------------------------------------
# Permutation views built from an index map
# --------------------------------------------------------------------------------------------------


class _IndexView(View):
    """A permutation of cells given by a source index: ``out[..., q] = x[..., src[q]]`` (flattened).

    Subclasses build the index at a given scale (1: latent cells, 8: pixels); at scale 8 every 8x8
    block must come from one 8x8 block, which makes the latent and pixel versions agree exactly.
    """

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self._cache: dict[tuple[int, int, int, torch.device], tuple[Tensor, Tensor]] = {}

    @abstractmethod
    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        """Source index ``(h*scale * w*scale,)`` (long, CPU) of each output position."""

    def _indices(self, h: int, w: int, scale: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(src, inv)`` index tensors on ``device``, built on first use for this size and device."""
        key = (h, w, scale, device)
        found = self._cache.get(key)
        if found is not None:
            return found
        self.check_canvas(h, w)
        src = self._build_source(h, w, scale)
        size = h * w * scale * scale
        if src.shape != (size,) or not bool((torch.bincount(src, minlength=size) == 1).all()):
            raise RuntimeError(f"internal error: {self.spec} is not a permutation on {h}x{w}")
        inv = torch.empty_like(src)
        inv[src] = torch.arange(size)
        # Built on first use, inside a denoising step: a blocking copy there would stall the device.
        found = (to_device(src, device), to_device(inv, device))
        if len(self._cache) >= _INDEX_CACHE_MAX:
            # A fresh dict, not clear(): another thread may be reading the old one (render writer threads).
            self._cache = {}
        self._cache[key] = found
        return found

    def view(self, x: Tensor) -> Tensor:
        h, w = _check_latent(x)
        return _gather(x, self._indices(h, w, 1, x.device)[0])

    def inverse_view(self, x: Tensor) -> Tensor:
        h, w = _check_latent(x)
        return _gather(x, self._indices(h, w, 1, x.device)[1])

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        h, w = _latent_size_of_pixels(pixels, cell)
        return _gather(pixels, self._indices(h, w, cell, pixels.device)[0])
