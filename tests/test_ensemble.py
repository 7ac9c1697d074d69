"""Ensemble, pseudo labels and the text-only control: the arithmetic the two-round workflow relies on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imatch import levels
from imatch.baseline import prior_predictions, text_predictions
from imatch.ensemble import combine, element_levels, fit_weights
from imatch.errors import InputError
from imatch.ingest import ingest
from imatch.pseudo import pseudo_label


def scores(tmp_path, name, task, rows):
    """A score table like `imatch score-set` writes: rows of (img_path, element, expected_level)."""
    table = pd.DataFrame(rows, columns=["img_path", "element", "expected_level"])
    table["task"] = task
    table["split"] = "val"
    table["view"] = "seen"
    table["id"] = table["img_path"] if task == "overall" else table["img_path"] + "|" + table["element"]
    table["score"] = levels.level_to_total(table["expected_level"]) if task == "overall" else 0.0
    path = tmp_path / f"{name}.parquet"
    table.to_parquet(path)
    return path


def test_combine_is_the_mean_of_models_and_hits_follow_tau(tmp_path):
    a = scores(tmp_path, "a", "overall", [("x.png", None, 1.0), ("y.png", None, 15.0)])
    b = scores(tmp_path, "b", "overall", [("y.png", None, 8.0), ("x.png", None, 8.0)])  # other order
    ea = scores(tmp_path, "ea", "element", [("x.png", "red (color)", 2.0), ("y.png", "red (color)", 6.0)])
    eb = scores(tmp_path, "eb", "element", [("x.png", "red (color)", 4.5), ("y.png", "red (color)", 1.0)])
    total, el = combine([a, b], [ea, eb], tau=3)
    assert total.set_index("img_path")["total_score"].to_dict() == pytest.approx(
        {"x.png": (1.0 + 3.0) / 2, "y.png": (5.0 + 3.0) / 2})
    el = el.set_index("img_path")
    assert el.loc["x.png", "expected_level"] == 3.25 and el.loc["x.png", "score"] == 1.0  # 3.25 > 3
    assert el.loc["y.png", "expected_level"] == 3.5 and el.loc["y.png", "score"] == 1.0
    weighted, _ = combine([a, b], [ea, eb], tau=3, weights={"overall": [1.0, 0.0], "element": [0.0, 1.0]})
    assert weighted.set_index("img_path")["total_score"].to_dict() == pytest.approx({"x.png": 1.0, "y.png": 5.0})


def test_models_covering_different_images_are_refused(tmp_path):
    a = scores(tmp_path, "a", "overall", [("x.png", None, 1.0), ("y.png", None, 15.0)])
    b = scores(tmp_path, "b", "overall", [("x.png", None, 8.0)])
    e = scores(tmp_path, "e", "element", [("x.png", "red (color)", 2.0)])
    with pytest.raises(InputError, match="covers other queries"):
        combine([a, b], [e], tau=3)


def test_element_levels_round_the_mean_half_up(tmp_path):
    ea = scores(tmp_path, "ea", "element", [("x.png", "k (object)", 3.0), ("y.png", "k (object)", 7.0)])
    eb = scores(tmp_path, "eb", "element", [("x.png", "k (object)", 4.0), ("y.png", "k (object)", 7.0)])
    table = element_levels([ea, eb]).set_index("img_path")
    assert table.loc["x.png", "level"] == 4 and table.loc["y.png", "level"] == 7  # 3.5 -> 4


def test_holdout_weights_recover_the_better_model():
    rng = np.random.default_rng(0)
    truth = pd.Series(rng.uniform(1, 5, 200), index=[f"{i}.png" for i in range(200)])
    good = truth + rng.normal(0, 0.1, 200)
    noise = pd.Series(rng.uniform(1, 5, 200), index=truth.index)
    w = fit_weights(pd.DataFrame({"good": good, "noise": noise}), truth)
    assert sum(w) == pytest.approx(1) and w[0] > 0.9


@pytest.fixture(scope="module")
def tables(demo_zip, tmp_path_factory):
    out = tmp_path_factory.mktemp("t")
    ingest(demo_zip, out, holdout_fraction=0.25, seed=0, eval_json=demo_zip / "eval.json")
    return pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "elements.parquet")


def test_pseudo_labels_reproduce_the_predicted_levels(tables):
    samples, elements = tables
    val = samples[samples["split"] == "val"]
    val_el = elements[elements["img_path"].isin(val["img_path"])]
    pred = val[["img_path"]].assign(total_score=np.linspace(0.5, 5.5, len(val)))
    pred_el = val_el[["img_path", "element"]].assign(expected_level=np.linspace(1, 7, len(val_el)))
    rows, els = pseudo_label(samples, elements, pred, pred_el)
    assert len(rows) == len(val) and len(els) == len(val_el)
    assert rows["total_score"].between(1, 5).all() and (rows["n_annotators"] == 0).all()
    # Eq. 4 of the pseudo score gives back the rounded predicted level
    assert np.array_equal(levels.element_level(els["score"]), levels.round_half_up(pred_el["expected_level"]))
    # ground-truth labels of val are not used
    assert not np.allclose(rows["total_score"], val["total_score"])
    with pytest.raises(InputError, match="have no prediction"):
        pseudo_label(samples, elements, pred.iloc[1:], pred_el)


def test_text_baseline_fits_on_train_only_and_covers_every_row(tables):
    samples, elements = tables
    pred, pred_el = text_predictions(samples, elements)
    assert len(pred) == len(samples) and len(pred_el) == len(elements)
    assert pred["total_score"].between(1, 5).all() and pred_el["score"].between(0, 1).all()
    again, again_el = text_predictions(samples, elements)
    pd.testing.assert_frame_equal(pred, again)
    pd.testing.assert_frame_equal(pred_el, again_el)
    # changing a val label cannot change any prediction (fitted on train only)
    hacked = samples.copy()
    hacked.loc[hacked["split"] == "val", "total_score"] = 5.0
    pd.testing.assert_frame_equal(text_predictions(hacked, elements)[0], pred)
    # it reads the prompt: predictions vary within a prompt type, unlike the prior's
    prior, _ = prior_predictions(samples, elements)
    assert pred.groupby(samples["prompt_type"])["total_score"].nunique().min() > prior.groupby(
        samples["prompt_type"])["total_score"].nunique().max()


@pytest.mark.parametrize("task, value", [("element", float("nan")), ("element", 9.0), ("overall", float("inf")),
                                         ("overall", 0.0)])
def test_non_finite_or_out_of_range_scores_are_refused(tmp_path, task, value):
    """A NaN expected level (a diverged model) was rounded to an in-range level and stated in the
    overall queries as if measured; now every stage that reads score tables refuses it, naming the
    file and the query."""
    good = scores(tmp_path, "good", task, [("x.png", "red (color)", 2.0), ("y.png", "red (color)", 6.0)])
    bad = scores(tmp_path, "bad", task, [("x.png", "red (color)", 2.0), ("y.png", "red (color)", value)])
    with pytest.raises(InputError, match=r"bad\.parquet.*y\.png"):
        if task == "element":
            element_levels([good, bad])
        else:
            combine([good, bad], [scores(tmp_path, "e", "element", [("x.png", "red (color)", 2.0),
                                                                      ("y.png", "red (color)", 6.0)])], tau=3)
    if task == "element":
        assert element_levels([good])["level"].tolist() == [2, 6]  # in range: read as before
