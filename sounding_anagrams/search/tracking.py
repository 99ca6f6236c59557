"""A thin MLflow layer: one experiment per study, a parent run per search invocation, a nested run per trial.

Written against ``MlflowClient`` (no global "active run"), so several search processes can log to one store.
Default store: ``sqlite:///<runs>/mlflow.db`` with artifacts under ``<runs>/mlartifacts``. ``--tracking-uri``
or ``MLFLOW_TRACKING_URI`` overrides it; with an MLflow server (``http(s)://``) the experiments use the
server's artifact location (``mlflow-artifacts:``, proxied by the server), so every worker's files land in one
place whatever machine it runs on. Telemetry is switched off.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sounding_anagrams.files import MLFLOW_ARTIFACTS, MLFLOW_FILE, machine_lock, write_text_atomic
from sounding_anagrams.numbers import readable
from sounding_anagrams.search.workers import worker_is_dead

PARENT_TAG = "mlflow.parentRunId"
# A trial run opened when its trial is told, until its metrics, card and files are logged: a run that ends
# (its worker died) with this tag still "true" is completed at the next start.
PENDING_TAG = "pending"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow's UI reads a view of the runs table from an experiment tag of this prefix (its "shared views").
SHARED_VIEW_TAG, LEADERBOARD_VIEW = "mlflow.sharedViewState.", "leaderboard"


def default_tracking_uri(runs_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir.resolve() / MLFLOW_FILE}"


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (shared by machines) rather than a local store."""
    return uri.startswith(("http://", "https://"))


