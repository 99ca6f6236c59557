"""Permutation views that move single cells or flip signs: identity, flip, mirror, skew and negate."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sounding_anagrams import viewspec
from sounding_anagrams.sampler.views.base import (
    View,
    _gather,
    _grid,
    _IndexView,
    _latent_size_of_pixels,
    register_view,
)
from sounding_anagrams.viewspec import LATENT_SCALE, ViewSpec, skew_shifts


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


@register_view
class IdentityView(View):
    """The picture as it is."""

    entry = viewspec.IDENTITY

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

    entry = viewspec.FLIP

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        rows, cols = _grid(h * scale, w * scale)
        return (h * scale - 1 - rows) * (w * scale) + cols

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        return _squash(pixels, t, pixels.dim() - 2)


@register_view
class MirrorView(_IndexView):
    """Left-right flip (the spectrogram played backwards)."""

    entry = viewspec.MIRROR

    def _build_source(self, h: int, w: int, scale: int) -> Tensor:
        rows, cols = _grid(h * scale, w * scale)
        return rows * (w * scale) + (w * scale - 1 - cols)

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        return _squash(pixels, t, pixels.dim() - 1)


@register_view
class SkewView(_IndexView):
    """Each latent column ``x`` shifted down (circularly) by ``round(factor * (x - w/2))`` cells.

    The default ``factor=0.125`` shifts the columns of a 32x128 latent by -8..+8 cells (-64..+64 px), a
    quarter of the height each way at the edges. Rounding is half up, so the shifts are the same
    everywhere; in pixels each 8-pixel column block moves by 8 times its column's shift.
    """

    entry = viewspec.SKEW

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.factor = float(spec["factor"])

    def shifts(self, w: int) -> Tensor:
        """Downward shift in cells of each of the ``w`` latent columns, ``(w,)`` long."""
        # The spec's formula: the canvas check (no column moved?) and the view cannot disagree.
        return torch.tensor(skew_shifts(self.factor, w), dtype=torch.long)

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

    entry = viewspec.NEGATE

    def view(self, x: Tensor) -> Tensor:
        return -x

    def inverse_view(self, x: Tensor) -> Tensor:
        return -x

    def view_pixels(self, pixels: Tensor, *, cell: int = LATENT_SCALE) -> Tensor:
        return -pixels
