"""What a user reads off a study: the leaderboard, the exported best config(s), and the study's pictures
(optimisation history or Pareto front, parameter importances, a contact sheet of the best candidates)."""

from __future__ import annotations

import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from sounding_anagrams.errors import (
    ConfigError,
    SoundingAnagramsError,
    database_reason,
    shown_url,
    unknown_name_message,
)
from sounding_anagrams.evaluation.metrics import summarize
from sounding_anagrams.numbers import readable, signed
from sounding_anagrams.search.locations import (
    render_files,
    seed_folders,
    study_render_root,
    tracking_uri_of,
    trial_location,
)
from sounding_anagrams.search.stores import check_sqlite_file, open_storage, require_database, trial_record
from sounding_anagrams.search.study import balance_weights

logger = logging.getLogger(__name__)


SHOWN_SCORES = ("clip/alignment", "clip/concealment", "clap/audio0", "clap/alignment", "clap/concealment")
# The leaderboard's column of each knob set's mean paired difference to the leader (docs/METHOD.md §5).
VS_LEADER = "vs leader"
# Its columns of a confirmed knob set's mean on the held-out seeds, and the study attribute they come from
# (written by search/confirmation.py, which imports this module: the name lives here).
HELD_OUT = "held-out"
# Its column marking the knob sets raced out (stopped after their first seeds: docs/METHOD.md §5).
RACED = "raced"
SEEDS_RENDERED = "seeds rendered"
CONFIRMATIONS_ATTR = "confirmations"
# Column suffixes of an objective's spread over a trial's seeds (ASCII: CSV headers are read by programs).
MIN_OVER_SEEDS, MAX_OVER_SEEDS, CI95 = "min over seeds", "max over seeds", "ci95"
# The table's width when the output is no terminal (a pipe, a file): what a person pastes reads well.
TERMINAL_WIDTH = 100


@dataclass
class Ranked:
    rank: int
    trial: FrozenTrial
    pareto: bool


def load_study_from_storage(name: str, storage: str) -> optuna.Study:
    """An existing study by name; a missing one is an error listing the studies there are."""
    require_database(storage)
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
    """Completed trials, best first: by the objective, or for several objectives the Pareto set first. Raced
    out trials (judged on their first seeds only, and significantly worse than the leader then) come after
    the trials complete on all their seeds."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    if len(study.directions) == 1:
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        ordered = sorted(
            complete, key=lambda t: (bool(t.user_attrs.get("raced")), sign * t.values[0], t.number)
        )
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
        per_seed = trial_record(trial, "seed_values") or [trial.values]
        folders = seed_folders(trial) or [trial.user_attrs.get("render_folder", "-")]
        for k, (seed, values) in enumerate(zip(seeds, per_seed, strict=False)):
            renders.append(SingleRender(trial, k, int(seed), list(values), str(folders[k])))
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    renders.sort(key=lambda r: (-sum(s * v for s, v in zip(signs, r.values, strict=True)), r.trial.number))
    return renders


def seed_spread(trial: FrozenTrial) -> list[dict[str, float]]:
    """Per objective, the spread of a trial's per-seed values: min, max and the 95% t-interval half-width."""
    per_seed = trial_record(trial, "seed_values") or [trial.values]
    spread = []
    for j in range(len(trial.values)):
        values = [v[j] for v in per_seed]
        spread.append({"min": min(values), "max": max(values), "ci95": summarize(values)["ci95"]})
    return spread


