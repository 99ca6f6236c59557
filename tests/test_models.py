"""Model loading: the tiny preset goes through the same from_pretrained path as real weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from sounding_anagrams.devices import resolve_device
from sounding_anagrams.errors import ConfigError, ModelLoadError
from sounding_anagrams.files import looks_like_path
from sounding_anagrams.sampler.models import load_diffusion_model, load_models, resolve_dtype
from sounding_anagrams.sampler.tiny import ensure_tiny_models, tiny_cache_dir


def test_tiny_preset_is_saved_as_pipeline_folders_and_loaded_back(tiny_models):
    folders = ensure_tiny_models()
    for kind in ("image", "audio"):
        names = sorted(p.name for p in folders[kind].iterdir())
        expected = ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
        assert names == sorted(expected + (["vocoder"] if kind == "audio" else []))
        assert (folders[kind] / "unet" / "config.json").exists()
    assert sorted(p.name for p in (folders["audio"] / "vocoder").iterdir()) == ["config.json", "vocoder.pt"]
    assert isinstance(tiny_models.image.unet, UNet2DConditionModel)
    assert isinstance(tiny_models.audio.vae, AutoencoderKL)
    assert isinstance(tiny_models.image.text_encoder, CLIPTextModel)
    assert tiny_models.vocoder is not None
    # Two different models (different seeds), as SD 1.5 and Auffusion are.
    image_weight = next(tiny_models.image.unet.parameters())
    audio_weight = next(tiny_models.audio.unet.parameters())
    assert not torch.equal(image_weight, audio_weight)
    assert tiny_models.scheduler_config["beta_schedule"] == "scaled_linear"


def test_tiny_vae_downsamples_by_8_like_the_real_one(tiny_models):
    pixels = torch.zeros(1, 3, 256, 1024)
    with torch.no_grad():
        latent = tiny_models.image.vae.encode(pixels).latent_dist.mean
        decoded = tiny_models.image.vae.decode(latent).sample
    assert latent.shape == (1, 4, 32, 128)
    assert decoded.shape == (1, 3, 256, 1024)


def test_tiny_tokenizer_pads_to_77_and_encodes_text(tiny_models):
    tokenizer = tiny_models.image.tokenizer
    ids = tokenizer(["a castle"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    with torch.no_grad():
        embedding = tiny_models.image.text_encoder(torch.tensor([ids]))[0]
    assert embedding.shape == (1, 77, 32)


def test_tiny_preset_is_built_once_and_reused():
    folders = ensure_tiny_models()
    stamp = (folders["image"] / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_models() == folders
    assert (folders["image"] / "model_index.json").stat().st_mtime_ns == stamp
    assert folders["image"].parent == tiny_cache_dir()


def test_a_partial_tiny_folder_is_rebuilt(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SOUNDING_ANAGRAMS_CACHE", str(tmp_path))
    broken = tiny_cache_dir() / "image"
    broken.mkdir(parents=True)
    (broken / "half-written").write_text("x")
    folders = ensure_tiny_models()
    assert not (folders["image"] / "half-written").exists()
    assert (
        json.loads((folders["image"] / "model_index.json").read_text())["_class_name"]
        == "StableDiffusionPipeline"
    )


def test_missing_folder_or_part_gives_a_clear_error(tmp_path: Path):
    with pytest.raises(
        ModelLoadError, match=r"model folder .*nowhere.* does not exist; give a diffusers pipeline folder"
    ):
        load_diffusion_model(str(tmp_path / "nowhere"), device=torch.device("cpu"), dtype=torch.float32)
    partial = tmp_path / "partial"
    partial.mkdir()
    import shutil

    shutil.copytree(ensure_tiny_models()["image"] / "unet", partial / "unet")
    with pytest.raises(ModelLoadError, match=r"could not load vae of"):
        load_diffusion_model(str(partial), device=torch.device("cpu"), dtype=torch.float32)


def test_hub_id_offline_without_cache_names_the_id(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"could not load unet of 'someone/not-cached'"):
        load_models("someone/not-cached", "tiny", device="cpu")


def test_device_and_dtype_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"dtype='float16': float16 is not supported on the CPU"):
        resolve_dtype("float16", torch.device("cpu"))


def test_device_names_allowed_and_refused(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:01", "mps", "CPU", ""):
        with pytest.raises(ConfigError, match=r"must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match=r"^--device='tpu': must be"):
        resolve_device("tpu", field="--device")
    # No CUDA device: auto falls back to the CPU; naming CUDA is refused, saying so.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for cuda in ("cuda", "cuda:0", torch.device("cuda", 0)):
        with pytest.raises(
            ConfigError, match=r"no CUDA device is present on this machine; use 'cpu' or 'auto'"
        ):
            resolve_device(cuda)
    # Two CUDA devices: cuda:1 is one of them, cuda:2 is not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(
        ConfigError, match=r"device='cuda:2': this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")


def test_a_model_name_is_a_folder_or_a_hub_id(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for hub_id in ("owner/name", "tiny", "laion/clap-htsat-unfused"):
        assert not looks_like_path(hub_id)
    (tmp_path / "local").mkdir()
    for folder in ("local", "./x", "../x", "/abs/x", "~/x", "a/b/c", "C:\\models\\sd"):
        assert looks_like_path(folder), folder


def _pipeline_copy(kind: str, target: Path) -> Path:
    """A copy of the tiny ``kind`` pipeline folder, to lay its weights out as a real repo does."""
    import shutil

    shutil.copytree(ensure_tiny_models()[kind], target)
    return target


def test_auffusions_layout_bin_only_unet_loads_in_fp16_with_weights_only(tmp_path: Path, monkeypatch):
    """Auffusion's unet/ ships only diffusion_pytorch_model.bin (no safetensors, no fp16 variant): asked for
    fp16, the loader tries the fp16 variant, falls back to the plain .bin, and reads it with
    ``torch.load(weights_only=True)`` (a pickle that could run code is refused)."""
    folder = _pipeline_copy("audio", tmp_path / "auffusion")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.bin",
    ]
    loads: list[Any] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    model = load_diffusion_model(str(folder), device=torch.device("cpu"), dtype=torch.float16)
    assert loads and all(flag is True for flag in loads), loads
    assert next(model.unet.parameters()).dtype == torch.float16
    expected = {k: v.half() for k, v in unet.state_dict().items()}
    for name, value in model.unet.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_an_sd_style_folder_with_an_fp16_variant_loads_the_variant_in_fp16(tmp_path: Path):
    """SD 1.5's repo has both the plain weights and the fp16 variant: asked for fp16, the variant wins
    (half the bytes read); asked for fp32, the plain weights."""
    folder = _pipeline_copy("image", tmp_path / "sd15")
    plain = UNet2DConditionModel.from_pretrained(folder / "unet")
    variant = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for parameter in variant.parameters():  # a variant told apart from the plain weights
            parameter.mul_(0.5)
    variant.half().save_pretrained(folder / "unet", variant="fp16")
    names = sorted(p.name for p in (folder / "unet").iterdir())
    assert names == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    half = load_diffusion_model(str(folder), device=torch.device("cpu"), dtype=torch.float16)
    full = load_diffusion_model(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    first = next(iter(plain.state_dict()))
    assert half.unet.state_dict()[first].dtype == torch.float16
    assert torch.equal(half.unet.state_dict()[first], (plain.state_dict()[first] * 0.5).half())
    assert torch.equal(full.unet.state_dict()[first], plain.state_dict()[first])


def test_a_cuda_device_by_index_becomes_the_current_one(monkeypatch):
    """Events and readbacks go to the current device's stream: with the models on cuda:1 it must be cuda:1."""
    from sounding_anagrams.devices import make_current

    made: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    for device in (torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1)):
        make_current(device)
    assert made == [torch.device("cuda", 1)]
