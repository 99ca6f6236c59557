"""Views: the transforms under which one latent shows a second picture.

A view ``v`` acts on a Stable Diffusion latent ``z`` of shape ``(B, C, h, w)``. Each denoising step the
image model sees ``v(z)`` and its noise estimate is brought back with ``v.inverse_view``. One latent
cell covers an 8x8 pixel block of the decoded picture (``H = 8h``, ``W = 8w``), so every permutation
view here moves whole cells, and ``view_pixels`` applies the same transform at 8x scale to a decoded
picture: what a user does to a printout (turn it, flip it, cut and reorder it).

Two kinds of views:

- ``"permutation"``: orthogonal, exactly invertible maps (rearrangements of cells, sign flips). Their
  inverse is their adjoint, which the sampler relies on; their weights sum to 1.
- ``"hybrid"``: frequency bands. ``view`` is the identity and ``inverse_view`` keeps one band
  (low-pass, high-pass, band-pass); the bands of one anagram must add up to the identity and each
  gets weight 1.

Views are written as spec strings, ``"name"`` or ``"name(key=value,...)"``; :func:`parse_view` reads them and
:attr:`View.spec` writes the canonical form back. New views register themselves with
:func:`register_view`.
"""

from __future__ import annotations

import inspect
import math
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import lazy_loader

from sounding_anagrams.errors import ConfigError, did_you_mean, unknown_name_message

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    # Parsing and checking a view spec needs no torch: a config or study file with a bad view is refused
    # before torch loads (seconds), and torch loads at the first tensor operation.
    torch = lazy_loader.load("torch")

__all__ = [
    "HYBRID",
    "LATENT_SCALE",
    "PERMUTATION",
    "VIEW_REGISTRY",
    "View",
    "available_views",
    "check_view_weights",
    "default_view_weights",
    "gaussian_blur",
    "parse_view",
    "register_view",
]

#: Pixels per latent cell along each axis (Stable Diffusion's VAE downsamples by 8).
LATENT_SCALE = 8
PERMUTATION = "permutation"
HYBRID = "hybrid"

_FIELD = "views"
_WEIGHT_SUM_TOL = 1e-6

ParamValue = int | float


def _canvas_text(h: int, w: int) -> str:
    """``"256x1024 pixels (32x128 latent cells)"``."""
    return f"{h * LATENT_SCALE}x{w * LATENT_SCALE} pixels ({h}x{w} latent cells)"


def _format_spec(name: str, params: dict[str, ParamValue]) -> str:
    if not params:
        return name
    return f"{name}({','.join(f'{key}={value!r}' for key, value in params.items())})"


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


# --------------------------------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------------------------------


class View(ABC):
    """A transform of latents ``(B, C, h, w)`` (any leading dims, any C, all channels alike).

    Subclasses set the class attributes ``name`` (registry key) and ``kind`` (``"permutation"`` or
    ``"hybrid"``) and take their parameters as keyword arguments with defaults, passing them on to
    ``View.__init__`` so that :attr:`spec`, equality and hashing work.
    """

    name: ClassVar[str]
    kind: ClassVar[str]

    def __init__(self, **params: ParamValue) -> None:
        self._params: dict[str, ParamValue] = dict(params)

    # -- identity of a view ------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, ParamValue]:
        """The view's parameters, in the order of its signature."""
        return dict(self._params)

    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"identity"`` or ``"patch_permute(patch=8,seed=0)"``."""
        return _format_spec(self.name, self._params)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return type(self) is type(other) and self._params == other._params

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self._params.items())))

    def __repr__(self) -> str:
        return f"View({self.spec!r})"

    # -- the transform -----------------------------------------------------------------------------

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        """Raise :class:`ConfigError` when this view cannot work on a latent of that size."""
        if latent_height < 1 or latent_width < 1:
            raise ConfigError(
                _FIELD, self.spec, f"the latent must be at least 1x1, got {latent_height}x{latent_width}"
            )

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

#: Registered views by name.
VIEW_REGISTRY: dict[str, type[View]] = {}


def register_view(cls: ViewT) -> ViewT:
    """Class decorator adding a :class:`View` subclass to :data:`VIEW_REGISTRY` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise TypeError(f"{cls.__name__}.name must be a lowercase identifier, got {name!r}")
    if getattr(cls, "kind", None) not in (PERMUTATION, HYBRID):
        raise TypeError(f"{cls.__name__}.kind must be {PERMUTATION!r} or {HYBRID!r}")
    if name in VIEW_REGISTRY and VIEW_REGISTRY[name] is not cls:
        raise TypeError(f"view name {name!r} is already registered by {VIEW_REGISTRY[name].__name__}")
    VIEW_REGISTRY[name] = cls
    return cls


def available_views() -> list[str]:
    """Sorted names of the registered views."""
    return sorted(VIEW_REGISTRY)


