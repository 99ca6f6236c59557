"""What a user reads off a study: the leaderboard, the exported best config(s), and the study's pictures
(optimisation history or Pareto front, parameter importances, a contact sheet of the best candidates)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import FrozenTrial, TrialState
from PIL import Image, ImageDraw

from sounding_anagrams.errors import (
    ConfigError,
    SoundingAnagramsError,
    database_reason,
    one_line,
    shown_url,
    unknown_name_message,
)
from sounding_anagrams.evaluation.metrics import summarize
from sounding_anagrams.search.stores import check_sqlite_file, open_storage
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.tracking import is_server, objective_metrics, run_link

logger = logging.getLogger(__name__)


def tracking_uri_of(study: optuna.Study, given: str | None = None) -> str | None:
    """The MLflow store the study's trials were logged to: ``given`` (``--tracking-uri``), else
    ``MLFLOW_TRACKING_URI``, else the one the search recorded on the study."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or study.user_attrs.get("tracking_uri")


def trial_location(
    study: optuna.Study, trial: FrozenTrial, seed_index: int | None = None, *, tracking_uri: str | None = None
) -> str:
    """Where a person finds a trial's (or one seed's) files from this machine: its folder when it is here,
    else its run's page on the MLflow server, else its artifact URI."""
    attrs = trial.user_attrs
    folders = attrs.get("render_folders") or []
    if seed_index is not None and seed_index < len(folders):
        local = folders[seed_index]
    else:
        local = attrs.get("trial_folder", attrs.get("render_folder"))
    if local and Path(local).is_dir():
        return str(local)
    run_id, uri = attrs.get("mlflow_run_id"), tracking_uri_of(study, tracking_uri)
    inside = f" (seed-{seed_index}/)" if seed_index is not None else ""
    if run_id and uri and is_server(uri) and study.user_attrs.get("mlflow_experiment_id"):
        return run_link(uri, study.user_attrs["mlflow_experiment_id"], run_id) + inside
    if attrs.get("artifact_uri"):
        return str(attrs["artifact_uri"]) + inside
    return str(local or "-")


def render_files(
    study: optuna.Study, trial: FrozenTrial, seed_index: int, cache: Path, *, tracking_uri: str | None = None
) -> Path:
    """A render folder of a trial on this machine: its own folder if it is here, else downloaded once from
    the trial's MLflow run (``<cache>/<run id>/seed-<k>``), so any machine can export and re-render it."""
    attrs = trial.user_attrs
    folders = attrs.get("render_folders") or [attrs.get("render_folder", "")]
    local = Path(str(folders[seed_index])) if seed_index < len(folders) else Path("")
    if (local / "config.yaml").is_file():
        return local
    run_id, uri = attrs.get("mlflow_run_id"), tracking_uri_of(study, tracking_uri)
    if not run_id or not uri:
        raise SoundingAnagramsError(
            f"trial {trial.number}: its render folder {local} is not on this machine and the trial names no "
            "MLflow run to download it from (a search older than runs on a tracking server?)"
        )
    target = cache / str(run_id) / f"seed-{seed_index}"
    if not (target / "config.yaml").is_file():
        import mlflow.artifacts

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.artifacts.download_artifacts(
                run_id=str(run_id), artifact_path=target.name, dst_path=str(target.parent), tracking_uri=uri
            )
        except Exception as error:  # the server's and the store's many kinds; the user needs the where
            raise SoundingAnagramsError(
                f"trial {trial.number}: its render folder {local} is not on this machine and downloading "
                f"{target.name}/ of MLflow run {run_id} from {shown_url(uri)} failed: {one_line(error)}"
            ) from None
    if not (target / "config.yaml").is_file():
        raise SoundingAnagramsError(
            f"trial {trial.number}: MLflow run {run_id} at {shown_url(uri)} holds no "
            f"{target.name}/config.yaml"
        )
    return target


# Score columns of the leaderboard, first these (when present), then the others.
SHOWN_SCORES = ("clip/alignment", "clip/concealment", "clap/audio0", "clap/alignment", "clap/concealment")


