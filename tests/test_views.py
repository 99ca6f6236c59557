"""Tests of the views (sounding_anagrams.sampler.views): invertibility, adjoints, the 8x pixel mapping,
animations, spec strings, weight rules and error messages. CPU only, fast."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.sampler.views import (
    HYBRID,
    PERMUTATION,
    VIEW_REGISTRY,
    View,
    available_views,
    build_views,
    check_view_weights,
    default_view_weights,
    gaussian_blur,
    parse_view,
    parse_view_spec,
    register_view,
)
from sounding_anagrams.sampler.views.hybrids import _HybridView
from sounding_anagrams.viewspec import VIEW_ENTRIES, ViewEntry

CANVASES = [(32, 128), (32, 32), (64, 64)]
CANVAS_IDS = [f"{h}x{w}" for h, w in CANVASES]
VIEW_NAMES = available_views()


def up8(z: torch.Tensor) -> torch.Tensor:
    return F.interpolate(z, scale_factor=8, mode="nearest")


def latent(
    h: int, w: int, *, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=generator).to(dtype)


def smooth_picture(h: int, w: int, *, seed: int = 0) -> torch.Tensor:
    """A smooth picture ``(1, 3, 8h, 8w)`` in [-1, 1]: small motions change it little."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, h // 4, w // 4, generator=generator)
    return F.interpolate(coarse, scale_factor=32, mode="bilinear", align_corners=False).clamp(-1, 1)


def view_on(name: str, h: int, w: int) -> View:
    """The default view ``name``, or skip where it declares the canvas unsupported (after checking that
    using it there raises the same ConfigError rather than cropping silently)."""
    view = parse_view(name)
    try:
        view.check_canvas(h, w)
    except ConfigError as err:
        assert err.field == "views"
        if view.kind == PERMUTATION:
            with pytest.raises(ConfigError):
                view.view(latent(h, w))
        pytest.skip(f"{name} does not support {h}x{w}: {err}")
    return view


grid = pytest.mark.parametrize(("h", "w"), CANVASES, ids=CANVAS_IDS)
each_view = pytest.mark.parametrize("name", VIEW_NAMES)


# ---------------------------------------------------------------------------------------------------
# Properties of every registered view on every canvas
# ---------------------------------------------------------------------------------------------------


def test_registry_has_the_views_the_method_needs() -> None:
    required = {
        "identity",
        "flip",
        "mirror",
        "rotate_180",
        "rotate_cw",
        "rotate_ccw",
        "tile_rotate_cw",
        "tile_rotate_ccw",
        "patch_permute",
        "skew",
        "negate",
        "jigsaw",
        "low_pass",
        "high_pass",
    }
    assert required <= set(VIEW_NAMES)
    assert sorted(VIEW_NAMES) == VIEW_NAMES
    for name in VIEW_NAMES:
        assert VIEW_REGISTRY[name].kind in (PERMUTATION, HYBRID)


@each_view
@grid
def test_only_whole_canvas_quarter_turns_need_a_square(name: str, h: int, w: int) -> None:
    view = parse_view(name)
    if name in ("rotate_cw", "rotate_ccw") and h != w:
        with pytest.raises(ConfigError):
            view.check_canvas(h, w)
    else:
        view.check_canvas(h, w)


@each_view
@grid
def test_inverse_views(name: str, h: int, w: int) -> None:
    """Permutation views: exact inverse, and the inverse is the adjoint (what the sampler relies on).
    Hybrid views: ``view`` is the identity and the band with its complementary bands adds up to the latent."""
    view = view_on(name, h, w)
    x = latent(h, w, seed=1)
    if view.kind == PERMUTATION:
        assert torch.equal(view.inverse_view(view.view(x)), x)
        assert torch.equal(view.view(view.inverse_view(x)), x)
        a, b = latent(h, w, seed=2).double(), latent(h, w, seed=3).double()
        lhs = (view.view(a) * b).sum()
        rhs = (a * view.inverse_view(b)).sum()
        assert torch.allclose(lhs, rhs, atol=1e-4, rtol=0)
        assert torch.allclose(view.view(a).norm(), a.norm())  # orthogonal: lengths are kept
    else:
        assert torch.equal(view.view(x), x)
        lo, hi = view.band  # type: ignore[attr-defined]
        parts = [view]
        if lo > 0:
            parts.append(parse_view(f"high_pass(sigma={lo})"))
        if hi < math.inf:
            parts.append(parse_view(f"low_pass(sigma={hi})"))
        check_view_weights(parts, [1.0] * len(parts))
        total = sum((p.inverse_view(x) for p in parts), torch.zeros_like(x))
        assert torch.allclose(total, x, atol=1e-5)


