"""Views: the transforms under which one latent shows a second picture.

A view ``v`` acts on a Stable Diffusion latent ``z`` of shape ``(B, C, h, w)``. Each denoising step the
image model sees ``v(z)`` and its noise estimate is brought back with ``v.inverse_view``. One latent
cell covers an 8x8 pixel block of the decoded picture (``H = 8h``, ``W = 8w``), so every permutation
view here moves whole cells, and ``view_pixels`` applies the same transform at 8x scale to a decoded
picture: what a user does to a printout (turn it, flip it, cut and reorder it).

What a view is called, its parameters, its kind (permutation or hybrid) and the weight rules are the spec's
(:mod:`sounding_anagrams.viewspec`, no torch); this package implements the transforms, one module per family:

- :mod:`.base`: the :class:`View` base class, the registry, :func:`build_views` (specs -> views, cached)
  and the index helpers of the permutation views;
- :mod:`.permutations`: identity, flip, mirror, skew, negate;
- :mod:`.pieces`: rigid pieces: rotate_180/cw/ccw, tile_rotate_cw/ccw, patch_permute, jigsaw, inner_circle;
- :mod:`.hybrids`: low_pass, high_pass, band_pass and :func:`gaussian_blur`.

Views are written as spec strings, ``"name"`` or ``"name(key=value,...)"``; :func:`parse_view` builds one
and :attr:`View.spec` writes the canonical form back. A new view is declared in the spec module and
implemented here with :func:`register_view`.
"""

from __future__ import annotations

# The family modules register their views on import.
from sounding_anagrams.sampler.views import hybrids, permutations, pieces  # noqa: F401
from sounding_anagrams.sampler.views.base import (
    VIEW_REGISTRY,
    View,
    build_view,
    build_views,
    parse_view,
    register_view,
)
from sounding_anagrams.sampler.views.hybrids import gaussian_blur
from sounding_anagrams.viewspec import (
    HYBRID,
    LATENT_SCALE,
    PERMUTATION,
    ViewSpec,
    available_views,
    check_view_weights,
    default_view_weights,
    parse_view_spec,
)

__all__ = [
    "HYBRID",
    "LATENT_SCALE",
    "PERMUTATION",
    "VIEW_REGISTRY",
    "View",
    "ViewSpec",
    "available_views",
    "build_view",
    "build_views",
    "check_view_weights",
    "default_view_weights",
    "gaussian_blur",
    "parse_view",
    "parse_view_spec",
    "register_view",
]