def leaderboard_url(ui: str, experiment_id: str) -> str:
    """The page of MLflow's UI at ``ui`` that shows a study's trials as its leaderboard (see
    :meth:`Tracker.set_leaderboard_view`)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={LEADERBOARD_VIEW}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens a run: the server's UI page for it."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


@cache
def git_commit() -> str:
    """The commit of the code that ran (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The whole run config as MLflow params: lists become compact JSON."""
    return {
        key: json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
        for key, value in config.items()
    }


class Tracker:
    """Logs one search invocation of one study."""

    def __init__(self, runs_dir: Path, experiment: str, *, tracking_uri: str | None = None) -> None:
        self.runs_dir = runs_dir
        self.tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        # The first touch creates and migrates a local store: one process of this machine at a time (two
        # workers start together).
        with machine_lock(runs_dir, "mlflow"):
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._experiment(experiment, runs_dir)
        # MLflow's UI opens an experiment of this kind on its runs table (not its GenAI overview of traces).
        self.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_run_id: str | None = None
        # Trial runs this invocation opened and has not ended: the stop path ends them (KILLED).
        self._open_runs: set[str] = set()
        self._open_runs_lock = threading.Lock()

    def _experiment(self, experiment: str, runs_dir: Path) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            return str(found.experiment_id)
        # On a server, the server's own artifact root, proxied: one home for all workers.
        local = (runs_dir / MLFLOW_ARTIFACTS / experiment).resolve().as_uri()
        try:
            return str(
                self.client.create_experiment(
                    experiment, artifact_location=None if is_server(self.tracking_uri) else local
                )
            )
        except MlflowException as error:
            # A worker on another machine created it a moment ago (the lock above is this machine's only).
            found = self.client.get_experiment_by_name(experiment)
            if error.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
                raise
            return str(found.experiment_id)

    def set_leaderboard_view(self, columns: Sequence[str], order_by: str, *, ascending: bool = False) -> None:
        """The experiment's "leaderboard" view in MLflow's UI (a shared view, kept as an experiment tag): the
        trial runs (not the search's own run, nor confirmations) sorted by ``order_by`` (a metric), with
        these columns (``metrics.`objective```, ``params.`view_balance```, ...). :func:`leaderboard_url`
        opens it."""
        state = {
            "searchFilter": "tags.trial LIKE '%'",  # only trial runs carry a "trial" tag
            "orderByKey": f"metrics.`{order_by}`",
            "orderByAsc": ascending,
            "startTime": "ALL",
            "lifecycleFilter": "Active",
            "datasetsFilter": [],
            "modelVersionFilter": "All Runs",
            "selectedColumns": list(columns),
            "runsHiddenMode": "SHOW_ALL",
        }
        self.set_experiment_tag(SHARED_VIEW_TAG + LEADERBOARD_VIEW, json.dumps(state))

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={**tags, "git_commit": git_commit(), "kind": "search"}
        )
        self.parent_run_id = run.info.run_id
        self.client.log_batch(
            self.parent_run_id, params=[Param(k, v) for k, v in flatten_params(params).items()]
        )
        return self.parent_run_id

    def end_dead_parents(self) -> None:
        """Search runs of this experiment left RUNNING by a process that died on this machine: KILLED, and
        their trial runs still RUNNING: FAILED."""
        runs = self.client.search_runs(
            [self.experiment_id], "tags.kind = 'search' and attributes.status = 'RUNNING'", max_results=1000
        )
        for run in runs:
            tags = run.data.tags
            worker = {"host": tags.get("host"), "pid": tags.get("pid", -1), "boot": tags.get("boot")}
            if run.info.run_id != self.parent_run_id and tags.get("pid") and worker_is_dead(worker):
                self.client.set_terminated(run.info.run_id, status="KILLED")
                # Its trial runs that were being logged when it died (or when its store refused a write).
                for child in self.client.search_runs(
                    [self.experiment_id],
                    f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
                    max_results=1000,
                ):
                    self.client.set_terminated(child.info.run_id, status="FAILED")

    def end_orphaned_trial_runs(self) -> None:
        """Trial runs still RUNNING whose search run has ended (its store refused the last writes of its
        stop): KILLED. Once per start, before the reconciling completes the told trials' among them."""
        alive = {
            run.info.run_id
            for run in self.client.search_runs(
                [self.experiment_id],
                "tags.kind = 'search' and attributes.status = 'RUNNING'",
                max_results=1000,
            )
        }
        for run in self.client.search_runs(
            [self.experiment_id], "attributes.status = 'RUNNING'", max_results=50000
        ):
            parent = run.data.tags.get(PARENT_TAG)
            if "trial" in run.data.tags and parent and parent not in alive:
                self.client.set_terminated(run.info.run_id, status="KILLED")

    def set_experiment_tag(self, key: str, value: str) -> None:
        """Set an experiment tag, whoever else sets it at the same moment: workers started together on one
        MLflow server race on its first insert, and the loser's insert is refused as a duplicate key."""
        try:
            self.client.set_experiment_tag(self.experiment_id, key, value)
        except MlflowException:
            self.client.set_experiment_tag(self.experiment_id, key, value)  # the row exists now: an update

    def store_artifacts(self, run_id: str, folder: Path) -> None:
        """The trial folder as the run's artifacts, stored once.

        With a local artifact store (the default, ``<runs>/mlartifacts``) the run's artifact folder is a link
        to the trial folder (relative): MLflow lists and serves the files from their one home, nothing is
        copied. With a remote store (an MLflow server's proxied artifacts, S3, ...) they are uploaded: the
        remote copy is the one a team browses, the render folder the local one.
        """
        uri = self.client.get_run(run_id).info.artifact_uri
        if uri.startswith("file:"):
            target = Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path))
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
                target.rmdir()
            # Relative: a runs folder moved or copied whole (an archive) keeps its links.
            link = os.path.relpath(folder.resolve(), target.parent.resolve())
            target.symlink_to(link, target_is_directory=True)
        else:
            self.client.log_artifacts(run_id, str(folder))

    def logged_trials(self) -> set[int]:
        """The numbers of the trials that have an ended, complete MLflow run in this experiment."""
        # Trial runs carry no "kind" tag (a filter on it would drop them all): their "trial" tag tells them.
        runs = self.client.search_runs(
            [self.experiment_id], "attributes.status != 'RUNNING'", max_results=50000
        )
        return {
            int(run.data.tags["trial"])
            for run in runs
            if run.data.tags.get("trial", "").isdigit() and run.data.tags.get(PENDING_TAG) != "true"
        }

    def open_trial_run(
        self, trial_number: int, study: str, tags: Mapping[str, str], *, started: datetime | None = None
    ) -> tuple[str, str]:
        """A trial's run, opened when the trial is told so that Optuna's record names it: (run id, artifact
        URI). It starts when the trial did (``started``, Optuna's ``datetime_start``). :meth:`log_trial`
        fills it."""
        run = self.client.create_run(
            self.experiment_id,
            start_time=milliseconds(started),
            run_name=f"trial-{trial_number:04d}",
            tags={
                PARENT_TAG: self.parent_run_id or "",
                "trial": str(trial_number),
                "study": study,
                PENDING_TAG: "true",
                **tags,
            },
        )
        with self._open_runs_lock:
            self._open_runs.add(run.info.run_id)
        return run.info.run_id, str(run.info.artifact_uri)

    def end_open_runs(self, status: str = "KILLED") -> list[str]:
        """End the trial runs this invocation opened and did not finish (the stop path's last word): with
        their ``pending`` tag still set, the next start completes them from the files. Returns their ids."""
        with self._open_runs_lock:
            runs, self._open_runs = sorted(self._open_runs), set()
        for run_id in runs:
            self.client.set_terminated(run_id, status=status)
        return runs

    def _closed(self, run_id: str) -> None:
        with self._open_runs_lock:
            self._open_runs.discard(run_id)

    def link(self, run_id: str) -> str:
        """A run's UI page on a server; on a local store its artifact folder."""
        if is_server(self.tracking_uri):
            return run_link(self.tracking_uri, self.experiment_id, run_id)
        return str(self.client.get_run(run_id).info.artifact_uri)

    def end_parent(self, status: str = "FINISHED") -> None:
        if self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)

    def log_parent_artifacts(self, files: Sequence[Path], metrics: Mapping[str, float] | None = None) -> None:
        assert self.parent_run_id is not None
        for path in files:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path="study")
        if metrics:
            self.client.log_batch(
                self.parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()]
            )

    def log_leaderboard(self, knob_sets: Any) -> None:
        """The study's ranked knob sets (a pandas DataFrame) as the search run's table artifact
        ``study/leaderboard.json``, which MLflow's artifact viewer shows as a table."""
        assert self.parent_run_id is not None
        self.client.log_table(self.parent_run_id, data=knob_sets, artifact_file="study/leaderboard.json")

    def log_trial(
        self,
        *,
        trial_number: int,
        state: str,
        study: str,
        config: Mapping[str, Any] | None,
        scores: Mapping[str, float],
        objectives: Mapping[str, float],
        previews: Sequence[tuple[int, Mapping[str, float]]] = (),
        folder: Path | None = None,
        reason: str | None = None,
        seeds: Sequence[int] = (),
        seed_scores: Sequence[Mapping[str, float]] = (),
        seed_objectives: Sequence[Mapping[str, float]] = (),
        best_seed: int | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        kind: str = "trial",
        started: datetime | None = None,
        ended: datetime | None = None,
        searched: Sequence[str] = (),
    ) -> str:
        """One nested run per trial (one knob set on several seeds), in ``run_id`` (opened when the trial was
        told) or a new one. Returns the run id. ``kind="confirmation"``: the run of a knob set confirmed on
        held-out seeds (tagged ``confirmation_of`` its trial, not ``trial``: it is not a trial of the search).
        ``started`` and ``ended`` (Optuna's ``datetime_start``/``datetime_complete``) are the run's times, so
        MLflow's "Duration" is the trial's rendering and judging, not its logging.

        Params: the knob set and its seeds. Metrics: the trial's aggregate objective(s) and mean scores, the
        spread of the objective over seeds (``objective/min``, ``objective/max``), every seed's own values
        (``seed2/objective``, ``seed2/clip/view0``), and the previews as step metrics. Artifacts: the trial
        folder (``seed-0/``, ``seed-1/``, ...) plus ``card.html``, which marks the ``searched`` knobs.
        """
        if kind not in ("trial", "confirmation"):
            raise ValueError(f"kind must be 'trial' or 'confirmation', but got {kind=}.")
        name = f"trial-{trial_number:04d}" if kind == "trial" else f"confirmation-trial-{trial_number:04d}"
        run_tags = {
            PARENT_TAG: self.parent_run_id or "",
            ("trial" if kind == "trial" else "confirmation_of"): str(trial_number),
            "state": state,
            "study": study,
            "git_commit": git_commit(),
            "seeds": json.dumps(list(seeds)),
            **(tags or {}),
        }
        if best_seed is not None:
            run_tags["best_seed"] = str(best_seed)
        if reason:
            run_tags["fail_reason"] = reason[:4000]
        opened = run_id is not None  # by open_trial_run, with its pending tag
        if run_id is None:
            run_id = self.client.create_run(
                self.experiment_id, start_time=milliseconds(started), run_name=name, tags=run_tags
            ).info.run_id
        try:
            values: dict[str, float] = {**scores, **objectives}
            for name in objectives:
                per_seed = [record[name] for record in seed_objectives if name in record]
                if per_seed:
                    values[f"{name}/min"], values[f"{name}/max"] = min(per_seed), max(per_seed)
            for k, (record, objective) in enumerate(zip(seed_scores, seed_objectives, strict=False)):
                values.update({f"seed{k}/{name}": value for name, value in {**objective, **record}.items()})
            metrics = [Metric(name, float(value), 0, 0) for name, value in values.items()]
            for step, record in previews:
                metrics += [
                    Metric(f"preview/{name}", float(value), 0, step) for name, value in record.items()
                ]
            params = [Param(k, v) for k, v in flatten_params(config or {}).items()]
            # Synchronous: MLflow's asynchronous logging measured 1.0 s a trial here (its queue's flush
            # interval) against 0.07 s, on the publisher's path (docs/PERFORMANCE.md, "the pipeline").
            self.client.log_batch(
                run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in run_tags.items()]
            )
            if folder is not None and folder.is_dir():
                card = folder / "card.html"
                write_text_atomic(
                    card,
                    trial_card_html(
                        trial_number,
                        study,
                        state,
                        config or {},
                        scores,
                        objectives,
                        folder,
                        seeds=seeds,
                        seed_objectives=seed_objectives,
                        best_seed=best_seed,
                        run_id=run_id,
                        searched=searched,
                    ),
                )
                self.store_artifacts(run_id, folder)
        except BaseException as error:
            # A run left RUNNING would look alive forever: end it, saying why its record is incomplete.
            try:
                self.client.set_tag(run_id, "logging_error", str(error)[:4000])
                if opened:
                    self._clear_pending(run_id)  # ended, as far as it goes
                self.client.set_terminated(run_id, status="FAILED", end_time=milliseconds(ended))
                self._closed(run_id)
            except Exception:  # the store itself is what failed (e.g. the disk is full)
                pass
            raise
        if opened:
            self._clear_pending(run_id)
        self.client.set_terminated(
            run_id,
            status="FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED",
            end_time=milliseconds(ended),
        )
        self._closed(run_id)
        return run_id

    def _clear_pending(self, run_id: str) -> None:
        """The run is complete: its ``pending`` tag, which means nothing to a person, goes."""
        try:
            self.client.delete_tag(run_id, PENDING_TAG)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # a run logged in one go never had it
                raise


