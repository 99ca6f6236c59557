"""Decoding in chunks: each VAE and the vocoder once per chunk, one copy to the host, the same pictures and
sounds as one candidate at a time; a chunk that fails is decoded again one by one; the judges get the
pictures where they were decoded."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sounding_anagrams.render as render_module
from sounding_anagrams.config import RenderConfig
from sounding_anagrams.render import (
    Decoded,
    decode_and_write,
    decode_candidates,
    decode_latents,
    spectrogram_to_wave,
    to_unit,
)
from sounding_anagrams.sampler.pipeline import SamplerOutput
from sounding_anagrams.sampler.views import build_views
from sounding_anagrams.search.judging import SharedScorers
from tests import test_host_waits as host_waits

# A small canvas (256 high: the mel bins) keeps the VAEs and Griffin-Lim quick on a CPU.
TINY = {"image_model": "tiny", "audio_model": "tiny", "device": "cpu", "dtype": "float32", "width": 256}
TWO_SOUNDS = {
    "views": ["identity", "flip"],
    "image_prompts": ["a castle", "a car"],
    "audio_prompts": ["bird chirping", "bell ringing"],
}


def configs_and_latents(count: int, **changes) -> tuple[list[RenderConfig], torch.Tensor]:
    configs = [RenderConfig(**{**TINY, **TWO_SOUNDS, "seed": s, **changes}) for s in range(count)]
    generator = torch.Generator().manual_seed(5)
    return configs, torch.randn(count, *configs[0].latent_shape, generator=generator)


def one_at_a_time(latent: torch.Tensor, config: RenderConfig, models) -> Decoded:
    """The decoding as it was: one candidate per VAE call, one vocoder call and one host copy per sound."""
    pixels = decode_latents(models.image, latent[None]).cpu()
    canvas = decode_latents(models.audio, latent[None]).cpu()
    width = config.width - config.crop_right
    pictures = [to_unit(view.view_pixels(pixels))[0] for view in build_views(config.view_specs())]
    waves = [
        spectrogram_to_wave(to_unit(view.view_pixels(canvas))[0].mean(dim=0)[:, :width], config, models)
        for view in build_views(config.audio_view_specs())
    ]
    return Decoded(pictures, to_unit(canvas)[0].mean(dim=0)[:, :width], waves)


class Calls:
    """Counts the calls (and their batch sizes) of both VAEs' decode and of the vocoder."""

    def __init__(self, models, monkeypatch):
        self.vae: list[int] = []
        self.vocoder: list[int] = []
        for model in (models.image, models.audio):
            monkeypatch.setattr(model.vae, "decode", self.counting(model.vae.decode, self.vae))
        self.handle = models.vocoder.register_forward_pre_hook(
            lambda m, args: self.vocoder.append(len(args[0]))
        )

    @staticmethod
    def counting(decode, sizes):
        def counted(z, *args, **kwargs):
            sizes.append(len(z))
            return decode(z, *args, **kwargs)

        return counted


