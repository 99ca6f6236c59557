"""The private names of Optuna (and optuna-dashboard) this project still relies on, each as we use it.

Optuna may rename or reshape a private name in any release; pyproject.toml bounds Optuna below 6, and this
test says which name broke, and who uses it, before a search does. Where a public way exists, use it instead
and take the name off these lists.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optuna
import pytest
from optuna_dashboard.preferential import create_study as create_preferential_study

# (class, private method, its parameters as we call it, who calls it)
PRIVATE_METHODS: list[tuple[type, str, list[str], str]] = [
    (
        optuna.samplers.GridSampler,
        "_get_unvisited_grid_ids",
        ["self", "study"],
        "search/samplers.py: AskTellGridSampler.unvisited counts the grid points left",
    ),
    (
        optuna.Study,
        "_get_trials",
        ["self", "deepcopy", "states", "use_cache"],
        "search/samplers.py: SettledStudy overrides it (and calls it positionally) for the pruner's view",
    ),
    (
        optuna.Trial,
        "_get_latest_trial",
        ["self"],
        "search/samplers.py: should_prune hands the pruner the trial as Trial.should_prune does",
    ),
]


def parameter_names(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    ("owner", "name", "parameters", "user"),
    PRIVATE_METHODS,
    ids=[f"{c.__name__}.{n}" for c, n, *_ in PRIVATE_METHODS],
)
def test_private_methods_we_call_keep_their_signature(
    owner: type, name: str, parameters: list[str], user: str
) -> None:
    where = f"optuna {optuna.__version__}: {owner.__qualname__}.{name}"
    method = getattr(owner, name, None)
    assert callable(method), f"{where} is gone; {user}"
    assert parameter_names(method) == parameters, f"{where} takes {parameter_names(method)}; {user}"


def test_the_preferential_study_keeps_its_optuna_study() -> None:
    """search/prefer.py reaches through optuna-dashboard's PreferentialStudy to the Optuna study inside
    (``_study``) to tell, enqueue and list trials."""
    preferential = create_preferential_study(
        n_generate=2, storage=optuna.storages.InMemoryStorage(), sampler=optuna.samplers.RandomSampler()
    )
    assert isinstance(preferential._study, optuna.Study), "PreferentialStudy._study is gone"


def test_the_dashboard_keeps_its_reader_of_skipped_candidates() -> None:
    """search/prefer.py reads the candidates a person skipped (``export --prefer`` says so) with
    optuna-dashboard's private ``get_skipped_trial_ids``, from the study attributes its "skip" button
    writes."""
    from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids, report_skip

    storage = optuna.storages.InMemoryStorage()
    preferential = create_preferential_study(
        n_generate=2, storage=storage, sampler=optuna.samplers.RandomSampler()
    )
    trial = preferential.ask()
    study_id = storage.get_study_id_from_name(preferential.study_name)
    report_skip(study_id, trial._trial_id, storage)
    assert get_skipped_trial_ids(storage.get_study_system_attrs(study_id)) == [trial._trial_id]