def milliseconds(moment: datetime | None) -> int | None:
    """MLflow's time of a moment (ms since the epoch); ``None`` (now) for none."""
    return None if moment is None else int(moment.timestamp() * 1000)


def objective_metrics(values: Sequence[float], names: Sequence[str] = ()) -> dict[str, float]:
    """MLflow names of objective values: ``objective`` for one objective (the sort key of the leaderboard
    view), ``objective/<name>`` for each of several (``objective/clip/alignment``), by the objectives'
    expressions ``names`` made metric-safe (:func:`metric_name`); ``objective0``, ``objective1``, ... without
    names (studies recorded before objectives had names in MLflow)."""
    if len(values) == 1:
        return {"objective": values[0]}
    if len(names) == len(values):
        return {f"objective/{metric_name(name)}": value for name, value in zip(names, values, strict=True)}
    return {f"objective{i}": value for i, value in enumerate(values)}


def metric_name(expression: str) -> str:
    """An objective's expression as an MLflow metric name, which allows letters, digits, ``_-. :/`` only:
    ``mean(clip/view0, clap/audio0)`` -> ``mean clip/view0 clap/audio0``."""
    return " ".join(re.sub(r"[^\w\-. :/]+", " ", expression).split())


# In MLflow's artifact viewer an HTML artifact is shown from a blob: URL, where its relative links lead
# nowhere: this script points each media element at the server's own artifact endpoint (``get-artifact``).
# Its ``data-artifact`` (a path inside a run) becomes its ``src`` and its ``data-poster`` its ``poster``, in
# the run that its own or its nearest ancestor's ``data-run`` names, else the page's one run (RUN_ID). Opened
# from disk, the links are plain relative paths and the script does nothing. One script for the trial card
# (one run) and the study gallery (a run per row).
ARTIFACT_SCRIPT = """<script>
(function () {
  if (location.protocol !== "blob:" && location.protocol !== "about:") return;
  var page = (document.referrer || location.href.replace(/^blob:/, "")).split("#")[0];
  var base = new URL(".", page);
  function served(path, run) {
    var query = "get-artifact?path=" + encodeURIComponent(path) + "&run_uuid=" + encodeURIComponent(run);
    return new URL(query, base).href;
  }
  document.querySelectorAll("[data-artifact]").forEach(function (el) {
    var holder = el.closest("[data-run]");
    var run = holder ? holder.getAttribute("data-run") : RUN_ID;
    el.src = served(el.getAttribute("data-artifact"), run);
    if (el.hasAttribute("data-poster")) el.poster = served(el.getAttribute("data-poster"), run);
  });
})();
</script>"""


