"""Test set-up: offline, telemetry off, tiny models built once per session into a temp cache."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: no test may reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every session builds the tiny preset afresh, so the build-save-load path is exercised each run."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    os.environ["SOUNDING_ANAGRAMS_CACHE"] = str(cache)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    return cache


@pytest.fixture(scope="session")
def tiny_models(_tiny_cache: Path):
    from sounding_anagrams.sampler.models import load_models

    return load_models("tiny", "tiny", device="cpu", dtype="float32")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts: any still running when it ends (a failed assertion) are killed, before the
    stores they use are dropped."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
