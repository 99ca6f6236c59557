"""HiFi-GAN generator, weight-norm (un)folding and checkpoint loading in Auffusion's layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sounding_anagrams.errors import ConfigError, ModelLoadError
from sounding_anagrams.sampler.vocoder import (
    HiFiGANConfig,
    HiFiGANGenerator,
    from_checkpoint_keys,
    fuse_weight_norm,
    load_vocoder,
    save_vocoder,
    split_weight_norm,
    to_checkpoint_keys,
    vocode,
)


def _tiny_generator(seed: int = 0, config: HiFiGANConfig | None = None) -> HiFiGANGenerator:
    torch.manual_seed(seed)
    return HiFiGANGenerator(config or HiFiGANConfig.tiny()).eval()


def _mel(t: int, n_mels: int = 256, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_mels, t, generator=gen) - 4.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[HiFiGANGenerator, Path]:
    """A tiny generator saved as ``<root>/vocoder/{config.json,vocoder.pt}``; returns (generator, root)."""
    root = tmp_path_factory.mktemp("model")
    gen = _tiny_generator()
    save_vocoder(gen, root / "vocoder")
    return gen, root


def _write_checkpoint(folder: Path, obj: object, config: HiFiGANConfig | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps((config or HiFiGANConfig.tiny()).to_dict()))
    torch.save(obj, folder / "vocoder.pt")
    return folder


def _saved_state(root: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / "vocoder" / "vocoder.pt", map_location="cpu", weights_only=True)
    return dict(ckpt["generator"])


# --------------------------------------------------------------------------- config


def test_config_from_dict_ignores_unknown_and_round_trips() -> None:
    d = HiFiGANConfig.tiny().to_dict() | {
        "batch_size": 16,
        "learning_rate": 2e-4,
        "n_fft": 2048,
        "hop_size": 160,
    }
    cfg = HiFiGANConfig.from_dict(d)
    assert cfg == HiFiGANConfig.tiny()
    assert cfg.hop_length == 160
    assert HiFiGANConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_missing_key() -> None:
    d = HiFiGANConfig.tiny().to_dict()
    del d["upsample_rates"]
    with pytest.raises(ModelLoadError, match="upsample_rates"):
        HiFiGANConfig.from_dict(d)


def test_config_inconsistent_lengths() -> None:
    d = HiFiGANConfig.tiny().to_dict() | {"upsample_kernel_sizes": [10, 8]}
    with pytest.raises(ModelLoadError, match="same length"):
        HiFiGANConfig.from_dict(d)
    with pytest.raises(ModelLoadError, match="resblock"):
        HiFiGANConfig.from_dict(HiFiGANConfig.tiny().to_dict() | {"resblock": "3"})


# --------------------------------------------------------------------------- generator


def test_key_map_gives_the_checkpoint_layout() -> None:
    gen = _tiny_generator()
    state = gen.state_dict()
    keys = set(to_checkpoint_keys(state))
    for key in ("conv_pre.weight", "conv_pre.bias", "ups.0.weight", "ups.3.bias", "conv_post.weight"):
        assert key in keys
    # Two kernels per stage, four stages: resblocks 0..7 with convs1/convs2 of three convs each.
    assert "resblocks.7.convs1.2.weight" in keys and "resblocks.7.convs2.2.bias" in keys
    assert "resblocks.8.convs1.0.weight" not in keys
    assert not any(k.startswith(("hifigan.", "upsampler.")) for k in keys)
    assert "mean" not in keys and "scale" not in keys  # SpeechT5's unused input normalisation
    assert gen.hifigan.upsampler[0].weight.shape == (32, 16, 11)  # ConvTranspose1d: (in, out, k)
    assert to_checkpoint_keys(state)["conv_post.weight"].shape == (1, 2, 7)
    back = from_checkpoint_keys(to_checkpoint_keys(state))
    assert set(back) == set(state) - {"hifigan.mean", "hifigan.scale"}
    assert all(back[k] is state[k] for k in back)


@pytest.mark.parametrize("frames", [1024, 37, 1])
def test_output_length(frames: int) -> None:
    gen = _tiny_generator()
    with torch.no_grad():
        out = gen(_mel(frames))
    assert out.shape == (1, frames * 160)
    assert out.abs().max() <= 1.0


def test_layouts_speecht5_cannot_build_are_refused() -> None:
    """SpeechT5HifiGan has no two-conv residual block (HiFi-GAN v3) and pads an odd k - u short by one."""
    base = HiFiGANConfig.tiny().to_dict()
    with pytest.raises(ModelLoadError, match=r"resblock='2'.*SpeechT5HifiGan.*resblock '1' only"):
        HiFiGANConfig.from_dict(base | {"resblock": "2", "resblock_dilation_sizes": [[1, 3], [1, 2]]})
    with pytest.raises(ModelLoadError, match=r"pairs \[\(5, 10\)\] have an odd kernel - rate"):
        HiFiGANConfig.from_dict(base | {"upsample_kernel_sizes": [10, 8, 8, 4]})
    with pytest.raises(ModelLoadError, match="exactly 3 dilations"):
        HiFiGANConfig.from_dict(base | {"resblock_dilation_sizes": [[1, 3, 5, 7], [1, 3, 5]]})


def _reference_forward(state: dict[str, torch.Tensor], cfg: HiFiGANConfig, mel: torch.Tensor) -> torch.Tensor:
    """HiFi-GAN v1's generator written out from its definition (DESIGN.md's vocoder layout) on a fused
    checkpoint state dict in Auffusion's names: the oracle that SpeechT5HifiGan must keep matching."""
    n_kernels = len(cfg.resblock_kernel_sizes)
    x = F.conv1d(mel, state["conv_pre.weight"], state["conv_pre.bias"], padding=3)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, state[f"ups.{i}.weight"], state[f"ups.{i}.bias"], u, (k - u) // 2)
        outs = []
        for j, (kr, dilations) in enumerate(
            zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        ):
            h, name = x, f"resblocks.{i * n_kernels + j}"
            for m, d in enumerate(dilations):
                t = F.leaky_relu(h, 0.1)
                t = F.conv1d(
                    t,
                    state[f"{name}.convs1.{m}.weight"],
                    state[f"{name}.convs1.{m}.bias"],
                    padding=d * (kr - 1) // 2,
                    dilation=d,
                )
                t = F.leaky_relu(t, 0.1)
                t = F.conv1d(
                    t,
                    state[f"{name}.convs2.{m}.weight"],
                    state[f"{name}.convs2.{m}.bias"],
                    padding=(kr - 1) // 2,
                )
                h = h + t
            outs.append(h)
        x = sum(outs) / n_kernels
    # HiFi-GAN's last activation uses leaky_relu's default slope, 0.01.
    x = F.conv1d(F.leaky_relu(x), state["conv_post.weight"], state["conv_post.bias"], padding=3)
    return torch.tanh(x).squeeze(1)


