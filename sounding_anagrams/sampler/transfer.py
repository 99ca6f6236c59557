"""Moving small values between the host and the device without making the device wait.

On CUDA a blocking copy (``torch.tensor(values, device="cuda")``, ``.tolist()``, ``.item()``, ``bool(t)``,
indexing with a Python list) waits until the GPU has finished everything queued so far. Once per denoising
step that is enough to leave the GPU idle while the host prepares the next step. The sampler therefore
uploads its small per-step tensors without blocking and reads its per-step flags one step late, through
:class:`HostReadback`; the search's background threads run their device work on a high-priority side stream
(:func:`side_stream`). On the CPU these are plain copies and no-ops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch


def upload(values: Sequence[float] | Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small ``(len(values),)`` tensor on ``device``; on CUDA queued behind the work already there,
    without waiting for it (``non_blocking``: the host copy is staged at once, the GPU reads it in turn)."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on ``device`` (same shape), queued on CUDA without waiting for the work already
    there, as in :func:`upload`; ``host`` may be dropped at once."""
    return host.to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class HostReadback:
    """A device tensor on its way to the host, read later by :meth:`result`.

    On CUDA the copy goes into pinned memory behind the work that makes the tensor, and a CUDA event marks
    its end: ``result`` waits for that event alone, not for the work queued after it. So a value asked for
    at step ``i`` and read at step ``i + 1`` costs the host no wait, and the device never runs dry. On the CPU
    the copy is done at once.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach().clone()
        self.mark()

    def mark(self) -> None:
        """Where this copy sits in the device's queue. (A hook: the pipeline benchmark's simulated device
        records its timeline here.)"""

    def wait(self) -> None:
        """Until the copy is done (and only that copy)."""
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> torch.Tensor:
        self.wait()
        return self._host


_streams = threading.local()


@contextlib.contextmanager
def side_stream(device: torch.device, after: torch.cuda.Event | None = None) -> Iterator[None]:
    """Run the enclosed device work on this thread's own high-priority CUDA stream.

    The search's background threads (previews, the judge) decode and score while the sampler keeps the
    default stream full. On the default stream their small calls would queue behind the sampler's steps and
    wait a step each; on a high-priority stream the GPU runs them at the next kernel boundary, and the
    sampler's work simply moves back by as much (nothing is lost). ``after``: an event the stream waits for
    first (where inputs made on the default stream are ready; see :func:`ready_event`). On the CPU it does
    nothing.
    """
    if device.type != "cuda":
        yield
        return
    if device.index is None:  # "cuda" is the current device: the thread's stream names it by its index
        device = torch.device("cuda", torch.cuda.current_device())
    stream: torch.cuda.Stream | None = getattr(_streams, "stream", None)
    if stream is None or stream.device != device:
        stream = torch.cuda.Stream(device, priority=-1)
        _streams.stream = stream
    if after is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream):
        yield


def ready_event(device: torch.device) -> torch.cuda.Event | None:
    """An event at the end of the work queued so far on this thread's stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def used_on_this_stream(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a tensor made on another stream as used on the current one, so that the caching allocator does
    not hand its memory out again before this stream is done with it."""
    if tensor.device.type == "cuda":
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor
