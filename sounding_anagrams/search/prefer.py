"""``prefer``: a person steers the search. CLIP and CLAP are proxies; a person looking and listening is the
judge the scores stand in for.

A preferential study (optuna-dashboard's API) keeps ``--candidates`` candidates in front of the person. Each
is rendered from the study file's space and uploaded with its media; the dashboard's comparison page
shows each candidate's clip (the views turning while its sound plays). The person clicks the worst one; that
choice is a preference "each other candidate is better than it", and optuna-dashboard's preferential GP
sampler (BoTorch, the ``[prefer]`` extra) proposes the next knob set from all the choices so far. The first
candidates are the study's hand-tuned baseline and start points, then random ones; ``--from-search`` starts
from the top knob sets of the automatic study instead.

The preferred candidates (those no choice put below another) export like any search's best:
``sounding-anagrams export <study>-prefer``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sounding_anagrams.commands.common import quiet_libraries, study_name_of, study_with_overrides
from sounding_anagrams.errors import ConfigError, SoundingAnagramsError, one_line, shown_url
from sounding_anagrams.search.media import STORE_ATTR, default_location, open_artifact_store
from sounding_anagrams.search.stores import default_storage, trial_id_of

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

PREFER_SUFFIX = "-prefer"
# The trial attribute holding the artifact id that the comparison page shows for each candidate.
CLIP_KEY = "clip"
# How many of the person's choices the sampler was fitted on when it proposed a trial (0: a random start).
CHOICES_ATTR = "choices_seen"
WAIT_SECONDS = 0.5  # between looks at the storage while the person chooses
PREFERENTIAL_ATTR = "preference:is_preferential"  # optuna-dashboard's mark of a preferential study


def preference_sampler_class() -> type:
    """optuna-dashboard's preferential GP sampler, recording on each trial it proposes how many of the
    person's choices it was fitted on. Needs BoTorch (the ``[prefer]`` extra)."""
    try:
        from optuna_dashboard.preferential import PreferentialStudy
        from optuna_dashboard.preferential.samplers.gp import PreferentialGPSampler
    except ImportError as error:
        raise SoundingAnagramsError(
            f"prefer needs BoTorch for its preferential sampler ({one_line(error)}): "
            "pip install 'sounding-anagrams[prefer]'"
        ) from None

    class ChoiceRecordingSampler(PreferentialGPSampler):
        """Notes, by trial number, the choices it was fitted on; the asker writes them on the trial
        (:func:`record_choices_seen`), since a sampler sees only a frozen copy of it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.choices_seen: dict[int, int] = {}

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
            params = super().sample_relative(study, trial, search_space)
            choices = len(PreferentialStudy(study).get_preferences(deepcopy=False)) if params else 0
            self.choices_seen[trial.number] = choices
            return params

    return ChoiceRecordingSampler


def record_choices_seen(sampler: Any, trial: optuna.Trial) -> None:
    """Write on ``trial`` how many choices the sampler was fitted on when it proposed it; a trial whose knobs
    were all given (a start point) was proposed by no fit and gets nothing."""
    if trial.number in sampler.choices_seen:
        trial.set_user_attr(CHOICES_ATTR, sampler.choices_seen.pop(trial.number))


def is_preferential(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Whether study ``name`` is a preferential study (``prefer``'s), by optuna-dashboard's mark."""
    return bool(storage.get_study_system_attrs(storage.get_study_id_from_name(name)).get(PREFERENTIAL_ATTR))


