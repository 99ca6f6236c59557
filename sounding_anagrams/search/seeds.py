"""A study's render seeds: never proposed by the Optuna sampler (a seed has no structure to model), drawn from
the study's ``seed`` with NumPy's ``SeedSequence`` so every machine draws the same (docs/METHOD.md §5).

Three families, apart by their spawn keys: the paired bank ``(k,)``, a trial's independent seeds
``(trial, k)``, the held-out seeds of confirmation ``(HELD_OUT_KEY, k)``.
"""

from __future__ import annotations

import numpy as np

from sounding_anagrams.search.study import StudyConfig


def trial_seeds(study_seed: int, trial_number: int, count: int) -> list[int]:
    """The render seeds of one trial with ``seeds: independent``: 32-bit draws of
    ``SeedSequence(study_seed, spawn_key=(trial, k))``.

    Never proposed by the Optuna sampler (a seed has no structure to model): the same study seed and trial
    number give the same seeds on every machine, and an export re-renders them exactly (docs/METHOD.md §5).
    """
    return [_draw(study_seed, (trial_number, k)) for k in range(count)]


def seed_bank(study_seed: int, count: int) -> list[int]:
    """The study's shared seeds with ``seeds: paired`` (the default): seed ``k`` of every trial is the same
    32-bit draw of ``SeedSequence(study_seed, spawn_key=(k,))``, so two knob sets are always compared on
    the same seeds (common random numbers, docs/METHOD.md §5). Its spawn keys have one entry, a trial's
    independent ones two: the two families never share a stream."""
    return [_draw(study_seed, (k,)) for k in range(count)]


def render_seeds(study: StudyConfig, trial_number: int) -> list[int]:
    """The ``seeds_per_trial`` seeds trial ``trial_number`` renders, as its study's ``seeds:`` says."""
    if study.seeds == "paired":
        return seed_bank(study.seed, study.seeds_per_trial)
    return trial_seeds(study.seed, trial_number, study.seeds_per_trial)


# Held-out seeds' first spawn-key entry: no trial number reaches it, and the bank's keys have one entry.
HELD_OUT_KEY = 2**32 - 1


def held_out_seeds(study_seed: int, count: int) -> list[int]:
    """The confirmation stage's seeds: ``SeedSequence(study_seed, spawn_key=(HELD_OUT_KEY, k))``, never a
    trial's (paired or independent), the same for every knob set confirmed (docs/METHOD.md §5)."""
    return [_draw(study_seed, (HELD_OUT_KEY, k)) for k in range(count)]


def _draw(study_seed: int, spawn_key: tuple[int, ...]) -> int:
    return int(np.random.SeedSequence(study_seed, spawn_key=spawn_key).generate_state(1)[0])
