"""The study gallery: one page, ``gallery.html`` in the study's render root, that puts its top knob sets
side by side to look at and listen to, one row each (the leaderboard's order): every view's picture captioned
with its prompt, the spectrogram, a player per sound and the clip of the knob set's best seed, its value with
the spread over seeds, its searched knobs and the command that renders it again. Buttons sort the rows by the
objective(s) and by each score.

The media are the render folders' own files, linked by relative path (about 3 KB a row, nothing embedded).
The search's MLflow run carries the page too (``study/gallery.html``): there every row names its trial's run
(``data-run``) and :data:`~sounding_anagrams.search.tracking.ARTIFACT_SCRIPT` fetches the row's media from it.

Written by the publisher after each batch (``search-publish`` thread, low priority: off the sampler's path)
and once more when the search ends (:func:`publish_gallery`, which fails a search only on a lost storage);
``sounding-anagrams gallery STUDY`` writes it from the stored study (:func:`write_gallery`).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import yaml
from optuna.trial import FrozenTrial

from sounding_anagrams.errors import one_line, raise_if_connection_lost
from sounding_anagrams.files import CLIP_FILE, write_text_atomic
from sounding_anagrams.numbers import readable
from sounding_anagrams.search.locations import found_here, seed_folders, study_render_root
from sounding_anagrams.search.report import (
    CONFIRMATIONS_ATTR,
    SHOWN_SCORES,
    load_study_from_storage,
    ranked_trials,
    seed_spread,
)
from sounding_anagrams.search.stores import default_storage, trial_record
from sounding_anagrams.search.tracking import artifact_script, media_element

if TYPE_CHECKING:
    from sounding_anagrams.search.opening import OpenedSearch

logger = logging.getLogger(__name__)
GALLERY_FILE = "gallery.html"
GALLERY_TOP = 8  # knob sets shown
ARTIFACT_FOLDER = "study"  # the search run's artifact folder of the study's pages and pictures
MAXIMIZE = optuna.study.StudyDirection.MAXIMIZE


@dataclass
class GalleryRow:
    """One knob set of the gallery: a ranked, complete trial, shown at its best seed."""

    rank: int
    trial: FrozenTrial
    pareto: bool
    seed_index: int  # the best seed's index among the trial's seeds
    folder: Path  # that seed's render folder (the rendering machine's path)
    config: Mapping[str, Any]  # its config.yaml: prompts, views, seed ({} when not on this machine)

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def run_id(self) -> str:
        """The trial's MLflow run, whose ``seed-<k>/`` artifacts are this row's media in MLflow's viewer."""
        return str(self.trial.user_attrs.get("mlflow_run_id") or "")

    @property
    def raced(self) -> bool:
        return bool(self.trial.user_attrs.get("raced"))

    @property
    def scores(self) -> dict[str, float]:
        """The trial's scores, each the mean over its seeds."""
        return dict(trial_record(self.trial, "scores") or {})

    def file(self, name: str) -> tuple[str, str]:
        """A media file of the best seed: (its path inside the render folder, its path inside the trial's
        MLflow run)."""
        return str(self.folder / name), f"seed-{self.seed_index}/{name}"

    def has(self, name: str) -> bool:
        """Whether the best seed has file ``name``; a folder not on this machine is assumed complete (its
        MLflow run holds the files)."""
        return not self.folder.is_dir() or (self.folder / name).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """A render folder's ``config.yaml`` as a mapping; ``{}`` when it is missing or unreadable (another
    machine's folder, a file cut short): the gallery then falls back on the study's definition."""
    try:
        loaded = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return dict(loaded) if isinstance(loaded, Mapping) else {}


def gallery_rows(
    study: optuna.Study, top: int = GALLERY_TOP, *, render_root: Path | None = None
) -> list[GalleryRow]:
    """The study's ``top`` knob sets in the leaderboard's order (pruned and failed trials are not ranked);
    their folders are looked for under ``render_root`` too (a moved runs folder)."""
    rows = []
    for ranked in ranked_trials(study)[:top]:
        attrs = ranked.trial.user_attrs
        best = int(attrs.get("best_seed", 0))
        folders = seed_folders(ranked.trial) or [attrs.get("render_folder", "")]
        recorded = str(folders[best] if best < len(folders) else folders[0])
        folder = found_here(recorded, render_root) or Path(recorded)
        rows.append(GalleryRow(ranked.rank, ranked.trial, ranked.pareto, best, folder, read_config(folder)))
    return rows


