"""``prefer``: a person steers the search. CLIP and CLAP are proxies; a person looking and listening is the
judge the scores stand in for.

A preferential study (optuna-dashboard's API) keeps ``--candidates`` candidates in front of the person. Each
is rendered from the study file's space, and shown on the dashboard's comparison page as one captioned clip
(:mod:`sounding_anagrams.search.candidate_clip`: its views under their prompts, the turn, the spectrogram
under its audio prompt, its knobs; its first frame is the poster). The person clicks the worst one; that
choice is a preference "each other candidate is better than it", and optuna-dashboard's preferential GP
sampler (BoTorch, the ``[prefer]`` extra) proposes the next knob set from all the choices so far. The first
candidates are the study's hand-tuned baseline and start points, then random ones; ``--from-search`` starts
from the top knob sets of the automatic study instead.

A candidate is RUNNING in Optuna only while it is made: once shown it is COMPLETE with optuna-dashboard's
placeholder value (a person's choice has no value; the study's metric name and ``objective`` attribute say
so), and the dashboard keeps showing it until a click puts it below another. Ctrl-C and SIGTERM only set
flags (:class:`sounding_anagrams.search.stopping.StopRequest`), seen at every denoising step and every wait;
the one stop path (:meth:`PreferSession.stop`) fails the candidates asked and not yet shown, and exits 130.
Each candidate is logged to MLflow (:mod:`sounding_anagrams.search.prefer_tracking`), with the person's
choices as they come.

The candidates no choice put below another (never compared ones included) export like any search's best:
``sounding-anagrams export <study> --prefer``, which says why each other candidate is left out.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sounding_anagrams.commands.common import check_port, quiet_libraries, study_name_of, study_with_overrides
from sounding_anagrams.errors import ConfigError, SoundingAnagramsError, one_line, shown_url
from sounding_anagrams.files import writable_folder
from sounding_anagrams.search.media import MIMETYPES, STORE_ATTR, default_location, open_artifact_store
from sounding_anagrams.search.stopping import EXIT_INTERRUPTED, SearchStopped, StopRequest, stop_on_signals
from sounding_anagrams.search.stores import default_storage, trial_id_of

if TYPE_CHECKING:
    import optuna

    from sounding_anagrams.config import RenderConfig
    from sounding_anagrams.sampler.models import ModelBundle
    from sounding_anagrams.sampler.pipeline import StepState
    from sounding_anagrams.search.media import ArtifactStore
    from sounding_anagrams.search.prefer_tracking import CandidateRuns
    from sounding_anagrams.search.study import StudyConfig

logger = logging.getLogger(__name__)

PREFER_SUFFIX = "-prefer"
# The trial attribute holding the artifact id that the comparison page shows for each candidate.
CLIP_KEY = "clip"
# How many of the person's choices the sampler was fitted on when it proposed a trial (0: a random start).
CHOICES_ATTR = "choices_seen"
WAIT_SECONDS = 0.5  # between looks at the storage while the person chooses
PREFERENTIAL_ATTR = "preference:is_preferential"  # optuna-dashboard's mark of a preferential study
# What Optuna's clients (the `optuna` CLI, trials_dataframe, the dashboard) read about the study's values.
PREFERENCE_METRIC = "preference (no objective value: compared by a person)"
OBJECTIVE_ATTR = "objective"
OBJECTIVE_NOTE = "none: a person compares; 0.0 is optuna-dashboard's placeholder, the direction means nothing"
NOT_SHOWN = "before it was shown"  # in the reason of a candidate a stop failed: it is not counted
# A shown candidate's value: the one optuna-dashboard itself writes on the candidates a click compares.
SHOWN_VALUE = 0.0


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


def origin_of(trial: optuna.Trial | optuna.trial.FrozenTrial) -> str:
    """Where a candidate's knobs came from, as its caption and its MLflow run say."""
    if "start_point" in trial.user_attrs:
        return str(trial.user_attrs["start_point"])
    seen = trial.user_attrs.get(CHOICES_ATTR)
    return f"proposed from {seen} choice(s)" if seen else "random start"


