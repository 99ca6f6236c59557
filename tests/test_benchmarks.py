"""Every benchmark of `make bench` still runs: each script on its smallest arguments, in a subprocess, as the
Makefile runs it. No speed is asserted here (speed targets live in the benchmarks); this catches a benchmark
left behind by a change of the code it measures (bench_search called a removed keyword for a day)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments", "prints"),
    [
        ("bench_sampler.py", ["--steps", "2", "--candidates", "1", "2"], "| 2 |"),
        ("bench_pruning.py", ["--trials", "2", "--steps", "2"], "pruning saved"),
        (
            "bench_search.py",
            ["--repeats", "1", "--renders", "32", "--fresh", "2", "--designs", "b,f"],
            "(f) paired + racing + confirmation",
        ),
        (
            "bench_pipeline.py",
            ["--trials", "2", "--steps", "4", "--skip-stages", "--repeats", "1", "--tflops", "400"],
            "| dpmsolver | 400 |",  # the fair model's last row, after the old model's
        ),
    ],
)
def test_the_benchmark_runs_on_its_smallest_arguments(script: str, arguments: list[str], prints: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert prints in done.stdout, done.stdout[-3000:]
