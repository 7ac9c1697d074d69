"""Official format: ground truth and submission.zip round trips, with row-count checks."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from imatch.errors import InputError
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


# ------------------------------------------------------------------------------------------------
# hand-made tables: every record and every refusal written out
# ------------------------------------------------------------------------------------------------
def _tables(tmp_path):
    samples = pd.DataFrame({"img_path": ["m/b.png", "m/a.png", "m/c.png", "m/t.png"],
                            "prompt": ["a bee", "an ant", "a cat", "a toad"],
                            "split": ["val", "val", "val", "train"],
                            "total_score": [2.5, 4.0, 1.0, 3.0]})
    elements = pd.DataFrame({"img_path": ["m/a.png", "m/b.png", "m/a.png", "m/t.png"],
                             "element": ["ant (animal)", "bee (animal)", "leaf (object)", "toad (animal)"],
                             "score": [1.0, 0.5, 0.0, 1.0]})
    samples.to_parquet(tmp_path / "s.parquet")
    elements.to_parquet(tmp_path / "el.parquet")
    pred = pd.DataFrame({"img_path": ["m/c.png", "m/a.png", "m/b.png", "m/t.png"], "total_score": [1.5, 4.5, 3.0, 2.0]})
    pred_el = pd.DataFrame({"img_path": ["m/b.png", "m/a.png", "m/a.png", "m/t.png"],
                            "element": ["bee (animal)", "leaf (object)", "ant (animal)", "toad (animal)"],
                            "score": [0.0, 1.0, 0.25, 1.0]})
    return tmp_path / "s.parquet", tmp_path / "el.parquet", pred, pred_el


def _submit_tables(tmp_path, pred, pred_el, split="val"):
    from imatch.submission import submission

    pred.to_parquet(tmp_path / "p.parquet")
    pred_el.to_parquet(tmp_path / "pe.parquet")
    return submission(tmp_path / "s.parquet", tmp_path / "el.parquet", split, tmp_path / "p.parquet",
                      tmp_path / "pe.parquet", tmp_path / "sub.zip", runtime=1.23456, cpu=1, extra_data=1, llm=0,
                      description="hand made")


def test_submission_records_by_hand(tmp_path):
    _, _, pred, pred_el = _tables(tmp_path)
    assert _submit_tables(tmp_path, pred, pred_el) == 3
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert zf.namelist() == ["output.json", "readme.txt"]
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_DEFLATED
                   and i.external_attr == 0o644 << 16 for i in zf.infolist())
        output = json.loads(zf.read("output.json").decode("utf-8"))
        readme = zf.read("readme.txt").decode()
    assert output == [  # img_path order, every element key as given, the train image left out
        {"prompt": "an ant", "img_path": "m/a.png", "total_score": 4.5,
         "element_score": {"ant (animal)": 0.25, "leaf (object)": 1.0}},
        {"prompt": "a bee", "img_path": "m/b.png", "total_score": 3.0, "element_score": {"bee (animal)": 0.0}},
        {"prompt": "a cat", "img_path": "m/c.png", "total_score": 1.5, "element_score": {}},
    ]
    s = pd.read_parquet(tmp_path / "s.parquet")
    s.loc[s["img_path"] == "m/c.png", "prompt"] = "une chèvre"
    s.to_parquet(tmp_path / "s.parquet")
    _submit_tables(tmp_path, pred, pred_el)
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert '"prompt": "une chèvre"'.encode("utf-8") in zf.read("output.json")  # UTF-8, not \u-escaped
    assert readme == ("runtime per image [s] : 1.2346\nCPU[1] / GPU[0] : 1\nExtra Data [1] / No Extra Data [0] : 1\n"
                      "LLM[1] / Non-LLM[0] : 0\nOther description : hand made\n")


def test_ground_truth_by_hand(tmp_path):
    from imatch.submission import ground_truth

    samples, elements, _, _ = _tables(tmp_path)
    assert ground_truth(samples, elements, "val", tmp_path / "gt.json") == 3
    text = (tmp_path / "gt.json").read_text()
    assert json.loads(text) == [
        {"prompt": "an ant", "img_path": "m/a.png", "total_score": 4.0,
         "element_score": {"ant (animal)": 1.0, "leaf (object)": 0.0}},
        {"prompt": "a bee", "img_path": "m/b.png", "total_score": 2.5, "element_score": {"bee (animal)": 0.5}},
        {"prompt": "a cat", "img_path": "m/c.png", "total_score": 1.0, "element_score": {}},
    ]
    assert "\n" not in text.strip()  # one line, as eval.json
    with pytest.raises(InputError) as err:
        ground_truth(samples, elements, "test", tmp_path / "x.json")
    assert str(err.value) == f"{samples}: split 'test' has no images"
    el = pd.read_parquet(elements)
    el.loc[1, "score"] = None
    el.to_parquet(tmp_path / "el.parquet")
    with pytest.raises(InputError) as err:
        ground_truth(samples, elements, "val", tmp_path / "x.json")
    assert str(err.value) == f"{elements}: img_path='m/b.png' element='bee (animal)': split 'val' has unlabelled elements"
    s = pd.read_parquet(samples)
    s.loc[2, "total_score"] = None
    s.to_parquet(samples)
    with pytest.raises(InputError) as err:
        ground_truth(samples, elements, "val", tmp_path / "x.json")
    assert str(err.value) == f"{samples}: img_path='m/c.png': split 'val' has 1 unlabelled images"
    assert not (tmp_path / "x.json").exists()


def _refusal(tmp_path, pred, pred_el):
    with pytest.raises(InputError) as err:
        _submit_tables(tmp_path, pred, pred_el)
    assert not (tmp_path / "sub.zip").exists()
    return str(err.value)


def test_each_bad_prediction_table_is_refused_by_name(tmp_path):
    _, _, pred, pred_el = _tables(tmp_path)
    p, pe = tmp_path / "p.parquet", tmp_path / "pe.parquet"
    dup = pd.concat([pred, pred.iloc[[1]]])
    assert _refusal(tmp_path, dup, pred_el) == f"{p}: img_path='m/a.png': duplicate img_path"
    assert _refusal(tmp_path, pred.iloc[[0, 1, 3]], pred_el) == (
        f"{p}: img_path='m/b.png': 1 images of the split have no prediction")
    assert _refusal(tmp_path, pred.assign(total_score=[None, 4.5, 3.0, 2.0]), pred_el) == (
        f"{p}: total_score is null or NaN")
    assert _refusal(tmp_path, pred.assign(total_score=[1.5, 5.5, 3.0, 2.0]), pred_el) == (
        f"{p}: 'm/a.png': np.float64(5.5): total_score must be finite and in [1, 5]; 1 rows are not")
    # the edges of the scales are accepted
    assert _submit_tables(tmp_path, pred.assign(total_score=[1.0, 5.0, 3.0, 2.0]),
                          pred_el.assign(score=[0.0, 1.0, 0.0, 1.0])) == 3
    (tmp_path / "sub.zip").unlink()
    dup = pd.concat([pred_el, pred_el.iloc[[2]].assign(score=0.75)])  # the same key twice, two values
    assert _refusal(tmp_path, pred, dup) == f"{pe}: img_path='m/a.png' element='ant (animal)': duplicate element prediction"
    assert _refusal(tmp_path, pred, pred_el.iloc[[0, 2, 3]]) == (
        f"{pe}: img_path='m/a.png' element='leaf (object)': 1 element keys have no prediction")
    assert _refusal(tmp_path, pred, pred_el.assign(score=[0.0, None, 0.25, 1.0])) == f"{pe}: element score is null or NaN"
    assert _refusal(tmp_path, pred, pred_el.assign(score=[0.0, 1.0, -0.5, 1.0])) == (
        f"{pe}: ('m/a.png', 'ant (animal)'): np.float64(-0.5): element score must be finite and in [0, 1]; 1 rows are not")
    # element keys the tables do not list are not submitted and not checked
    extra = pd.concat([pred_el, pd.DataFrame({"img_path": ["m/c.png", "m/b.png"], "element": ["new (object)", "x (y)"],
                                              "score": [5.0, float("nan")]})])
    assert _submit_tables(tmp_path, pred, extra) == 3
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert json.loads(zf.read("output.json"))[2]["element_score"] == {}
    (tmp_path / "sub.zip").unlink()
    # rows of other splits are ignored, even out of range or duplicated
    assert _submit_tables(tmp_path, pd.concat([pred.assign(total_score=[1.5, 4.5, 3.0, 99.0]), pred.iloc[[3]]]),
                          pred_el) == 3
