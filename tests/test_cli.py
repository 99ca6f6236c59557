"""`sounding-anagrams render` end to end on the tiny models: files, determinism, re-render, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from sounding_anagrams.cli import main
from sounding_anagrams.sampler.audio import read_wav

REPO = Path(__file__).resolve().parents[1]
FAST = ["--models", "tiny", "--device", "cpu", "--steps", "2", "--image-start-step", "1", "--quiet"]


def render(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["render", *FAST, *extra, "--out", str(out)]) == 0
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.slow
def test_render_writes_every_file_a_user_needs(tmp_path: Path, capsys):
    out = render(tmp_path, "rotate", "--config", str(REPO / "configs" / "rotate.yaml"))
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "audio0.wav",
        "config.yaml",
        "render.json",
        "spectrogram.png",
        "transition.mp4",
        "view0.png",
        "view1.png",
    ]
    for view in ("view0.png", "view1.png"):
        assert Image.open(out / view).size == (1024, 256)
    assert Image.open(out / "spectrogram.png").size == (1024 - 32, 256)
    with av.open(str(out / "transition.mp4")) as clip:  # H.264 at the clip's size: half the canvas
        video = clip.streams.video[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", 512, 128)
        frames = [frame.to_ndarray(format="gray") for frame in clip.decode(video)]
    with av.open(str(out / "transition.mp4")) as clip:  # the sound plays along: AAC, as long as the WAV
        sound = clip.streams.audio[0]
        assert (sound.codec_context.name, sound.rate, sound.channels) == ("aac", 16000, 1)
        heard = np.concatenate([f.to_ndarray().reshape(-1) for f in clip.decode(sound)])
    wav, _ = read_wav(out / "audio0.wav")
    assert abs(len(heard) - len(wav)) <= 2048  # AAC pads to whole 1024-sample frames (and its priming)
    assert np.sqrt(np.mean(heard**2)) == pytest.approx(np.sqrt(np.mean(wav**2)), rel=0.2)
    # The frames last as long as the sound: the holds are stretched (12 fps, 24 frames per turn).
    assert len(frames) == math.ceil(len(wav) / 16000 * 12)
    # It starts on view 0 and turns into view 1 (within H.264's loss), then holds and turns back.
    view1 = np.asarray(Image.open(out / "view1.png").convert("L").resize((512, 128), Image.BOX), np.float32)
    view0 = np.asarray(Image.open(out / "view0.png").convert("L").resize((512, 128), Image.BOX), np.float32)
    holds = len(frames) - 48
    middle = frames[holds - holds // 2 + 23].astype(np.float32)
    assert np.abs(middle - view1).mean() < 0.5 * np.abs(middle - view0).mean()
    assert np.abs(frames[0].astype(np.float32) - view0).mean() < 12
    wave, rate = read_wav(out / "audio0.wav")
    assert rate == 16000
    assert len(wave) == (1024 - 32) * 160  # 10.24 s minus the 32-pixel crop = 9.92 s
    assert np.abs(wave).max() > 0
    meta = json.loads((out / "render.json").read_text())
    assert meta["seed"] == 0 and meta["steps_done"] == 2 and meta["duration_s"] == [9.92]
    printed = capsys.readouterr().out
    assert str(out) in printed and "audio0" in printed


@pytest.mark.slow
def test_same_config_twice_gives_identical_files_and_config_yaml_re_renders_them(tmp_path: Path):
    first = render(
        tmp_path,
        "a",
        "--seed",
        "3",
        "--views",
        "identity",
        "patch_permute",
        "--image-prompts",
        "trees",
        "castles",
    )
    second = render(
        tmp_path,
        "b",
        "--seed",
        "3",
        "--views",
        "identity",
        "patch_permute",
        "--image-prompts",
        "trees",
        "castles",
    )
    assert folder_bytes(first) == folder_bytes(second)
    again = tmp_path / "again"
    assert main(["render", "--config", str(first / "config.yaml"), "--quiet", "--out", str(again)]) == 0
    assert folder_bytes(again) == folder_bytes(first)
    other = render(
        tmp_path,
        "c",
        "--seed",
        "4",
        "--views",
        "identity",
        "patch_permute",
        "--image-prompts",
        "trees",
        "castles",
    )
    assert (other / "view0.png").read_bytes() != (first / "view0.png").read_bytes()


@pytest.mark.slow
def test_per_view_audio_prompts_give_one_wav_each_and_griffin_lim_needs_no_vocoder(tmp_path: Path):
    out = render(
        tmp_path,
        "two-sounds",
        "--config",
        str(REPO / "configs" / "mirror-two-sounds.yaml"),
        "--vocoder",
        "griffin_lim",
    )
    first, rate = read_wav(out / "audio0.wav")
    second, _ = read_wav(out / "audio1.wav")
    assert rate == 16000 and len(first) == len(second) == 992 * 160
    assert not np.array_equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("height", "width", "views"),
    [(256, 256, ["identity", "rotate_cw"]), (512, 512, ["identity", "rotate_180"])],
)
def test_square_canvases_render(tmp_path: Path, height: int, width: int, views: list[str]):
    out = render(
        tmp_path,
        f"{height}x{width}",
        "--height",
        str(height),
        "--width",
        str(width),
        "--views",
        *views,
        "--crop-right",
        "0",
    )
    assert Image.open(out / "view1.png").size == (width, height)
    wave, _ = read_wav(out / "audio0.wav")
    assert len(wave) == width * 160


@pytest.mark.slow
def test_several_seeds_render_in_one_batch(tmp_path: Path):
    out = render(tmp_path, "seeds", "--num-seeds", "2", "--seed", "5")
    assert sorted(p.name for p in out.iterdir()) == ["seed5", "seed6"]
    single = render(tmp_path, "single", "--seed", "6")
    # Batched and single renders of one seed agree up to float rounding (convolutions of other batch sizes
    # sum in another order): at most one grey level on a few pixels.
    batched = np.asarray(Image.open(out / "seed6" / "view1.png"), dtype=int)
    alone = np.asarray(Image.open(single / "view1.png"), dtype=int)
    assert np.abs(batched - alone).max() <= 1
    assert (batched != alone).mean() < 0.01


def test_a_short_schedule_renders_with_the_default_warm_start(tmp_path: Path, capsys):
    # The default image start is 5% of the schedule: 3 steps start at 0 instead of failing on step 5.
    out = tmp_path / "three"
    argv = ["render", "--models", "tiny", "--device", "cpu", "--steps", "3", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["num_inference_steps"] == 3 and config["image_start_step"] is None
    assert json.loads((out / "render.json").read_text())["steps_done"] == 3
    # An explicit value out of range is still refused, naming the field.
    capsys.readouterr()
    assert main([*argv[:-2], "--image-start-step", "5"]) == 2
    assert "image_start_step=5: must be in [0, num_inference_steps) = [0, 3)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--views", "identity", "rotat"], r"unknown view 'rotat'; did you mean 'rotate_[a-z0-9]+'\?"),
        (["--image-prompts", "only one"], r"image_prompts=\['only one'\]: give one image prompt per view"),
        (["--view-weights", "0.3", "0.3"], r"view_weights=\[0.3, 0.3\]"),
        (["--audio-weight", "2"], r"audio_weight=2.0: must be in \[0, 1\]"),
        (["--views", "identity", "rotate_cw"], r"tile_rotate_cw"),
        (["--models", "/nowhere"], r"--models='/nowhere': must be 'tiny', 'default', a folder"),
        (["--config", "/nowhere.yaml"], r"--config='/nowhere.yaml': no such file"),
        (["--audio-prompt", "a", "--audio-prompts", "b", "c"], r"not both"),
        (["--num-seeds", "0"], r"--num-seeds=0: must be at least 1"),
        (["--out", __file__], r"--out=.*test_cli.py': is a file; give a folder"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(argv, pattern, capsys):
    assert main(["render", "--models", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ")
    import re

    assert re.search(pattern, err), err


def test_unknown_key_in_config_file_names_file_and_key(tmp_path: Path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("views: [identity, flip]\nimage_prompts: [a, b]\naudio_wieght: 0.3\n")
    assert main(["render", "--config", str(config)]) == 2
    assert (
        "typo.yaml: audio_wieght=0.3: unknown field 'audio_wieght'; did you mean 'audio_weight'?"
        in capsys.readouterr().err
    )


def test_missing_weights_offline_exit_3_with_what_to_do(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code = main(
        [
            "render",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--image-start-step",
            "0",
            "--quiet",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "local diffusers pipeline folder" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_console_script_runs_in_a_fresh_process(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sounding_anagrams.cli", "render", *FAST, "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p" / "audio0.wav").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["render", "--audio-weight", "nan"],
        ["render", "--image-guidance", "inf"],
        ["render", "--view-weights", "0.5", "inf"],
        ["search", "studies/rotate.yaml", "--minutes", "nan"],
    ],
)
def test_nan_and_infinity_are_refused_where_a_number_is_read(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must be a finite number, but got" in err and argv[-1] in err and "Traceback" not in err


def test_counts_and_seed_ranges_are_checked_with_the_flag_named(tmp_path: Path, capsys):
    assert main(["leaderboard", "rotate", "--runs", str(tmp_path), "--top", "0"]) == 2
    assert "--top=0: must be at least 1" in capsys.readouterr().err
    argv = ["render", "--models", "tiny", "--seed", str(2**63 - 1), "--num-seeds", "2"]
    assert main(argv) == 2
    assert "--num-seeds=2: renders seeds 9223372036854775807..9223372036854775808" in capsys.readouterr().err


def test_a_finished_render_is_never_written_over(tmp_path: Path, capsys, monkeypatch):
    first = render(tmp_path, "once", "--seed", "1")
    before = folder_bytes(first)
    (first / "scores.json").write_text("{}")
    capsys.readouterr()
    assert main(["render", *FAST, "--seed", "2", "--out", str(first)]) == 2
    assert "holds a finished render" in capsys.readouterr().err
    assert {k: v for k, v in folder_bytes(first).items() if k != "scores.json"} == before
    # The default folder is named by views and seed: a second render of other prompts gets a fresh one.
    monkeypatch.chdir(tmp_path)
    assert main(["render", *FAST, "--seed", "3"]) == 0
    assert main(["render", *FAST, "--seed", "3", "--image-prompts", "a", "b"]) == 0
    err = capsys.readouterr().err
    assert (
        "renders/identity-tile_rotate_cw-seed3 exists; rendering into renders/identity-tile_rotate_cw-seed3-2"
        in err
    )
    second = yaml.safe_load(
        (tmp_path / "renders" / "identity-tile_rotate_cw-seed3-2" / "config.yaml").read_text()
    )
    assert second["image_prompts"] == ["a", "b"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["render", "--help"],
        ["render", "--steps", "0", "--models", "tiny"],
        ["render", "--views", "bogus", "--models", "tiny"],
        ["search", "studies/nope.yaml"],
        ["search", "studies/rotate.yaml", "--trials", "0"],
        ["prefer", "studies/rotate.yaml", "--candidates", "1"],
        ["leaderboard", "rotate", "--runs", "nowhere"],
        ["export", "rotate", "--runs", "nowhere"],
        ["dashboard", "--runs", "nowhere"],
        ["ui", "--runs", "nowhere"],
        ["evaluate", "nowhere"],
    ],
)
def test_help_and_input_errors_answer_before_the_heavy_libraries_load(argv: list[str], tmp_path: Path):
    """The command line checks its arguments before torch, diffusers or transformers are imported (each
    costs seconds): a typo is answered at once (docs/PERFORMANCE.md, "The command line")."""
    probe = (
        "import sys\n"
        "from sounding_anagrams.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "names = ('torch', 'diffusers', 'transformers', 'open_clip', 'mlflow')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print('exit', code, 'heavy', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    last = done.stdout.strip().splitlines()[-1]
    expected_code = 0 if "--help" in argv else 2
    assert last == f"exit {expected_code} heavy []", (last, done.stderr[-2000:])
    if expected_code:
        assert done.stderr.startswith("error: "), done.stderr


def test_render_on_a_cuda_device_this_machine_lacks_says_so_before_any_model_loads(
    tmp_path: Path, capsys, monkeypatch
):
    import torch

    import sounding_anagrams.sampler.models as models_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models_module, "load_models_for", lambda config: pytest.fail("models loaded"))
    assert main(["render", "--models", "tiny", "--device", "cuda:1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == "error: --device='cuda:1': no CUDA device is present on this machine; use 'cpu' or 'auto'\n"
    assert not (tmp_path / "r").exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(monkeypatch, capsys):
    """A bug (played here by a command that raises what no code foresaw) is one sentence and exit code 70;
    --debug, or SOUNDING_ANAGRAMS_DEBUG=1, lets its traceback through."""
    import sounding_anagrams.cli as cli

    def broken(args):
        raise KeyError("no such thing")

    monkeypatch.setattr(cli, "run_leaderboard", broken)
    monkeypatch.delenv("SOUNDING_ANAGRAMS_DEBUG", raising=False)
    assert cli.main(["leaderboard", "rotate"]) == cli.UNEXPECTED_EXIT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        "error: an unexpected error (KeyError: 'no such thing'): a bug of sounding-anagrams"
    )
    with pytest.raises(KeyError):
        cli.main(["--debug", "leaderboard", "rotate"])
    # The flag holds for that call (and the processes it starts), not for what this process runs next.
    assert "SOUNDING_ANAGRAMS_DEBUG" not in os.environ
    monkeypatch.setenv("SOUNDING_ANAGRAMS_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["leaderboard", "rotate"])


def test_a_file_or_folder_that_fails_in_use_is_one_sentence_naming_it(monkeypatch, capsys):
    """A file system error no check foresaw (played by a command that raises it) names the place, the reason
    and what to do, exit code 1."""
    import errno

    import sounding_anagrams.cli as cli

    def read_only_disk(args):
        raise OSError(errno.EROFS, "Read-only file system", "/archive/runs/renders/x/.gallery.html.tmp")

    monkeypatch.setattr(cli, "run_gallery", read_only_disk)
    assert cli.main(["gallery", "rotate"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: could not use /archive/runs/renders/x/.gallery.html.tmp: Read-only file system; check the "
        "place's permissions and disk, or choose another place\n"
    )


def serving_argv(command: str, runs: Path) -> list[str]:
    """A command that serves a page, with its stores under ``runs`` (nothing made there if it is refused)."""
    return {
        "server": ["server", "--backend-store-uri", f"sqlite:///{runs}/m.db"],
        "dashboard": ["dashboard", "--runs", str(runs)],
        "ui": ["ui", "--runs", str(runs)],
        "prefer": ["prefer", str(REPO / "studies" / "rotate.yaml"), "--models", "tiny", "--runs", str(runs)],
    }[command]


@pytest.mark.parametrize("command", ["server", "dashboard", "prefer"])
def test_a_busy_port_is_said_before_any_work(command, tmp_path: Path, capsys):
    """A port another process listens on is refused at once, before a store, a model or a candidate."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*serving_argv(command, tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"error: --port={port}: is in use on 127.0.0.1 (Address already in use): stop what serves there, or "
        "give another --port"
    )
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize("command", ["server", "dashboard", "ui", "prefer"])
def test_serving_beyond_loopback_is_refused_unless_exposed(command, tmp_path: Path, capsys):
    """Nothing is served beyond this machine by accident: a --host that is not loopback needs --expose, and
    with it a warning says there is no authentication and how to add it."""
    assert main([*serving_argv(command, tmp_path), "--host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --host='0.0.0.0': would serve beyond this machine with no authentication: add --expose if "
        "that is meant (default 127.0.0.1, this machine only)"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_exposed_port_warns_that_nothing_asks_for_a_password(capsys):
    import socket

    from sounding_anagrams.commands.common import check_port, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    check_port("0.0.0.0", port, expose=True)
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: serving on 0.0.0.0:{port} with no authentication")
    assert "--app-name basic-auth" in warning and "reverse proxy with a password" in warning
