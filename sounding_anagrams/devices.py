"""The torch device a ``device`` setting names, checked against this machine before any model loads.

Kept apart from the loaders: the config, the command line, the sampler and the judges all read it. Its names
(``DEVICE_PATTERN``) need no torch, so the config checks them without importing it; torch is imported only
to resolve a name on this machine.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sounding_anagrams.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N: a CUDA device's index)"
# Every name a ``device`` setting may take, whatever the machine (JSON Schema and Python regex alike).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$"
_CUDA = re.compile(r"cuda(?::(0|[1-9][0-9]*))?")


def resolve_device(device: str | torch.device = "auto", *, field: str = "device") -> torch.device:
    """``auto``: CUDA where a CUDA device is present, else the CPU; ``cpu``, ``cuda`` or ``cuda:N`` as named.

    Raises:
        ConfigError: ``device`` is none of those, or names a CUDA device this machine does not have.
    """
    import torch

    if isinstance(device, torch.device):
        device = str(device)  # torch.device("cuda", 1) -> "cuda:1": checked like the string
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise ConfigError(field, device, DEVICE_CHOICES)
    if not torch.cuda.is_available():
        raise ConfigError(field, device, "no CUDA device is present on this machine; use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ConfigError(
            field, device, f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device(device)


def make_current(device: torch.device) -> None:
    """Make a CUDA ``device`` this thread's current one (the CPU: nothing to do).

    What runs on "the current stream" (CUDA events, the sampler's readbacks) is on the current device's, which
    is ``cuda:0`` until set: with the models on ``cuda:1`` an event would mark cuda:0's queue and wait for
    nothing. (The search's other threads run their device work inside ``torch.cuda.stream(...)`` of the
    models' device, which sets it there.)
    """
    import torch

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
