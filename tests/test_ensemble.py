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
    assert total.columns.tolist() == ["img_path", "split", "total_score"] and total["split"].tolist() == ["val"] * 2
    el = el.set_index("img_path")
    assert el.loc["x.png", "expected_level"] == 3.25 and el.loc["x.png", "score"] == 1.0  # 3.25 > 3
    assert el.loc["y.png", "expected_level"] == 3.5 and el.loc["y.png", "score"] == 1.0
    weighted, weighted_el = combine([a, b], [ea, eb], tau=3, weights={"overall": [1.0, 0.0], "element": [0.0, 1.0]})
    assert weighted.set_index("img_path")["total_score"].to_dict() == pytest.approx({"x.png": 1.0, "y.png": 5.0})
    # the element weights pick model eb: 4.5 (a hit) for x, 1.0 (a miss) for y
    weighted_el = weighted_el.set_index("img_path")
    assert weighted_el["expected_level"].to_dict() == {"x.png": 4.5, "y.png": 1.0}
    assert weighted_el["score"].to_dict() == {"x.png": 1.0, "y.png": 0.0}


def test_a_hit_is_strictly_above_tau_and_a_miss_scores_zero(tmp_path):
    """Eq. 2: hit when the mean expected level is > tau; a level exactly at tau is a miss (0.0)."""
    o = scores(tmp_path, "o", "overall", [(f"{i}.png", None, 8.0) for i in range(4)])
    ea = scores(tmp_path, "ea", "element", [("0.png", "k (object)", 3.0), ("1.png", "k (object)", 2.0),
                                            ("2.png", "k (object)", 3.0), ("3.png", "k (object)", 7.0)])
    eb = scores(tmp_path, "eb", "element", [("0.png", "k (object)", 3.0), ("1.png", "k (object)", 2.0),
                                            ("2.png", "k (object)", 3.2), ("3.png", "k (object)", 1.0)])
    _, el = combine([o], [ea, eb], tau=3)
    assert el["img_path"].tolist() == ["0.png", "1.png", "2.png", "3.png"]
    assert el["expected_level"].tolist() == pytest.approx([3.0, 2.0, 3.1, 4.0])
    assert el["score"].tolist() == [0.0, 0.0, 1.0, 1.0]  # 3.0 is not > 3
    assert el.columns.tolist() == ["img_path", "element", "score", "expected_level"]
    # another tau moves the boundary
    _, el4 = combine([o], [ea, eb], tau=4)
    assert el4["score"].tolist() == [0.0, 0.0, 0.0, 0.0]
    _, el2 = combine([o], [ea, eb], tau=2.5)
    assert el2["score"].tolist() == [1.0, 0.0, 1.0, 1.0]


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
    # banker's rounding would give 2 and 4 here: half-up gives 3 and 5
    ec = scores(tmp_path, "ec", "element", [("a.png", "k (object)", 2.0), ("b.png", "k (object)", 4.0),
                                            ("c.png", "k (object)", 1.0), ("d.png", "k (object)", 6.0)])
    ed = scores(tmp_path, "ed", "element", [("a.png", "k (object)", 3.0), ("b.png", "k (object)", 5.0),
                                            ("c.png", "k (object)", 1.4), ("d.png", "k (object)", 6.8)])
    table = element_levels([ec, ed])
    assert table.columns.tolist() == ["img_path", "element", "level", "expected_level"]
    assert table["img_path"].tolist() == ["a.png", "b.png", "c.png", "d.png"]
    assert table["expected_level"].tolist() == pytest.approx([2.5, 4.5, 1.2, 6.4])
    assert table["level"].tolist() == [3, 5, 1, 6] and table["level"].dtype == "int64"


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
    # each image's pseudo total is its own prediction, clipped to 1..5
    assert rows.set_index("img_path")["total_score"].to_dict() == pytest.approx(
        {img: min(max(v, 1.0), 5.0) for img, v in zip(pred["img_path"], pred["total_score"])})
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
    # nor a holdout label (fitting on train + holdout would inflate the holdout control)
    hacked = samples.copy()
    hacked.loc[hacked["split"] == "holdout", "total_score"] = 5.0
    hacked_el = elements.copy()
    hacked_el.loc[hacked_el["img_path"].isin(samples.loc[samples["split"] == "holdout", "img_path"]), "score"] = 1.0
    again, again_el = text_predictions(hacked, hacked_el)
    pd.testing.assert_frame_equal(again, pred)
    pd.testing.assert_frame_equal(again_el, pred_el)
    # the totals are a ridge regression on the train rows' prompt words, fitted here independently
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge

    train = samples[samples["split"] == "train"]
    words = CountVectorizer(token_pattern=r"[A-Za-z0-9]+", ngram_range=(1, 2), binary=True).fit(train["prompt"])
    ridge = Ridge(alpha=1.0).fit(words.transform(train["prompt"]), train["total_score"])
    expected = np.clip(ridge.predict(words.transform(samples["prompt"])), 1, 5)
    assert pred["total_score"].to_numpy() == pytest.approx(expected, abs=1e-9)
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
    what = "element expected_level" if task == "element" else "overall score"
    with pytest.raises(InputError, match=rf"bad\.parquet: .*y\.png.*: {what} must be finite and in"):
        if task == "element":
            element_levels([good, bad])
        else:
            combine([good, bad], [scores(tmp_path, "e", "element", [("x.png", "red (color)", 2.0),
                                                                      ("y.png", "red (color)", 6.0)])], tau=3)
    if task == "element":
        assert element_levels([good])["level"].tolist() == [2, 6]  # in range: read as before


