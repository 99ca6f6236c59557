"""The anchors' metrics as plain tensor formulas (docs/METHOD.md §4), shared by the CLIP and CLAP scorers.

- images-that-sound: a picture is scored on ``H x H`` windows slid along its width with stride ``H/8``; the
  windows' ``100 cos`` are averaged and the mean is clamped at 0 (torchmetrics' CLIPScore), then ``/ 100``.
- Visual Anagrams: with ``S[i, j]`` the similarity of view ``i`` to prompt ``j``, alignment is
  ``min_i S[i, i]`` and concealment is ``(1/N) tr(softmax(S / tau))`` averaged over the row and the column
  softmax, ``tau`` being the model's temperature (CLIP: 1/100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from sounding_anagrams.errors import ConfigError


def window_offsets(height: int, width: int, stride_fraction: float = 1 / 8) -> list[int]:
    """Left edges of the ``height x height`` windows along the width: 25 on 256x1024, 24 on 256x992.

    A picture narrower than it is tall gets one window of its own width.
    """
    if height <= 0 or width <= 0:
        raise ConfigError("image size", (height, width), "height and width must be positive")
    if width <= height:
        return [0]
    stride = max(1, round(height * stride_fraction))
    return list(range(0, width - height + 1, stride))


def sliding_windows(images: torch.Tensor, stride_fraction: float = 1 / 8) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, n, C, H', H')`` square windows (``H' = min(H, W)``)."""
    _, _, height, width = images.shape
    side = min(height, width)
    offsets = window_offsets(height, width, stride_fraction)
    return torch.stack([images[..., :side, x : x + side] for x in offsets], dim=1)


def windowed_score(cos: torch.Tensor) -> torch.Tensor:
    """``(..., n_windows)`` cosines -> ``(...)``: ``max(mean(100 cos), 0) / 100`` over the windows.

    The mean is clamped, not each window (images-that-sound scores with torchmetrics' CLIPScore, which clamps
    the averaged score): a window that matches badly pulls the picture's score down.
    """
    return (100 * cos).mean(dim=-1).clamp(min=0) / 100


def alignment(similarity: torch.Tensor) -> float:
    """``min_i S[i, i]``: the worst view's match to its own prompt."""
    _check_square(similarity)
    return float(similarity.diagonal().min())


def concealment(similarity: torch.Tensor, temperature: float) -> float:
    """Mean of the diagonals of the row softmax and the column softmax of ``S / temperature``.

    1.0 when each view matches its own prompt far better than the others; ``1/N`` when every view looks alike.
    """
    _check_square(similarity)
    if not temperature > 0:
        raise ConfigError("temperature", temperature, "must be positive")
    logits = similarity.double() / temperature
    rows = logits.softmax(dim=1).diagonal().mean()
    cols = logits.softmax(dim=0).diagonal().mean()
    return float((rows + cols) / 2)


def _check_square(similarity: torch.Tensor) -> None:
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ConfigError("similarity", tuple(similarity.shape), "must be a square (views x prompts) matrix")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, 95% interval half-width (Student t), 90th and 95th percentiles and count over samples."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(array.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "ci95": math.nan, "p90": math.nan, "p95": math.nan}
    half_width = math.nan
    if n > 1:
        from scipy import stats

        half_width = float(stats.t.ppf(0.975, n - 1) * array.std(ddof=1) / math.sqrt(n))
    return {
        "n": n,
        "mean": float(array.mean()),
        "ci95": half_width,
        "p90": float(np.percentile(array, 90)),
        "p95": float(np.percentile(array, 95)),
    }