def confirmed_records(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """The study's confirmation records (search/confirmation.py writes them), by trial number."""
    return {int(n): record for n, record in (study.user_attrs.get(CONFIRMATIONS_ATTR) or {}).items()}


def paired_difference(trial: FrozenTrial, leader: FrozenTrial, objective: int = 0) -> dict[str, float]:
    """``trial`` minus ``leader`` on objective ``objective``, over the seeds both rendered (matched by seed
    value): the mean difference, its 95% t-interval half-width and the number of shared seeds (0: none
    shared, as with ``seeds: independent``; then the mean is NaN). Paired seeds: docs/METHOD.md §5."""
    mine = dict(
        zip(trial.user_attrs.get("seeds", []), trial_record(trial, "seed_values") or [], strict=False)
    )
    theirs = dict(
        zip(leader.user_attrs.get("seeds", []), trial_record(leader, "seed_values") or [], strict=False)
    )
    differences = [mine[seed][objective] - theirs[seed][objective] for seed in mine if seed in theirs]
    shared = summarize(differences)
    return {"mean": shared["mean"], "ci95": shared["ci95"], "n": shared["n"]}


@dataclass
class Leaderboard:
    """A study's leaderboard as two pandas tables: ``knob_sets`` (ranked by the aggregate over seeds, each
    objective with its seeds' min, max and 95% half-width, then the mean scores, the knobs, where each came
    from and where its files are) and ``renders`` (the best single renders: trial, seed, values, folder).

    A person reads :meth:`render`'s ``table``: the rank, value, spread and searched knobs (short names and a
    legend) in the terminal's width; ``wide=True`` every column. CSV and JSON carry everything at full
    precision under ASCII names."""

    study_name: str
    counts: dict[str, int]
    seeds_per_trial: int
    aggregate: str
    objectives: list[str]
    knobs: list[str]
    knob_sets: pd.DataFrame
    renders: pd.DataFrame

    @property
    def summary(self) -> str:
        return (
            f"study {self.study_name}: "
            + ", ".join(f"{v} {k.lower()}" for k, v in self.counts.items())
            + f"; each knob set is judged on {self.seeds_per_trial} seed(s), by their {self.aggregate}"
        )

    def render(self, format: str = "table", *, width: int = TERMINAL_WIDTH, wide: bool = False) -> str:
        """The leaderboard as text: a person's ``table`` (at most ``width`` characters a line, unless
        ``wide``), ``markdown`` (both tables), ``csv`` (the knob sets) or ``json`` (everything, numbers as
        numbers)."""
        if format == "csv":
            return self.knob_sets.to_csv(index=False)
        if format == "json":
            return json.dumps(
                {
                    "study": self.study_name,
                    "trials": self.counts,
                    "seeds_per_trial": self.seeds_per_trial,
                    "aggregate": self.aggregate,
                    "objectives": self.objectives,
                    "knob_sets": json.loads(self.knob_sets.to_json(orient="records")),
                    "best_renders": json.loads(self.renders.to_json(orient="records")),
                },
                indent=2,
            )
        lines = textwrap.wrap(self.summary, width) if format == "table" and not wide else [self.summary]
        if self.knob_sets.empty:
            return "\n".join([*lines, "no completed trial yet"])
        title = f"knob sets, ranked by the {self.aggregate} over their seeds"
        renders_title = "best single renders" + (
            " (by the sum of the objectives)" if len(self.objectives) > 1 else ""
        )
        knob_sets, renders = self._shown_knob_sets(wide), self._shown_renders(wide)
        if format == "markdown":
            return "\n".join(
                [
                    *lines,
                    f"\n### {title}\n",
                    knob_sets.to_markdown(index=False),
                    f"\n### {renders_title}\n",
                    renders.to_markdown(index=False),
                    "",
                    *self.legend(wide),
                ]
            )
        left_out: list[str] = []
        if not wide:
            knob_sets, left_out = _fit(knob_sets, width)
        legend = self.legend(wide) + ([f"left out for width: {', '.join(left_out)}"] if left_out else [])
        return "\n".join(
            [
                *lines,
                "",
                title,
                _plain(knob_sets),
                "",
                renders_title,
                _plain(renders),
                "",
                *(line for item in legend for line in (textwrap.wrap(item, width) if not wide else [item])),
            ]
        )

    def objective_label(self, index: int) -> str:
        """An objective's column in the table: ``objective`` (``objective 1``, ``objective 2``, ... for
        several); the legend gives its expression."""
        return "objective" if len(self.objectives) == 1 else f"objective {index + 1}"

    def legend(self, wide: bool = False) -> list[str]:
        """What the table's short names stand for."""
        objectives = "; ".join(
            f"{self.objective_label(j)} = {name}, the {self.aggregate} over seeds"
            for j, name in enumerate(self.objectives)
        )
        lines = [objectives]
        if not wide and self.knobs:
            lines.append(
                "knobs: " + ", ".join(f"{short} = {name}" for name, short in short_names(self.knobs).items())
            )
        if RACED in self.knob_sets:
            lines.append("seeds: the seeds judged; raced: stopped there, significantly worse than the leader")
        lines.append(
            "±: the 95% interval's half-width over seeds; `leaderboard --wide`: every column and the files; "
            "--format csv or json: full precision"
        )
        return lines

    def _shown_knob_sets(self, wide: bool) -> pd.DataFrame:
        """The knob sets as a person reads them (4 significant digits): rank, each objective with its 95%
        half-width and its seeds' min..max, the seeds rendered, the held-out mean where there is, the searched
        knobs (short names unless ``wide``) and the paired difference to the leader.
        ``wide`` adds the mean scores, where each came from and its files."""
        frame = self.knob_sets
        marks = frame["pareto"].map({True: "*", False: ""}) if "pareto" in frame else ""
        columns: list[tuple[str, pd.Series]] = [
            ("rank", frame["rank"].astype(str) + marks),
            ("trial", frame["trial"].astype(str)),
        ]
        for j, name in enumerate(self.objectives):
            label = self.objective_label(j)
            columns += [
                (label, _with_interval(frame[name], frame[f"{name} {CI95}"])),
                (
                    f"{label} min..max over seeds" if len(self.objectives) > 1 else "min..max over seeds",
                    frame[f"{name} {MIN_OVER_SEEDS}"].map(readable)
                    + ".."
                    + frame[f"{name} {MAX_OVER_SEEDS}"].map(readable),
                ),
            ]
        if RACED in frame:
            rendered = [
                f"{n} raced" if was_raced else str(n)
                for was_raced, n in zip(frame[RACED], frame[SEEDS_RENDERED], strict=True)
            ]
            columns.append(("seeds", pd.Series(rendered, index=frame.index)))
        for j, name in enumerate(self.objectives if f"{HELD_OUT} seeds" in frame else []):
            label = "held-out" if len(self.objectives) == 1 else f"held-out {j + 1}"
            columns.append(
                (label, _with_interval(frame[f"{name} {HELD_OUT}"], frame[f"{name} {HELD_OUT} {CI95}"]))
            )
        names = self.knobs if wide else list(short_names(self.knobs).values())
        columns += [
            (shown_name, frame[name].map(readable))
            for name, shown_name in zip(self.knobs, names, strict=True)
        ]
        if VS_LEADER in frame:
            leader = (frame["rank"] == 1) | (frame[f"{VS_LEADER} seeds"] == 0)
            shown = [
                "" if first else f"{signed(mean)} ±{readable(ci95)}"
                for first, mean, ci95 in zip(
                    leader, frame[VS_LEADER], frame[f"{VS_LEADER} {CI95}"], strict=True
                )
            ]
            columns.append(("vs leader, same seeds", pd.Series(shown, index=frame.index)))
        if wide:
            known = {column for column in frame.columns if column.startswith(tuple(self.objectives))}
            known |= {"rank", "pareto", "trial", "origin", "where", RACED, SEEDS_RENDERED, *self.knobs}
            known |= {column for column in frame.columns if column.startswith((HELD_OUT, VS_LEADER))}
            columns += [(c, frame[c].map(readable)) for c in frame.columns if c not in known]
            columns += [
                ("origin", frame["origin"]),
                ("files (folder, or run on the MLflow server)", frame["where"]),
            ]
        shown = pd.concat([series for _, series in columns], axis=1)
        shown.columns = [name for name, _ in columns]
        return shown

    def _shown_renders(self, wide: bool) -> pd.DataFrame:
        shown = pd.DataFrame(
            {
                "rank": self.renders["rank"].astype(str),
                "trial": self.renders["trial"].astype(str),
                "seed index": self.renders["seed index"].astype(str),
                "seed": self.renders["seed"].astype(str),
            }
        )
        for j, name in enumerate(self.objectives):
            shown[self.objective_label(j)] = self.renders[name].map(readable)
        if wide:
            shown["files"] = self.renders["where"]
        return shown


def short_names(names: list[str]) -> dict[str, str]:
    """Short column names of knobs, their words' initials: ``view_balance`` -> ``vb``,
    ``image_guidance_scale`` -> ``igs`` (a second ``vb`` would be ``vb2``)."""
    shorts: dict[str, str] = {}
    for name in names:
        short = "".join(word[0] for word in name.split("_") if word) or name
        candidate, n = short, 2
        while candidate in shorts.values():
            candidate, n = f"{short}{n}", n + 1
        shorts[name] = candidate
    return shorts


def _with_interval(values: pd.Series, ci95: pd.Series) -> pd.Series:
    """``0.6124 ±0.0213`` (blank where there is no value)."""
    return pd.Series(
        [
            "" if v is None or pd.isna(v) else f"{readable(v)} ±{readable(c)}"
            for v, c in zip(values, ci95, strict=True)
        ],
        index=values.index,
    )


def _fit(frame: pd.DataFrame, width: int) -> tuple[pd.DataFrame, list[str]]:
    """The table's columns from the left that fit ``width`` characters, and the names of those left out
    (the rank, trial and first value always stay)."""
    kept = 0
    total = -2
    for name in frame.columns:
        column_width = max(len(str(name)), *(len(str(v)) for v in frame[name])) + 2
        if kept >= 3 and total + column_width > width:
            break
        total += column_width
        kept += 1
    return frame.iloc[:, :kept], [str(name) for name in frame.columns[kept:]]


def _plain(frame: pd.DataFrame) -> str:
    """Left-aligned columns two spaces apart: what a terminal shows well and a test can split."""
    cells = [list(frame.columns), *frame.astype(str).values.tolist()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def leaderboard(
    study: optuna.Study, top: int = 10, *, tracking_uri: str | None = None, runs_dir: Path | None = None
) -> Leaderboard:
    """The study's :class:`Leaderboard` of its ``top`` knob sets and ``top`` best single renders; ``runs_dir``
    is where its files are looked for when they are not where they were written (a moved runs folder)."""
    tracking_uri = tracking_uri_of(study, tracking_uri, runs_dir)
    render_root = study_render_root(study, runs_dir)
    ranked = ranked_trials(study)[:top]
    any_raced = any(r.trial.user_attrs.get("raced") for r in ranked)
    objectives = study.user_attrs.get("objectives") or [f"objective{i}" for i in range(len(study.directions))]
    confirmed = confirmed_records(study)
    counts = {
        state.name: len(study.get_trials(deepcopy=False, states=(state,)))
        for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    params = sorted({name for r in ranked for name in r.trial.params})
    scores = [
        name for name in SHOWN_SCORES if any(name in (trial_record(r.trial, "scores") or {}) for r in ranked)
    ]
    scores += sorted(
        {n for r in ranked for n in (trial_record(r.trial, "scores") or {})} - set(scores) - set(objectives)
    )
    rows = []
    for r in ranked:
        row: dict[str, Any] = {"rank": r.rank}
        if len(study.directions) > 1:
            row["pareto"] = r.pareto
        row["trial"] = r.trial.number
        for name, value, spread in zip(objectives, r.trial.values, seed_spread(r.trial), strict=True):
            row[name] = value
            row[f"{name} {MIN_OVER_SEEDS}"], row[f"{name} {MAX_OVER_SEEDS}"] = spread["min"], spread["max"]
            row[f"{name} {CI95}"] = spread["ci95"]
        if len(study.directions) == 1:  # the leader is rank 1; several objectives have no one leader
            difference = paired_difference(r.trial, ranked[0].trial)
            row[VS_LEADER], row[f"{VS_LEADER} {CI95}"] = difference["mean"], difference["ci95"]
            row[f"{VS_LEADER} seeds"] = difference["n"]
        if confirmed:
            held_out = confirmed.get(r.trial.number)
            for j, name in enumerate(objectives):
                row[f"{name} {HELD_OUT}"] = held_out["mean"][j] if held_out else None
                row[f"{name} {HELD_OUT} {CI95}"] = held_out["ci95"][j] if held_out else None
            row[f"{HELD_OUT} seeds"] = len(held_out["seeds"]) if held_out else 0
        row.update({name: (trial_record(r.trial, "scores") or {}).get(name) for name in scores})
        row.update({name: r.trial.params.get(name) for name in params})
        # Beside a balance, the weights it set (what a config file says).
        for balance, weights in (
            ("view_balance", "view_weights"),
            ("audio_view_balance", "audio_view_weights"),
        ):
            if balance in r.trial.params:
                row[weights] = json.dumps(balance_weights(r.trial.params[balance]))
        if any_raced:
            row[RACED] = bool(r.trial.user_attrs.get("raced"))
            row[SEEDS_RENDERED] = len(trial_record(r.trial, "seed_values") or [])
        row["origin"] = trial_origin(r.trial)
        row["where"] = trial_location(study, r.trial, tracking_uri=tracking_uri, render_root=render_root)
        rows.append(row)
    renders = [
        {
            "rank": i + 1,
            "trial": r.trial.number,
            "seed index": r.seed_index,
            "seed": r.seed,
            **dict(zip(objectives, r.values, strict=False)),
            "where": trial_location(
                study, r.trial, r.seed_index, tracking_uri=tracking_uri, render_root=render_root
            ),
        }
        for i, r in enumerate(single_renders(study)[:top])
    ]
    return Leaderboard(
        study_name=study.study_name,
        counts=counts,
        seeds_per_trial=study.user_attrs.get("seeds_per_trial", 1),
        aggregate=study.user_attrs.get("aggregate", "mean"),
        objectives=list(objectives),
        knobs=params,
        # No knob set yet (no trial, or only failed or pruned ones): the columns still, so CSV has its header.
        knob_sets=pd.DataFrame(rows) if rows else pd.DataFrame(columns=empty_columns(study, objectives)),
        renders=pd.DataFrame(renders, columns=["rank", "trial", "seed index", "seed", *objectives, "where"]),
    )


def empty_columns(study: optuna.Study, objectives: list[str]) -> list[str]:
    """The knob sets' columns of a study with none yet: rank, trial, each objective with its spread over
    seeds, the searched knobs the study's trials name, origin and files."""
    spread = [
        f"{name}{suffix}"
        for name in objectives
        for suffix in ("", f" {MIN_OVER_SEEDS}", f" {MAX_OVER_SEEDS}", f" {CI95}")
    ]
    knobs = sorted({name for trial in study.get_trials(deepcopy=False) for name in trial.params})
    pareto = ["pareto"] if len(study.directions) > 1 else []
    return ["rank", *pareto, "trial", *spread, *knobs, "origin", "where"]


def leaderboard_text(
    study: optuna.Study,
    top: int = 10,
    *,
    tracking_uri: str | None = None,
    runs_dir: Path | None = None,
    format: str = "table",
    width: int = TERMINAL_WIDTH,
    wide: bool = False,
) -> str:
    """Knob sets ranked by their aggregate over seeds, with the spread over seeds; then the best renders."""
    board = leaderboard(study, top, tracking_uri=tracking_uri, runs_dir=runs_dir)
    return board.render(format, width=width, wide=wide)


def trial_origin(trial: FrozenTrial) -> str:
    """Where a knob set came from: the baseline, a start point, a retry of a trial whose worker died, or the
    sampler (``-``)."""
    parts = [str(trial.user_attrs["start_point"])] if "start_point" in trial.user_attrs else []
    if "retry_of" in trial.user_attrs:
        parts.append(f"retry of {trial.user_attrs['retry_of']}")
    return ", ".join(parts) or "-"


def confirmed_winner(study: optuna.Study, confirmed: dict[int, dict[str, Any]]) -> int | None:
    """The trial number of the completed knob set with the best held-out mean (one objective), if any."""
    complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    scored = {
        number: sign * record["mean"][0]
        for number, record in confirmed.items()
        if number in complete and record["mean"] and math.isfinite(record["mean"][0])
    }
    return max(scored, key=lambda number: (scored[number], -number)) if scored else None


def searched_knobs(params: dict[str, Any]) -> str:
    """A trial's knobs under their study-file names at full precision, e.g. ``view_balance: 0.3,
    audio_weight: 0.4512`` (a balance is what was searched; the config below holds the weights it set)."""
    return ", ".join(f"{name}: {value!r}" for name, value in params.items())


def export_best(
    study: optuna.Study,
    out: Path,
    *,
    cache: Path | None = None,
    tracking_uri: str | None = None,
    runs_dir: Path | None = None,
) -> list[Path]:
    """Write the best knob set's config (single objective) or the Pareto set's (several) under ``out``.

    Each file is the ``config.yaml`` of the knob set's best seed, which ``render --config`` re-renders, with a
    header naming the study, the trial, its aggregate and per-seed values, and how to render more seeds. A
    render made on another machine is downloaded from its MLflow run into ``cache`` (default
    ``<out>/downloads``), pictures and sounds with it; ``runs_dir`` is where the files are looked for when
    they are not where they were written (a moved runs folder).
    """
    tracking_uri = tracking_uri_of(study, tracking_uri, runs_dir)
    render_root = study_render_root(study, runs_dir)
    ranked = [r for r in ranked_trials(study) if r.pareto]
    if not ranked:
        raise SoundingAnagramsError(f"study {study.study_name} has no completed trial to export yet")
    confirmed = confirmed_records(study)
    if len(study.directions) == 1:
        winner = confirmed_winner(study, confirmed)
        if winner is not None:  # the best on held-out seeds, not the best of the search's noisy means
            ranked = [next(r for r in ranked_trials(study) if r.trial.number == winner)]
    objectives = study.user_attrs.get("objectives") or []
    how = study.user_attrs.get("aggregate", "mean")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in ranked:
        attrs = r.trial.user_attrs
        best_seed = int(attrs.get("best_seed", 0))
        downloads = cache or out / "downloads"
        source = render_files(
            study, r.trial, best_seed, downloads, tracking_uri=tracking_uri, render_root=render_root
        )
        source = source / "config.yaml"
        values = ", ".join(
            f"{name} = {readable(value)}" for name, value in zip(objectives, r.trial.values, strict=False)
        )
        seeds = attrs.get("seeds", [])
        best = attrs.get("best_seed", 0)
        per_seed = "; ".join(
            f"seed {seed}: " + ", ".join(readable(v) for v in values_k)
            for seed, values_k in zip(seeds, trial_record(r.trial, "seed_values") or [], strict=False)
        )
        header = (
            f"# study {study.study_name}, trial {r.trial.number}: "
            f"{how} over {len(seeds) or 1} seed(s): {values}\n"
        )
        header += f"# knobs searched: {searched_knobs(r.trial.params)}\n"
        if per_seed:
            header += f"# per seed: {per_seed}\n# this file is its best seed, {seeds[best]}\n"
        held_out = confirmed.get(r.trial.number)
        if held_out:
            shown = ", ".join(
                f"{name} = {readable(mean)} ±{readable(ci95)}"
                for name, mean, ci95 in zip(objectives, held_out["mean"], held_out["ci95"], strict=False)
            )
            count = len(held_out["seeds"])
            header += (
                f"# confirmed on {count} held-out seeds (no trial rendered them), mean ±95%: {shown}\n"
                f"# held-out seeds: {held_out['seeds']}\n"
            )
            if len(study.directions) == 1:
                header += f"# the confirmed winner of {len(confirmed)} knob set(s) confirmed\n"
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
