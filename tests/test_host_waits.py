"""No denoising step makes the host wait for the device: the sampler's steps run on a stand-in CUDA device
that records every host read of a device value and every blocking copy between host and device.

Why a stand-in, and this one. The sampler and :mod:`sounding_anagrams.sampler.transfer` take their
non-blocking paths where ``device.type == "cuda"``, so the test needs tensors that say they are on
``cuda:0`` on a machine without a GPU; and the steps must still compute real numbers, because the host
rightly reads some (DPM-Solver++'s index lookups and DDIM's schedule tables on the CPU, the non-finite
flags read one step late through ``HostReadback``). Measured here, on the tiny models:

- ``FakeTensorMode`` does make ``cuda:0`` tensors without CUDA, but they hold no values: entered for the
  sampler call it stops in the scheduler's set-up (``.numpy() is not supported for tensor subclasses`` in
  DPM-Solver++'s ``set_timesteps``), and every legitimate host read becomes an error, not a result;
- the ``meta`` device has no values either (``Cannot copy out of meta tensor; no data!`` at the first
  one-step-late readback), and it is not ``cuda``: ``upload`` and ``HostReadback`` take their CPU paths, where
  a blocking copy and a non-blocking one look alike.

So :class:`StandInCuda` is a ``TorchDispatchMode`` over :class:`OnDevice` tensors: wrapper tensors whose
``device`` is ``cuda:0`` and whose values live in a CPU tensor. Every aten op goes through the mode, which
runs it on the CPU values and wraps what lands on the device: the sampler runs unchanged and its latents
come out as on the CPU (to 3e-5: attention takes its math path on cuda). Inside a step (the body of the
sampler's step loop) the mode records:

- a host read of a device value: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``,
  ``if t:``), ``aten.equal``, and the ops whose output size depends on device values (``nonzero``, boolean
  masks, ``unique``, ...: torch's ``data_dependent_output`` and ``dynamic_output_shape`` tags);
- a copy between host and device that is blocking (host -> device without ``non_blocking``) or that goes
  device -> host (``.cpu()``, ``.tolist()``), but for a non-blocking copy into pinned memory (what
  ``HostReadback`` does; its event is waited for a step later, and a wait in the same step is recorded);
- a host tensor (not a 0-dim scalar) in an op with device tensors: on a GPU a hidden blocking copy or an
  error; and ``torch.cuda.synchronize()``.

Not seen: a sync inside a CUDA kernel's own C++ wrapper, which the CPU kernel run here does not have (on
a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches those); stream order (``side_stream``); memory
(the OOM retry). On a machine without a GPU the test leaves CUDA marked as initialised, with no-op device
guards (as ``FakeTensorMode`` does there); no test makes real CUDA tensors on such a machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sounding_anagrams.config import RenderConfig
from sounding_anagrams.sampler import pipeline
from sounding_anagrams.sampler.models import ModelBundle, load_models
from sounding_anagrams.sampler.pipeline import JointSampler, StepState
from sounding_anagrams.sampler.transfer import HostReadback
from sounding_anagrams.sampler.views import VIEW_REGISTRY, base

CUDA = torch.device("cuda", 0)
_aten = torch.ops.aten

# Ops that read device values on the host whatever their arguments.
_HOST_READS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default}
# Ops with a boolean-mask form that syncs (the mask's count) and an integer-index form that does not.
_MASKABLE = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}
_MASKABLE.add(_aten._index_put_impl_.default)


@dataclasses.dataclass(frozen=True)
class Wait:
    """A place where the host would wait for the device, in loop step ``step``."""

    step: int
    what: str
    where: str


def report(waits: list[Wait]) -> str:
    """The waits, one line per kind and place, with the steps where they happened."""
    places: dict[tuple[str, str], list[int]] = {}
    for wait in waits:
        places.setdefault((wait.what, wait.where), []).append(wait.step)
    lines = [f"the host waits for the device inside a step, {len(waits)} times at {len(places)} places:"]
    for (what, where), steps in places.items():
        lines.append(f"  {what}: {len(steps)} times, in steps {sorted(set(steps))}\n    at {where}")
    return "\n".join(lines)


def _where() -> str:
    """The innermost frames of this project's code (not torch's, not this module's machinery)."""
    here = Path(__file__).name
    frames = [
        f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        for frame in reversed(traceback.extract_stack())
        if "site-packages" not in frame.filename
        and "/torch/" not in frame.filename
        and not (Path(frame.filename).name == here and frame.name in _MACHINERY)
    ]
    return " <- ".join(frames[:4])