def artifact_script(run_id: str = "") -> str:
    """:data:`ARTIFACT_SCRIPT` for a page whose elements without a ``data-run`` belong to run ``run_id``."""
    return ARTIFACT_SCRIPT.replace("RUN_ID", json.dumps(run_id))


def media_element(tag: str, path: str, extra: str = "", *, artifact: str | None = None) -> str:
    """An element showing a file by its relative path ``path`` (opened from disk); inside MLflow's viewer the
    file ``artifact`` (default ``path``) of its run (see ``ARTIFACT_SCRIPT``)."""
    quoted = html.escape(path, quote=True)
    stored = html.escape(artifact if artifact is not None else path, quote=True)
    close = "" if tag == "img" else f"</{tag}>"
    return f"<{tag} src='{quoted}' data-artifact='{stored}'{extra}>{close}"


def trial_card_html(
    trial_number: int,
    study: str,
    state: str,
    config: Mapping[str, Any],
    scores: Mapping[str, float],
    objectives: Mapping[str, float],
    folder: Path,
    *,
    seeds: Sequence[int] = (),
    seed_objectives: Sequence[Mapping[str, float]] = (),
    best_seed: int | None = None,
    run_id: str = "",
    searched: Sequence[str] = (),
) -> str:
    """One page of a few kilobytes: per seed the view pictures, spectrogram and sounds (the best seed first,
    with its clip), then the trial's scores and knob set (the ``searched`` knobs first, marked). The media
    are the trial folder's own files, linked by relative path, not embedded; inside MLflow's viewer they are
    fetched from the run's artifacts."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(study)} trial {trial_number}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1100px}img{max-width:100%;"
        "image-rendering:pixelated;border:1px solid #ccc}td,th{padding:2px 10px;text-align:left}"
        "h2{margin-top:1.4em;border-top:1px solid #ddd;padding-top:.6em}.k{color:#555}"
        "tr.searched td{font-weight:bold}</style></head><body>",
        f"<h1>{esc(study)}: trial {trial_number} <small class='k'>({esc(state)})</small></h1>",
    ]
    if state == "PRUNED":
        parts.append(
            "<p class='k'>Pruned: the pictures and sounds are the x0 previews the pruner judged.</p>"
        )
    order = list(range(len(seeds)))
    if best_seed is not None and best_seed in order:
        order.remove(best_seed)
        order.insert(0, best_seed)
    prompts = list(config.get("image_prompts", []))
    views = list(config.get("views", []))
    audio_prompts = list(config.get("audio_prompts", []))
    for k in order:
        render = folder / f"seed-{k}"
        if not (render / "view0.png").exists():
            continue
        values = seed_objectives[k] if k < len(seed_objectives) else {}
        label = ", ".join(f"{esc(name)} {readable(value)}" for name, value in values.items())
        best = " (best)" if k == best_seed else ""
        parts.append(f"<h2>seed {k}{best}: {seeds[k]}</h2><p class='k'>{label}</p>")
        for index in range(len(views)):
            path = render / f"view{index}.png"
            if path.exists():
                prompt = prompts[index] if index < len(prompts) else ""
                parts.append(
                    f"<h3>view {index}: {esc(str(views[index]))}</h3><p class='k'>{esc(prompt)}</p>"
                    + media_element("img", f"seed-{k}/{path.name}")
                )
        if k == order[0] and state == "COMPLETE":
            clip = media_element(
                "video", f"seed-{k}/transition.mp4", " controls loop muted autoplay playsinline"
            )
            parts.append(f"<h3>transition</h3>{clip}")
        if (render / "spectrogram.png").exists():
            parts.append("<h3>spectrogram</h3>" + media_element("img", f"seed-{k}/spectrogram.png"))
        for index, prompt in enumerate(audio_prompts):
            path = render / f"audio{index}.wav"
            if path.exists():
                parts.append(
                    f"<h3>sound {index}</h3><p class='k'>{esc(str(prompt))}</p>"
                    + media_element("audio", f"seed-{k}/{path.name}", " controls preload='none'")
                )
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{readable(v)}</td></tr>" for k, v in {**objectives, **scores}.items()
    )
    parts.append(f"<h2>scores (mean over seeds)</h2><table>{rows}</table>")
    # The searched knobs first, marked; then the fixed fields of the config (4 significant digits: the
    # config files and MLflow's params keep every digit).
    ordered = [k for k in searched if k in config] + [k for k in config if k not in searched]
    rows = "".join(
        f"<tr{' class=searched' if k in searched else ''}><td>{esc(k)}</td>"
        f"<td>{esc(readable(config[k]))}</td><td class='k'>{'searched' if k in searched else ''}</td></tr>"
        for k in ordered
    )
    parts.append(f"<h2>knob set</h2><table>{rows}</table>")
    parts.append(artifact_script(run_id) + "</body></html>")
    return "\n".join(parts)


def relocated_store(store: Path, runs_dir: Path, folder: Path) -> Path | None:
    """A copy of the local store ``store`` in ``folder`` whose runs name their files under ``runs_dir``, when
    the runs folder was moved or copied (an archive) and its artifacts are no longer where they were logged;
    None when they are (the store is served as it is). The store itself is only read: it may be read-only.
    """
    import sqlite3

    here = (runs_dir.resolve() / MLFLOW_ARTIFACTS).as_uri()
    with contextlib.closing(sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)) as source:
        locations = [row[0] for row in source.execute("SELECT artifact_location FROM experiments")]
        logged = {
            location[: location.index(f"/{MLFLOW_ARTIFACTS}/") + len(MLFLOW_ARTIFACTS) + 1]
            for location in locations
            if f"/{MLFLOW_ARTIFACTS}/" in (location or "")
        }
        moved = sorted(
            old for old in logged if old != here and not Path(urllib.parse.urlparse(old).path).is_dir()
        )
        if not moved:
            return None
        copy = folder / MLFLOW_FILE
        with contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)
            for old in moved:
                for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                    target.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE substr({column}, 1, ?) = ?",
                        (here, len(old) + 1, len(old), old),
                    )
            target.commit()
    return copy