def test_generator_is_hifigan_v1_on_auffusions_checkpoint(tmp_path: Path) -> None:
    """A checkpoint saved in Auffusion's layout, vocoded by the loaded SpeechT5HifiGan and by the definition.
    Three residual kernels like Auffusion's (the tiny preset has two); outputs pushed towards +-1."""
    cfg = HiFiGANConfig.from_dict(
        HiFiGANConfig.tiny().to_dict()
        | {"resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5]] * 3}
    )
    gen = _tiny_generator(config=cfg)
    with torch.no_grad():
        gen.hifigan.conv_post.weight.mul_(5.0)
    save_vocoder(gen, tmp_path)
    state = fuse_weight_norm(torch.load(tmp_path / "vocoder.pt", weights_only=True)["generator"])
    mel = _mel(48)
    out = vocode(load_vocoder(tmp_path, subfolder=None), mel)
    with torch.no_grad():
        expected = _reference_forward(state, cfg, mel)
    assert expected.abs().max() > 0.3, "the outputs should not all sit near zero"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_tiny_vocoder_is_fast_enough() -> None:
    n_params = sum(p.numel() for p in _tiny_generator().parameters())
    assert n_params < 100_000


# --------------------------------------------------------------------------- weight norm


def test_split_then_fuse_is_identity() -> None:
    state = to_checkpoint_keys(_tiny_generator().state_dict())
    split = split_weight_norm(state)
    assert "conv_pre.weight" not in split and "conv_pre.bias" in split
    assert split["ups.0.weight_g"].shape == (32, 1, 1)
    assert split["ups.0.weight_v"].shape == (32, 16, 11)
    fused = fuse_weight_norm(split)
    assert fused.keys() == state.keys()
    for k, v in state.items():
        assert torch.allclose(fused[k], v, atol=1e-6), k


def test_fuse_matches_weight_norm_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 3, 5, generator=gen)
    g = torch.rand(4, 1, 1, generator=gen) + 0.5
    fused = fuse_weight_norm({"c.weight_g": g, "c.weight_v": v, "c.bias": torch.zeros(4)})
    expected = g * v / v.norm(dim=(1, 2), keepdim=True)
    assert torch.allclose(fused["c.weight"], expected, atol=1e-6)
    assert set(fused) == {"c.weight", "c.bias"}
    # The newer parametrization names fuse the same way.
    new = fuse_weight_norm(
        {"c.parametrizations.weight.original0": g, "c.parametrizations.weight.original1": v}
    )
    assert torch.allclose(new["c.weight"], expected, atol=1e-6)