@dataclass
class Ranked:
    rank: int
    trial: FrozenTrial
    pareto: bool


def load_study_from_storage(name: str, storage: str) -> optuna.Study:
    """An existing study by name; a missing one is an error listing the studies there are."""
    check_sqlite_file(storage)
    rdb = open_storage(storage)  # under the storage's lock: a search may be creating it right now
    try:
        summaries = optuna.get_all_study_summaries(rdb)
    except Exception as error:
        raise ConfigError(
            "--storage", shown_url(storage), f"cannot open this Optuna storage: {database_reason(error)}"
        ) from None
    names = [s.study_name for s in summaries]
    if name not in names:
        raise ConfigError(
            "study",
            name,
            unknown_name_message("study", name, names)
            if names
            else "no study in this storage: run `sounding-anagrams search` first, or give --runs/--storage",
        )
    return optuna.load_study(study_name=name, storage=rdb)


def ranked_trials(study: optuna.Study) -> list[Ranked]:
    """Completed trials, best first: by the objective, or for several objectives the Pareto set first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) == 1:
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        ordered = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
        return [Ranked(i + 1, t, i == 0) for i, t in enumerate(ordered)]
    pareto = {t.number for t in study.best_trials}
    signs = [-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions]
    ordered = sorted(
        complete,
        key=lambda t: (
            t.number not in pareto,
            sum(s * v for s, v in zip(signs, t.values, strict=True)),
            t.number,
        ),
    )
    return [Ranked(i + 1, t, t.number in pareto) for i, t in enumerate(ordered)]


@dataclass
class SingleRender:
    """One render of one trial: its seed and its own objective values."""

    trial: FrozenTrial
    seed_index: int
    seed: int
    values: list[float]
    folder: str


def single_renders(study: optuna.Study) -> list[SingleRender]:
    """Every render of the completed trials, best first (by the objective; several: by their sum, all being
    maximised). A trial of one seed (older studies) is one render."""
    renders = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seeds = trial.user_attrs.get("seeds") or [trial.params.get("seed", -1)]
        per_seed = trial.user_attrs.get("seed_values") or [trial.values]
        folders = trial.user_attrs.get("render_folders") or [trial.user_attrs.get("render_folder", "-")]
        for k, (seed, values) in enumerate(zip(seeds, per_seed, strict=False)):
            renders.append(SingleRender(trial, k, int(seed), list(values), str(folders[k])))
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    renders.sort(key=lambda r: (-sum(s * v for s, v in zip(signs, r.values, strict=True)), r.trial.number))
    return renders


def seed_spread(trial: FrozenTrial) -> list[dict[str, float]]:
    """Per objective, the spread of a trial's per-seed values: min, max and the 95% t-interval half-width."""
    per_seed = trial.user_attrs.get("seed_values") or [trial.values]
    spread = []
    for j in range(len(trial.values)):
        values = [v[j] for v in per_seed]
        spread.append({"min": min(values), "max": max(values), "ci95": summarize(values)["ci95"]})
    return spread