def test_a_chunk_takes_one_call_of_each_vae_and_of_the_vocoder_and_decodes_as_one_at_a_time(
    tiny_models, monkeypatch
):
    # Five candidates: chunks of 4 and 1. Candidate 3 crops another width (its own vocoder call), candidate 4
    # uses Griffin-Lim (seeded, on the host).
    configs, latents = configs_and_latents(5)
    configs[3] = configs[3].replace(crop_right=64)
    configs[4] = configs[4].replace(vocoder="griffin_lim")
    calls = Calls(tiny_models, monkeypatch)
    decoded = decode_candidates(latents, configs, tiny_models, vae_batch=4)
    calls.handle.remove()
    assert calls.vae == [4, 4, 1, 1]  # image and audio VAE, per chunk
    assert calls.vocoder == [6, 2]  # candidates 0-2 x 2 sounds, then candidate 3's 2 (Griffin-Lim: none)
    for k, config in enumerate(configs):
        alone = one_at_a_time(latents[k], config, tiny_models)
        # The VAE's kernels round a little differently in a batch of 4 (CPU fp32: 4e-5 measured).
        for got, expected in zip(decoded[k].pictures, alone.pictures, strict=True):
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
        torch.testing.assert_close(decoded[k].spectrogram, alone.spectrogram, atol=2e-4, rtol=0)
        assert [len(w) for w in decoded[k].waves] == [len(w) for w in alone.waves]
        for got, expected in zip(decoded[k].waves, alone.waves, strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert decoded[k].device_pictures is None  # decoded on the CPU: the host's pictures are the device's
    # One candidate with one sound per chunk is the one-at-a-time decoding, to the bit.
    configs, latents = configs_and_latents(1, audio_prompts=["bird chirping"])
    single = decode_candidates(latents, configs, tiny_models, vae_batch=1)[0]
    alone = one_at_a_time(latents[0], configs[0], tiny_models)
    assert all(torch.equal(a, b) for a, b in zip(single.pictures, alone.pictures, strict=True))
    assert torch.equal(single.spectrogram, alone.spectrogram)
    assert np.array_equal(single.waves[0], alone.waves[0])


def test_the_vocoder_of_a_batch_gives_each_sound_it_gives_alone(tiny_models):
    from sounding_anagrams.sampler.vocoder import vocode

    log_mels = torch.rand(
        6, tiny_models.vocoder.config.num_mels, 40, generator=torch.Generator().manual_seed(1)
    )
    together = vocode(tiny_models.vocoder, log_mels * 10 - 8)
    alone = torch.cat([vocode(tiny_models.vocoder, row[None] * 10 - 8) for row in log_mels])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)  # 9e-8 measured on sounds up to 0.29
    assert vocode(tiny_models.vocoder, log_mels, to_host=False).device == tiny_models.device


