"""Hybrid views: frequency bands of the latent (low_pass, high_pass, band_pass) and the gaussian blur that
makes them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sounding_anagrams import viewspec
from sounding_anagrams.sampler.views.base import View, _check_latent, _latent_size_of_pixels, register_view
from sounding_anagrams.viewspec import LATENT_SCALE, ViewSpec


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
    # The ``(2 radius + 1,)`` kernel is made where x is, in float64: a kernel made on the host would need a
    # blocking copy at every call, inside the denoising step (a few tiny kernels queue without waiting).
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(work_dtype)
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

    @property
    def band(self) -> tuple[float, float]:
        """``(lo, hi)`` blur sigmas in latent cells bounding the band (``0`` and ``inf`` allowed).

        The spec's band, which the weight rules check the split with."""
        return self.view_spec.band

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


@register_view
class LowPassView(_HybridView):
    """The coarse part: gaussian low-pass, ``sigma`` in latent cells (8x that in pixels)."""

    entry = viewspec.LOW_PASS

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.sigma = float(spec["sigma"])

    def _animate(self, pixels: Tensor, t: float, cell: int) -> Tensor:
        # Blur growing with t: the picture seen from further and further away.
        return gaussian_blur(pixels, t * self.sigma * cell)


@register_view
class HighPassView(_HybridView):
    """The fine part: ``x - low_pass(x)`` with the same ``sigma``; it shows the whole picture (up close)."""

    entry = viewspec.HIGH_PASS

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.sigma = float(spec["sigma"])


@register_view
class BandPassView(_HybridView):
    """The middle part ``blur_sigma1(x) - blur_sigma2(x)`` for a three-way hybrid with
    ``high_pass(sigma=sigma1)`` and ``low_pass(sigma=sigma2)``."""

    entry = viewspec.BAND_PASS

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.sigma1, self.sigma2 = float(spec["sigma1"]), float(spec["sigma2"])
