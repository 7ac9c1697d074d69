"""Pseudo labels (paper Sec. 3.2.2, Eq. 8) on hand-made tables: every value written out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imatch.errors import InputError
from imatch.pseudo import pseudo_label

SAMPLES = pd.DataFrame({
    "img_path": ["t/0.png", "v/1.png", "v/2.png", "v/3.png", "x/4.png"],
    "split": ["train", "val", "val", "val", "test"],
    "prompt": ["p0", "p1", "p2", "p3", "p4"],
    "total_score": [2.0, 4.0, 4.0, 4.0, np.nan],  # val ground truth: never read
    "n_annotators": [3, 5, 5, 5, 0],
})
ELEMENTS = pd.DataFrame({
    "img_path": ["t/0.png", "v/1.png", "v/1.png", "v/2.png", "v/3.png", "x/4.png"],
    "element": ["a (object)", "a (object)", "b (color)", "c (object)", "d (human)", "e (object)"],
    "score": [1.0, 0.0, 1.0, 1.0, 0.0, np.nan],  # val ground truth: never read
})
# predictions in another row order than the samples, and covering other splits too
PRED = pd.DataFrame({"img_path": ["v/3.png", "x/4.png", "v/1.png", "t/0.png", "v/2.png"],
                     "total_score": [5.7, 2.0, 2.5, 1.0, 0.3]})
PRED_EL = pd.DataFrame({
    "img_path": ["v/3.png", "v/2.png", "v/1.png", "v/1.png", "t/0.png", "x/4.png"],
    "element": ["d (human)", "c (object)", "b (color)", "a (object)", "a (object)", "e (object)"],
    "expected_level": [7.0, 1.0, 2.5, 4.0, 6.0, 3.0],
})


def test_pseudo_labels_are_the_round_one_predictions_per_image_and_element():
    rows, els = pseudo_label(SAMPLES, ELEMENTS, PRED, PRED_EL)
    # only the val split, every other column kept
    assert rows["img_path"].tolist() == ["v/1.png", "v/2.png", "v/3.png"]
    assert rows["prompt"].tolist() == ["p1", "p2", "p3"] and (rows["split"] == "val").all()
    # total: the prediction of that image, clipped to the judge's 1-5 scale (5.7 -> 5, 0.3 -> 1)
    assert rows["total_score"].tolist() == [2.5, 1.0, 5.0]
    assert rows["n_annotators"].tolist() == [0, 0, 0]  # no human rated these
    # element: (E[l] - 1) / 6, in [0, 1]: 4 -> 0.5, 2.5 -> 0.25, 1 -> 0, 7 -> 1
    got = els.set_index(["img_path", "element"])["score"].to_dict()
    assert got == pytest.approx({("v/1.png", "a (object)"): 0.5, ("v/1.png", "b (color)"): 0.25,
                                 ("v/2.png", "c (object)"): 0.0, ("v/3.png", "d (human)"): 1.0})
    assert els[["img_path", "element"]].values.tolist() == [["v/1.png", "a (object)"], ["v/1.png", "b (color)"],
                                                            ["v/2.png", "c (object)"], ["v/3.png", "d (human)"]]
    assert list(rows.index) == [0, 1, 2] and list(els.index) == [0, 1, 2, 3]
    assert rows.columns.tolist() == SAMPLES.columns.tolist() and els.columns.tolist() == ELEMENTS.columns.tolist()


def test_out_of_scale_element_levels_are_clipped_to_0_1():
    pred_el = PRED_EL.assign(expected_level=[9.0, -1.0, 2.5, 4.0, 6.0, 3.0])
    _, els = pseudo_label(SAMPLES, ELEMENTS, PRED, pred_el)
    got = els.set_index(["img_path", "element"])["score"]
    assert got[("v/3.png", "d (human)")] == 1.0 and got[("v/2.png", "c (object)")] == 0.0


def test_another_split_can_be_pseudo_labelled():
    rows, els = pseudo_label(SAMPLES, ELEMENTS, PRED, PRED_EL, split="test")
    assert rows["img_path"].tolist() == ["x/4.png"] and rows["total_score"].tolist() == [2.0]
    assert els["score"].tolist() == pytest.approx([(3.0 - 1) / 6])


def test_missing_predictions_are_named():
    with pytest.raises(InputError) as err:
        pseudo_label(SAMPLES, ELEMENTS, PRED[PRED["img_path"] != "v/2.png"], PRED_EL)
    assert str(err.value) == "predictions: img_path='v/2.png': 1 val images have no prediction"
    with pytest.raises(InputError) as err:
        pseudo_label(SAMPLES, ELEMENTS, PRED, PRED_EL.drop(index=2))
    assert str(err.value) == ("element predictions: img_path='v/1.png' element='b (color)': "
                              "1 val elements have no prediction")
