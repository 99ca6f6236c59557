"""The transition clip of a candidate: view 0 turning into view 1 and back, encoded as H.264 MP4, with the
candidate's sound as its AAC audio track (the clip then lasts as long as the sound: one artifact a person
watches turn while hearing it).

Frames are made at the clip's size (the canvas downscaled first, then the view's pieces moved at that scale),
and only for trials that complete. MP4 replaced the GIF: on the tiny models' 512x128 clip it is about 18x
smaller (139 kB against 2.55 MB) for about twice the encode time; browsers and MLflow's artifact viewer play
it (docs/PERFORMANCE.md, "Artifacts").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sounding_anagrams.sampler.views import LATENT_SCALE, View

CLIP_FPS = 12
CLIP_MAX_SIDE = 512  # pixels of the clip's longer side
TURN_FRAMES = 24  # frames of the turn itself
HOLD_FRAMES = 8  # frames held at each end (at least; longer to last as long as the sound)
AUDIO_BITRATE = 64_000  # AAC, mono: speech-grade is plenty for a 16 kHz spectrogram's sound
AAC_FRAME = 1024  # samples per AAC frame
# H.264 at constant quality: 23 is libx264's default; "veryfast" keeps the encode well under the GPU's share.
CRF = 23
PRESET = "veryfast"


def clip_cell(height: int, width: int) -> int:
    """Pixels per latent cell in the clip: 8 at full size, 4 when the canvas is halved to fit."""
    cell = LATENT_SCALE
    while cell > 1 and max(height, width) * cell // LATENT_SCALE > CLIP_MAX_SIDE:
        cell //= 2
    return cell


def downscale(pixels: torch.Tensor, cell: int) -> torch.Tensor:
    """``(B, C, H, W)`` decoded pixels -> ``(B, C, H*cell/8, W*cell/8)`` by area averaging."""
    factor = LATENT_SCALE // cell
    return pixels if factor == 1 else F.avg_pool2d(pixels, factor)


@torch.no_grad()
def transition_frames(
    views: Sequence[View], pictures: Sequence[torch.Tensor], *, seconds: float = 0.0
) -> list[np.ndarray]:
    """Grayscale uint8 frames ``(h, w)`` of view 0 turning into view 1, held, and turning back.

    ``pictures[i]`` is what view i shows, ``(3, H, W)`` in [0, 1]. They are downscaled to the clip's size
    first and the view moves its pieces at that scale (``cell`` pixels per latent cell), so a frame costs a
    fraction of a full-size one. Where view 0 is the identity, view 0's picture is the canvas and the turn is
    view 1's own animation of it; otherwise the clip crossfades the two pictures. The holds are stretched so
    the frames last at least ``seconds`` at CLIP_FPS (the sound's length).
    """
    cell = clip_cell(pictures[0].shape[-2], pictures[0].shape[-1])
    small = [downscale(p[None].float() * 2 - 1, cell) for p in pictures[:2]]
    if len(views) < 2 or len(small) < 2:
        return [_to_gray(small[0])]
    ts = [i / (TURN_FRAMES - 1) for i in range(TURN_FRAMES)]
    if views[0].name == "identity":
        turn = [_to_gray(views[1].animate_pixels(small[0], t, cell=cell)) for t in ts]
    else:
        turn = [_to_gray(torch.lerp(small[0], small[1], t)) for t in ts]
    holds = max(2 * HOLD_FRAMES, math.ceil(seconds * CLIP_FPS) - 2 * TURN_FRAMES)
    return [turn[0]] * (holds - holds // 2) + turn + [turn[-1]] * (holds // 2) + turn[::-1]


def _to_gray(pixels: torch.Tensor) -> np.ndarray:
    """``(1, 3, h, w)`` in [-1, 1] -> ``(h, w)`` uint8 (the canvas is grayscale; same input, same bytes)."""
    unit = ((pixels[0].mean(dim=0) + 1) / 2).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).cpu().numpy()


def write_mp4(
    path: Path,
    frames: Sequence[np.ndarray],
    fps: int = CLIP_FPS,
    *,
    sound: np.ndarray | None = None,
    sample_rate: int = 16_000,
) -> None:
    """Encode grayscale uint8 frames ``(h, w)`` (even sides) as H.264 MP4 in yuv420p, which browsers play,
    with ``sound`` (``(N,)`` float samples in [-1, 1]) as a mono AAC track."""
    import av  # PyAV bundles FFmpeg with libx264 and AAC: no system encoder is needed

    height, width = frames[0].shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 frames need even sides, but got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread and no B-frame lookahead jitter: the same frames give the same bytes.
        stream.options = {"crf": str(CRF), "preset": PRESET, "threads": "1"}
        stream.codec_context.time_base = Fraction(1, fps)
        if sound is not None:  # every stream is added before the first packet is muxed
            audio = container.add_stream("aac", rate=sample_rate)
            audio.bit_rate, audio.layout = AUDIO_BITRATE, "mono"
            _encode_sound(container, audio, sound, sample_rate)
        _encode(container, stream, (_video_frame(gray, index) for index, gray in enumerate(frames)))


def _video_frame(gray: np.ndarray, index: int) -> Any:
    import av

    frame = av.VideoFrame.from_ndarray(np.repeat(gray[..., None], 3, axis=2), format="rgb24")
    frame.pts = index
    return frame


def _encode_sound(container: Any, stream: Any, sound: np.ndarray, sample_rate: int) -> None:
    """Encode ``sound`` on the AAC ``stream``, all of it (the muxer interleaves it with the video)."""
    import av

    samples = np.nan_to_num(np.asarray(sound, dtype=np.float32).reshape(-1)).clip(-1, 1)

    def audio_frame(start: int) -> Any:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples[None, start : start + AAC_FRAME]), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
        return frame

    _encode(container, stream, (audio_frame(start) for start in range(0, len(samples), AAC_FRAME)))


def _encode(container: Any, stream: Any, frames: Iterable[Any]) -> None:
    """Encode ``frames`` on ``stream`` one at a time, then flush what the encoder still holds (``None``),
    muxing every packet it gives."""
    for frame in itertools.chain(frames, [None]):
        for packet in stream.encode(frame):
            container.mux(packet)