def stopped_before_shown(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a candidate was failed by a stop (a signal, a killed run) before it was shown."""
    return NOT_SHOWN in str(trial.user_attrs.get("fail_reason", ""))


def is_preferential(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Whether study ``name`` is a preferential study (``prefer``'s), by optuna-dashboard's mark."""
    return bool(storage.get_study_system_attrs(storage.get_study_id_from_name(name)).get(PREFERENTIAL_ATTR))


def label_study(study: optuna.Study) -> None:
    """Name the study's one value for every Optuna client: it is no objective, a person compares."""
    study.set_metric_names([PREFERENCE_METRIC])
    study.set_user_attr(OBJECTIVE_ATTR, OBJECTIVE_NOTE)


@dataclass
class Candidate:
    """A trial this process asked, until it is shown or failed."""

    trial: optuna.Trial
    knobs: dict[str, Any] = field(default_factory=dict)  # study-file names (view_balance) -> values
    config: RenderConfig | None = None
    origin: str = ""

    @property
    def number(self) -> int:
        return int(self.trial.number)


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
    if args.no_dashboard:
        if not 1 <= args.port <= 65535:
            raise ConfigError("--port", args.port, "must be a TCP port, 1 to 65535")
    else:
        check_port(args.host, args.port, expose=args.expose)  # said before any candidate renders
    sampler_class = preference_sampler_class()
    request = StopRequest()
    # Ctrl-C and a plain `kill` (SIGTERM) only set the request's flags: the session sees them at its next
    # denoising step or wait and takes its one stop path.
    with stop_on_signals(request):
        session = PreferSession(args, study, sampler_class(seed=study.seed), request, trials)
        return session.run()


class PreferSession:
    """One ``prefer`` invocation: the preferential study opened, candidates made and shown until ``trials``
    exist, the person's choices logged as they come; every ending through :meth:`stop`."""

    def __init__(
        self, args: argparse.Namespace, study: StudyConfig, sampler: Any, request: StopRequest, trials: int
    ) -> None:
        self.args, self.study, self.sampler, self.request, self.trials = args, study, sampler, request, trials
        self.searched_name = study_name_of(study.name, args.models)
        self.name = self.searched_name + PREFER_SUFFIX
        self.storage_url = args.storage or default_storage(args.runs)
        self.asked: dict[int, Candidate] = {}  # asked by this process, not yet shown nor failed
        self.models: ModelBundle | None = None
        self.runs: CandidateRuns | None = None  # once open: MLflow, where each candidate is logged

    def run(self) -> int:
        """Open, make candidates, wait for the last choices; 130 once stopped by a signal."""
        try:
            self.open()
            self.make_candidates()
        except SearchStopped:
            return self.stop(f"interrupted ({self.request.signal_name})")
        except BaseException as error:
            self.fail_asked(f"cut short {NOT_SHOWN}: {one_line(error)}")
            raise
        return 0

    # -- opening -------------------------------------------------------------------------------------------

    def open(self) -> None:
        """The stores, the preferential study (its first candidates queued when new), the candidates a
        killed run left settled, the MLflow experiment, the dashboard, then the models."""
        import optuna
        from optuna_dashboard import register_preference_feedback_component
        from optuna_dashboard.preferential import create_study

        from sounding_anagrams.search.prefer_tracking import CandidateRuns
        from sounding_anagrams.search.stores import open_storage
        from sounding_anagrams.search.tracking import Tracker

        args = self.args
        writable_folder(args.runs, "--runs")
        self.location = args.artifact_store or default_location(args.runs)
        self.store: ArtifactStore = open_artifact_store(self.location)
        self.rdb = open_storage(self.storage_url, heartbeat=False)
        existing = {s.study_name for s in optuna.get_all_study_summaries(self.rdb)}
        if self.name not in existing and self.args.from_search and self.searched_name not in existing:
            # Said before the prefer study is made: a refused run leaves no empty study behind.
            raise ConfigError(
                "--from-search",
                self.searched_name,
                "no such study in this storage: run `search` first, or leave it out",
            )
        if self.name in existing and not is_preferential(self.rdb, self.name):
            raise ConfigError(
                "study",
                self.name,
                f"a study of this name in {shown_url(self.storage_url)} is not a prefer study (an automatic "
                "search made it?): give the study file another name, or use another --runs or --storage",
            )
        self.preferential = create_study(
            n_generate=args.candidates,
            storage=self.rdb,
            sampler=self.sampler,
            study_name=self.name,
            load_if_exists=True,
        )
        self.inner: optuna.Study = self.preferential._study
        register_preference_feedback_component(self.preferential, "artifact", artifact_key=CLIP_KEY)
        label_study(self.inner)
        self.inner.set_user_attr(STORE_ATTR, self.location)
        self.inner.set_user_attr("study_file", self.study.source)
        self.inner.set_user_attr("runs_dir", str(args.runs.resolve()))
        if self.name not in existing:
            self.queue_first_candidates()
        settle_left_candidates(self.rdb, self.inner)
        self.runs = CandidateRuns(Tracker(args.runs, self.name, tracking_uri=args.tracking_uri), self.name)
        if not args.no_dashboard:
            self.serve_dashboard()
        self.check()
        from sounding_anagrams.sampler.models import load_models_for

        quiet_libraries()
        # Until the person's first choice the GP has nothing to fit: its random start says so at every ask.
        warnings.filterwarnings("ignore", message="Dynamic search space detected", category=UserWarning)
        self.models = load_models_for(self.study.render)
        self.check()

    def queue_first_candidates(self) -> None:
        """A new study's first candidates: the automatic search's top knob sets, or the study's start
        points (the hand-tuned baseline first)."""
        if self.args.from_search:
            enqueue_top_knob_sets(self.inner, self.storage_url, self.searched_name, self.args.candidates)
            return
        for index, point in enumerate(self.study.start_points[: self.args.candidates]):
            label = "baseline" if self.study.baseline and index == 0 else f"start point {index}"
            self.inner.enqueue_trial(dict(point), user_attrs={"start_point": label})

    def serve_dashboard(self) -> None:
        from optuna_dashboard import run_server

        args = self.args
        threading.Thread(
            target=run_server,
            args=(self.rdb,),
            kwargs={"host": args.host, "port": args.port, "artifact_store": self.store},
            name="dashboard",
            daemon=True,
        ).start()
        study_id = self.rdb.get_study_id_from_name(self.name)
        print(
            f"choose in optuna-dashboard, study {self.name}: "
            f"http://{args.host}:{args.port}/dashboard/studies/{study_id}\n"
            f"  (storage {shown_url(self.storage_url)}, media {self.location}; Ctrl-C stops)",
            flush=True,
        )

    # -- making candidates ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`SearchStopped` once a signal asked to stop."""
        self.request.check()

    def on_step(self, state: StepState) -> None:
        """The sampler's per-step look: a stop asked mid-render ends the render at this step."""
        self.check()

    def made(self) -> int:
        """The candidates counted against ``--trials``: all but those stopped before they were shown (as a
        search does not count its interrupted trials)."""
        return sum(not stopped_before_shown(t) for t in self.inner.get_trials(deepcopy=False))

    def make_candidates(self) -> None:
        """Ask, render and show candidates while the study has fewer than ``trials``, waiting for the
        person's choices in between; then, with the dashboard, wait for the last choices until stopped."""
        while self.made() < self.trials:
            asked = self.ask_candidates()
            if asked:
                self.render_and_show(asked)
            else:
                self.wait()  # the person is choosing
        print(
            f"all {self.trials} candidates made; the preferred: sounding-anagrams export {self.name} "
            f"--runs {self.args.runs}",
            flush=True,
        )
        if not self.args.no_dashboard:
            print("  (the dashboard stays up for the last choices; Ctrl-C stops it)", flush=True)
            while True:
                self.wait()

    def wait(self) -> None:
        """One look at the person's choices (logged to MLflow as they come), then a short wait."""
        assert self.runs is not None
        self.runs.log_choices(self.inner)
        self.request.requested.wait(WAIT_SECONDS)
        self.check()

    def ask_candidates(self) -> list[Candidate]:
        """As many new candidates as the dashboard has room for, each with its knobs, seed and config."""
        from sounding_anagrams.search.asking import suggest
        from sounding_anagrams.search.seeds import trial_seeds

        asked: list[Candidate] = []
        while self.preferential.should_generate() and self.made() < self.trials:
            self.check()
            candidate = Candidate(self.preferential.ask())
            self.asked[candidate.number] = candidate  # from now on the stop path settles it
            trial = candidate.trial
            candidate.knobs = {param.name: suggest(trial, param) for param in self.study.space}
            record_choices_seen(self.sampler, trial)
            seed = trial_seeds(self.study.seed, trial.number, 1)[0]
            trial.set_user_attr("seeds", [seed])
            candidate.config = self.study.candidate_config(candidate.knobs).replace(seed=seed)
            candidate.origin = origin_of(trial)
            asked.append(candidate)
        return asked

    def render_and_show(self, asked: list[Candidate]) -> None:
        """Render the candidates in one batched call, then show each (or fail it, saying why)."""
        from sounding_anagrams.render import render

        assert self.models is not None
        root = self.args.runs / "renders" / self.name
        folders = [root / f"candidate-{c.number:04d}" for c in asked]
        configs = [c.config for c in asked if c.config is not None]
        results = render(
            configs, self.models, folders, callback=self.on_step, progress=not self.args.quiet
        ).results
        for candidate, result in zip(asked, results, strict=True):
            self.check()
            if result.failure:
                self.fail(candidate, result.failure)
            else:
                self.show(candidate, result.folder)

    def show(self, candidate: Candidate, folder: Path) -> None:
        """Compose the candidate's captioned clip, upload it with its media, log its MLflow run, and tell it
        COMPLETE (shown): the dashboard shows it until a click puts it below another."""
        from optuna.artifacts import upload_artifact

        from sounding_anagrams.search.candidate_clip import Caption, write_candidate_clip
        from sounding_anagrams.search.media import upload_media
        from sounding_anagrams.search.prefer_tracking import RUN_ATTR

        trial, config = candidate.trial, candidate.config
        assert config is not None
        try:
            clip = write_candidate_clip(
                folder, config, Caption(candidate.number, candidate.origin, candidate.knobs, config.seed)
            )
            upload_media(self.store, trial, folder)  # the trial's own page: views, spectrogram, sounds
            clip_id = upload_artifact(
                artifact_store=self.store,
                file_path=str(clip),
                study_or_trial=trial,
                mimetype=MIMETYPES[clip.suffix],
            )
        except Exception as error:  # a candidate with no clip cannot be shown: failed, saying why
            self.fail(candidate, f"its clip could not be made or uploaded: {one_line(error)}")
            return
        trial.set_user_attr("render_folder", str(folder.resolve()))
        assert self.runs is not None
        run_id = self.runs.log(
            trial,
            knobs=candidate.knobs,
            config=config,
            origin=candidate.origin,
            status="FINISHED",
            folder=folder,
        )
        if run_id is not None:
            trial.set_user_attr(RUN_ATTR, run_id)
        trial.set_user_attr(CLIP_KEY, clip_id)
        self.inner.tell(trial, SHOWN_VALUE)
        del self.asked[candidate.number]
        print(f"candidate {candidate.number}: {folder}", flush=True)

    def fail(self, candidate: Candidate, reason: str, *, status: str = "FAILED") -> None:
        """Fail a candidate this process asked, with its reason (in Optuna, MLflow and on stderr)."""
        from optuna.trial import TrialState

        trial = candidate.trial
        trial.set_user_attr("fail_reason", reason)
        if candidate.config is not None and self.runs is not None:
            self.runs.log(
                trial,
                knobs=candidate.knobs,
                config=candidate.config,
                origin=candidate.origin,
                status=status,
                reason=reason,
            )
        self.inner.tell(trial, state=TrialState.FAIL)
        self.asked.pop(candidate.number, None)
        print(f"candidate {candidate.number} failed: {reason}", file=sys.stderr, flush=True)

    # -- the one stop path ---------------------------------------------------------------------------------

    def fail_asked(self, reason: str, *, status: str = "FAILED") -> int:
        """Fail every candidate asked and not shown (the one place that does); returns how many. A store
        that fails here is said, and the next start fails what it kept RUNNING."""
        left = list(self.asked.values())
        for candidate in left:
            try:
                self.fail(candidate, reason, status=status)
            except Exception as error:
                logger.warning("candidate %d was not failed: %s", candidate.number, one_line(error))
        return len(left)

    def stop(self, why: str) -> int:
        """After Ctrl-C or SIGTERM: the candidates asked and not shown fail (``interrupted (SIGTERM) before
        it was shown``), the choices so far are logged; no trial of this process stays RUNNING. Exit 130."""
        failed = self.fail_asked(f"{why} {NOT_SHOWN}", status="KILLED")
        if self.runs is not None:
            self.runs.log_choices(self.inner)
        print(
            f"{why}: {failed} candidate(s) not yet shown were failed; the shown candidates and every choice "
            f"are kept in {shown_url(self.storage_url)}; run the same command to go on",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED


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


def settle_left_candidates(storage: optuna.storages.BaseStorage, preferential: optuna.Study) -> None:
    """What a killed run (SIGKILL, a lost machine) left RUNNING: a candidate it showed (its clip uploaded) is
    COMPLETE like any shown one; one it never showed would wait for a choice forever, and is failed so that
    a fresh one takes its place."""
    from optuna.trial import TrialState

    for trial in preferential.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = trial_id_of(storage, preferential.study_name, trial.number)
        if CLIP_KEY in trial.user_attrs:
            storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[SHOWN_VALUE])
            continue
        storage.set_trial_user_attr(trial_id, "fail_reason", f"cut short {NOT_SHOWN}")
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def skipped_candidates(storage: optuna.storages.BaseStorage, name: str) -> set[int]:
    """The numbers of the candidates the person skipped in the dashboard (its "skip trial" button)."""
    # optuna-dashboard keeps them as study attributes by trial id; its reader of them is private.
    from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids

    ids = get_skipped_trial_ids(storage.get_study_system_attrs(storage.get_study_id_from_name(name)))
    return {storage.get_trial(trial_id).number for trial_id in ids}


def export_preferred(
    study: optuna.Study, storage: optuna.storages.BaseStorage, out: Path
) -> tuple[list[Path], list[str]]:
    """The ``config.yaml`` of every shown candidate no choice put below another (never compared ones
    included), each with a header saying what it was preferred to; and a line per candidate left out,
    saying why. Raises when none can be exported."""
    from optuna_dashboard.preferential import PreferentialStudy

    from sounding_anagrams.search.prefer_tracking import choices_by_candidate

    preferences = PreferentialStudy(study).get_preferences(deepcopy=False)
    by = choices_by_candidate([(better.number, worse.number) for better, worse in preferences])
    skipped = skipped_candidates(storage, study.study_name)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    worse: list[int] = []
    notes: list[str] = []
    for trial in study.get_trials(deepcopy=False):
        against, beaten = by.get(trial.number, ([], []))
        if against:
            worse.append(trial.number)
            continue
        why = left_out_reason(trial, skipped)
        if why is not None:
            notes.append(f"candidate {trial.number} {why}")
            continue
        written.append(write_preferred(study.study_name, trial, beaten, out))
    if worse:
        notes.append(f"left out, judged worse than another: candidate(s) {', '.join(map(str, worse))}")
    if not written:
        raise SoundingAnagramsError(
            f"study {study.study_name} has no candidate to export: " + "; ".join(notes or ["none made yet"])
        )
    return written, notes


def left_out_reason(trial: optuna.trial.FrozenTrial, skipped: set[int]) -> str | None:
    """Why a candidate no choice put below another cannot be exported (None: it can)."""
    from optuna.trial import TrialState

    if trial.state == TrialState.FAIL:
        return f"failed: {trial.user_attrs.get('fail_reason', 'no reason recorded')}"
    if trial.state == TrialState.RUNNING:
        return "is not shown yet (RUNNING: being made, or its process was killed: the next `prefer` fails it)"
    if trial.state == TrialState.WAITING:
        return "was never made (queued as a start point)"
    if trial.number in skipped:
        return "was skipped in the dashboard"
    if trial.state != TrialState.COMPLETE or "render_folder" not in trial.user_attrs:
        return f"has no render ({trial.state.name})"
    return None


def write_preferred(study_name: str, trial: optuna.trial.FrozenTrial, beaten: list[int], out: Path) -> Path:
    """One exported candidate's ``config.yaml``, under a header saying what it was preferred to."""
    source = Path(trial.user_attrs["render_folder"]) / "config.yaml"
    judged = (
        f"preferred by a person to candidate(s) {', '.join(map(str, beaten))}"
        if beaten
        else "never compared by a person (shown; no choice ranked it below another)"
    )
    header = (
        f"# study {study_name}, candidate {trial.number}: {judged}\n"
        "# re-render: sounding-anagrams render --config <this file>\n"
        "# more seeds of this knob set: sounding-anagrams render --config <this file> --num-seeds 8\n"
    )
    target = out / f"{study_name}-trial-{trial.number:04d}.yaml"
    target.write_text(header + source.read_text(encoding="utf-8"), encoding="utf-8")
    return target