@dataclass
class Leaderboard:
    """A study's leaderboard as two pandas tables: ``knob_sets`` (ranked by the aggregate over seeds, each
    objective with its seeds' min, max and 95% half-width, then the mean scores, the knobs, where each came
    from and where its files are) and ``renders`` (the best single renders: trial, seed, values, folder)."""

    study_name: str
    counts: dict[str, int]
    seeds_per_trial: int
    aggregate: str
    objectives: list[str]
    knob_sets: pd.DataFrame
    renders: pd.DataFrame

    @property
    def summary(self) -> str:
        return (
            f"study {self.study_name}: "
            + ", ".join(f"{v} {k.lower()}" for k, v in self.counts.items())
            + f"; each knob set is judged on {self.seeds_per_trial} seed(s), by their {self.aggregate}"
        )

    def render(self, format: str = "table") -> str:
        """The leaderboard as text: a person's ``table``, ``markdown`` (both tables), ``csv`` (the knob sets)
        or ``json`` (everything, numbers as numbers)."""
        if format == "csv":
            return self.knob_sets.to_csv(index=False)
        if format == "json":
            return json.dumps(
                {
                    "study": self.study_name,
                    "trials": self.counts,
                    "seeds_per_trial": self.seeds_per_trial,
                    "aggregate": self.aggregate,
                    "knob_sets": json.loads(self.knob_sets.to_json(orient="records")),
                    "best_renders": json.loads(self.renders.to_json(orient="records")),
                },
                indent=2,
            )
        if self.knob_sets.empty:
            return f"{self.summary}\nno completed trial yet"
        title = f"knob sets, ranked by the {self.aggregate} over their seeds"
        renders_title = "best single renders" + (
            " (by the sum of the objectives)" if len(self.objectives) > 1 else ""
        )
        pareto_note = "\n* on the Pareto front" if "pareto" in self.knob_sets else ""
        if format == "markdown":
            return (
                f"{self.summary}\n\n### {title}\n\n{self._shown_knob_sets().to_markdown(index=False)}"
                f"{pareto_note}\n\n### {renders_title}\n\n{self._shown_renders().to_markdown(index=False)}"
            )
        return (
            f"{self.summary}\n\n{title}\n{_plain(self._shown_knob_sets())}{pareto_note}"
            f"\n\n{renders_title}\n{_plain(self._shown_renders())}"
        )

    def _shown_knob_sets(self) -> pd.DataFrame:
        """The knob sets as a person reads them: 4 decimals, and each objective followed by its seeds'
        ``min..max`` and ``±95%`` (column names that repeat for several objectives)."""
        frame = self.knob_sets
        marks = frame["pareto"].map({True: "*", False: ""}) if "pareto" in frame else ""
        columns = [("rank", frame["rank"].astype(str) + marks), ("trial", frame["trial"].astype(str))]
        spread = {"rank", "pareto", "trial", "origin", "where"}
        for name in self.objectives:
            low, high, ci95 = f"{name} seeds min", f"{name} seeds max", f"{name} ±95%"
            spread |= {name, low, high, ci95}
            columns += [
                (name, frame[name].map(_four)),
                ("seeds min..max", frame[low].map(_four) + ".." + frame[high].map(_four)),
                ("±95%", frame[ci95].map(_fmt)),
            ]
        columns += [(c, frame[c].map(_fmt)) for c in frame.columns if c not in spread]
        columns += [
            ("origin", frame["origin"]),
            ("where (folder, or run on the MLflow server)", frame["where"]),
        ]
        shown = pd.concat([series for _, series in columns], axis=1)
        shown.columns = [name for name, _ in columns]
        return shown

    def _shown_renders(self) -> pd.DataFrame:
        shown = self.renders.astype({"rank": str, "trial": str, "seed": str, "seed value": str})
        for name in self.objectives:
            shown[name] = self.renders[name].map(_four)
        return shown


