"""Numbers as a person reads them: 4 significant digits wherever a score or a knob is shown (terminal, card,
contact sheet, gallery). Full precision stays in CSV/JSON, logged metrics and exported configs."""

from __future__ import annotations

import math
from typing import Any

SIGNIFICANT_DIGITS = 4


def readable(value: Any) -> str:
    """``0.6919126410238697`` -> ``0.6919``, ``0.30000000000000004`` -> ``0.3``, ``12`` -> ``12``; a list
    element-wise (``[0.7, 0.3]``); ``None`` and NaN -> ``-``; anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{SIGNIFICANT_DIGITS}g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(readable(v) for v in value) + "]"
    return str(value)


def signed(value: Any) -> str:
    """A difference with its sign: ``+0.0123``, ``-0.5``; ``-`` when there is none (NaN, None)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:+.{SIGNIFICANT_DIGITS}g}"