def _param_defaults(cls: type[View]) -> dict[str, ParamValue]:
    """Keyword parameters of a view class with their defaults, in signature order."""
    out: dict[str, ParamValue] = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD) and param.name != "self":
            out[param.name] = param.default
    return out


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


def parse_view(spec: str | View) -> View:
    """Build a view from its spec string: ``"flip"``, ``"patch_permute(patch=8, seed=3)"``.

    Whitespace is ignored around names, keys and values; missing parameters take their defaults.
    A :class:`View` is returned as is. Errors are :class:`ConfigError` on field ``views``.
    """
    if isinstance(spec, View):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(_FIELD, spec, _SPEC_SYNTAX)
    match = _SPEC_RE.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(_FIELD, spec, _SPEC_SYNTAX)
    name, arg_text = match.group(1), match.group(2)
    cls = VIEW_REGISTRY.get(name)
    if cls is None:
        raise ConfigError(_FIELD, spec, unknown_name_message("view", name, available_views()))
    defaults = _param_defaults(cls)
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
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _hybrid_split_error(views: Sequence[View]) -> str | None:
    """Why these hybrid views do not split the latent into bands that add up to it, or None."""
    bands = sorted((v.band for v in views if isinstance(v, _HybridView)), key=lambda band: band)
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


def _check_kinds(views: Sequence[View]) -> str:
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


def check_view_weights(views: Sequence[View], weights: Sequence[float], field: str = "view_weights") -> None:
    """Check the method's weight rules for one anagram; raise :class:`ConfigError` naming ``field``.

    One weight per view, each >= 0. Permutation views: weights sum to 1. Hybrid views: the bands split
    the latent completely (e.g. ``low_pass(sigma=2.0)`` + ``high_pass(sigma=2.0)``), each weight exactly 1.
    Hybrid and permutation views cannot be mixed.
    """
    values = list(weights)
    if len(values) != len(views):
        raise ConfigError(
            field,
            values,
            f"{len(values)} weights for {len(views)} views ({', '.join(v.spec for v in views)}); "
            "give exactly one weight per view",
        )
    kind = _check_kinds(views)
    bad = [w for w in values if not _is_nonnegative_number(w)]
    if bad:
        raise ConfigError(field, values, f"every weight must be a finite number >= 0 (got {bad})")
    if kind == PERMUTATION:
        total = math.fsum(float(w) for w in values)
        if abs(total - 1.0) > _WEIGHT_SUM_TOL:
            example = ", ".join(f"{w:g}" for w in default_view_weights(views))
            raise ConfigError(
                field,
                values,
                f"weights of permutation views must sum to 1, they sum to {total:g} (e.g. [{example}])",
            )
        return
    reason = _hybrid_split_error(views)
    if reason is not None:
        raise ConfigError(
            _FIELD,
            [v.spec for v in views],
            f"{reason}; hybrid views must split the latent into bands that add up to it: low_pass(sigma=s) + "
            "high_pass(sigma=s) with the same sigma, or low_pass(sigma=b) + band_pass(sigma1=a,sigma2=b) + "
            "high_pass(sigma=a)",
        )
    if any(float(w) != 1.0 for w in values):
        raise ConfigError(
            field, values, "each hybrid view's weight must be exactly 1 (the bands add up to eps)"
        )


def default_view_weights(views: Sequence[View]) -> tuple[float, ...]:
    """Equal weights summing to 1 for permutation views; 1 each for hybrid views."""
    if _check_kinds(views) == HYBRID:
        return tuple(1.0 for _ in views)
    return tuple(1.0 / len(views) for _ in views)


# --------------------------------------------------------------------------------------------------
# Permutation views built from an index map
# --------------------------------------------------------------------------------------------------


# CPU index tensors shared by equal views (a search re-parses the same specs for every candidate), keyed by
# (spec, h, w, scale); bounded because pixel-scale indices of a 256x1024 canvas take 2 MiB each.
_SHARED_INDICES: OrderedDict[tuple[str, int, int, int], tuple[Tensor, Tensor]] = OrderedDict()
_SHARED_INDICES_MAX = 64