def test_fuse_unpaired_raises() -> None:
    with pytest.raises(ModelLoadError, match=r"conv_pre\.weight_v"):
        fuse_weight_norm({"conv_pre.weight_v": torch.ones(2, 1, 1)})
    with pytest.raises(ModelLoadError, match=r"ups\.0\.weight_g"):
        fuse_weight_norm({"ups.0.weight_g": torch.ones(2, 1, 1)})


# --------------------------------------------------------------------------- save / load


def test_saved_checkpoint_uses_old_weight_norm_layout(saved: tuple[HiFiGANGenerator, Path]) -> None:
    _, root = saved
    assert sorted(p.name for p in (root / "vocoder").iterdir()) == ["config.json", "vocoder.pt"]
    ckpt = torch.load(root / "vocoder" / "vocoder.pt", map_location="cpu", weights_only=True)
    assert list(ckpt) == ["generator"]
    keys = set(ckpt["generator"])
    assert any(k.endswith(".weight_g") for k in keys)
    assert any(k.endswith(".weight_v") for k in keys)
    assert not any(k.endswith(".weight") for k in keys)
    assert "resblocks.0.convs1.0.weight_g" in keys and "conv_post.bias" in keys and "ups.3.weight_v" in keys
    assert json.loads((root / "vocoder" / "config.json").read_text()) == HiFiGANConfig.tiny().to_dict()


def test_load_reproduces_output(saved: tuple[HiFiGANGenerator, Path]) -> None:
    original, root = saved
    mel = _mel(1024)
    with torch.no_grad():
        expected = original(mel)
    for loaded in (
        load_vocoder(root / "vocoder", subfolder=None),
        load_vocoder(root),
        load_vocoder(str(root)),
    ):
        assert not loaded.training
        assert all(not p.requires_grad for p in loaded.parameters())
        assert loaded.config == original.config
        out = vocode(loaded, mel)
        assert out.shape == (1, 1024 * 160)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        assert torch.allclose(out, expected, atol=1e-5)
    # An odd frame count too.
    odd = _mel(101)
    with torch.no_grad():
        assert torch.allclose(vocode(load_vocoder(root), odd), original(odd), atol=1e-5)


def test_load_with_dtype(saved: tuple[HiFiGANGenerator, Path]) -> None:
    _, root = saved
    gen = load_vocoder(root, dtype=torch.float64)
    assert next(gen.parameters()).dtype == torch.float64
    out = vocode(gen, _mel(8))  # float32 input is cast to the generator's dtype; output is float32
    assert out.dtype == torch.float32