class OnDevice(torch.Tensor):
    """A tensor that says it lives on ``cuda:0``; its values are the CPU tensor ``host`` (same shape,
    strides and dtype). Only :class:`StandInCuda` computes with it."""

    host: torch.Tensor

    @staticmethod
    def __new__(cls, host: torch.Tensor) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            host.shape,
            strides=host.stride(),
            storage_offset=host.storage_offset(),
            dtype=host.dtype,
            layout=host.layout,
            device=CUDA,
            requires_grad=host.requires_grad,
        )
        out.host = host
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def tolist(self) -> Any:
        # As on CUDA: through a device -> host copy (torch refuses .tolist() on subclasses).
        return self.cpu().tolist()

    def __repr__(self) -> str:  # type: ignore[override]
        return f"OnDevice({self.host!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        raise RuntimeError(f"{func} on a stand-in CUDA tensor outside StandInCuda")


def _device_of(value: Any) -> torch.device | None:
    return None if value is None else torch.device(value)


class StandInCuda(TorchDispatchMode):
    """Runs every op on the CPU, with :class:`OnDevice` tensors for the device's; records :class:`Wait`
    while ``step`` is not None (see the module docstring for what counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.window = 0  # counts step windows, so an event can tell whether it was recorded in this one
        self.waits: list[Wait] = []
        self.outside: list[str] = []  # the same, outside the steps (set-up and hand-over): allowed
        # Transfers that are allowed in a step, per step: non-blocking uploads and pinned readbacks.
        self.uploads: dict[int, int] = {}
        self.readbacks: dict[int, int] = {}
        self._lift: bool | None = None

    def __enter__(self) -> StandInCuda:
        # torch.tensor(..., device=cuda) then builds on the CPU and moves with an op the mode sees.
        self._lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        torch._C._set_only_lift_cpu_tensors(bool(self._lift))

    def record(self, what: str) -> None:
        if self.step is not None:
            self.waits.append(Wait(self.step, what, _where()))
        else:
            self.outside.append(what)

    def _count(self, counts: dict[int, int]) -> None:
        if self.step is not None:
            counts[self.step] = counts.get(self.step, 0) + 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        if func is _aten.record_stream.default:
            return None
        if func is _aten.is_pinned.default:
            return bool(getattr(args[0], "stand_in_pinned", False))
        if func is _aten._pin_memory.default:  # pinning needs CUDA: a copy marked as pinned
            copy = args[0].clone()
            copy.stand_in_pinned = True
            return copy

        # Where the result goes: an explicit device, else the device of the inputs.
        target = _device_of(kwargs.get("device"))
        out_on_device = target.type == "cuda" if target is not None else on_device
        if target is not None:
            kwargs["device"] = torch.device("cpu")
        pinned = bool(kwargs.get("pin_memory"))
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = None if kwargs["pin_memory"] is None else False

        if func is _aten._to_copy.default:
            self._check_copy(isinstance(args[0], OnDevice), out_on_device, bool(kwargs.get("non_blocking")))
        elif func is _aten.copy_.default:
            dst, src = args[0], args[1]
            self._check_copy(
                isinstance(src, OnDevice),
                isinstance(dst, OnDevice),
                bool(args[2] if len(args) > 2 else kwargs.get("non_blocking")),
                pinned_dst=bool(getattr(dst, "stand_in_pinned", False)),
            )
        elif on_device:
            self._check_op(func, args, kwargs, tensors)

        host_args, host_kwargs = pytree.tree_map_only(OnDevice, lambda t: t.host, (args, kwargs))
        out = func(*host_args, **host_kwargs)

        # In-place and out= results are their input; anything new is wrapped where it lives.
        inputs = {id(t.host): t for t in tensors if isinstance(t, OnDevice)}
        plain = {id(t) for t in tensors if not isinstance(t, OnDevice)}

        def rewrap(t: torch.Tensor) -> torch.Tensor:
            if id(t) in inputs:
                same = inputs[id(t)]
                if same.shape != t.shape or same.stride() != t.stride():
                    raise NotImplementedError(f"{func} changes a stand-in tensor's shape in place")
                return same
            if id(t) in plain or not out_on_device:
                if pinned:
                    t.stand_in_pinned = True  # type: ignore[attr-defined]
                return t
            return OnDevice(t)

        return pytree.tree_map_only(torch.Tensor, rewrap, out)

    def _check_copy(
        self, from_device: bool, to_device: bool, non_blocking: bool, pinned_dst: bool = False
    ) -> None:
        if from_device and not to_device:
            if non_blocking and pinned_dst:
                self._count(self.readbacks)
            else:
                self.record("device -> host copy (.cpu(), .tolist(), .to('cpu')): waits for the device")
        elif to_device and not from_device:
            if non_blocking:
                self._count(self.uploads)
            else:
                self.record("blocking host -> device copy (.to(device) without non_blocking)")

    def _check_op(self, func: Any, args: Any, kwargs: Any, tensors: list[torch.Tensor]) -> None:
        name = func.name()
        if func in _HOST_READS or torch.Tag.data_dependent_output in func.tags:
            self.record(f"host read of a device value ({name}: .item(), float(), bool(), if tensor:)")
        elif func in _MASKABLE:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.record(f"boolean-mask indexing ({name}): its size is read from the device")
        elif torch.Tag.dynamic_output_shape in func.tags and not (
            func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None
        ):
            self.record(f"{name}: its output size is read from the device")
        for t in tensors:
            if not isinstance(t, OnDevice) and t.dim() > 0:
                self.record(
                    f"host tensor {tuple(t.shape)} in {name} with device tensors: on a GPU a hidden "
                    "blocking copy or an error"
                )


class _Event:
    """``torch.cuda.Event`` on the stand-in: waiting for one recorded in the same step is a host wait."""

    def __init__(self, mode: StandInCuda) -> None:
        self.mode = mode
        self.window: int | None = None

    def record(self, stream: object = None) -> None:
        self.window = self.mode.window

    def synchronize(self) -> None:
        if self.mode.step is not None and self.window == self.mode.window:
            self.mode.record("waits for a CUDA event recorded in this same step")

    def query(self) -> bool:
        return True


_MACHINERY = {
    "__torch_dispatch__",
    "_check_copy",
    "_check_op",
    "record",
    "synchronize",
    "_where",
    "steps",
    "_sync",
}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on one CPU thread: on a busy machine, idle OpenMP workers spinning between the many small
    ops (and the mode's Python between them) take the cores from the thread that works (measured: 5x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def stand_in_cuda() -> Iterator[StandInCuda]:
    """The mode, with the sampler's step loop marked and the CUDA calls it makes redirected to it."""
    mode = StandInCuda()

    def steps(iterable: Any, **_: Any) -> Iterator[int]:
        # The sampler's loop is ``for step in tqdm(range(...))``: each iteration is one step's window.
        for step in iterable:
            mode.step, mode.window = step, mode.window + 1
            yield step
        mode.step = None

    def _sync(*_: object) -> None:
        mode.record("torch.cuda.synchronize()")

    with pytest.MonkeyPatch.context() as patch:
        if not torch.cuda.is_available():
            # Without a GPU: no CUDA initialisation for factory calls with device=cuda (the mode makes them),
            # and no-op CUDA device guards (indexing a cuda tensor sets one), as FakeTensorMode does here.
            patch.setattr(torch.cuda, "_lazy_init", lambda: None)
            torch._C._ensureCUDADeviceGuardSet()
        patch.setattr(torch.cuda, "Event", lambda *a, **k: _Event(mode))
        patch.setattr(torch.cuda, "synchronize", _sync)
        patch.setattr(pipeline, "tqdm", steps)
        with mode:
            yield mode