@grid
def test_hybrid_splits(h: int, w: int) -> None:
    x = latent(h, w, seed=4)
    low, high = parse_view("low_pass(sigma=2.0)"), parse_view("high_pass(sigma=2.0)")
    assert torch.allclose(low.inverse_view(x) + high.inverse_view(x), x, atol=1e-5)
    specs = ("high_pass(sigma=1.0)", "band_pass(sigma1=1.0,sigma2=4.0)", "low_pass(sigma=4)")
    total = sum((parse_view(s).inverse_view(x) for s in specs), torch.zeros_like(x))
    assert torch.allclose(total, x, atol=1e-5)


def test_hybrid_parts_show_the_picture_up_close_and_from_afar() -> None:
    # The seed and Visual Anagrams show the high-pass part as the whole decoded picture (seen up close) and
    # the low-pass part as the blurred picture (seen from afar), never the gray residual x - blur(x).
    pixels = smooth_picture(32, 128, seed=12)
    high, low = parse_view("high_pass(sigma=2.0)"), parse_view("low_pass(sigma=2.0)")
    middle = parse_view("band_pass(sigma1=1.0,sigma2=4.0)")
    assert torch.equal(high.view_pixels(pixels), pixels)
    assert torch.allclose(low.view_pixels(pixels), gaussian_blur(pixels, 16.0))
    assert torch.allclose(middle.view_pixels(pixels), gaussian_blur(pixels, 8.0))
    # Not a residual round mid gray: the full picture keeps its brightness and its contrast.
    residual = pixels - gaussian_blur(pixels, 16.0)
    assert high.view_pixels(pixels).std() > 2 * residual.std()
    assert low.view_pixels(pixels).mean() == pytest.approx(float(pixels.mean()), abs=1e-2)


@grid
def test_low_pass_removes_fine_detail_and_keeps_the_mean(h: int, w: int) -> None:
    x = latent(h, w, seed=5)
    low = parse_view("low_pass").inverse_view(x)
    high = parse_view("high_pass").inverse_view(x)

    def fine_energy(t: torch.Tensor) -> float:
        return float((t.diff(dim=-1) ** 2).mean() + (t.diff(dim=-2) ** 2).mean())

    assert fine_energy(low) < 0.05 * fine_energy(x)
    assert fine_energy(high) > 0.8 * fine_energy(x)
    assert torch.allclose(low.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=0.1)
    constant = torch.full((1, 4, h, w), 0.7)
    assert torch.allclose(parse_view("low_pass").inverse_view(constant), constant, atol=1e-5)
    assert parse_view("high_pass").inverse_view(constant).abs().max() < 1e-5


@each_view
@grid
def test_pixels_match_latent_at_8x(name: str, h: int, w: int) -> None:
    view = view_on(name, h, w)
    z = latent(h, w, batch=1, seed=6)
    if view.kind == PERMUTATION:
        assert torch.equal(view.view_pixels(up8(z)), up8(view.view(z)))
    else:
        # A blur of the blocky picture is close to, not equal to, the blocky picture of the blurred latent.
        shown = F.avg_pool2d(view.view_pixels(up8(z)), 8)
        seen = view.seen(z)  # type: ignore[attr-defined]
        assert (shown - seen).norm() < 0.35 * seen.norm()


