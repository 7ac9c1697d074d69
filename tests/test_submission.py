"""Official format: ground truth and submission.zip round trips, with row-count checks."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from imatch.evaluate import evaluate, load_official
from imatch.ingest import ingest


@pytest.fixture(scope="module")
def tables(ingested):
    return ingested


def _predictions(tmp_path, samples, elements, split):
    s = pd.read_parquet(samples)
    e = pd.read_parquet(elements)
    s = s[s["split"] == split]
    e = e[e["img_path"].isin(s["img_path"])]
    pred = pd.DataFrame({"img_path": s["img_path"], "total_score": [1 + (i % 9) / 2 for i in range(len(s))]})
    pred_el = e[["img_path", "element"]].assign(score=[(i % 3) / 2 for i in range(len(e))])
    pred.to_parquet(tmp_path / "p.parquet")
    pred_el.to_parquet(tmp_path / "e.parquet")
    return pred, pred_el


def _submit(imatch, tmp_path, tables, split, out="submission.zip"):
    return imatch("submission", "--samples", tables[0], "--elements", tables[1], "--split", split,
                  "--predictions", tmp_path / "p.parquet", "--element-predictions", tmp_path / "e.parquet",
                  "--out", tmp_path / out, "--runtime", "0.51", "--cpu", "0", "--description", "unit test")


def test_submission_round_trip(tables, tmp_path, imatch):
    pred, pred_el = _predictions(tmp_path, *tables, "test")
    code, _, err = _submit(imatch, tmp_path, tables, "test")
    assert code == 0, err
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["output.json", "readme.txt"]
        readme = zf.read("readme.txt").decode().splitlines()
    assert readme == [
        "runtime per image [s] : 0.5100",
        "CPU[1] / GPU[0] : 0",
        "Extra Data [1] / No Extra Data [0] : 0",
        "LLM[1] / Non-LLM[0] : 1",
        "Other description : unit test",
    ]
    records = load_official(tmp_path / "submission.zip")
    assert [r["img_path"] for r in records] == sorted(pred["img_path"])
    totals = pred.set_index("img_path")["total_score"]
    scores = pred_el.set_index(["img_path", "element"])["score"]
    for r in records:
        assert r["total_score"] == totals[r["img_path"]]
        assert r["element_score"] == {k: scores[(r["img_path"], k)] for k in r["element_score"]}
    assert sum(len(r["element_score"]) for r in records) == len(pred_el)
    # deterministic bytes
    _submit(imatch, tmp_path, tables, "test", out="again.zip")
    assert (tmp_path / "submission.zip").read_bytes() == (tmp_path / "again.zip").read_bytes()


def test_missing_prediction_rows_are_refused(tables, tmp_path, imatch):
    pred, pred_el = _predictions(tmp_path, *tables, "val")
    pred.iloc[1:].to_parquet(tmp_path / "p.parquet")
    code, _, err = _submit(imatch, tmp_path, tables, "val")
    assert code == 2 and "p.parquet" in err and "1 images of the split have no prediction" in err
    pred.to_parquet(tmp_path / "p.parquet")
    pred_el.iloc[:-1].to_parquet(tmp_path / "e.parquet")
    code, _, err = _submit(imatch, tmp_path, tables, "val")
    assert code == 2 and "e.parquet" in err and "1 element keys have no prediction" in err
    assert not (tmp_path / "submission.zip").exists()


def test_ground_truth_of_val_equals_eval_json(tables, demo_zip, tmp_path, imatch):
    code, _, err = imatch("ground-truth", "--samples", tables[0], "--elements", tables[1], "--split", "val",
                          "--out", tmp_path / "gt.json")
    assert code == 0, err
    ours = sorted(json.loads((tmp_path / "gt.json").read_text()), key=lambda r: r["img_path"])
    official = sorted(json.loads((demo_zip / "eval.json").read_text()), key=lambda r: r["img_path"])
    assert ours == official
    perfect = evaluate(tmp_path / "gt.json", demo_zip / "eval.json")
    assert perfect["srcc"] == pytest.approx(1.0) and perfect["acc"] == 1.0


def test_ground_truth_refuses_unlabelled_split(tables, tmp_path, imatch):
    code, _, err = imatch("ground-truth", "--samples", tables[0], "--elements", tables[1], "--split", "test",
                          "--out", tmp_path / "gt.json")
    assert code == 2 and "unlabelled images" in err and not (tmp_path / "gt.json").exists()


@pytest.mark.parametrize("total, element", [(42.0, None), (-7.0, None), (float("inf"), None), (None, 1.5)])
def test_out_of_range_predictions_never_reach_the_submission(tables, tmp_path, imatch, total, element):
    """Totals outside the judge's 1-5 scale or element scores outside 0-1 (a hand edit, a damaged
    table) are refused, naming the table and the image; no zip is written."""
    pred, pred_el = _predictions(tmp_path, *tables, "val")
    if total is not None:
        pred.iloc[1, pred.columns.get_loc("total_score")] = total
        bad = pred["img_path"].iloc[1]
    else:
        pred_el.iloc[2, pred_el.columns.get_loc("score")] = element
        bad = pred_el["img_path"].iloc[2]
    pred.to_parquet(tmp_path / "p.parquet")
    pred_el.to_parquet(tmp_path / "e.parquet")
    code, _, err = _submit(imatch, tmp_path, tables, "val")
    assert code == 2 and ("p.parquet" if total is not None else "e.parquet") in err and bad in err, err
    assert not (tmp_path / "submission.zip").exists()