def test_to_host_cuts_one_buffer_back_into_the_tensors():
    tensors = [torch.rand(3, 4, 5), torch.rand(7), torch.rand(2, 3).t()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for got, expected in zip(render_module.cut(flat, tensors), tensors, strict=True):
        assert torch.equal(got, expected) and got.shape == expected.shape
    assert all(a is b for a, b in zip(render_module.to_host(tensors), tensors, strict=True))  # CPU: no copy


def output_of(latents: torch.Tensor) -> SamplerOutput:
    n = latents.shape[0]
    return SamplerOutput(latents, [False] * n, {}, {}, {}, [1] * n)


def test_a_chunk_out_of_memory_is_decoded_again_one_by_one(tiny_models, monkeypatch, tmp_path: Path, caplog):
    configs, latents = configs_and_latents(3, audio_prompts=["bird chirping"])
    latents[2] = float("nan")  # fails alone, by its own fault

    def short_of_memory(model, z):
        if len(z) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (injected)")
        return decode_latents(model, z)

    monkeypatch.setattr(render_module, "decode_latents", short_of_memory)
    folders = [tmp_path / f"seed{k}" for k in range(3)]
    results = decode_and_write(output_of(latents), configs, tiny_models, folders, with_clip=False)
    assert [r.failure for r in results] == [
        None,
        None,
        "decoding failed: the decoded pictures are not finite",
    ]
    assert "3 candidates at once: decoding failed: CUDA out of memory" in caplog.text
    for k in range(2):
        alone = one_at_a_time(latents[k], configs[k], tiny_models)
        assert all(
            torch.equal(a, b) for a, b in zip(results[k].decoded.pictures, alone.pictures, strict=True)
        )
        assert (folders[k] / "view1.png").is_file() and (folders[k] / "audio0.wav").is_file()


class RecordingScorers:
    def __init__(self):
        self.pictures = []

    def score(self, candidates):
        self.pictures += [c.pictures for c in candidates]
        return [{"clip/view0": 0.0} for _ in candidates]


def test_the_judges_score_the_pictures_where_they_were_decoded_then_let_them_go():
    host = [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]
    kept = [p.clone() for p in host]  # stands for the device's copies
    decoded = Decoded(host, torch.zeros(8, 8), [np.zeros(16, np.float32)], device_pictures=kept)
    config = RenderConfig(**TINY)
    recording = RecordingScorers()
    SharedScorers(recording).score([config], [decoded])  # type: ignore[arg-type]
    assert recording.pictures[0] is kept
    assert decoded.device_pictures is None and decoded.judged_pictures is host


# -- on a stand-in CUDA device (tests/test_host_waits.py): what crosses between the device and the host --


class CopiesToHost(host_waits.StandInCuda):
    """The stand-in device; also records the shape of each device -> host copy (``.cpu()``, ``.tolist()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_host: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        device = (kwargs or {}).get("device")
        leaving = device is not None and torch.device(device).type == "cpu"
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], host_waits.OnDevice) and leaving:
            self.to_host.append(tuple(args[0].shape))
        return super().__torch_dispatch__(func, types, args, kwargs)


def onto_stand_in(*modules: torch.nn.Module) -> None:
    """Parameters and buffers wrapped as stand-in device tensors, in place (as test_host_waits does)."""
    for module in modules:
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None:
                    sub._parameters[name] = torch.nn.Parameter(host_waits.OnDevice(param.detach()), False)
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    sub._buffers[name] = host_waits.OnDevice(buffer)


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # CLIP's fp16 autocast: off here
def test_on_a_gpu_a_chunk_comes_to_the_host_in_one_copy_and_the_judge_reads_the_device_pictures(
    _tiny_cache, tiny_models, monkeypatch
):
    """Decoded on the (stand-in) device: one device -> host copy per chunk, pictures kept on the device for
    the judges, the same values as on the CPU; CLIP scores them there, copying back only small results
    (ranges, embeddings), never a picture."""
    from sounding_anagrams.evaluation.clip import ClipScorer
    from sounding_anagrams.sampler.models import load_models

    configs, latents = configs_and_latents(3, height=256, width=64)
    cpu_decoded = decode_candidates(latents, configs, tiny_models, vae_batch=3)
    bundle = load_models("tiny", "tiny", device="cpu", dtype="float32")  # its own: moved in place below
    clip = ClipScorer("tiny", device="cpu")
    cpu_scores = clip.score_batch([d.pictures for d in cpu_decoded], configs[0].image_prompts)
    clip.text_embeddings(configs[0].image_prompts)  # cached: this test is about the pictures
    if not torch.cuda.is_available():  # as test_host_waits sets the stand-in up on a machine without a GPU
        monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
        torch._C._ensureCUDADeviceGuardSet()
    with host_waits.one_thread(), CopiesToHost() as mode:
        onto_stand_in(bundle.image.vae, bundle.audio.vae, bundle.vocoder, clip.model)
        models = dataclasses.replace(bundle, device=host_waits.CUDA)
        clip.device = host_waits.CUDA
        clip._mean, clip._std = host_waits.OnDevice(clip._mean), host_waits.OnDevice(clip._std)
        decoded = decode_candidates(latents, configs, models, vae_batch=3, keep_on_device=True)
        decode_copies, mode.to_host = mode.to_host, []
        scores = clip.score_batch([d.judged_pictures for d in decoded], configs[0].image_prompts)
    # 3 candidates x (2 pictures (3, 256, 64) + a spectrogram (256, 32) + 2 sounds of 32 frames).
    hop = bundle.vocoder.config.hop_length
    assert decode_copies == [(3 * (2 * 3 * 256 * 64 + 256 * 32 + 2 * 32 * hop),)]
    for got, expected in zip(decoded, cpu_decoded, strict=True):
        assert all(isinstance(p, host_waits.OnDevice) for p in got.device_pictures)
        assert not any(isinstance(p, host_waits.OnDevice) for p in got.pictures)
        for on_device, host, cpu in zip(got.device_pictures, got.pictures, expected.pictures, strict=True):
            assert torch.equal(on_device.host, host)
            torch.testing.assert_close(host, cpu, atol=1e-4, rtol=0)  # the stand-in's attention path: 3e-5
        for wave, cpu_wave in zip(got.waves, expected.waves, strict=True):
            np.testing.assert_allclose(wave, cpu_wave, atol=1e-5, rtol=0)
    # CLIP: per candidate one (2, 2) copy of the pictures' ranges and one of the window embeddings.
    assert mode.to_host and max(math.prod(shape) for shape in mode.to_host) < 3 * 256 * 64
    for got, expected in zip(scores, cpu_scores, strict=True):
        assert got.keys() == expected.keys()
        assert all(abs(got[k] - expected[k]) < 1e-4 for k in got)
