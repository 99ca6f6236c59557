"""Permutation views made of rigid pieces (translated and turned by quarter turns): whole-canvas and tile
rotations, patch_permute, jigsaw and inner_circle."""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sounding_anagrams import viewspec
from sounding_anagrams.sampler.views.base import _grid, _IndexView, _latent_size_of_pixels, register_view
from sounding_anagrams.viewspec import ViewSpec, inner_circle_disk


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

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
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
        motion = self._motion_cache.get(key)
        if motion is None:
            pieces, piece, rel = self._geometry(h, w, cell, torch.float32)
            motion = (pieces, piece.to(pixels.device), rel.to(pixels.device))
            # Replaced whole, never mutated: a view is shared, and another thread may be animating with it.
            self._motion_cache = {key: motion}
        pieces, piece, rel = motion
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


# --------------------------------------------------------------------------------------------------
# Turns of the whole canvas and of its square tiles (the canvas rules are the spec's)
# --------------------------------------------------------------------------------------------------


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

    entry = viewspec.ROTATE_180
    _turns = 2


@register_view
class RotateCWView(_WholeCanvasTurn):
    """The whole (square) canvas turned a quarter turn clockwise."""

    entry = viewspec.ROTATE_CW
    _turns = 1


@register_view
class RotateCCWView(_WholeCanvasTurn):
    """The whole (square) canvas turned a quarter turn counter-clockwise."""

    entry = viewspec.ROTATE_CCW
    _turns = -1


class _TileTurn(_PieceView):
    """Each ``h x h`` square tile turned in place by ``_turns`` quarter turns clockwise."""

    _turns: ClassVar[int]

    def _pieces(self, h: int, w: int) -> _Pieces:
        label, centers = _square_pieces(h, w, h, h)
        turns = torch.full((w // h,), self._turns, dtype=torch.long)
        return _Pieces(label, centers, centers, turns)


@register_view
class TileRotateCWView(_TileTurn):
    """Each square tile (``h x h`` cells, 256x256 px on a 256x1024 canvas) turned clockwise in place."""

    entry = viewspec.TILE_ROTATE_CW
    _turns = 1


@register_view
class TileRotateCCWView(_TileTurn):
    """Each square tile turned counter-clockwise in place."""

    entry = viewspec.TILE_ROTATE_CCW
    _turns = -1


# --------------------------------------------------------------------------------------------------
# Shuffles and the inner circle
# --------------------------------------------------------------------------------------------------


@register_view
class PatchPermuteView(_PieceView):
    """A seeded shuffle of ``patch x patch``-cell square patches (8 cells = 64 px: a 4x16 grid on 32x128).

    The permutation comes from ``torch.randperm`` with a CPU ``torch.Generator`` seeded with ``seed``; it
    is redrawn (from the same generator) while it is the identity.
    """

    entry = viewspec.PATCH_PERMUTE

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.patch, self.seed = int(spec["patch"]), int(spec["seed"])

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

    entry = viewspec.JIGSAW

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.piece, self.seed, self.rotate = int(spec["piece"]), int(spec["seed"]), int(spec["rotate"])

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

    entry = viewspec.INNER_CIRCLE

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__(spec)
        self.radius = float(spec["radius"])

    def _disk(self, h: int) -> Tensor:
        # The spec's disk: the canvas check (a disk of at least 2 cells) counts the same cells.
        return torch.tensor(inner_circle_disk(self.radius, h), dtype=torch.bool)

    def _pieces(self, h: int, w: int) -> _Pieces:
        tiles, centers = _square_pieces(h, w, h, h)
        label = 2 * tiles + self._disk(h).repeat(1, w // h).long()
        centers = centers.repeat_interleave(2, 0)
        turns = torch.tensor([0, 2], dtype=torch.long).repeat(w // h)
        return _Pieces(label, centers, centers, turns)