# -- the runs -------------------------------------------------------------------------------------------

# Every view, by family (the modules of sounding_anagrams.sampler.views), sized for an 8x8 latent.
FAMILIES = {
    "permutations": ("identity", "flip", "mirror", "skew(factor=0.25)", "negate"),
    "pieces": (
        "rotate_180",
        "rotate_cw",
        "rotate_ccw",
        "tile_rotate_cw",
        "tile_rotate_ccw",
        "patch_permute(patch=4)",
        "jigsaw(piece=4)",
        "inner_circle",
    ),
    "hybrids": ("low_pass(sigma=2.0)", "band_pass(sigma1=1.0,sigma2=2.0)", "high_pass(sigma=1.0)"),
}
TINY = {"image_model": "tiny", "audio_model": "tiny", "device": "cpu", "dtype": "float32"}


def config(views: tuple[str, ...], scheduler: str, **changes: Any) -> RenderConfig:
    """A candidate on a 64x64 canvas with the image term on from the first of 2 steps."""
    return RenderConfig(
        **{
            "views": views,
            "image_prompts": [f"picture {i}" for i in range(len(views))],
            "audio_prompts": ["a sound"],
            "height": 64,
            "width": 64,
            "scheduler": scheduler,
            "num_inference_steps": 2,
            "image_start_step": 0,
            "seed": 1,
            **TINY,
            **changes,
        }
    )


