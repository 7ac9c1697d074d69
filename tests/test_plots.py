"""The report's figures say what the metrics table says, and stay readable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imatch import plots
from imatch.evaluate import plcc_official


def test_the_scatter_titles_carry_the_judges_plcc_not_plain_pearson():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 5, 60)
    pred = 1 + 4 / (1 + np.exp(-3 * (truth - 3))) + rng.normal(0, 0.1, 60)  # monotone, far from linear
    text = plots.scatter_stats(truth, pred)
    judge = plcc_official(truth, pred)
    pearson = float(np.corrcoef(truth, pred)[0, 1])
    assert f"PLCC {judge:.3f} (judge's)" in text and abs(judge - pearson) > 0.01


@pytest.fixture
def captured(monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig))
    return figures


def test_training_curves_never_share_a_colour_within_a_panel(tmp_path, captured):
    records = []
    for backbone in ("a", "b", "c"):
        for run in ("overall-r1", "overall-r2", "element-r1", "element-r2"):
            folder = tmp_path / backbone / run
            folder.mkdir(parents=True)
            (folder / "training.json").write_text(json.dumps({"loss_curve": [{"step": 1, "loss": 2.0},
                                                                              {"step": 2, "loss": 1.0}]}))
            records.append(folder)
    plots.curves(records, tmp_path / "curves.png")
    axes = captured[0].axes
    assert [ax.get_title() for ax in axes] == ["a", "b", "c"]
    for ax in axes:
        colours = [line.get_color() for line in ax.get_lines()]
        assert len(colours) == 4 and len(set(colours)) == 4


def test_the_category_legend_sits_beside_the_bars(tmp_path, captured):
    elements = pd.DataFrame({"img_path": ["x", "x", "y"], "element": ["a (color)", "b (object)", "a (color)"],
                             "category": ["color", "object", "color"], "score": [1.0, 0.0, 1.0]})
    paths = []
    for name in ("p1", "p2", "p3"):
        path = tmp_path / "predictions" / name / "val" / "element_predictions.parquet"
        path.parent.mkdir(parents=True)
        elements[["img_path", "element"]].assign(score=[1.0, 1.0, 0.0]).to_parquet(path)
        paths.append(path)
    plots.categories(elements, paths, "val", tmp_path / "c.png")
    fig = captured[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the plotting area: covers no bar