def _plain(frame: pd.DataFrame) -> str:
    """Left-aligned columns two spaces apart: what a terminal shows well and a test can split."""
    cells = [list(frame.columns), *frame.astype(str).values.tolist()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def leaderboard(study: optuna.Study, top: int = 10, *, tracking_uri: str | None = None) -> Leaderboard:
    """The study's :class:`Leaderboard` of its ``top`` knob sets and ``top`` best single renders."""
    ranked = ranked_trials(study)[:top]
    objectives = study.user_attrs.get("objectives") or [f"objective{i}" for i in range(len(study.directions))]
    counts = {
        state.name: len(study.get_trials(deepcopy=False, states=(state,)))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    params = sorted({name for r in ranked for name in r.trial.params})
    scores = [
        name for name in SHOWN_SCORES if any(name in r.trial.user_attrs.get("scores", {}) for r in ranked)
    ]
    scores += sorted(
        {n for r in ranked for n in r.trial.user_attrs.get("scores", {})} - set(scores) - set(objectives)
    )
    rows = []
    for r in ranked:
        row: dict[str, Any] = {"rank": r.rank}
        if len(study.directions) > 1:
            row["pareto"] = r.pareto
        row["trial"] = r.trial.number
        for name, value, spread in zip(objectives, r.trial.values, seed_spread(r.trial), strict=True):
            row[name] = value
            row[f"{name} seeds min"], row[f"{name} seeds max"] = spread["min"], spread["max"]
            row[f"{name} ±95%"] = spread["ci95"]
        row.update({name: r.trial.user_attrs.get("scores", {}).get(name) for name in scores})
        row.update({name: r.trial.params.get(name) for name in params})
        row["origin"] = trial_origin(r.trial)
        row["where"] = trial_location(study, r.trial, tracking_uri=tracking_uri)
        rows.append(row)
    renders = [
        {
            "rank": i + 1,
            "trial": r.trial.number,
            "seed": r.seed_index,
            "seed value": r.seed,
            **dict(zip(objectives, r.values, strict=False)),
            "where": trial_location(study, r.trial, r.seed_index, tracking_uri=tracking_uri),
        }
        for i, r in enumerate(single_renders(study)[:top])
    ]
    return Leaderboard(
        study_name=study.study_name,
        counts=counts,
        seeds_per_trial=study.user_attrs.get("seeds_per_trial", 1),
        aggregate=study.user_attrs.get("aggregate", "mean"),
        objectives=list(objectives),
        knob_sets=pd.DataFrame(rows),
        renders=pd.DataFrame(renders, columns=["rank", "trial", "seed", "seed value", *objectives, "where"]),
    )


def leaderboard_text(
    study: optuna.Study, top: int = 10, *, tracking_uri: str | None = None, format: str = "table"
) -> str:
    """Knob sets ranked by their aggregate over seeds, with the spread over seeds; then the best renders."""
    return leaderboard(study, top, tracking_uri=tracking_uri).render(format)


def trial_origin(trial: FrozenTrial) -> str:
    """Where a knob set came from: the baseline, a start point, a retry of a trial whose worker died, or the
    sampler (``-``)."""
    parts = [str(trial.user_attrs["start_point"])] if "start_point" in trial.user_attrs else []
    if "retry_of" in trial.user_attrs:
        parts.append(f"retry of {trial.user_attrs['retry_of']}")
    return ", ".join(parts) or "-"


def _four(value: float) -> str:
    return f"{value:.4f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def export_best(
    study: optuna.Study, out: Path, *, cache: Path | None = None, tracking_uri: str | None = None
) -> list[Path]:
    """Write the best knob set's config (single objective) or the Pareto set's (several) under ``out``.

    Each file is the ``config.yaml`` of the knob set's best seed, which ``render --config`` re-renders, with a
    header naming the study, the trial, its aggregate and per-seed values, and how to render more seeds. A
    render made on another machine is downloaded from its MLflow run into ``cache`` (default
    ``<out>/downloads``), pictures and sounds with it.
    """
    ranked = [r for r in ranked_trials(study) if r.pareto]
    if not ranked:
        raise SoundingAnagramsError(f"study {study.study_name} has no completed trial to export yet")
    objectives = study.user_attrs.get("objectives") or []
    how = study.user_attrs.get("aggregate", "mean")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in ranked:
        attrs = r.trial.user_attrs
        best_seed = int(attrs.get("best_seed", 0))
        downloads = cache or out / "downloads"
        source = render_files(study, r.trial, best_seed, downloads, tracking_uri=tracking_uri)
        source = source / "config.yaml"
        values = ", ".join(
            f"{name} = {value:.4f}" for name, value in zip(objectives, r.trial.values, strict=False)
        )
        seeds = attrs.get("seeds", [])
        best = attrs.get("best_seed", 0)
        per_seed = "; ".join(
            f"seed {seed}: " + ", ".join(f"{v:.4f}" for v in values_k)
            for seed, values_k in zip(seeds, attrs.get("seed_values", []), strict=False)
        )
        header = (
            f"# study {study.study_name}, trial {r.trial.number}: "
            f"{how} over {len(seeds) or 1} seed(s): {values}\n"
        )
        if per_seed:
            header += f"# per seed: {per_seed}\n# this file is its best seed, {seeds[best]}\n"
        header += (
            "# re-render: sounding-anagrams render --config <this file>\n"
            "# more seeds of this knob set: sounding-anagrams render --config <this file> --num-seeds 8\n"
        )
        text = header + source.read_text(encoding="utf-8")
        target, n = out / f"{study.study_name}-trial-{r.trial.number:04d}.yaml", 2
        # Another study of the same name (another storage) may have exported here: never write over it.
        while target.exists() and target.read_text(encoding="utf-8") != text:
            target, n = out / f"{study.study_name}-trial-{r.trial.number:04d}-{n}.yaml", n + 1
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def import_plotting() -> tuple[Any, Any]:
    """matplotlib (headless) and Optuna's plots: seconds of imports (the search starts them early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    return plt, optuna_plots


PLOT_TITLES = {
    "history.png": "objective of each trial, and the best so far",
    "pareto.png": "the objectives of each trial; the Pareto front",
    "importances.png": "how much each knob moves the objective",
}


def readable(figure: Any, title: str) -> None:
    """Optuna's plots, readable at the size MLflow shows them: a title that says what is drawn, the legend
    inside the axes (outside, it took half the width), trial axes named as such."""
    renamed = {
        "Trial": "trial number",
        "Hyperparameter": "knob",
        "Hyperparameter Importance": "importance (PED-ANOVA: share of the objective's spread)",
    }
    for axes in figure.axes:
        for where in ("left", "right"):  # Optuna titles some plots on the left
            axes.set_title("", loc=where)
        axes.set_title(title, fontsize=12)
        if axes.get_legend() is not None:
            axes.legend(loc="best", fontsize=9, framealpha=0.8)
        axes.set_xlabel(renamed.get(axes.get_xlabel(), axes.get_xlabel()))
        axes.set_ylabel(renamed.get(axes.get_ylabel(), axes.get_ylabel()))
        axes.tick_params(labelsize=9)


def study_pictures(
    study: optuna.Study, config: StudyConfig, folder: Path, *, cache: Path | None = None
) -> tuple[list[Path], dict[str, float]]:
    """History or Pareto front, parameter importances, contact sheet; plus the best values as metrics.
    Renders of other workers' machines are downloaded into ``cache`` for the contact sheet."""
    plt, optuna_plots = import_plotting()

    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # Each value is the aggregate over the trial's seeds: the axis says so.
    how = f" ({config.aggregate} of {config.seeds_per_trial} seeds)" if config.seeds_per_trial > 1 else ""
    names = [o.spec + how for o in config.objectives]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        plots: list[tuple[str, Any]] = []
        if len(names) == 1:
            plots.append(
                ("history.png", lambda: optuna_plots.plot_optimization_history(study, target_name=names[0]))
            )
        elif complete:
            plots.append(("pareto.png", lambda: optuna_plots.plot_pareto_front(study, target_names=names)))
        if len(complete) >= 2:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            plots.append(
                (
                    "importances.png",
                    lambda: optuna_plots.plot_param_importances(
                        study,
                        evaluator=evaluator,
                        target=(lambda t: t.values[0]) if len(names) > 1 else None,
                        target_name=names[0],
                    ),
                )
            )
        for filename, draw in plots:
            try:
                axes = draw()
                figure = axes.figure if hasattr(axes, "figure") else axes.flatten()[0].figure
                figure.set_size_inches(8, 5)
                readable(figure, f"{study.study_name}: {PLOT_TITLES[filename]}")
                figure.tight_layout()
                figure.savefig(folder / filename, dpi=100)
                plt.close(figure)
                files.append(folder / filename)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                logger.info("skipped %s: %s", filename, error)
    sheet = contact_sheet(study, folder / "best.png", cache=cache)
    if sheet is not None:
        files.append(sheet)
    metrics: dict[str, float] = {"trials_complete": float(len(complete))}
    ranked = ranked_trials(study)
    if ranked:
        best = ranked[0].trial
        metrics["best/trial"] = float(best.number)
        metrics.update({f"best/{key}": value for key, value in objective_metrics(best.values).items()})
    return files, metrics


def sheet_font(size: int) -> Any:
    """A TrueType font (matplotlib's DejaVu Sans) of ``size`` pixels; PIL's small bitmap font without it."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def sheet_headers(render: Path, pictures: int) -> list[str]:
    """Column titles of a contact sheet: each view with its prompt, then the spectrogram (the sound)."""
    try:
        config = yaml.safe_load((render / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    views, prompts = list(config.get("views") or []), list(config.get("image_prompts") or [])
    sounds = ", ".join(str(p) for p in config.get("audio_prompts") or [])
    titles = [
        f"view {i}: {views[i] if i < len(views) else '?'}\n" + (f'"{prompts[i]}"' if i < len(prompts) else "")
        for i in range(pictures - 1)
    ]
    return [*titles, "spectrogram (the sound)\n" + (f'"{sounds}"' if sounds else "")]


def fitted(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    study: optuna.Study, path: Path, top: int = 6, width: int = 512, *, cache: Path | None = None
) -> Path | None:
    """The study's sheet, to read or print: a row per best knob set (its rank, value and best seed; its mean
    scores and knobs), with its best render's view pictures and spectrogram side by side under column titles
    naming each view and its prompt. Renders of other machines are downloaded from their MLflow runs into
    ``cache`` (default beside ``path``)."""
    rows = []
    headers: list[str] = []
    for r in ranked_trials(study)[:top]:
        try:
            folder = render_files(
                study,
                r.trial,
                int(r.trial.user_attrs.get("best_seed", 0)),
                cache or path.parent / "downloads",
            )
        except SoundingAnagramsError as error:
            logger.info("contact sheet: %s", error)
            continue
        pictures = [*sorted(folder.glob("view*.png")), folder / "spectrogram.png"]
        images = [Image.open(p).convert("RGB") for p in pictures if p.exists()]
        if not images:
            continue
        if not headers:
            headers = sheet_headers(folder, len(images))
        scale = width / max(image.width for image in images)
        images = [
            image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            for image in images
        ]
        values = ", ".join(f"{v:.4f}" for v in r.trial.values)
        seed = r.trial.user_attrs.get("best_seed")
        label = f"#{r.rank}  trial {r.trial.number}: {values}" + (
            "" if seed is None else f"  (its best seed, {seed})"
        )
        scores = r.trial.user_attrs.get("scores", {})
        details = [f"{name} {scores[name]:.4f}" for name in SHOWN_SCORES if name in scores]
        details += [f"{name} {_fmt(value)}" for name, value in sorted(r.trial.params.items())]
        rows.append((label + "\n" + "   ".join(details), images))
    if not rows:
        return None
    font, small = sheet_font(20), sheet_font(16)
    label_h, header_h, pad = 50, 46, 8
    row_heights = [label_h + max(i.height for i in images) for _, images in rows]
    row_width = max(sum(i.width + pad for i in images) for _, images in rows)
    sheet = Image.new("RGB", (row_width, header_h + sum(row_heights) + pad * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for header, image in zip(headers, rows[0][1], strict=False):
        for line, text in enumerate(header.splitlines()):
            draw.text(
                (x + 2, 2 + 21 * line), fitted(draw, text, small, image.width - 4), fill="#444", font=small
            )
        x += image.width + pad
    y = header_h
    for (label, images), height in zip(rows, row_heights, strict=True):
        title, knobs = label.split("\n", 1)
        draw.text((2, y + 2), title, fill="black", font=font)
        draw.text((2, y + 26), fitted(draw, knobs, small, row_width - 4), fill="#444", font=small)
        x = 0
        for image in images:
            sheet.paste(image, (x, y + label_h))
            x += image.width + pad
        y += height + pad
    sheet.save(path)
    return path