@pytest.fixture(scope="module")
def stand_in_models(_tiny_cache: Path) -> Callable[[StandInCuda], ModelBundle]:
    """The tiny models moved onto the stand-in device (under a mode, as they are wrapped there)."""
    cpu = load_models("tiny", "tiny", device="cpu", dtype="float32", with_vocoder=False)
    moved: list[ModelBundle] = []

    def on(mode: StandInCuda) -> ModelBundle:
        # Not Module.to: its ``param.data = moved`` would keep a plain tensor that claims cuda:0.
        if not moved:
            for module in (cpu.image.unet, cpu.image.text_encoder, cpu.audio.unet, cpu.audio.text_encoder):
                for sub in module.modules():
                    for name, param in sub._parameters.items():
                        if param is not None:
                            sub._parameters[name] = torch.nn.Parameter(OnDevice(param.detach()), False)
                    for name, buffer in sub._buffers.items():
                        if buffer is not None:
                            sub._buffers[name] = OnDevice(buffer)
            moved.append(dataclasses.replace(cpu, device=CUDA))
        return moved[0]

    return on


def run_steps(
    models: Callable[[StandInCuda], ModelBundle],
    configs: list[RenderConfig],
    callback: Callable[[StepState], None] | None = None,
) -> tuple[StandInCuda, torch.Tensor, list[int]]:
    """Run the sampler on the stand-in; the mode, the final latents and the steps the callback saw."""
    # Fresh views: their index tensors are then made during the first step, as in a fresh process.
    base._build.cache_clear()
    seen: list[int] = []

    def watch(state: StepState) -> None:
        seen.append(state.step)
        if callback is not None:
            callback(state)

    try:
        with one_thread(), stand_in_cuda() as mode:
            output = JointSampler(models(mode))(configs, callback=watch, progress=False)
    finally:
        base._build.cache_clear()  # no stand-in index tensors left in the views other tests get
    # Each step is seen through the loop's tqdm: a loop written otherwise leaves the test blind, so it fails.
    assert mode.step is None and mode.window == len(seen), "the test no longer sees the sampler's steps"
    return mode, output.latents, seen


def check_steps(
    mode: StandInCuda, steps: list[int], latents: torch.Tensor, cpu: ModelBundle, configs: list[RenderConfig]
) -> None:
    """No waits; the allowed transfers ran on their CUDA paths (an upload and a readback every step); the
    latents are the CPU's."""
    if mode.waits:
        pytest.fail(report(mode.waits), pytrace=False)
    assert sorted(mode.uploads) == sorted(mode.readbacks) == steps
    # The stand-in changes where values are said to be, not what they are. (Not bit for bit: attention
    # decomposes by device, into the math path on cuda and a fused kernel on the CPU; 3e-5 apart at most.)
    with one_thread():
        reference = JointSampler(cpu)(configs, progress=False).latents
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_step_waits_for_the_device(stand_in_models, tiny_models, family, scheduler):
    configs = [config(FAMILIES[family], scheduler)]
    mode, latents, seen = run_steps(stand_in_models, configs)
    assert seen == [0, 1]
    check_steps(mode, seen, latents, tiny_models, configs)


def test_no_step_waits_in_a_batch_with_its_own_knobs(stand_in_models, tiny_models):
    """Candidates that differ take the sampler's gather and scatter paths: at step 0 candidate 1's image term
    is off (image rows 0 and 2), the DDIM candidates 0 and 2 step as one group, DPM-Solver++ steps candidate
    1 alone, and at step 2 candidate 1 runs alone (its rows of the latents taken and put back)."""
    views, sounds = ("identity", "flip"), ["a sound", "another sound"]  # the audio term through the views too
    configs = [
        config(views, "ddim", audio_prompts=sounds),
        config(views, "dpmsolver++", audio_prompts=sounds, seed=2, num_inference_steps=3, image_start_step=1),
        config(views, "ddim", audio_prompts=sounds, seed=3, audio_weight=0.3, image_guidance_scale=4.0),
    ]
    mode, latents, seen = run_steps(stand_in_models, configs)
    assert seen == [0, 1, 2]
    check_steps(mode, seen, latents, tiny_models, configs)