def objective_names(study: optuna.Study, attrs: Mapping[str, Any]) -> list[str]:
    """The objectives as the study file names them (``attrs``: the study's user attributes), else as Optuna
    names them, else ``objective0``, ..."""
    names = attrs.get("objectives") or study.metric_names
    if not names or len(names) != len(study.directions):
        return [f"objective{i}" for i in range(len(study.directions))]
    return [str(name) for name in names]


def score_names(rows: Sequence[GalleryRow], objectives: Sequence[str]) -> list[str]:
    """The scores the rows carry: the leaderboard's key scores first, then the others by name."""
    present = {name for row in rows for name in row.scores} - set(objectives)
    return [name for name in SHOWN_SCORES if name in present] + sorted(present - set(SHOWN_SCORES))


def sort_values(row: GalleryRow, objectives: Sequence[str]) -> dict[str, float | None]:
    """What the page sorts a row by (full precision; a missing or non-finite value sorts last)."""
    # An objective named as a score (``clip/alignment``) sorts by the objective: the aggregate over seeds.
    values: dict[str, Any] = {"rank": row.rank, **row.scores}
    values.update(zip(objectives, row.trial.values, strict=False))
    return {
        k: float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None for k, v in values.items()
    }


def render_command(row: GalleryRow) -> str:
    """The command that renders this knob set at its best seed again (its folder's own config)."""
    return f"sounding-anagrams render --config {row.folder / 'config.yaml'}"


# -- the page --------------------------------------------------------------------------------------------

_STYLE = """<style>
body{font:14px/1.35 sans-serif;margin:1em 1.5em;color:#222}
h1{font-size:1.4em;margin:.2em 0}.k{color:#555}.sort{margin:.8em 0}
.sort button{margin:0 .3em .3em 0;padding:.25em .7em;border:1px solid #999;border-radius:4px;
background:#f6f6f6;cursor:pointer}.sort button.on{background:#234;color:#fff;border-color:#234}
table.g{border-collapse:collapse;width:100%}table.g>thead th{text-align:left;color:#555;font-weight:normal}
table.g>tbody>tr{border-top:2px solid #bbb;vertical-align:top}table.g>tbody>tr>td{padding:.7em .6em}
td.info{width:21em;min-width:15em;font-size:13px}td.pics{min-width:280px}td.play{width:320px;min-width:240px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:.2em .8em}
figure{margin:0 0 .5em}figcaption{font-size:12px;color:#333;margin-top:2px}
img{display:block;width:100%;image-rendering:pixelated;border:1px solid #ccc;background:#eee}
video{display:block;width:100%;background:#000}audio{width:100%;height:36px}
.tag{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;margin-left:4px;color:#fff}
.pareto{background:#2a7}.raced{background:#b60}.n td{padding:0 .8em 0 0}.n{margin:.3em 0}
code.cmd{display:block;user-select:all;word-break:break-all;font-size:11px;background:#f3f3f3;padding:.3em;
margin-top:.4em}
</style>"""

