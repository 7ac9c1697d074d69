"""The official Track 1 scoring: values computed by hand and the judge's quirks."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from scipy.stats import pearsonr

from imatch.errors import InputError
from imatch.evaluate import load_official, logistic, plcc_official, plcc_pred_to_gt, score


def rec(img, total, **elements):
    return {"prompt": "p", "img_path": img, "total_score": total, "element_score": elements}


GT = [rec("a.png", 1, x=0.6), rec("b.png", 2, x=0.4), rec("c.png", 3, x=0.5), rec("d.png", 4, x=0.0), rec("e.png", 5)]
PRED = [rec("a.png", 1.1, x=0.5), rec("b.png", 2.5, x=0.5), rec("c.png", 2.0, x=0.49), rec("d.png", 4.2, x=0.1), rec("e.png", 5.0)]


def test_srcc_and_acc_by_hand():
    m = score(GT, PRED)
    # ranks of pred: 1, 3, 2, 4, 5 -> d^2 sum = 2 -> 1 - 6*2/(5*24) = 0.9
    assert m["srcc"] == pytest.approx(0.9)
    # a: 0.6>=.5 vs 0.5>=.5 agree; b: miss vs hit disagree; c: 0.5 is a hit (>=) vs 0.49 miss
    # disagree; d: agree -> 2/4, pooled over all pairs (e has no elements)
    assert m["acc"] == pytest.approx(0.5)
    assert m["n_elements"] == 4
    assert m["final"] == pytest.approx(m["srcc"] / 4 + m["plcc"] / 4 + m["acc"] / 2)


def test_plcc_is_fitted_from_ground_truth_to_predictions():
    """The judge fits f: gt -> pred. If pred is exactly a logistic of gt, official PLCC is 1."""
    gt = np.linspace(1, 5, 40)
    pred = logistic(gt, 4.5, 1.5, 3.0, 0.4)
    assert plcc_official(gt, pred) == pytest.approx(1.0, abs=1e-6)
    # the textbook direction (pred -> gt) cannot invert the saturated ends exactly
    assert plcc_pred_to_gt(gt, pred) < 0.999
    # and a plain Pearson is lower still: the fit matters
    assert pearsonr(gt, pred)[0] < plcc_official(gt, pred)


def test_pairing_is_by_sorted_img_path_not_by_order():
    shuffled = [PRED[i] for i in (3, 0, 4, 2, 1)]
    assert score(GT, shuffled) == score(GT, PRED)


def test_mismatched_images_are_refused():
    with pytest.raises(InputError, match="image set differs"):
        score(GT, PRED[:-1] + [rec("z.png", 3.0)])


def test_missing_element_key_is_refused_and_extra_keys_ignored():
    bad = [dict(r, element_score={}) if r["img_path"] == "c.png" else r for r in PRED]
    with pytest.raises(InputError, match="missing element keys \\['x'\\]"):
        score(GT, bad)
    extra = [dict(r, element_score={**r["element_score"], "y": 1.0}) for r in PRED]
    assert score(GT, extra) == score(GT, PRED)


def test_submission_zip_and_json_read_the_same(tmp_path):
    out = tmp_path / "output.json"
    out.write_text(json.dumps(PRED))
    with zipfile.ZipFile(tmp_path / "submission.zip", "w") as zf:
        zf.writestr("output.json", json.dumps(PRED))
        zf.writestr("readme.txt", "x")
    assert load_official(out) == load_official(tmp_path / "submission.zip") == PRED


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "malformed JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"img_path": "a.png", "total_score": "high", "element_score": {}}]', "total_score must be a finite number"),
        ('[{"img_path": "a.png", "total_score": 3, "element_score": {"x": NaN}}]', "must be a finite number"),
        ('[{"total_score": 3, "element_score": {}}]', "missing required field 'img_path'"),
    ],
)
def test_bad_prediction_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "output.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_official(path)
    assert str(path) in str(err.value)


def test_cli_prints_metrics_and_fails_cleanly(tmp_path, imatch):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "pred.json").write_text(json.dumps(PRED))
    code, out, _ = imatch("evaluate", "--gt", tmp_path / "gt.json", "--pred", tmp_path / "pred.json")
    assert code == 0
    assert set(json.loads(out)) >= {"srcc", "plcc", "acc", "final"}
    (tmp_path / "pred.json").write_text(json.dumps(PRED[:3]))
    code, _, err = imatch("evaluate", "--gt", tmp_path / "gt.json", "--pred", tmp_path / "pred.json")
    assert code == 2 and "pred.json" in err and "image set differs" in err