def test_every_view_is_run() -> None:
    ran = {spec.split("(")[0] for views in FAMILIES.values() for spec in views}
    assert ran == set(VIEW_REGISTRY)


# -- the detector catches what it must ------------------------------------------------------------------


def _plant_item(z: torch.Tensor) -> None:
    z.abs().max().item()


def _plant_float(z: torch.Tensor) -> None:
    float(z.sum())


def _plant_if(z: torch.Tensor) -> None:
    if (z > 100).any():
        pass


def _plant_tolist(z: torch.Tensor) -> None:
    z[0, 0, 0].tolist()


def _plant_cpu(z: torch.Tensor) -> None:
    z.cpu()


def _plant_blocking_upload(z: torch.Tensor) -> None:
    torch.ones(3).to(z.device)


def _plant_tensor_on_device(z: torch.Tensor) -> None:
    torch.tensor([1.0, 2.0], device=z.device)


def _plant_mask(z: torch.Tensor) -> None:
    _ = z[z > 0]


def _plant_nonzero(z: torch.Tensor) -> None:
    torch.nonzero(z > 0)


def _plant_host_index(z: torch.Tensor) -> None:
    z.index_select(0, torch.tensor([0]))


def _plant_synchronize(z: torch.Tensor) -> None:
    torch.cuda.synchronize()


def _plant_same_step_readback(z: torch.Tensor) -> None:
    HostReadback(z.sum()).result()


PLANTS = {
    "item": (_plant_item, "host read of a device value"),
    "float": (_plant_float, "host read of a device value"),
    "if tensor": (_plant_if, "host read of a device value"),
    "tolist": (_plant_tolist, "device -> host copy"),
    "cpu": (_plant_cpu, "device -> host copy"),
    "blocking to(device)": (_plant_blocking_upload, "blocking host -> device copy"),
    "torch.tensor(device=)": (_plant_tensor_on_device, "blocking host -> device copy"),
    "boolean mask": (_plant_mask, "boolean-mask indexing"),
    "nonzero": (_plant_nonzero, "nonzero"),
    "host index": (_plant_host_index, "host tensor (1,) in aten::index_select"),
    "synchronize": (_plant_synchronize, "torch.cuda.synchronize()"),
    "same-step readback": (_plant_same_step_readback, "event recorded in this same step"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_wait_in_a_step_is_caught(stand_in_models, tiny_models, monkeypatch, plant):
    """A wait planted where every step goes (the scheduler step) fails the check, which says where it is."""
    action, expected = PLANTS[plant]
    scheduler_step = JointSampler.scheduler_step

    def planted(plans: Any, step: int, z: torch.Tensor, eps: torch.Tensor) -> Any:
        action(eps)
        return scheduler_step(plans, step, z, eps)

    monkeypatch.setattr(JointSampler, "scheduler_step", staticmethod(planted))
    configs = [config(("identity", "flip"), "ddim", num_inference_steps=1)]
    mode, latents, seen = run_steps(stand_in_models, configs)

    assert seen == [0]
    assert [w.step for w in mode.waits] == [0], report(mode.waits)
    assert expected in mode.waits[0].what
    assert "planted" in mode.waits[0].where
    with pytest.raises(pytest.fail.Exception, match="the host waits for the device inside a step"):
        check_steps(mode, seen, latents, tiny_models, configs)


def test_a_wait_in_the_step_callback_is_caught(stand_in_models):
    """The callback runs inside the step too: a preview that reads the device there stalls it."""
    configs = [config(("identity", "flip"), "ddim", num_inference_steps=1)]
    mode, _, _ = run_steps(stand_in_models, configs, callback=lambda s: _plant_item(s.latents))
    assert [w.what.split(" (")[0] for w in mode.waits] == ["host read of a device value"]


def test_waits_outside_the_steps_are_not_counted(stand_in_models):
    """The set-up's blocking copies (the noise, the token ids) and the final ``.cpu()`` are seen, and allowed:
    they are not in a step."""
    configs = [config(("identity", "flip"), "ddim", num_inference_steps=1)]
    mode, latents, _ = run_steps(stand_in_models, configs)
    assert not mode.waits
    assert sum("blocking host -> device" in what for what in mode.outside) >= 2
    assert any("device -> host" in what for what in mode.outside)
    assert latents.device.type == "cpu" and not isinstance(latents, OnDevice)