# Sorting without a library: a button sorts the rows by its key, best first, and again the other way; the
# rows carry their values (``data-values``), a missing one sorts last and ties keep the leaderboard's order.
_SORT_SCRIPT = """<script>
(function () {
  var body = document.getElementById("rows");
  var buttons = [].slice.call(document.querySelectorAll(".sort button"));
  buttons.forEach(function (button) {
    button.addEventListener("click", function () {
      var key = button.getAttribute("data-sort");
      var high = button.getAttribute("data-best") === "high";
      if (button.classList.contains("on")) high = button.getAttribute("data-order") !== "high";
      var rows = [].slice.call(body.children);
      rows.sort(function (a, b) {
        var x = JSON.parse(a.getAttribute("data-values")), y = JSON.parse(b.getAttribute("data-values"));
        var u = x[key], v = y[key];
        if (u === v || (u == null && v == null)) return x.rank - y.rank;
        if (u == null) return 1;
        if (v == null) return -1;
        return high ? v - u : u - v;
      });
      rows.forEach(function (row) { body.appendChild(row); });
      buttons.forEach(function (other) {
        other.classList.remove("on");
        other.textContent = other.getAttribute("data-label");
      });
      button.classList.add("on");
      button.setAttribute("data-order", high ? "high" : "low");
      button.textContent = button.getAttribute("data-label") + (high ? " \\u25bc" : " \\u25b2");
    });
  });
})();
</script>"""


def gallery_html(study: optuna.Study, rows: Sequence[GalleryRow], root: Path) -> str:
    """The gallery page of ``rows``, its media linked relative to ``root`` (the folder the page is in)."""
    attrs = study.user_attrs  # (each read is a query of the storage)
    objectives = objective_names(study, attrs)
    scores = score_names(rows, objectives)
    held_out = {int(n): record for n, record in (attrs.get(CONFIRMATIONS_ATTR) or {}).items()}
    esc = html.escape
    counts = {state.name.lower(): 0 for state in optuna.trial.TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    seeds = attrs.get("seeds_per_trial", 1)
    how = attrs.get("aggregate", "mean")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(study.study_name)}: gallery</title>{_STYLE}</head><body>",
        f"<h1>{esc(study.study_name)}: the top {len(rows)} knob sets</h1>",
        f"<p class='k'>trials: {esc(shown or 'none yet')}. Each knob set is judged on {esc(str(seeds))} "
        f"seed(s) by their {esc(str(how))}, and shown at its best seed; ranked as the leaderboard ranks "
        f"them. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
        _sort_bar(study, objectives, scores),
        "<table class='g'><thead><tr><th>knob set</th><th>pictures (each view, then the spectrogram)</th>"
        "<th>sounds and clip</th></tr></thead><tbody id='rows'>",
    ]
    # The prompts and views of a folder not on this machine: the study's definition, when it records them
    # (studies before it was kept as a fingerprint).
    definition = attrs.get("definition")
    definition = definition if isinstance(definition, Mapping) else {}
    for row in rows:
        config = {**definition, **row.config}
        # The row names its trial's MLflow run: its media are that run's artifacts (ARTIFACT_SCRIPT).
        parts.append(
            f"<tr data-trial='{row.number}' data-run='{esc(row.run_id, quote=True)}' "
            f"data-values='{_attribute(json.dumps(sort_values(row, objectives)))}'>"
            f"<td class='info'>{_numbers(study, row, objectives, scores, held_out.get(row.number))}</td>"
            f"<td class='pics'>{_pictures(row, config, root)}</td>"
            f"<td class='play'>{_sounds(row, config, root)}</td></tr>"
        )
    if not rows:
        parts.append("<tr><td colspan='3' class='k'>no completed knob set yet</td></tr>")
    parts.append("</tbody></table>" + _SORT_SCRIPT + artifact_script() + "</body></html>")
    return "\n".join(parts)


def _sort_bar(study: optuna.Study, objectives: Sequence[str], scores: Sequence[str]) -> str:
    """The sort buttons: the leaderboard's rank, each objective (best first in its direction), each score
    (higher first)."""
    keys = [("rank", "rank", "low")]
    keys += [
        (name, name, "high" if d == MAXIMIZE else "low")
        for name, d in zip(objectives, study.directions, strict=False)
    ]
    keys += [(name, name, "high") for name in scores]
    buttons = "".join(
        f"<button type='button' data-sort='{html.escape(key, quote=True)}' data-best='{best}' "
        f"data-label='{html.escape(label, quote=True)}'{' class=on' if key == 'rank' else ''}>"
        f"{html.escape(label)}</button>"
        for key, label, best in keys
    )
    return f"<div class='sort'>sort by: {buttons}</div>"