class _IndexView(View):
    """A permutation of cells given by a source index: ``out[..., q] = x[..., src[q]]`` (flattened).

    Subclasses build the index at a given scale (1: latent cells, 8: pixels); at scale 8 every 8x8
    block must come from one 8x8 block, which makes the latent and pixel versions agree exactly.
    """

    kind = PERMUTATION

    def __init__(self, **params: ParamValue) -> None:
        super().__init__(**params)
        self._cache: dict[tuple[int, int, int, torch.device], tuple[Tensor, Tensor]] = {}

    @abstractmethod
    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        """Source index ``(h*scale * w*scale,)`` (long, CPU) of each output position."""

    def _indices(self, h: int, w: int, scale: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(src, inv)`` index tensors on ``device``, built on first use for this size and device."""
        key = (h, w, scale, device)
        if key not in self._cache:
            self.check_canvas(h, w)
            shared_key = (self.spec, h, w, scale)
            if shared_key in _SHARED_INDICES:
                _SHARED_INDICES.move_to_end(shared_key)
                src, inv = _SHARED_INDICES[shared_key]
            else:
                src = self._build_source(h, w, scale)
                size = h * w * scale * scale
                if src.shape != (size,) or not bool((torch.bincount(src, minlength=size) == 1).all()):
                    raise RuntimeError(f"internal error: {self.spec} is not a permutation on {h}x{w}")
                inv = torch.empty_like(src)
                inv[src] = torch.arange(size)
                _SHARED_INDICES[shared_key] = (src, inv)
                while len(_SHARED_INDICES) > _SHARED_INDICES_MAX:
                    _SHARED_INDICES.popitem(last=False)
            self._cache[key] = (src.to(device), inv.to(device))
        return self._cache[key]

    def view(self, x: Tensor) -> Tensor:
        h, w = _check_latent(x)
        return _gather(x, self._indices(h, w, 1, x.device)[0])

    def inverse_view(self, x: Tensor) -> Tensor:
        h, w = _check_latent(x)
        return _gather(x, self._indices(h, w, 1, x.device)[1])

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        h, w = _latent_size_of_pixels(pixels, cell)
        return _gather(pixels, self._indices(h, w, cell, pixels.device)[0])


def _grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    """Row and column index of every position, flattened: two ``(height*width,)`` long tensors."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return rows, cols


def _squash(pixels: Tensor, t: float, dim: int) -> Tensor:
    """Scale the picture by ``cos(pi t)`` along ``dim`` about its centre (nearest sampling, gray outside).

    At t=1 the scale is -1: the picture is flipped along ``dim``, like a card turning over.
    """
    scale = math.cos(math.pi * t)
    if abs(scale) < 1e-6:
        return torch.zeros_like(pixels)
    n = pixels.shape[dim]
    centred = torch.arange(n, dtype=torch.float64) + 0.5 - n / 2
    src = torch.floor(centred / scale + n / 2).long()
    valid = (src >= 0) & (src < n)
    out = pixels.index_select(dim, src.clamp(0, n - 1).to(pixels.device))
    shape = [1] * pixels.dim()
    shape[dim] = n
    return out * valid.to(device=pixels.device, dtype=pixels.dtype).view(shape)


# --------------------------------------------------------------------------------------------------
# Permutation views made of rigid pieces (translated and turned by quarter turns)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pieces:
    """A view as rigid pieces of cells: piece ``j`` moves its centre from ``src_center[j]`` to
    ``dst_center[j]`` (in cells, ``(row, col)``) and turns by ``turns[j]`` quarter turns clockwise.

    ``label`` is ``(h, w)``: the piece of each source cell. With ``wrap`` the canvas is a torus (pieces
    may cross its edges).
    """

    label: Tensor
    src_center: Tensor
    dst_center: Tensor
    turns: Tensor
    wrap: bool = False


def _square_pieces(h: int, w: int, ph: int, pw: int) -> tuple[Tensor, Tensor]:
    """Label map ``(h, w)`` of a grid of ``ph x pw``-cell pieces and their centres ``(n, 2)``."""
    gh, gw = h // ph, w // pw
    label = (torch.arange(h) // ph)[:, None] * gw + (torch.arange(w) // pw)[None, :]
    slots = torch.arange(gh * gw)
    centers = torch.stack([(slots // gw).double() * ph + ph / 2, (slots % gw).double() * pw + pw / 2], dim=1)
    return label, centers


class _PieceView(_IndexView):
    """A permutation view made of rigid pieces; animates by sliding and turning each piece."""

    def __init__(self, **params: ParamValue) -> None:
        super().__init__(**params)
        # Geometry of the last canvas animated: an animation renders many frames of one canvas.
        self._motion_cache: dict[tuple[int, int, int, torch.device], tuple[_Pieces, Tensor, Tensor]] = {}

    @abstractmethod
    def _pieces(self, h: int, w: int) -> _Pieces:
        """The pieces on a latent of ``h x w`` cells (``check_canvas`` has passed)."""

    def _geometry(self, h: int, w: int, scale: int, dtype: torch.dtype) -> tuple[_Pieces, Tensor, Tensor]:
        """Pieces, the piece ``(H*W,)`` of each position on the ``scale`` grid, and its offset ``(2, H*W)``
        ``(row, col)`` from its piece's source centre, measured from the position's centre."""
        pieces = self._pieces(h, w)
        height, width = h * scale, w * scale
        piece = pieces.label.repeat_interleave(scale, 0).repeat_interleave(scale, 1).flatten()
        centre = pieces.src_center.to(torch.float64) * scale
        rows, cols = _grid(height, width)
        rel_r = rows.double() + 0.5 - centre[piece, 0]
        rel_c = cols.double() + 0.5 - centre[piece, 1]
        if pieces.wrap:
            # Offsets measured the short way round the torus, so tabs across an edge stay attached.
            rel_r = torch.remainder(rel_r + height / 2, height) - height / 2
            rel_c = torch.remainder(rel_c + width / 2, width) - width / 2
        return pieces, piece, torch.stack([rel_r, rel_c]).to(dtype)

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        pieces, piece, (rel_r, rel_c) = self._geometry(h, w, scale, torch.float64)
        height, width = h * scale, w * scale
        quarter = torch.remainder(pieces.turns, 4)[piece]
        # Exact quarter turns clockwise in (row, col) image coordinates: (dr, dc) -> (dc, -dr).
        cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=torch.float64)[quarter]
        sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=torch.float64)[quarter]
        dst = pieces.dst_center.to(torch.float64)[piece] * scale
        dest_r = torch.round(dst[:, 0] + rel_r * cos_k + rel_c * sin_k - 0.5).long()
        dest_c = torch.round(dst[:, 1] + rel_c * cos_k - rel_r * sin_k - 0.5).long()
        if pieces.wrap:
            dest_r, dest_c = torch.remainder(dest_r, height), torch.remainder(dest_c, width)
        elif bool(((dest_r < 0) | (dest_r >= height) | (dest_c < 0) | (dest_c >= width)).any()):
            raise RuntimeError(f"internal error: {self.spec} moves cells off the {h}x{w} canvas")
        forward = dest_r * width + dest_c
        source = torch.full((height * width,), -1, dtype=torch.long)
        source[forward] = torch.arange(height * width)
        return source

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        h, w = _latent_size_of_pixels(pixels, cell)
        self.check_canvas(h, w)
        height, width = h * cell, w * cell
        key = (h, w, cell, pixels.device)
        if key not in self._motion_cache:
            pieces, piece, rel = self._geometry(h, w, cell, torch.float32)
            self._motion_cache = {key: (pieces, piece.to(pixels.device), rel.to(pixels.device))}
        pieces, piece, rel = self._motion_cache[key]
        # Per piece: where its centre is at time t, and how far it has turned.
        centre = torch.lerp(pieces.src_center, pieces.dst_center, t) * cell
        angle = pieces.turns.double() * (t * math.pi / 2)
        per_piece = torch.stack([centre[:, 0], centre[:, 1], torch.cos(angle), torch.sin(angle)])
        c_r, c_c, cos_a, sin_a = per_piece.to(device=pixels.device, dtype=torch.float32)[:, piece]
        rel_r, rel_c = rel[0], rel[1]
        if bool(pieces.turns.any()):
            # Four samples per pixel: a turned grid of half-pixel spacing leaves no target pixel empty.
            offsets = torch.tensor([-0.25, 0.25], device=pixels.device)
            rel_r = (rel_r[None, :] + offsets.repeat_interleave(2)[:, None]).flatten()
            rel_c = (rel_c[None, :] + offsets.repeat(2)[:, None]).flatten()
            c_r, c_c, cos_a, sin_a = (v.repeat(4) for v in (c_r, c_c, cos_a, sin_a))
        source = torch.arange(height * width, device=pixels.device).repeat(rel_r.numel() // (height * width))
        pos_r = torch.floor(c_r + rel_r * cos_a + rel_c * sin_a).long()
        pos_c = torch.floor(c_c + rel_c * cos_a - rel_r * sin_a).long()
        if pieces.wrap:
            pos_r, pos_c = torch.remainder(pos_r, height), torch.remainder(pos_c, width)
        else:
            keep = (pos_r >= 0) & (pos_r < height) & (pos_c >= 0) & (pos_c < width)
            pos_r, pos_c, source = pos_r[keep], pos_c[keep], source[keep]
        # Where sliding pieces overlap, the highest source index wins: a max is order-independent, so every
        # frame is the same on every run (a plain indexed write with duplicates is not).
        winner = torch.full((height * width,), -1, dtype=torch.long, device=pixels.device)
        winner.scatter_reduce_(0, pos_r * width + pos_c, source, reduce="amax")
        covered = winner >= 0
        flat = pixels.flatten(-2)
        out = torch.zeros_like(flat)  # uncovered places show mid gray
        out[..., covered] = flat[..., winner[covered]]
        return out.view(pixels.shape)


def _draw_permutation(generator: torch.Generator, n: int) -> Tensor:
    """A permutation of ``n >= 2`` items that is not the identity, drawn deterministically."""
    while True:
        perm = torch.randperm(n, generator=generator)
        if not torch.equal(perm, torch.arange(n)):
            return perm


def _common_divisors(h: int, w: int) -> list[int]:
    return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0 and (h // p) * (w // p) >= 2]


# --------------------------------------------------------------------------------------------------
# Registered permutation views
# --------------------------------------------------------------------------------------------------


@register_view
class IdentityView(View):
    """The picture as it is."""

    name = "identity"
    kind = PERMUTATION

    def view(self, x: Tensor) -> Tensor:
        return x.clone()

    def inverse_view(self, x: Tensor) -> Tensor:
        return x.clone()

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        return pixels.clone()

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        return pixels.clone()


@register_view
class FlipView(_IndexView):
    """Upside down: a vertical flip (the spectrogram's frequency axis reversed)."""

    name = "flip"

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        rows, cols = _grid(h * scale, w * scale)
        return (h * scale - 1 - rows) * (w * scale) + cols

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        return _squash(pixels, t, pixels.dim() - 2)


@register_view
class MirrorView(_IndexView):
    """Left-right flip (the spectrogram played backwards)."""

    name = "mirror"

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        rows, cols = _grid(h * scale, w * scale)
        return rows * (w * scale) + (w * scale - 1 - cols)

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        return _squash(pixels, t, pixels.dim() - 1)


class _WholeCanvasTurn(_PieceView):
    """The whole canvas turned about its centre by ``_turns`` quarter turns clockwise."""

    _turns: ClassVar[int]

    def _pieces(self, h: int, w: int) -> _Pieces:
        centre = torch.tensor([[h / 2, w / 2]], dtype=torch.float64)
        return _Pieces(
            torch.zeros(h, w, dtype=torch.long), centre, centre, torch.tensor([self._turns], dtype=torch.long)
        )


@register_view
class Rotate180View(_WholeCanvasTurn):
    """The canvas turned upside down by a half turn (any canvas)."""

    name = "rotate_180"
    _turns = 2


class _SquareTurn(_WholeCanvasTurn):
    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        if latent_height != latent_width:
            tile = latent_height * LATENT_SCALE
            hint = (
                f"; use tile_{self.name} to turn each {tile}x{tile} tile in place"
                if latent_width % latent_height == 0
                else ""
            )
            raise ConfigError(
                _FIELD,
                self.spec,
                f"{self.name} turns the whole canvas and needs a square canvas, but the canvas is "
                f"{_canvas_text(latent_height, latent_width)}{hint}",
            )


@register_view
class RotateCWView(_SquareTurn):
    """The whole (square) canvas turned a quarter turn clockwise."""

    name = "rotate_cw"
    _turns = 1


@register_view
class RotateCCWView(_SquareTurn):
    """The whole (square) canvas turned a quarter turn counter-clockwise."""

    name = "rotate_ccw"
    _turns = -1


class _TileTurn(_PieceView):
    """Each ``h x h`` square tile turned in place by ``_turns`` quarter turns clockwise."""

    _turns: ClassVar[int]

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        if latent_width % latent_height:
            raise ConfigError(
                _FIELD,
                self.spec,
                f"{self.name} turns square tiles as tall as the canvas, so the width must be a multiple of "
                f"the height, but the canvas is {_canvas_text(latent_height, latent_width)}",
            )

    def _pieces(self, h: int, w: int) -> _Pieces:
        label, centers = _square_pieces(h, w, h, h)
        turns = torch.full((w // h,), self._turns, dtype=torch.long)
        return _Pieces(label, centers, centers, turns)


@register_view
class TileRotateCWView(_TileTurn):
    """Each square tile (``h x h`` cells, 256x256 px on a 256x1024 canvas) turned clockwise in place."""

    name = "tile_rotate_cw"
    _turns = 1


@register_view
class TileRotateCCWView(_TileTurn):
    """Each square tile turned counter-clockwise in place."""

    name = "tile_rotate_ccw"
    _turns = -1


@register_view
class PatchPermuteView(_PieceView):
    """A seeded shuffle of ``patch x patch``-cell square patches (8 cells = 64 px: a 4x16 grid on 32x128).

    The permutation comes from ``torch.randperm`` with a CPU ``torch.Generator`` seeded with ``seed``; it
    is redrawn (from the same generator) while it is the identity.
    """

    name = "patch_permute"

    def __init__(self, *, patch: int = 8, seed: int = 0) -> None:
        if patch < 1:
            raise ConfigError(
                _FIELD, _format_spec(self.name, {"patch": patch, "seed": seed}), "patch must be >= 1"
            )
        super().__init__(patch=patch, seed=seed)
        self.patch, self.seed = patch, seed

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        p = self.patch
        if latent_height % p or latent_width % p or (latent_height // p) * (latent_width // p) < 2:
            fits = ", ".join(map(str, _common_divisors(latent_height, latent_width)))
            raise ConfigError(
                _FIELD,
                self.spec,
                f"patch={p} cells ({p * LATENT_SCALE} px) must divide both sides of the canvas "
                f"{_canvas_text(latent_height, latent_width)} into at least 2 patches; patch sizes that fit: "
                f"{fits}",
            )

    def permutation(self, h: int, w: int) -> Tensor:
        """Patch permutation on an ``h x w`` latent, ``(n,)`` long.

        Output patch ``i`` shows source patch ``perm[i]``; patches are numbered row by row.
        """
        self.check_canvas(h, w)
        n = (h // self.patch) * (w // self.patch)
        return _draw_permutation(torch.Generator().manual_seed(self.seed), n)

    def _pieces(self, h: int, w: int) -> _Pieces:
        label, centers = _square_pieces(h, w, self.patch, self.patch)
        dst = torch.empty_like(centers)
        dst[self.permutation(h, w)] = centers
        return _Pieces(label, centers, dst, torch.zeros(len(centers), dtype=torch.long))


@register_view
class JigsawView(_PieceView):
    """Interlocking jigsaw pieces shuffled (and with ``rotate=1`` turned by random quarter turns).

    Pieces are ``piece x piece``-cell squares with a tab on each side and a matching notch: all pieces are
    the same shape, symmetric under quarter turns, so any piece fits any place in any orientation. Tabs on
    the canvas border wrap round to the opposite border (the grid is a torus). Per edge, walking clockwise,
    the tab spans cells ``[piece//8, 3*piece//8)`` and reaches ``piece//4`` cells deep (2x2-cell tabs at the
    default ``piece=8``). The shuffle and turns come from a CPU ``torch.Generator`` seeded with ``seed``.
    """

    name = "jigsaw"

    def __init__(self, *, piece: int = 8, seed: int = 0, rotate: int = 1) -> None:
        spec = _format_spec(self.name, {"piece": piece, "seed": seed, "rotate": rotate})
        if piece < 4:
            raise ConfigError(_FIELD, spec, "piece must be >= 4 cells (room for tabs)")
        if rotate not in (0, 1):
            raise ConfigError(_FIELD, spec, "rotate must be 0 (only shuffle) or 1 (shuffle and turn pieces)")
        super().__init__(piece=piece, seed=seed, rotate=rotate)
        self.piece, self.seed, self.rotate = piece, seed, rotate

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        p = self.piece
        if latent_height % p or latent_width % p or latent_height // p < 2 or latent_width // p < 2:
            fits = [q for q in _common_divisors(latent_height, latent_width) if q >= 4]
            fits = [q for q in fits if latent_height // q >= 2 and latent_width // q >= 2]
            raise ConfigError(
                _FIELD,
                self.spec,
                f"piece={p} cells ({p * LATENT_SCALE} px) must divide both sides of the canvas "
                f"{_canvas_text(latent_height, latent_width)} into at least 2 pieces each way; piece sizes "
                f"that fit: {', '.join(map(str, fits)) or 'none'}",
            )

    def arrangement(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """``(perm, turns)``, both ``(n,)`` long, on an ``h x w`` latent.

        Place ``i`` shows piece ``perm[i]``; piece ``j`` turns ``turns[j]`` quarter turns clockwise (in
        {-1, 0, 1, 2}); pieces are numbered row by row.
        """
        self.check_canvas(h, w)
        n = (h // self.piece) * (w // self.piece)
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(n, generator=generator)
            turns = torch.randint(-1, 3, (n,), generator=generator) * self.rotate
            if not (torch.equal(perm, torch.arange(n)) and not bool(turns.any())):
                return perm, turns

    def _label(self, h: int, w: int) -> Tensor:
        p = self.piece
        a, b, depth = p // 8, 3 * p // 8, p // 4
        label, _ = _square_pieces(h, w, p, p)
        gw = w // p
        lo, hi = torch.arange(a, b), torch.arange(p - b, p - a)
        tab = torch.arange(depth)
        # (rows, cols) of the four tabs relative to the piece's top-left cell, each the previous one turned
        # a quarter turn clockwise: top, right, bottom, left.
        tabs = [
            (-1 - tab[:, None], lo[None, :]),
            (lo[:, None], p + tab[None, :]),
            (p + tab[:, None], hi[None, :]),
            (hi[:, None], -1 - tab[None, :]),
        ]
        for slot in range((h // p) * gw):
            r0, c0 = (slot // gw) * p, (slot % gw) * p
            for rows, cols in tabs:
                rr, cc = torch.broadcast_tensors(rows + r0, cols + c0)
                label[torch.remainder(rr, h), torch.remainder(cc, w)] = slot
        return label

    def _pieces(self, h: int, w: int) -> _Pieces:
        _, centers = _square_pieces(h, w, self.piece, self.piece)
        perm, turns = self.arrangement(h, w)
        dst = torch.empty_like(centers)
        dst[perm] = centers
        return _Pieces(self._label(h, w), centers, dst, turns, wrap=True)


@register_view
class InnerCircleView(_PieceView):
    """In each ``h x h`` square tile, a central disk of cells turned by a half turn; the rest stays.

    The disk holds the cells whose centres lie within ``radius * h / 2`` cells of the tile centre
    (``radius`` in (0, 1]; 1 touches the tile sides). On a square canvas the tile is the whole canvas.
    """

    name = "inner_circle"

    def __init__(self, *, radius: float = 0.75) -> None:
        radius = float(radius)
        if not 0.0 < radius <= 1.0:
            raise ConfigError(_FIELD, _format_spec(self.name, {"radius": radius}), "radius must be in (0, 1]")
        super().__init__(radius=radius)
        self.radius = radius

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        if latent_width % latent_height:
            raise ConfigError(
                _FIELD,
                self.spec,
                f"{self.name} works on square tiles as tall as the canvas, so the width must be a multiple "
                f"of the height, but the canvas is {_canvas_text(latent_height, latent_width)}",
            )
        if int(self._disk(latent_height).sum()) < 2:
            raise ConfigError(
                _FIELD,
                self.spec,
                f"radius={self.radius} leaves no disk to turn on a {latent_height}-cell tile",
            )

    def _disk(self, h: int) -> Tensor:
        centred = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
        dist2 = centred[:, None] ** 2 + centred[None, :] ** 2
        return dist2 <= (self.radius * h / 2) ** 2

    def _pieces(self, h: int, w: int) -> _Pieces:
        tiles, centers = _square_pieces(h, w, h, h)
        label = 2 * tiles + self._disk(h).repeat(1, w // h).long()
        centers = centers.repeat_interleave(2, 0)
        turns = torch.tensor([0, 2], dtype=torch.long).repeat(w // h)
        return _Pieces(label, centers, centers, turns)


@register_view
class SkewView(_IndexView):
    """Each latent column ``x`` shifted down (circularly) by ``round(factor * (x - w/2))`` cells.

    The default ``factor=0.125`` shifts the columns of a 32x128 latent by -8..+8 cells (-64..+64 px), a
    quarter of the height each way at the edges. Rounding is half up, so the shifts are the same
    everywhere; in pixels each 8-pixel column block moves by 8 times its column's shift.
    """

    name = "skew"

    def __init__(self, *, factor: float = 0.125) -> None:
        factor = float(factor)
        if not math.isfinite(factor):
            raise ConfigError(_FIELD, _format_spec(self.name, {"factor": factor}), "factor must be finite")
        super().__init__(factor=factor)
        self.factor = factor

    def check_canvas(self, latent_height: int, latent_width: int) -> None:
        super().check_canvas(latent_height, latent_width)
        if not bool(torch.remainder(self.shifts(latent_width), latent_height).any()):
            raise ConfigError(
                _FIELD,
                self.spec,
                f"factor={self.factor} moves no column of the canvas "
                f"{_canvas_text(latent_height, latent_width)}; use |factor| >= {1.0 / latent_width:.3g}",
            )

    def shifts(self, w: int) -> Tensor:
        """Downward shift in cells of each of the ``w`` latent columns, ``(w,)`` long."""
        x = torch.arange(w, dtype=torch.float64)
        return torch.floor(self.factor * (x - w / 2) + 0.5).long()

    def _source_with_shift(self, h: int, w: int, scale: int, fraction: float) -> Tensor:
        height, width = h * scale, w * scale
        per_column = self.shifts(w).repeat_interleave(scale) * scale
        if fraction != 1.0:
            per_column = torch.floor(per_column.double() * fraction + 0.5).long()
        rows, cols = _grid(height, width)
        return torch.remainder(rows - per_column[cols], height) * width + cols

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        return self._source_with_shift(h, w, scale, 1.0)

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        h, w = _latent_size_of_pixels(pixels, cell)
        self.check_canvas(h, w)
        # Each column slides gradually to its final shift.
        return _gather(pixels, self._source_with_shift(h, w, cell, t).to(pixels.device))


@register_view
class NegateView(View):
    """``x -> -x``: the colour negative (in [-1, 1]); orthogonal and its own inverse."""

    name = "negate"
    kind = PERMUTATION

    def view(self, x: Tensor) -> Tensor:
        return -x

    def inverse_view(self, x: Tensor) -> Tensor:
        return -x

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        return -pixels


# --------------------------------------------------------------------------------------------------
# Hybrid views (frequency bands)
# --------------------------------------------------------------------------------------------------


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable gaussian blur of every channel of ``(..., h, w)`` with ``sigma`` in cells/pixels.

    Kernel radius ``ceil(4 sigma)``; reflect padding, or replicate where a side is too short to
    reflect. Half-precision inputs are filtered in float32 and cast back.
    """
    if sigma <= 0:
        return x.clone()
    h, w = int(x.shape[-2]), int(x.shape[-1])
    radius = math.ceil(4 * sigma)
    work_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=work_dtype)
    y = x.reshape(-1, 1, h, w).to(work_dtype)
    y = torch.nn.functional.pad(y, (0, 0, radius, radius), mode="reflect" if radius < h else "replicate")
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, -1, 1))
    y = torch.nn.functional.pad(y, (radius, radius, 0, 0), mode="reflect" if radius < w else "replicate")
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, 1, -1))
    return y.reshape(x.shape).to(x.dtype)


class _HybridView(View):
    """A frequency band ``blur_lo(x) - blur_hi(x)`` (``blur_0`` = identity, ``blur_inf`` = 0).

    ``view`` is the identity: the image model sees the whole latent and only the band of its estimate
    is kept. Bands ``[0, s]``, ``[s, t]``, ``[t, inf]`` add up to the identity.

    What the part *shows* (``view_pixels``, and the sound of a part with its own audio prompt) is the picture
    seen from that part's distance, not the band itself (docs/METHOD.md §2): ``blur_lo(x)``, i.e. the full
    picture for the high-pass part (seen up close) and the blurred picture for the low-pass part (from afar).
    """

    kind = HYBRID

    @property
    @abstractmethod
    def band(self) -> tuple[float, float]:
        """``(lo, hi)`` blur sigmas in latent cells bounding the band (``0`` and ``inf`` allowed)."""

    def _band_of(self, x: Tensor, scale: float) -> Tensor:
        lo, hi = self.band
        fine = x if lo == 0 else gaussian_blur(x, lo * scale)
        if hi == math.inf:
            return fine.clone() if fine is x else fine
        return fine - gaussian_blur(x, hi * scale)

    def view(self, x: Tensor) -> Tensor:
        return x.clone()

    def inverse_view(self, x: Tensor) -> Tensor:
        _check_latent(x)
        return self._band_of(x, 1.0)

    def seen(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """The picture from this part's distance: ``blur_lo(x)`` (``scale``: pixels per latent cell)."""
        lo, _ = self.band
        return x.clone() if lo == 0 else gaussian_blur(x, lo * scale)

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        _latent_size_of_pixels(pixels, cell)
        return self.seen(pixels, float(cell))


def _check_sigma(name: str, params: dict[str, ParamValue], *keys: str) -> None:
    for key in keys:
        if not (math.isfinite(params[key]) and params[key] > 0):
            raise ConfigError(
                _FIELD, _format_spec(name, params), f"{key} must be a finite number > 0 (in latent cells)"
            )


class _OneSigmaHybrid(_HybridView):
    """A hybrid part split off at one gaussian ``sigma`` (latent cells)."""

    def __init__(self, *, sigma: float = 2.0) -> None:
        sigma = float(sigma)
        _check_sigma(self.name, {"sigma": sigma}, "sigma")
        super().__init__(sigma=sigma)
        self.sigma = sigma


@register_view
class LowPassView(_OneSigmaHybrid):
    """The coarse part: gaussian low-pass, ``sigma`` in latent cells (8x that in pixels)."""

    name = "low_pass"

    @property
    def band(self) -> tuple[float, float]:
        return (self.sigma, math.inf)

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        # Blur growing with t: the picture seen from further and further away.
        return gaussian_blur(pixels, t * self.sigma * cell)


@register_view
class HighPassView(_OneSigmaHybrid):
    """The fine part: ``x - low_pass(x)`` with the same ``sigma``; it shows the whole picture (up close)."""

    name = "high_pass"

    @property
    def band(self) -> tuple[float, float]:
        return (0.0, self.sigma)


@register_view
class BandPassView(_HybridView):
    """The middle part ``blur_sigma1(x) - blur_sigma2(x)`` for a three-way hybrid with
    ``high_pass(sigma=sigma1)`` and ``low_pass(sigma=sigma2)``."""

    name = "band_pass"

    def __init__(self, *, sigma1: float = 1.0, sigma2: float = 4.0) -> None:
        sigma1, sigma2 = float(sigma1), float(sigma2)
        params: dict[str, ParamValue] = {"sigma1": sigma1, "sigma2": sigma2}
        _check_sigma(self.name, params, "sigma1", "sigma2")
        if not sigma1 < sigma2:
            raise ConfigError(_FIELD, _format_spec(self.name, params), "sigma1 must be smaller than sigma2")
        super().__init__(**params)
        self.sigma1, self.sigma2 = sigma1, sigma2

    @property
    def band(self) -> tuple[float, float]:
        return (self.sigma1, self.sigma2)