@each_view
@grid
def test_a_view_at_half_size_is_the_half_size_of_the_view(name: str, h: int, w: int) -> None:
    """Clips are made at their output size (``cell=4`` pixels per latent cell): downscaling first and then
    moving the pieces gives what moving them at full size and downscaling gives."""
    view = view_on(name, h, w)
    pixels = smooth_picture(h, w, seed=9)
    small = F.avg_pool2d(pixels, 2)
    at_half = view.view_pixels(small, cell=4)
    halved = F.avg_pool2d(view.view_pixels(pixels), 2)
    if view.kind == PERMUTATION:
        assert torch.allclose(at_half, halved, atol=1e-5)
    else:  # a blur of sigma*4 at half size is close to the halved blur of sigma*8
        assert (at_half - halved).norm() < 0.05 * halved.norm()
    frame = view.animate_pixels(small, 0.5, cell=4)
    assert frame.shape == small.shape and bool(torch.isfinite(frame).all())
    assert torch.allclose(view.animate_pixels(small, 1.0, cell=4), at_half)


@each_view
@grid
def test_every_channel_changes(name: str, h: int, w: int) -> None:
    view = view_on(name, h, w)
    x = latent(h, w, seed=7)
    out = view.view(x) if view.kind == PERMUTATION else view.inverse_view(x)
    pixels = up8(x[:, :3])
    shown = view.view_pixels(pixels)
    for channel in range(4):
        changed = not torch.equal(out[:, channel], x[:, channel])
        assert changed == (name != "identity"), f"channel {channel}"
    for channel in range(3):
        # The high-pass part of a hybrid is seen up close: its picture is the whole picture.
        assert (not torch.equal(shown[:, channel], pixels[:, channel])) == (
            name not in ("identity", "high_pass")
        )


@each_view
@grid
def test_animation_runs_from_the_picture_to_the_view(name: str, h: int, w: int) -> None:
    view = view_on(name, h, w)
    pixels = smooth_picture(h, w, seed=8)
    target = view.view_pixels(pixels)
    first, last = view.animate_pixels(pixels, 0.0), view.animate_pixels(pixels, 1.0)
    assert torch.allclose(first, pixels, atol=1e-5)
    assert torch.allclose(last, target, atol=1e-5)
    # Continuous at both ends, with the view's own motion (turns, slides, squashes, blur).
    assert (view.animate_pixels(pixels, 0.001) - pixels).abs().mean() < 0.05
    assert (view.animate_pixels(pixels, 0.999) - target).abs().mean() < 0.05
    middle = view.animate_pixels(pixels, 0.5)
    assert middle.shape == pixels.shape and middle.dtype == pixels.dtype
    assert bool(torch.isfinite(middle).all())
    if view.kind == PERMUTATION:  # frames are made of the picture's own values (and gray)
        assert middle.abs().max() <= 1.0
    with pytest.raises(ConfigError):
        view.animate_pixels(pixels, 1.5)


@each_view
def test_spec_round_trip(name: str) -> None:
    view = parse_view(name)
    assert parse_view(view.spec) == view
    assert parse_view(view.spec).spec == view.spec
    assert hash(parse_view(view.spec)) == hash(view)
    spaced = view.spec.replace("(", " ( ").replace(",", " , ").replace("=", " = ")
    assert parse_view(f"  {spaced}  ") == view
    assert parse_view(view) is view


def test_spec_with_parameters() -> None:
    view = parse_view("patch_permute( patch = 4 , seed = 3 )")
    assert view.spec == "patch_permute(patch=4,seed=3)"
    assert view != parse_view("patch_permute(patch=4,seed=4)")
    assert parse_view("patch_permute(seed=0)") == parse_view("patch_permute")
    assert parse_view("low_pass(sigma=3)").spec == "low_pass(sigma=3.0)"
    assert parse_view("skew(factor=-0.25)").spec == "skew(factor=-0.25)"
    assert parse_view("identity()").spec == "identity"


