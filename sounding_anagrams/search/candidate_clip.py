"""What a person judges in ``prefer``: each candidate as one captioned clip, its first frame the poster.

optuna-dashboard's comparison page shows one artifact per candidate, in a card whose media area is 368 px
wide (fixed in its page), as a bare ``<video controls>``: no poster attribute, no caption, and its question
("Which trial is the worst?") is fixed too. So the captions and the poster are in the clip itself. A frame
as wide as the canvas (1024 px: sharp at full screen, about 370 px in the card) holds, top to bottom:

- the candidate's title (its number and where it came from) and what is judged;
- its knobs under their study-file names (``view_balance 0.3``, 4 significant digits) and its seed;
- each view's picture under its image prompt (still);
- the spectrogram under its audio prompt(s), with a playhead while a sound plays (right to left for a
  sound heard mirrored);
- the turn: view 0 turning into view 1 and back, the frames of the render's own clip (``transition.mp4``),
  drawn at the frame's width and looped while the sounds last. It is last: the controls of a paused video
  cover the bottom of its frame, where the turn rests on view 0, already shown above.

Its audio track is the candidate's sounds one after another (with several, the caption of the one playing is
shown inverted). Its first frame is the whole layout at rest, which a browser shows before play: the poster,
also written as ``poster.png``.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, ImageDraw

from sounding_anagrams.animation import CLIP_FPS, write_mp4
from sounding_anagrams.config import RenderConfig
from sounding_anagrams.files import CLIP_FILE
from sounding_anagrams.numbers import readable
from sounding_anagrams.search.pictures import fitted, sheet_font, wrapped

CANDIDATE_CLIP = "candidate.mp4"
POSTER = "poster.png"
WIDTH = 1024  # pixels of the frame: the canvas's own width (1024 px shows it sharp at full screen)
MAX_PICTURE_HEIGHT = 512  # a square canvas is fitted into this height instead of filling the width
MARGIN = 16
TITLE_SIZE, TEXT_SIZE = 44, 36  # pixels: 16 and 13 px in the dashboard's 368 px card
INK, SOFT_INK, PAPER, PLAYHEAD = 15, 90, 255, 255
SOUND_GAP_SECONDS = 0.5  # silence between two sounds of the track
JUDGED = "worst = looks or sounds least like its prompts"
# How a sound heard through a view plays over the spectrogram: the canvas forwards, mirrored backwards;
# through any other view its time is not the spectrogram's, and no playhead is drawn.
PLAYHEAD_DIRECTIONS = {"identity": 1, "mirror": -1}


@dataclass(frozen=True)
class Caption:
    """What the clip says about its candidate beside its media."""

    number: int
    origin: str  # "baseline", "start point 1", "proposed from 2 choice(s)", "random start"
    knobs: Mapping[str, Any]  # study-file names (view_balance) -> values
    seed: int

    def title(self) -> str:
        return f"candidate {self.number} · {self.origin}"

    def knob_items(self) -> list[str]:
        """``name value`` per knob, by name, then the seed: what the person reads (never float noise)."""
        return [f"{name} {readable(value)}" for name, value in sorted(self.knobs.items())] + [
            f"seed {self.seed}"
        ]


def view_captions(config: RenderConfig) -> list[str]:
    """One line per view: its number, its name and the image prompt it should show."""
    return [
        f'view {i} · {view}: "{prompt}"'
        for i, (view, prompt) in enumerate(zip(config.views, config.image_prompts, strict=False))
    ]


def sound_captions(config: RenderConfig) -> list[str]:
    """One line per sound: the audio prompt it should sound like (and, for several, the view it is heard
    through)."""
    if len(config.audio_prompts) == 1:
        return [f'sound: "{config.audio_prompts[0]}"']
    views = [spec.name for spec in config.audio_view_specs()]
    return [f'sound {a} · {views[a]}: "{prompt}"' for a, prompt in enumerate(config.audio_prompts)]


@dataclass
class Layout:
    """The still part of every frame (the poster) and where the moving parts go."""

    poster: np.ndarray  # (H, WIDTH) uint8 grayscale
    turn_box: tuple[int, int, int, int]  # left, top, width, height of the turning canvas
    spectrogram_box: tuple[int, int, int, int]
    sound_rows: list[tuple[int, int]] = field(default_factory=list)  # top, bottom of each sound's caption
    # Every caption drawn, with its box (left, top, right, bottom): what a test reads back.
    texts: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)


class _Page:
    """A grayscale page drawn top to bottom: lines of text, then pictures, each at the next free row."""

    def __init__(self, height: int) -> None:
        self.image = Image.new("L", (WIDTH, height), PAPER)
        self.draw = ImageDraw.Draw(self.image)
        self.title_font, self.font = sheet_font(TITLE_SIZE), sheet_font(TEXT_SIZE)
        self.y = MARGIN
        self.texts: list[tuple[str, tuple[int, int, int, int]]] = []

    def text(self, line: str, *, title: bool = False, soft: bool = False) -> tuple[int, int]:
        """One line (cut to the width); returns its top and bottom."""
        font = self.title_font if title else self.font
        size = TITLE_SIZE if title else TEXT_SIZE
        line = fitted(self.draw, line, font, WIDTH - 2 * MARGIN)
        top = self.y
        self.draw.text((MARGIN, top), line, fill=SOFT_INK if soft else INK, font=font)
        right = MARGIN + round(self.draw.textlength(line, font=font))
        self.texts.append((line, (MARGIN, top, right, top + size)))
        self.y += round(size * 1.3)
        return top, self.y

    def lines(self, items: Sequence[str], *, separator: str = "   ") -> None:
        """Items joined on as few lines as fit the width, an item never split."""
        for line in wrapped(self.draw, items, self.font, WIDTH - 2 * MARGIN, separator):
            self.text(line)

    def paragraph(self, text: str) -> tuple[int, int]:
        """``text`` broken at spaces over as many lines as it takes; returns its top and bottom."""
        rows = [
            self.text(line)
            for line in wrapped(self.draw, text.split(" "), self.font, WIDTH - 2 * MARGIN, " ")
        ]
        return rows[0][0], rows[-1][1]

    def picture(self, image: Image.Image) -> tuple[int, int, int, int]:
        """``image`` fitted to the width (a tall one to MAX_PICTURE_HEIGHT), centred; returns its box."""
        fitted = fit_picture(image)
        left = (WIDTH - fitted.width) // 2
        self.image.paste(fitted, (left, self.y))
        box = (left, self.y, fitted.width, fitted.height)
        self.y += fitted.height + MARGIN // 2
        return box

    def gap(self) -> None:
        self.y += MARGIN


def fit_picture(image: Image.Image) -> Image.Image:
    scale = min(WIDTH / image.width, MAX_PICTURE_HEIGHT / image.height)
    size = (max(2, round(image.width * scale)), max(2, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def lay_out(folder: Path, config: RenderConfig, caption: Caption) -> Layout:
    """The poster of the render in ``folder``: every caption and still picture where the frames keep them."""
    views = [read_gray(folder / f"view{i}.png") for i in range(len(config.views))]
    spectrogram = read_gray(folder / "spectrogram.png")
    # Measured on a scratch page first: the frame's height is what the captions and pictures take.
    height = _drawn_height(lambda page: _draw(page, views, spectrogram, config, caption))
    page = _Page(height + (height % 2))  # H.264 wants even sides
    turn_box, spectrogram_box, sound_rows = _draw(page, views, spectrogram, config, caption)
    return Layout(np.asarray(page.image).copy(), turn_box, spectrogram_box, sound_rows, page.texts)


def read_gray(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L")


def _drawn_height(draw: Any) -> int:
    scratch = _Page(8192)
    draw(scratch)
    return scratch.y


def _draw(
    page: _Page,
    views: Sequence[Image.Image],
    spectrogram: Image.Image,
    config: RenderConfig,
    caption: Caption,
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int], list[tuple[int, int]]]:
    page.text(caption.title(), title=True)
    page.text(JUDGED, soft=True)
    page.lines(caption.knob_items())
    page.gap()
    for line, picture in zip(view_captions(config), views, strict=False):
        page.paragraph(line)
        page.picture(picture)
    sound_rows = [page.paragraph(line) for line in sound_captions(config)]
    spectrogram_box = page.picture(spectrogram)
    # Last: a paused video's controls cover the bottom of the frame, where the turn rests on view 0 (shown
    # above); playing, they hide.
    page.text("turning: view 0 into view 1 and back (press play)", soft=True)
    turn_box = page.picture(views[0])
    return turn_box, spectrogram_box, sound_rows


class ClipFrames(Sequence[np.ndarray]):
    """The clip's frames, made one at a time as the encoder takes them (a list of them would hold hundreds
    of megabytes): the poster with the turn's frame, the playhead and the playing sound's caption."""

    def __init__(
        self, layout: Layout, turn: Sequence[np.ndarray], sounds: Sequence[tuple[float, float, int]]
    ) -> None:
        """``sounds``: each one's start and end in seconds, and its playhead's direction (1 left to right,
        -1 right to left, 0 none)."""
        self.layout, self.turn, self.sounds = layout, turn, sounds
        seconds = max((end for _, end, _ in sounds), default=0.0)
        self.length = max(len(turn), math.ceil(seconds * CLIP_FPS))

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)  # iteration stops here: the turn itself loops
        index %= len(self)
        frame = self.layout.poster.copy()
        left, top, width, height = self.layout.turn_box
        turn = self.turn[index % len(self.turn)]
        if turn.shape != (height, width):
            turn = np.asarray(Image.fromarray(turn).resize((width, height), Image.Resampling.BILINEAR))
        frame[top : top + height, left : left + width] = turn
        seconds = index / CLIP_FPS
        for number, (start, end, direction) in enumerate(self.sounds):
            if not start <= seconds < end:
                continue
            if len(self.sounds) > 1:  # which sound plays: its caption inverted
                row_top, row_bottom = self.layout.sound_rows[number]
                frame[row_top:row_bottom] = PAPER - frame[row_top:row_bottom]
            if direction:  # where the sound is in the spectrogram
                left, top, width, height = self.layout.spectrogram_box
                done = (seconds - start) / (end - start)
                x = left + min(width - 3, int(width * (done if direction > 0 else 1 - done)))
                frame[top : top + height, x : x + 3] = PLAYHEAD
        return frame


def sound_track(folder: Path, count: int) -> tuple[np.ndarray | None, list[tuple[float, float]], int]:
    """The candidate's sounds one after another (a short silence between), each one's (start, end) in
    seconds, and the sample rate."""
    from sounding_anagrams.sampler.audio import read_wav

    pieces: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    rate = 16_000
    for a in range(count):
        wave, rate = read_wav(folder / f"audio{a}.wav")
        start = sum(len(p) for p in pieces) / rate
        spans.append((start, start + len(wave) / rate))
        pieces += [wave, np.zeros(round(SOUND_GAP_SECONDS * rate), dtype=np.float32)]
    if not pieces:
        return None, [], rate
    return np.concatenate(pieces[:-1]), spans, rate


def read_clip_frames(path: Path) -> list[np.ndarray]:
    """The grayscale frames ``(h, w)`` of a render's clip. Read back rather than made again: turning the views
    took 2-8 s a candidate on 2 loaded cores, decoding them a fraction of a second."""
    import av

    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "the render's clip is missing", str(path))
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]


def write_candidate_clip(folder: Path, config: RenderConfig, caption: Caption) -> Path:
    """``candidate.mp4`` and ``poster.png`` of the render in ``folder``, from its files; written whole or not
    at all. Returns the clip's path."""
    layout = lay_out(folder, config, caption)
    sound, spans, rate = sound_track(folder, len(config.audio_prompts))
    directions = [PLAYHEAD_DIRECTIONS.get(spec.name, 0) for spec in config.audio_view_specs()]
    sounds = [(start, end, way) for (start, end), way in zip(spans, directions, strict=True)]
    frames = ClipFrames(layout, read_clip_frames(folder / CLIP_FILE), sounds)
    poster = folder / POSTER
    Image.fromarray(frames[0]).save(poster)
    path, partial = folder / CANDIDATE_CLIP, folder / f".{CANDIDATE_CLIP}.partial.mp4"
    try:
        write_mp4(partial, frames, sound=sound, sample_rate=rate)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
