"""The anchors' formulas against hand-computed values, and the objectives built from score records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sounding_anagrams.errors import ConfigError
from sounding_anagrams.evaluation.metrics import (
    alignment,
    concealment,
    sliding_windows,
    summarize,
    window_offsets,
    windowed_score,
)
from sounding_anagrams.evaluation.objectives import metric_names, parse_objective, parse_objectives


def test_window_counts_follow_images_that_sound():
    assert len(window_offsets(256, 1024)) == 25  # stride 32
    assert len(window_offsets(256, 992)) == 24  # after the 32-pixel crop
    assert window_offsets(256, 1024)[-1] == 768
    assert window_offsets(256, 256) == [0]
    assert window_offsets(512, 512) == [0]
    windows = sliding_windows(torch.arange(2 * 3 * 256 * 1024, dtype=torch.float32).view(2, 3, 256, 1024))
    assert windows.shape == (2, 25, 3, 256, 256)
    assert torch.equal(
        windows[1, 3], torch.arange(2 * 3 * 256 * 1024).view(2, 3, 256, 1024)[1, :, :, 96:352].float()
    )


def test_windowed_score_clamps_the_mean_not_each_window():
    cos = torch.tensor([[0.30, -0.20, 0.10, 0.0], [-0.30, 0.10, 0.0, 0.0]])
    # mean(100 cos) = 5 -> 0.05 (clamping each window first would give 0.10); a negative mean -> 0.
    assert windowed_score(cos).tolist() == pytest.approx([0.05, 0.0])


def test_alignment_is_the_worst_diagonal():
    similarity = torch.tensor([[0.31, 0.20], [0.25, 0.27]])
    assert alignment(similarity) == pytest.approx(0.27)


def test_concealment_by_hand_with_clip_temperature():
    similarity = torch.tensor([[0.31, 0.20], [0.25, 0.27]])
    tau = 0.01
    rows = [1 / (1 + math.exp((0.20 - 0.31) / tau)), 1 / (1 + math.exp((0.25 - 0.27) / tau))]
    cols = [1 / (1 + math.exp((0.25 - 0.31) / tau)), 1 / (1 + math.exp((0.20 - 0.27) / tau))]
    expected = (sum(rows) / 2 + sum(cols) / 2) / 2
    assert concealment(similarity, tau) == pytest.approx(expected, rel=1e-6)  # S is float32
    # Row and column softmax differ here, so averaging both directions matters.
    assert sum(rows) / 2 != pytest.approx(sum(cols) / 2)


def test_concealment_limits_and_temperature():
    perfect = torch.tensor([[0.4, 0.0], [0.0, 0.4]])
    alike = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
    assert concealment(perfect, 0.01) == pytest.approx(1.0, abs=1e-12)
    assert concealment(alike, 0.01) == pytest.approx(0.5)
    mild = torch.tensor([[0.32, 0.30], [0.30, 0.32]])
    assert concealment(mild, 0.001) > concealment(mild, 0.01) > concealment(mild, 0.1) > 0.5


def test_metric_formulas_reject_bad_shapes():
    with pytest.raises(ConfigError, match=r"similarity=\(2, 3\): must be a square"):
        alignment(torch.zeros(2, 3))
    with pytest.raises(ConfigError, match=r"temperature=0\.0: must be positive"):
        concealment(torch.zeros(2, 2), 0.0)


def test_summary_mean_interval_and_percentiles():
    values = [0.1, 0.2, 0.3, 0.4, 0.5, float("nan")]
    stats = summarize(values)
    assert stats["n"] == 5
    assert stats["mean"] == pytest.approx(0.3)
    # t(0.975, 4) = 2.7764; std (ddof 1) = 0.15811; half width = 2.7764 * 0.15811 / sqrt(5)
    assert stats["ci95"] == pytest.approx(2.776445 * 0.1581139 / math.sqrt(5), rel=1e-5)
    assert stats["p90"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 0.5], 90))
    assert stats["p95"] == pytest.approx(0.48)
    assert math.isnan(summarize([])["mean"])
    assert math.isnan(summarize([0.5])["ci95"])


RECORD = {
    "clip/view0": 0.30,
    "clip/view1": 0.24,
    "clip/alignment": 0.24,
    "clip/concealment": 0.8,
    "clap/audio0": 0.4,
}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("clip/alignment", 0.24),
        ("min(clip/alignment, clap/audio0)", 0.24),
        ("mean(clip/view0, clip/view1)", 0.27),
        ("max(clip/view0, clap/audio0)", 0.40),
        ("0.7 * clip/alignment + 0.3*clap/audio0", 0.7 * 0.24 + 0.3 * 0.4),
        ("clip/view0 + 2e-1*clap/audio0", 0.30 + 0.2 * 0.4),
    ],
)
def test_objectives_compute_from_the_record(spec, expected):
    assert parse_objective(spec).value(RECORD) == pytest.approx(expected)


def test_objective_on_a_missing_or_nan_metric_is_nan():
    assert math.isnan(parse_objective("clap/audio1").value(RECORD))
    assert math.isnan(
        parse_objective("min(clip/view0, clap/audio0)").value({**RECORD, "clap/audio0": math.nan})
    )


def test_metric_names_and_objective_check():
    assert metric_names(2, 1) == [
        "clip/view0",
        "clip/view1",
        "clip/alignment",
        "clip/concealment",
        "clap/audio0",
    ]
    assert metric_names(2, 2)[-2:] == ["clap/alignment", "clap/concealment"]
    with pytest.raises(
        ConfigError, match=r"unknown metric 'clip/alignmnet'; did you mean 'clip/alignment'\?"
    ):
        parse_objective("min(clip/alignmnet, clap/audio0)").check(metric_names(2, 1))


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("", "an objective is a metric name"),
        ("median(clip/view0)", r"unknown aggregate 'median'; did you mean"),
        ("0.5 * ", r"cannot read '0.5 \*'"),
        ("clip/view0 - clap/audio0", r"cannot read"),
        ("min(clip/view0, 3)", r"min\(...\) takes metric names"),
    ],
)
def test_bad_objectives_are_named(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_objective(spec)


def test_several_objectives_for_multi_objective_search():
    objectives = parse_objectives(["clip/alignment", "clap/audio0"])
    assert [o.metrics for o in objectives] == [["clip/alignment"], ["clap/audio0"]]
    with pytest.raises(ConfigError, match="objectives must differ"):
        parse_objectives(["clap/audio0", "clap/audio0"])
    with pytest.raises(ConfigError, match="give at least one objective"):
        parse_objectives([])