@each_view
@grid
def test_half_precision_and_no_mutation(name: str, h: int, w: int) -> None:
    view = view_on(name, h, w)
    x = latent(h, w, seed=9, dtype=torch.float16)
    keep = x.clone()
    y, back = view.view(x), view.inverse_view(x)
    assert torch.equal(x, keep)
    assert y.dtype == back.dtype == torch.float16 and y.shape == x.shape
    reference = view.view(x.float()) if view.kind == PERMUTATION else view.inverse_view(x.float())
    got = y if view.kind == PERMUTATION else back
    if view.kind == PERMUTATION:
        assert torch.equal(got, reference.half())
    else:
        assert torch.allclose(got.float(), reference, atol=2e-2)
    pixels = smooth_picture(h, w, seed=10).half()
    keep_pixels = pixels.clone()
    assert view.view_pixels(pixels).dtype == torch.float16
    assert view.animate_pixels(pixels, 0.4).dtype == torch.float16
    assert torch.equal(pixels, keep_pixels)
    # The output never aliases the input.
    y.add_(1)
    assert torch.equal(x, keep)


@pytest.mark.parametrize("name", ["tile_rotate_cw", "patch_permute", "jigsaw", "skew", "low_pass", "negate"])
def test_any_leading_batch_shape(name: str) -> None:
    view = parse_view(name)
    x = torch.randn(3, 2, 4, 32, 128)
    out = view.view(x) if view.kind == PERMUTATION else view.inverse_view(x)
    single = view.view(x[1, 0]) if view.kind == PERMUTATION else view.inverse_view(x[1, 0])
    assert out.shape == x.shape
    assert torch.allclose(out[1, 0], single, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", VIEW_NAMES)
def test_cuda_matches_cpu(name: str) -> None:
    view = view_on(name, 32, 32)
    x = latent(32, 32, seed=11)
    for method in (view.view, view.inverse_view):
        assert torch.allclose(method(x.cuda()).cpu(), method(x), atol=1e-5)
    pixels = smooth_picture(32, 32)
    assert torch.allclose(view.view_pixels(pixels.cuda()).cpu(), view.view_pixels(pixels), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# What each view does to a printout
# ---------------------------------------------------------------------------------------------------


def test_pixel_transforms_are_the_familiar_ones() -> None:
    square = smooth_picture(32, 32, seed=12)
    wide = smooth_picture(32, 128, seed=13)
    assert torch.equal(parse_view("flip").view_pixels(wide), wide.flip(-2))
    assert torch.equal(parse_view("mirror").view_pixels(wide), wide.flip(-1))
    assert torch.equal(parse_view("rotate_180").view_pixels(wide), wide.rot90(2, dims=(-2, -1)))
    assert torch.equal(parse_view("rotate_cw").view_pixels(square), square.rot90(-1, dims=(-2, -1)))
    assert torch.equal(parse_view("rotate_ccw").view_pixels(square), square.rot90(1, dims=(-2, -1)))
    assert torch.equal(parse_view("negate").view_pixels(wide), -wide)
    tiles = wide.split(256, dim=-1)
    cw = torch.cat([tile.rot90(-1, dims=(-2, -1)) for tile in tiles], dim=-1)
    ccw = torch.cat([tile.rot90(1, dims=(-2, -1)) for tile in tiles], dim=-1)
    assert torch.equal(parse_view("tile_rotate_cw").view_pixels(wide), cw)
    assert torch.equal(parse_view("tile_rotate_ccw").view_pixels(wide), ccw)
    # On a square canvas a tile is the whole canvas.
    x = latent(32, 32)
    assert torch.equal(parse_view("tile_rotate_cw").view(x), parse_view("rotate_cw").view(x))


def test_skew_shifts_whole_columns() -> None:
    view = parse_view("skew")
    x = latent(32, 128, batch=1)
    out = view.view(x)
    shifts = view.shifts(128)  # type: ignore[attr-defined]
    assert shifts.tolist()[0] == -8 and shifts.tolist()[-1] == 8
    for column in (0, 5, 64, 127):
        assert torch.equal(out[..., column], x[..., column].roll(int(shifts[column]), dims=-1))


def test_inner_circle_turns_only_the_disk() -> None:
    view = parse_view("inner_circle(radius=0.5)")
    x = latent(32, 32, batch=1)
    changed = (view.view(x) != x).any(dim=1)[0]
    assert not changed[0].any() and not changed[:, 0].any()  # the border stays
    assert changed[16, 16]


def test_patch_permute_is_seeded_and_never_the_identity() -> None:
    a, b = parse_view("patch_permute(seed=0)"), parse_view("patch_permute(seed=0)")
    c = parse_view("patch_permute(seed=1)")
    perm_a = a.permutation(32, 128)  # type: ignore[attr-defined]
    assert perm_a.shape == (64,)
    assert torch.equal(perm_a, b.permutation(32, 128))  # type: ignore[attr-defined]
    assert not torch.equal(perm_a, c.permutation(32, 128))  # type: ignore[attr-defined]
    x = latent(32, 128)
    assert torch.equal(a.view(x), b.view(x)) and not torch.equal(a.view(x), c.view(x))
    # Even a two-patch grid is shuffled.
    for seed in range(8):
        two = parse_view(f"patch_permute(patch=32,seed={seed})")
        assert two.permutation(32, 64).tolist() == [1, 0]  # type: ignore[attr-defined]
    # Whole patches move: each 8x8-cell patch of the output is a patch of the input.
    out = a.view(x)
    patches_in = x.unfold(-2, 8, 8).unfold(-2, 8, 8).reshape(2, 4, 64, 64)
    patches_out = out.unfold(-2, 8, 8).unfold(-2, 8, 8).reshape(2, 4, 64, 64)
    assert torch.equal(patches_out, patches_in[:, :, perm_a])


def test_jigsaw_is_seeded_and_pieces_keep_their_size() -> None:
    view = parse_view("jigsaw")
    perm, turns = view.arrangement(32, 128)  # type: ignore[attr-defined]
    perm2, turns2 = parse_view("jigsaw(seed=0)").arrangement(32, 128)  # type: ignore[attr-defined]
    assert torch.equal(perm, perm2) and torch.equal(turns, turns2)
    assert set(turns.tolist()) <= {-1, 0, 1, 2}
    label = view._label(32, 128)  # type: ignore[attr-defined]
    assert torch.bincount(label.flatten()).tolist() == [64] * 64
    no_turns = parse_view("jigsaw(rotate=0)")
    assert not no_turns.arrangement(32, 128)[1].any()  # type: ignore[attr-defined]


def test_gaussian_blur_falls_back_on_tiny_canvases() -> None:
    x = torch.randn(1, 4, 4, 6)
    out = gaussian_blur(x, 2.0)  # radius 8 exceeds both sides: replicate padding
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    low, high = parse_view("low_pass"), parse_view("high_pass")
    assert torch.allclose(low.inverse_view(x) + high.inverse_view(x), x, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Errors the user sees
# ---------------------------------------------------------------------------------------------------


def test_unknown_view_suggests_a_name() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown view 'rotat'; did you mean 'rotate_[a-z0-9]+'\? available: "
    ) as err:
        parse_view("rotat")
    assert err.value.field == "views"
    with pytest.raises(ConfigError, match="did you mean 'patch_permute'"):
        parse_view("patch_permut(patch=8)")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (
            "patch_permute(size=8)",
            r"patch_permute has no parameter 'size'.*allowed parameters.*patch=8, seed=0",
        ),
        ("patch_permute(seeed=1)", r"did you mean 'seed'"),
        ("identity(x=1)", r"identity has no parameter 'x'.*none"),
        ("patch_permute(patch=abc)", r"patch='abc' must be an integer"),
        ("patch_permute(patch=8.5)", r"patch='8.5' must be an integer"),
        ("low_pass(sigma=nan)", r"sigma='nan' must be a finite number"),
        ("low_pass(sigma=-1)", r"sigma must be a finite number > 0"),
        ("low_pass(sigma=inf)", r"sigma=.inf. must be a finite number"),
        ("band_pass(sigma1=4,sigma2=1)", r"sigma1 must be smaller than sigma2"),
        ("patch_permute(patch=0)", r"patch must be >= 1"),
        ("jigsaw(rotate=2)", r"rotate must be 0"),
        ("inner_circle(radius=2.0)", r"radius must be in \(0, 1\]"),
        ("patch_permute(patch=8,patch=4)", r"given twice"),
        ("patch_permute(8)", r"is not key=value"),
        ("flip(", r"name\(key=value"),
        ("", r"a view is written as"),
    ],
)
def test_bad_specs(spec: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_view(spec)
    with pytest.raises(ConfigError, match=pattern):
        parse_view_spec(spec)


def test_quarter_turn_on_a_wide_canvas_points_to_tile_rotation() -> None:
    with pytest.raises(
        ConfigError,
        match=r"rotate_cw turns the whole canvas and needs a square canvas, but the canvas is 256x1024 pixels"
        r".*use tile_rotate_cw to turn each 256x256 tile in place",
    ):
        parse_view("rotate_cw").check_canvas(32, 128)
    with pytest.raises(ConfigError, match="tile_rotate_ccw"):
        parse_view("rotate_ccw").view(latent(32, 128))
    with pytest.raises(ConfigError, match="rotate_cw"):
        parse_view("rotate_cw").view_pixels(torch.zeros(1, 3, 256, 1024))


def test_patch_that_does_not_divide_the_canvas() -> None:
    with pytest.raises(
        ConfigError, match=r"patch=12 cells \(96 px\) must divide.*256x1024 pixels.*fit: 1, 2, 4"
    ):
        parse_view("patch_permute(patch=12)").check_canvas(32, 128)
    with pytest.raises(ConfigError, match="patch=12"):
        parse_view("patch_permute(patch=12)").view(latent(32, 128))
    with pytest.raises(ConfigError, match="piece=12"):
        parse_view("jigsaw(piece=12)").check_canvas(32, 32)
    with pytest.raises(ConfigError, match="width must be a multiple of the height"):
        parse_view("tile_rotate_cw").check_canvas(32, 80)
    with pytest.raises(ConfigError, match="moves no column"):
        parse_view("skew(factor=0.001)").check_canvas(32, 32)
    with pytest.raises(ConfigError, match="multiples of 8 pixels"):
        parse_view("flip").view_pixels(torch.zeros(1, 3, 250, 1024))


def views(*specs: str) -> list[View]:
    return [parse_view(spec) for spec in specs]


def test_weight_rules_accept_the_method_settings() -> None:
    check_view_weights(views("identity", "patch_permute"), [0.4, 0.6])
    check_view_weights(views("identity", "tile_rotate_cw"), (0.3, 0.7))
    check_view_weights(
        views("identity", "flip", "mirror"), default_view_weights(views("identity", "flip", "mirror"))
    )
    check_view_weights(views("low_pass", "high_pass"), [1, 1])
    check_view_weights(views("high_pass(sigma=3)", "low_pass(sigma=3)"), [1.0, 1.0])
    check_view_weights(
        views("low_pass(sigma=4)", "band_pass(sigma1=1,sigma2=4)", "high_pass(sigma=1)"), [1, 1, 1]
    )
    assert default_view_weights(views("identity", "flip")) == (0.5, 0.5)
    assert default_view_weights(views("low_pass", "high_pass")) == (1.0, 1.0)
    assert math.isclose(sum(default_view_weights(views("identity", "flip", "negate"))), 1.0)


@pytest.mark.parametrize(
    ("specs", "weights", "pattern"),
    [
        (("identity", "flip"), [1.0], r"view_weights=\[1.0\]: 1 weights for 2 views \(identity, flip\)"),
        (("identity", "flip"), [0.5, 0.5, 0.0], r"3 weights for 2 views"),
        (("identity", "flip"), [0.5, 0.6], r"view_weights=\[0.5, 0.6\]: .*must sum to 1, they sum to 1.1"),
        (("identity", "flip"), [1.2, -0.2], r"view_weights=\[1.2, -0.2\]: every weight must be .*>= 0"),
        (("identity", "flip"), [0.5, float("nan")], r"finite"),
        (
            ("low_pass", "high_pass"),
            [0.5, 0.5],
            r"view_weights=\[0.5, 0.5\]: each hybrid view's weight must be exactly 1",
        ),
        (("low_pass", "high_pass(sigma=3)"), [1, 1], r"views=.*must split the latent into bands"),
        (("low_pass",), [1], r"must split the latent"),
        (("high_pass", "high_pass"), [1, 1], r"must split the latent"),
        (
            ("low_pass", "flip"),
            [1, 1],
            r"views=\['low_pass\(sigma=2.0\)', 'flip'\]: hybrid views .* cannot be mixed",
        ),
        ((), [], r"at least one view"),
    ],
)
def test_weight_rules_reject(specs: tuple[str, ...], weights: list[float], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        check_view_weights(views(*specs), weights)


def test_weight_errors_name_the_given_field() -> None:
    with pytest.raises(ConfigError, match=r"^trainer.anagram_balance_weight=\[0.2, 0.2\]: "):
        check_view_weights(views("identity", "flip"), [0.2, 0.2], field="trainer.anagram_balance_weight")
    with pytest.raises(ConfigError, match="cannot be mixed"):
        default_view_weights(views("negate", "high_pass"))


def test_register_view_rejects_a_taken_name() -> None:
    class Another(View):
        entry = VIEW_ENTRIES["flip"]

        def view(self, x: torch.Tensor) -> torch.Tensor:
            return x.flip(-2)

        def inverse_view(self, x: torch.Tensor) -> torch.Tensor:
            return x.flip(-2)

        def view_pixels(self, pixels: torch.Tensor, *, cell: int = 8) -> torch.Tensor:
            return pixels.flip(-2)

    with pytest.raises(TypeError, match="already registered"):
        register_view(Another)
    assert VIEW_REGISTRY["flip"] is not Another
    assert Another.name == "flip" and Another.kind == PERMUTATION


def test_register_view_needs_an_entry_of_the_spec() -> None:
    class Unspecified(View):
        entry = ViewEntry("unspecified", PERMUTATION)

        def view(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        def inverse_view(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        def view_pixels(self, pixels: torch.Tensor, *, cell: int = 8) -> torch.Tensor:
            return pixels.clone()

    with pytest.raises(TypeError, match=r"must be an entry of sounding_anagrams\.viewspec"):
        register_view(Unspecified)
    assert "unspecified" not in VIEW_REGISTRY


def test_every_spec_has_exactly_one_implementation() -> None:
    """The spec (names, kinds, parameters) and the implementations cannot drift apart."""
    assert set(VIEW_REGISTRY) == set(VIEW_ENTRIES)
    for name, cls in VIEW_REGISTRY.items():
        assert cls.entry is VIEW_ENTRIES[name]
        assert (cls.name, cls.kind) == (name, VIEW_ENTRIES[name].kind)
        assert issubclass(cls, _HybridView) == (cls.kind == HYBRID), name

    def concrete(cls: type[View]) -> list[type[View]]:
        below = [c for sub in cls.__subclasses__() for c in concrete(sub)]
        return [cls, *below] if "entry" in vars(cls) else below

    below_view = [c for sub in View.__subclasses__() for c in concrete(sub)]
    implementations = [cls for cls in below_view if cls.__module__.startswith("sounding_anagrams.")]
    assert sorted(cls.name for cls in implementations) == sorted(VIEW_ENTRIES)


@each_view
def test_views_are_built_once_per_spec(name: str) -> None:
    spec = parse_view_spec(name)
    view = build_views([spec])[0]
    assert view.view_spec == spec and view.spec == spec.spec and view.kind == spec.kind
    assert build_views([spec.spec, f" {spec.spec} "]) == (view, view)
    assert build_views([spec])[0] is view and parse_view(spec.spec) is view
    if spec.kind == HYBRID:
        assert view.band == spec.band  # type: ignore[attr-defined]


def test_spec_checks_need_no_torch() -> None:
    """The config checks views with the spec module alone: it imports neither torch nor the sampler."""
    probe = (
        "import sys\n"
        "from sounding_anagrams.viewspec import parse_view_spec\n"
        "from sounding_anagrams.config import RenderConfig\n"
        "parse_view_spec('jigsaw(seed=3)').check_canvas(32, 128)\n"
        "RenderConfig(views=('identity', 'skew'), image_prompts=('a', 'b'))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sounding_anagrams.sampler')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