def _numbers(
    study: optuna.Study,
    row: GalleryRow,
    objectives: Sequence[str],
    scores: Sequence[str],
    held_out: Mapping[str, Any] | None,
) -> str:
    """A row's words and numbers: rank, marks, value(s) with their spread over seeds, the mean on held-out
    seeds (a confirmed knob set), scores, knobs and the command that renders it again."""
    esc = html.escape
    marks = ""
    if len(study.directions) > 1 and row.pareto:
        marks += (
            "<span class='tag pareto' title='no other knob set is better on every objective'>Pareto</span>"
        )
    per_seed = trial_record(row.trial, "seed_values") or [row.trial.values]
    if row.raced:
        marks += (
            f"<span class='tag raced' title='stopped early: significantly worse than the leader'>"
            f"raced out after {len(per_seed)} seeds</span>"
        )
    seeds = row.trial.user_attrs.get("seeds") or []
    seed = row.config.get("seed", seeds[row.seed_index] if row.seed_index < len(seeds) else "-")
    lines = [
        f"<b>#{row.rank} trial {row.number}</b>{marks}",
        f"<div class='k'>shown: seed {row.seed_index} ({esc(str(seed))}), the best of {len(per_seed)}</div>",
    ]
    values = []
    for name, value, spread in zip(objectives, row.trial.values, seed_spread(row.trial), strict=False):
        values.append(
            f"<tr><td>{esc(name)}</td><td><b>{readable(value)}</b></td></tr><tr class='k'><td>over seeds</td>"
            f"<td>{readable(spread['min'])}..{readable(spread['max'])}, "
            f"&plusmn;{readable(spread['ci95'])} (95%)</td></tr>"
        )
    if held_out:
        for name, mean, ci95 in zip(objectives, held_out["mean"], held_out["ci95"], strict=False):
            values.append(
                f"<tr><td>{esc(name)}, {len(held_out['seeds'])} held-out seeds</td>"
                f"<td>{readable(mean)} &plusmn;{readable(ci95)}</td></tr>"
            )
    lines.append(f"<table class='n'>{''.join(values)}</table>")
    lines.append(_pairs("scores (mean over seeds)", [(name, row.scores.get(name)) for name in scores]))
    lines.append(_pairs("searched knobs", sorted(row.trial.params.items())))
    lines.append(f"<code class='cmd' title='render it again'>{esc(render_command(row))}</code>")
    return "\n".join(lines)


def _attribute(text: str) -> str:
    """``text`` inside a single-quoted HTML attribute (JSON keeps its double quotes: the page stays small)."""
    return html.escape(text, quote=False).replace("'", "&#39;")


def _pairs(title: str, pairs: Sequence[tuple[str, Any]]) -> str:
    """A small two-column table of names and values, at 4 significant digits."""
    if not pairs:
        return ""
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(readable(v))}</td></tr>" for k, v in pairs)
    return f"<div class='k'>{html.escape(title)}</div><table class='n'>{body}</table>"


def _linked(row: GalleryRow, name: str, root: Path) -> tuple[str, str]:
    """(path from the page's folder, path in the trial's MLflow run) of one of the row's media files."""
    local, stored = row.file(name)
    return Path(os.path.relpath(local, root)).as_posix(), stored


def _pictures(row: GalleryRow, config: Mapping[str, Any], root: Path) -> str:
    """Each view's picture captioned with its view and prompt, then the spectrogram."""
    views = list(config.get("views") or [])
    prompts = list(config.get("image_prompts") or [])
    figures = []
    for index, view in enumerate(views):
        name = f"view{index}.png"
        if row.has(name):
            prompt = prompts[index] if index < len(prompts) else ""
            caption = f"view {index} ({view}): {prompt}"
            figures.append(_figure(row, name, root, "img", caption, f" alt='view {index}'"))
    if row.has("spectrogram.png"):
        figures.append(
            _figure(row, "spectrogram.png", root, "img", "spectrogram (what plays)", " alt='spectrogram'")
        )
    return f"<div class='grid'>{''.join(figures)}</div>"


