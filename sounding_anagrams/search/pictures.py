"""The study's pictures, drawn when a search ends: its optimisation history (or Pareto front), the knobs'
importances, and a contact sheet of the best candidates."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from PIL import Image, ImageDraw

from sounding_anagrams.errors import SoundingAnagramsError
from sounding_anagrams.numbers import readable as readable_number
from sounding_anagrams.search.locations import render_files
from sounding_anagrams.search.report import SHOWN_SCORES, ranked_trials
from sounding_anagrams.search.stores import trial_record
from sounding_anagrams.search.study import StudyConfig
from sounding_anagrams.search.tracking import objective_metrics

logger = logging.getLogger(__name__)


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
        metrics.update(
            {
                f"best/{key}": value
                for key, value in objective_metrics(best.values, config.objective_names).items()
            }
        )
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


def wrapped(
    draw: ImageDraw.ImageDraw, items: Sequence[str], font: Any, width: int, separator: str = "   "
) -> list[str]:
    """``items`` joined by ``separator`` onto lines of at most ``width`` pixels (an item is never split: one
    too long for a line stands alone)."""
    lines: list[str] = []
    for item in items:
        joined = f"{lines[-1]}{separator}{item}" if lines else item
        if lines and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(item)
    return lines


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
        values = ", ".join(readable_number(v) for v in r.trial.values)
        seed = r.trial.user_attrs.get("best_seed")
        label = f"#{r.rank}  trial {r.trial.number}: {values}" + (
            "" if seed is None else f"  (its best seed, {seed})"
        )
        scores = trial_record(r.trial, "scores") or {}
        details = [f"{name} {readable_number(scores[name])}" for name in SHOWN_SCORES if name in scores]
        details += [f"{name} {readable_number(value)}" for name, value in sorted(r.trial.params.items())]
        rows.append((label, details, images))
    if not rows:
        return None
    font, small = sheet_font(20), sheet_font(16)
    header_h, pad, line_h = 46, 8, 20
    row_width = max(sum(i.width + pad for i in images) for _, _, images in rows)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Every knob is read: the details wrap onto as many lines as the row's width needs, never cut.
    detail_lines = [wrapped(measure, details, small, row_width - 4) for _, details, _ in rows]
    label_heights = [28 + line_h * len(lines) for lines in detail_lines]
    row_heights = [
        h + max(i.height for i in images) for h, (_, _, images) in zip(label_heights, rows, strict=True)
    ]
    sheet = Image.new("RGB", (row_width, header_h + sum(row_heights) + pad * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for header, image in zip(headers, rows[0][2], strict=False):
        for line, text in enumerate(header.splitlines()):
            draw.text(
                (x + 2, 2 + 21 * line), fitted(draw, text, small, image.width - 4), fill="#444", font=small
            )
        x += image.width + pad
    y = header_h
    for (title, _, images), lines, label_h, height in zip(
        rows, detail_lines, label_heights, row_heights, strict=True
    ):
        draw.text((2, y + 2), title, fill="black", font=font)
        for index, detail in enumerate(lines):
            draw.text((2, y + 26 + line_h * index), detail, fill="#444", font=small)
        x = 0
        for image in images:
            sheet.paste(image, (x, y + label_h))
            x += image.width + pad
        y += height + pad
    sheet.save(path)
    return path