def test_score_tables_are_read_per_view_and_split_and_checked(tmp_path):
    """by_model: one column per model (named by its file), the seen view by default, the edges of a
    scale accepted, every refusal naming the file."""
    from imatch.ensemble import by_model, check_range, mean_over_models

    def table(name, rows, task="element"):
        t = pd.DataFrame(rows, columns=["img_path", "split", "view", "expected_level"])
        t["task"], t["element"] = task, "k (object)"
        t["id"] = t["img_path"] + "|k (object)" if task == "element" else t["img_path"]
        t["score"] = 0.5
        t.to_parquet(tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    a = table("a", [("x.png", "holdout", "seen", 1.0), ("x.png", "holdout", "blank", 5.0),
                    ("y.png", "holdout", "seen", 7.0), ("z.png", "val", "seen", 2.0)])
    b = table("b", [("y.png", "holdout", "seen", 3.0), ("x.png", "holdout", "seen", 2.0),
                    ("x.png", "holdout", "blank", 6.0), ("z.png", "val", "seen", 4.0)])
    got = by_model([a, b], "element", "expected_level", split="holdout")  # view: seen by default
    assert got.columns.tolist() == [str(a), str(b)]
    assert got.to_dict("index") == {("x.png", "k (object)"): {str(a): 1.0, str(b): 2.0},
                                    ("y.png", "k (object)"): {str(a): 7.0, str(b): 3.0}}
    assert by_model([a], "element", "expected_level", view="blank")[str(a)].tolist() == [5.0]
    assert element_levels([a, b], view="blank")[["img_path", "level", "expected_level"]].values.tolist() == [
        ["x.png", 6, 5.5]]
    assert mean_over_models([a, b], "element", "expected_level", [0.25, 0.75], split="holdout").values.tolist() == [
        ["x.png", "k (object)", 1.75], ["y.png", "k (object)", 4.0]]

    def refused(*args, **kwargs):
        with pytest.raises(InputError) as err:
            by_model(*args, **kwargs)
        return str(err.value)

    assert refused([a], "element", "expected_level", split="test") == f"{a}: no seen scores of the test split"
    assert refused([a], "element", "expected_level", view="other") == f"{a}: no other scores"
    # an element table asked for overall scores: its rows are not overall queries (ids differ), none is left
    assert refused([a], "overall", "expected_level") == f"{a}: expected overall scores, found []"
    odd = pd.read_parquet(a).assign(id=lambda t: t["img_path"])  # element rows with overall-style ids
    odd.to_parquet(tmp_path / "odd.parquet")
    assert refused([tmp_path / "odd.parquet"], "overall", "expected_level") == (
        f"{tmp_path / 'odd.parquet'}: expected overall scores, found ['element']")
    dup = table("dup", [("x.png", "val", "seen", 1.0), ("x.png", "holdout", "seen", 2.0)])
    assert refused([dup], "element", "expected_level") == f"{dup}: {{'img_path': 'x.png', 'element': 'k (object)'}}: duplicate query"
    short = table("short", [("x.png", "holdout", "seen", 1.0)])
    assert refused([a, short], "element", "expected_level", split="holdout") == (
        f"{short}: covers other queries than {a} (1 vs 2 rows)")
    with pytest.raises(ValueError) as err:
        mean_over_models([a, b], "element", "expected_level", [1.0], split="holdout")
    assert str(err.value) == "1 weights for 2 models"

    # check_range: the ends of the scale are in, a hair beyond is out; text and NA are refused as values
    check_range(pd.Series([1.0, 7.0]), 1, 7, "t.parquet", "element expected_level")
    check_range(pd.Series([1 - 1e-9, 7 + 1e-9]), 1, 7, "t.parquet", "x")  # rounding error is tolerated
    with pytest.raises(InputError) as err:
        check_range(pd.Series([1.0, 7.01, 9.0], index=["a", "b", "c"]), 1, 7, "t.parquet", "element expected_level")
    assert str(err.value) == "t.parquet: 'b': np.float64(7.01): element expected_level must be finite and in [1, 7]; 2 rows are not"
    with pytest.raises(InputError, match=r"'b': np.float64\(0.99\): .* 1 rows are not"):
        check_range(pd.Series([1.0, 0.99], index=["a", "b"]), 1, 7, "t.parquet", "x")
    with pytest.raises(InputError, match="'b': 'high'"):
        check_range(pd.Series([2.0, "high"], index=["a", "b"]), 1, 7, "t.parquet", "x")
    with pytest.raises(InputError, match="'b': <NA>"):
        check_range(pd.Series([2.0, None], index=["a", "b"], dtype="Float64"), 1, 7, "t.parquet", "x")


def test_holdout_weights_are_normalised_and_fall_back_to_equal_weights():
    idx = [f"{i}.png" for i in range(6)]
    preds = pd.DataFrame({"a": [1.0, 2, 3, 4, 5, 6], "b": [6.0, 1, 5, 2, 4, 3]}, index=idx)
    # the truth is half of model a: raw NNLS weights (0.5, 0) normalised to (1, 0); truth in another order
    truth = (preds["a"] / 2).iloc[::-1]
    assert fit_weights(preds, truth) == pytest.approx([1.0, 0.0])
    # a truth no non-negative mix fits (all negative): equal weights, for 2 and for 3 models
    assert fit_weights(preds, -truth) == [0.5, 0.5]
    assert fit_weights(preds.assign(c=1.0), -truth) == pytest.approx([1 / 3] * 3)
    # a mix of both, found exactly
    assert fit_weights(preds, 0.3 * preds["a"] + 0.9 * preds["b"]) == pytest.approx([0.25, 0.75])