def _sounds(row: GalleryRow, config: Mapping[str, Any], root: Path) -> str:
    """The clip (the views turning while the sound plays; its poster the first view), then a player per
    audio prompt captioned with it."""
    parts = []
    if row.has(CLIP_FILE):
        poster, poster_stored = _linked(row, "view0.png", root)
        extra = (
            f" poster='{html.escape(poster, quote=True)}'"
            f" data-poster='{html.escape(poster_stored, quote=True)}'"
            " controls loop playsinline preload='none'"
        )
        parts.append(
            _figure(row, CLIP_FILE, root, "video", "clip: the views turning while the sound plays", extra)
        )
    for index, prompt in enumerate(config.get("audio_prompts") or []):
        name = f"audio{index}.wav"
        if row.has(name):
            parts.append(
                _figure(row, name, root, "audio", f"sound {index}: {prompt}", " controls preload='metadata'")
            )
    return "".join(parts)


def _figure(row: GalleryRow, name: str, root: Path, tag: str, caption: str, extra: str) -> str:
    path, stored = _linked(row, name, root)
    element = media_element(tag, path, extra, artifact=stored)
    return f"<figure>{element}<figcaption>{html.escape(caption)}</figcaption></figure>"


# -- where it goes ---------------------------------------------------------------------------------------


def write_gallery(study: optuna.Study, root: Path, *, top: int = GALLERY_TOP) -> Path:
    """Write ``<root>/gallery.html`` of the study's ``top`` knob sets, whole or not at all; returns its
    path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / GALLERY_FILE
    rows = gallery_rows(study, top, render_root=root)
    write_text_atomic(path, gallery_html(study, rows, root.resolve()))
    return path


def publish_gallery(opened: OpenedSearch) -> Path | None:
    """Rewrite the search's gallery and log it on its MLflow run (``study/gallery.html``). The gallery is a
    view of what Optuna and MLflow keep, and a search is never lost over it: a failure is a warning, except an
    Optuna storage that stopped answering, which is raised (the search stops on it). Returns the page's path
    (None: not written)."""
    try:
        path = write_gallery(opened.optuna_study, opened.render_root)
    except Exception as error:
        raise_if_connection_lost(error)
        logger.warning("could not write the study gallery: %s", one_line(error))
        return None
    if opened.tracker.parent_run_id is not None:
        try:
            opened.tracker.client.log_artifact(opened.tracker.parent_run_id, str(path), ARTIFACT_FOLDER)
        except Exception as error:
            logger.warning("could not log the study gallery on the search's MLflow run: %s", one_line(error))
    return path


def find_gallery(runs_dir: Path, name: str, storage: str | None = None) -> Path | None:
    """The gallery of study ``name`` under ``runs_dir`` (its Optuna storage ``storage``, default the one under
    ``runs_dir``), if it has been written; None otherwise, whatever the reason (``ui`` only mentions it)."""
    if storage is None and not (runs_dir / "optuna.db").is_file():
        return None  # (opening a storage that is not there would create it)
    try:
        study = load_study_from_storage(name, storage or default_storage(runs_dir))
        root = study_render_root(study, runs_dir)
    except Exception:
        logger.debug("no gallery found for study %s", name, exc_info=True)
        return None
    return root / GALLERY_FILE if root is not None and (root / GALLERY_FILE).is_file() else None


def gallery_page(client: Any, ui: str, experiment_id: str) -> str | None:
    """The page of MLflow's UI at ``ui`` that shows the study's gallery (the artifact of its latest search run
    that carries one), or None, whatever the reason (``ui`` only mentions it). ``client``: an
    ``MlflowClient`` of the study's store."""
    wanted = f"{ARTIFACT_FOLDER}/{GALLERY_FILE}"
    try:
        runs = client.search_runs(
            [experiment_id], "tags.kind = 'search'", max_results=5, order_by=["attributes.start_time DESC"]
        )
        for run in runs:
            run_id = run.info.run_id
            if any(item.path == wanted for item in client.list_artifacts(run_id, ARTIFACT_FOLDER)):
                return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{wanted}"
    except Exception:
        logger.debug("no gallery found in experiment %s", experiment_id, exc_info=True)
    return None
