"""How much UNet work pruning saves: the same small study with and without a median pruner, tiny models.

The judges are the tests' designed ones (brightness / loudness): the tiny CLIP and CLAP are random towers
whose scores barely move between candidates, so they would never prune anything. Usage:
``python benchmarks/bench_pruning.py [--trials 16] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from optuna.trial import TrialState  # noqa: E402

from sounding_anagrams.sampler.models import load_models  # noqa: E402
from sounding_anagrams.search.loop import SearchRunner  # noqa: E402
from sounding_anagrams.search.opening import SearchSettings  # noqa: E402
from sounding_anagrams.search.study import parse_study  # noqa: E402
from tests.designed_judges import JUDGED_STUDY, designed_judges  # noqa: E402


def study(trials: int, steps: int, pruned: bool) -> dict:
    return {
        **JUDGED_STUDY,
        "name": "bench-pruning",
        "render": {**JUDGED_STUDY["render"], "num_inference_steps": steps},
        "pruner": {"type": "median", "n_startup_trials": 4} if pruned else "none",
        "previews": [0.3, 0.6] if pruned else [],
        "batch": 4,
        "budget": {"trials": trials},
        "seed": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    models = load_models("tiny", "tiny", device="cpu", dtype="float32")
    judges = designed_judges()
    print(
        f"# bench_pruning {datetime.date.today()}: {args.trials} trials, {args.steps} steps, batch 4, "
        "previews at 30% and 60%, MedianPruner(n_startup_trials=4), TPE seed 0, tiny models on CPU"
    )
    print("| pruner | complete | pruned | UNet sample-forwards | wall s | best objective |")
    print("|---|---|---|---|---|---|")
    samples = {}
    for pruned in (False, True):
        with tempfile.TemporaryDirectory() as runs:
            config = parse_study(study(args.trials, args.steps, pruned), source="bench", tiny=True)
            runner = SearchRunner.open(
                config, models, judges, SearchSettings(runs_dir=Path(runs), progress=False, confirm=False)
            )
            start = time.perf_counter()
            summary = runner.run()
            wall = time.perf_counter() - start
            states = [o.state for o in summary.outcomes]
            samples[pruned] = summary.unet_samples
            print(
                f"| {'median' if pruned else 'none'} | {states.count(TrialState.COMPLETE)} | "
                f"{states.count(TrialState.PRUNED)} | {summary.unet_samples} | {wall:.1f} | "
                f"{runner.optuna_study.best_value:.4f} |",
                flush=True,
            )
    print(f"\npruning saved {1 - samples[True] / samples[False]:.1%} of the UNet sample-forwards")


if __name__ == "__main__":
    main()