def test_vocode_rejects_wrong_mel_count(saved: tuple[HiFiGANGenerator, Path]) -> None:
    gen, _ = saved
    with pytest.raises(ConfigError, match="height=128"):
        vocode(gen, torch.zeros(1, 128, 10))
    with pytest.raises(ConfigError, match="shape"):
        vocode(gen, torch.zeros(256, 10))


def test_missing_generator_key(tmp_path: Path) -> None:
    folder = _write_checkpoint(tmp_path / "v", {"model": {}, "optim": {}})
    with pytest.raises(ModelLoadError, match=r"no 'generator'.*\['model', 'optim'\]"):
        load_vocoder(folder, subfolder=None)


def test_renamed_key_reports_missing_and_unexpected(
    saved: tuple[HiFiGANGenerator, Path], tmp_path: Path
) -> None:
    state = _saved_state(saved[1])
    state["conv_post.bias_renamed"] = state.pop("conv_post.bias")
    folder = _write_checkpoint(tmp_path / "v", {"generator": state})
    with pytest.raises(ModelLoadError, match="missing keys") as info:
        load_vocoder(folder, subfolder=None)
    msg = str(info.value)
    assert "conv_post.bias" in msg and "conv_post.bias_renamed" in msg and "unexpected keys (1)" in msg


def test_wrong_shape_names_both_shapes(saved: tuple[HiFiGANGenerator, Path], tmp_path: Path) -> None:
    state = _saved_state(saved[1])
    state["conv_pre.bias"] = torch.zeros(31)
    folder = _write_checkpoint(tmp_path / "v", {"generator": state})
    with pytest.raises(ModelLoadError, match=r"conv_pre\.bias: checkpoint \(31,\) vs model \(32,\)"):
        load_vocoder(folder, subfolder=None)


def test_config_mismatching_checkpoint(saved: tuple[HiFiGANGenerator, Path], tmp_path: Path) -> None:
    cfg = HiFiGANConfig.from_dict(HiFiGANConfig.tiny().to_dict() | {"num_mels": 80})
    folder = _write_checkpoint(tmp_path / "v", {"generator": _saved_state(saved[1])}, config=cfg)
    with pytest.raises(ModelLoadError, match=r"conv_pre\.weight_?.*\(32, 256, 7\)"):
        load_vocoder(folder, subfolder=None)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(
        ModelLoadError, match=re.escape(str(missing)) + r".*does not exist.*config\.json and vocoder\.pt"
    ):
        load_vocoder(missing)
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text(json.dumps(HiFiGANConfig.tiny().to_dict()))
    with pytest.raises(ModelLoadError, match=r"lacks vocoder\.pt.*auffusion/auffusion-full-no-adapter"):
        load_vocoder(tmp_path / "only_config")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json, vocoder\.pt"):
        load_vocoder(tmp_path / "empty")


def test_bad_config_json(saved: tuple[HiFiGANGenerator, Path], tmp_path: Path) -> None:
    folder = _write_checkpoint(tmp_path / "v", {"generator": _saved_state(saved[1])})
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read vocoder config"):
        load_vocoder(folder, subfolder=None)


class _Evil:
    """Unpickling this would call ``open(marker, "w")`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    folder = _write_checkpoint(tmp_path / "v", {"generator": {}, "payload": _Evil(marker)})
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_vocoder(folder, subfolder=None)
    assert not marker.exists()


def test_hub_id_offline_with_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once at import; patch the module too in case it is already imported.
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so the id cannot be mistaken for a local folder
    with pytest.raises(ModelLoadError) as info:
        load_vocoder("auffusion/auffusion-full-no-adapter")
    msg = str(info.value)
    assert "not in the Hugging Face cache" in msg
    assert "auffusion/auffusion-full-no-adapter" in msg and "'vocoder'" in msg
    assert "local folder" in msg and "config.json and vocoder.pt" in msg