def preferred_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The candidates no choice of the person put below another, by trial number."""
    from optuna_dashboard.preferential import PreferentialStudy

    return sorted(PreferentialStudy(study).best_trials, key=lambda t: t.number)


def run_prefer(args: argparse.Namespace) -> int:
    study = study_with_overrides(args)
    if args.candidates < 2:
        raise ConfigError(
            "--candidates", args.candidates, "must be at least 2 (a person compares candidates)"
        )
    trials = args.trials if args.trials is not None else study.trial_budget
    if trials is None or trials < args.candidates:
        raise ConfigError(
            "--trials", trials, f"must be at least --candidates ({args.candidates}): the candidates to make"
        )
    if not 1 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "must be a TCP port, 1 to 65535")
    sampler_class = preference_sampler_class()
    searched_name = study_name_of(study.name, args.models)
    name = searched_name + PREFER_SUFFIX
    args.runs.mkdir(parents=True, exist_ok=True)
    storage = args.storage or default_storage(args.runs)
    location = args.artifact_store or default_location(args.runs)
    store = open_artifact_store(location)

    import optuna
    from optuna_dashboard import register_preference_feedback_component
    from optuna_dashboard.preferential import create_study

    from sounding_anagrams.search.stores import open_storage

    rdb = open_storage(storage, heartbeat=False)
    existing = {s.study_name for s in optuna.get_all_study_summaries(rdb)}
    sampler = sampler_class(seed=study.seed)
    preferential = create_study(
        n_generate=args.candidates,
        storage=rdb,
        sampler=sampler,
        study_name=name,
        load_if_exists=True,
    )
    inner: optuna.Study = preferential._study
    register_preference_feedback_component(preferential, "artifact", artifact_key=CLIP_KEY)
    inner.set_user_attr(STORE_ATTR, location)
    inner.set_user_attr("study_file", study.source)
    inner.set_user_attr("runs_dir", str(args.runs.resolve()))
    if name not in existing and args.from_search:
        enqueue_top_knob_sets(inner, storage, searched_name, args.candidates)
    elif name not in existing:
        for index, point in enumerate(study.start_points[: args.candidates]):
            label = "baseline" if study.baseline and index == 0 else f"start point {index}"
            inner.enqueue_trial(dict(point), user_attrs={"start_point": label})
    fail_unfinished_candidates(rdb, inner)

    if not args.no_dashboard:
        from optuna_dashboard import run_server

        threading.Thread(
            target=run_server,
            args=(rdb,),
            kwargs={"host": args.host, "port": args.port, "artifact_store": store},
            name="dashboard",
            daemon=True,
        ).start()
        print(
            f"choose in optuna-dashboard, study {name}: "
            f"http://{args.host}:{args.port}/dashboard/studies/{rdb.get_study_id_from_name(name)}\n"
            f"  (storage {shown_url(storage)}, media {location}; Ctrl-C stops)",
            flush=True,
        )

    from sounding_anagrams.render import render
    from sounding_anagrams.sampler.models import load_models_for
    from sounding_anagrams.search.asking import suggest
    from sounding_anagrams.search.media import upload_media
    from sounding_anagrams.search.seeds import trial_seeds

    quiet_libraries()
    # Until the person's first choice the GP has nothing to fit: its random start says so at every ask.
    warnings.filterwarnings("ignore", message="Dynamic search space detected", category=UserWarning)
    config = study.render
    models = load_models_for(config)
    root = args.runs / "renders" / name
    while len(inner.get_trials(deepcopy=False)) < trials:
        asked = []
        while preferential.should_generate() and len(inner.get_trials(deepcopy=False)) < trials:
            trial = preferential.ask()
            params = {param.name: suggest(trial, param) for param in study.space}
            record_choices_seen(sampler, trial)
            seed = trial_seeds(study.seed, trial.number, 1)[0]
            trial.set_user_attr("seeds", [seed])
            asked.append((trial, study.candidate_config(params).replace(seed=seed)))
        if not asked:
            time.sleep(WAIT_SECONDS)  # the person is choosing
            continue
        folders = [root / f"candidate-{trial.number:04d}" for trial, _ in asked]
        results = render([c for _, c in asked], models, folders, progress=not args.quiet).results
        for (trial, _), result in zip(asked, results, strict=True):
            if result.failure:
                trial.set_user_attr("fail_reason", result.failure)
                inner.tell(trial, state=optuna.trial.TrialState.FAIL)
                print(f"candidate {trial.number} failed: {result.failure}", file=sys.stderr)
                continue
            trial.set_user_attr("render_folder", str(result.folder.resolve()))
            media = upload_media(store, trial, result.folder)
            if CLIP_KEY in media:
                trial.set_user_attr(CLIP_KEY, media[CLIP_KEY])
            print(f"candidate {trial.number}: {result.folder}", flush=True)
    print(
        f"all {trials} candidates made; the preferred: sounding-anagrams export {name} --runs {args.runs}",
        flush=True,
    )
    if not args.no_dashboard:
        print("  (the dashboard stays up for the last choices; Ctrl-C stops it)", flush=True)
        threading.Event().wait()
    return 0


def enqueue_top_knob_sets(preferential: optuna.Study, storage: str, searched: str, k: int) -> None:
    """The automatic study's top ``k`` knob sets as the first candidates."""
    import optuna

    from sounding_anagrams.search.report import load_study_from_storage, ranked_trials

    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if searched not in names:
        raise ConfigError(
            "--from-search", searched, "no such study in this storage: run `search` first, or leave it out"
        )
    source = load_study_from_storage(searched, storage)
    for ranked in ranked_trials(source)[:k]:
        preferential.enqueue_trial(
            dict(ranked.trial.params),
            user_attrs={"start_point": f"trial {ranked.trial.number} of {searched}"},
        )


def fail_unfinished_candidates(storage: optuna.storages.BaseStorage, preferential: optuna.Study) -> None:
    """A candidate a stopped run asked but never showed (no clip uploaded) would wait for a choice forever:
    it is failed, so that a fresh one takes its place."""
    from optuna.trial import TrialState

    for trial in preferential.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if CLIP_KEY not in trial.user_attrs:
            trial_id = trial_id_of(storage, preferential.study_name, trial.number)
            storage.set_trial_user_attr(trial_id, "fail_reason", "cut short before shown")
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def export_preferred(study: optuna.Study, out: Path) -> list[Path]:
    """The preferred candidates' ``config.yaml``, each with a header saying what it was preferred to."""
    from optuna_dashboard.preferential import PreferentialStudy

    preferred = preferred_trials(study)
    if not preferred:
        raise SoundingAnagramsError(
            f"study {study.study_name} has no choice made yet: choose in the dashboard"
        )
    choices = PreferentialStudy(study).get_preferences(deepcopy=False)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for trial in preferred:
        below = sorted({worse.number for better, worse in choices if better.number == trial.number})
        source = Path(trial.user_attrs["render_folder"]) / "config.yaml"
        header = (
            f"# study {study.study_name}, candidate {trial.number}: preferred by a person to candidate(s) "
            f"{', '.join(map(str, below))}\n"
            "# re-render: sounding-anagrams render --config <this file>\n"
            "# more seeds of this knob set: sounding-anagrams render --config <this file> --num-seeds 8\n"
        )
        target = out / f"{study.study_name}-trial-{trial.number:04d}.yaml"
        target.write_text(header + source.read_text(encoding="utf-8"), encoding="utf-8")
        written.append(target)
    return written
