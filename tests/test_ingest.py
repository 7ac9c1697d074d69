"""Ingest: the tables it writes, the EvalMuse quirks it accepts, and its determinism."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest

from imatch.errors import InputError
from imatch.ingest import ELEMENT_COLUMNS, SAMPLE_COLUMNS, holdout_prompts, ingest, split_element_key


@pytest.fixture(scope="module")
def ingested(demo_zip, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    summary = ingest(demo_zip, out, holdout_fraction=0.25, seed=1,
                     eval_json=demo_zip / "eval.json", final_test=demo_zip / "final_test.json")
    return out, summary, pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "elements.parquet")


def test_tables_have_the_documented_columns_and_splits(ingested, demo_zip):
    _, summary, samples, elements = ingested
    assert list(samples.columns) == SAMPLE_COLUMNS
    assert list(elements.columns) == ELEMENT_COLUMNS
    n_train = len(json.loads((demo_zip / "train_list.json").read_text()))
    n_val = len(json.loads((demo_zip / "test.json").read_text()))
    n_test = len(json.loads((demo_zip / "final_test.json").read_text()))
    counts = samples["split"].value_counts().to_dict()
    assert counts["train"] + counts["holdout"] == n_train
    assert counts["val"] == n_val and counts["test"] == n_test
    assert samples["img_path"].is_unique
    assert samples.loc[samples["split"] == "test", "total_score"].isna().all()
    assert samples.loc[samples["split"] != "test", "total_score"].notna().all()
    assert all(pd.io.common.file_exists(p) for p in samples["image"])
    assert summary["samples"] == counts | {s: counts.get(s, 0) for s in summary["samples"]}


def test_holdout_is_carved_by_prompt(ingested):
    _, _, samples, _ = ingested
    train = set(samples.loc[samples["split"] == "train", "prompt_id"])
    hold = set(samples.loc[samples["split"] == "holdout", "prompt_id"])
    assert hold and not train & hold
    assert len(hold) == round(0.25 * len(train | hold))


def test_holdout_choice_is_seeded_and_order_free():
    ids = [f"{i:05d}" for i in range(100)]
    a = holdout_prompts(ids, 0.2, seed=7)
    assert a == holdout_prompts(list(reversed(ids)) * 3, 0.2, seed=7)
    assert a != holdout_prompts(ids, 0.2, seed=8)
    assert len(a) == 20


def test_ground_truth_is_the_mean_over_annotators(ingested, demo_zip):
    _, _, samples, elements = ingested
    rec = json.loads((demo_zip / "train_list.json").read_text())[0]
    row = samples.set_index("img_path").loc[rec["img_path"]]
    assert row["total_score"] == pytest.approx(np.mean(rec["total_score"]))
    assert row["n_annotators"] == len(rec["total_score"])
    assert row["prompt_meaningless"] == pytest.approx(np.mean(rec["promt_meaningless"]))  # misspelled key
    els = elements[elements["img_path"] == rec["img_path"]]
    assert list(els["element"]) == list(rec["element_score"])  # order as given
    for key, votes in rec["element_score"].items():
        assert els.set_index("element").loc[key, "score"] == pytest.approx(np.mean(votes))


def test_val_labels_come_from_eval_json(ingested, demo_zip):
    _, _, samples, elements = ingested
    labels = {r["img_path"]: r for r in json.loads((demo_zip / "eval.json").read_text())}
    val = samples[samples["split"] == "val"].set_index("img_path")
    for img, r in labels.items():
        assert val.loc[img, "total_score"] == pytest.approx(r["total_score"])
        got = elements[elements["img_path"] == img].set_index("element")["score"].to_dict()
        assert got == pytest.approx(r["element_score"])


@pytest.mark.parametrize(
    "key, phrase, category",
    [
        ("puffin (animal)", "puffin", "animal"),
        ("ring (donut) (object-other)", "ring (donut)", "object-other"),
        ("0 (Counting)", "0", "Counting"),
        ("Compass (object-other)", "Compass", "object-other"),
    ],
)
def test_element_keys_split_on_the_last_parenthesis(key, phrase, category):
    assert split_element_key(key) == (phrase, category)


@pytest.mark.parametrize("key", ["puffin", "puffin ()", " (animal)", "puffin (animal"])
def test_element_keys_without_category_are_rejected(key):
    assert split_element_key(key) is None


def test_demo_quirks_reach_the_tables(ingested, demo_zip):
    _, _, samples, elements = ingested
    records = json.loads((demo_zip / "train_list.json").read_text())
    assert all("promt_meaningless" in r for r in records)
    assert any("fidelity_label" not in r for r in records) and any("fidelity_label" in r for r in records)
    assert len({len(r["total_score"]) for r in records}) > 1  # annotator count varies
    assert set(samples["prompt_type"]) == {"real", "synthetic"}
    assert {"Counting", "counting", "object", "color"} <= set(elements["category"])


def test_same_input_gives_identical_bytes(demo_zip, ingested, tmp_path):
    out, *_ = ingested
    ingest(demo_zip, tmp_path, holdout_fraction=0.25, seed=1,
           eval_json=demo_zip / "eval.json", final_test=demo_zip / "final_test.json")
    for name in ("samples.parquet", "elements.parquet"):
        a = pd.read_parquet(out / name)
        b = pd.read_parquet(tmp_path / name)
        if "image" in a:  # absolute paths differ by output folder
            a, b = a.drop(columns="image"), b.drop(columns="image")
        pd.testing.assert_frame_equal(a, b)
    # and a second ingest into the same folder rewrites byte-identical files
    before = {n: (tmp_path / n).read_bytes() for n in ("samples.parquet", "elements.parquet")}
    ingest(demo_zip, tmp_path, holdout_fraction=0.25, seed=1,
           eval_json=demo_zip / "eval.json", final_test=demo_zip / "final_test.json")
    assert before == {n: (tmp_path / n).read_bytes() for n in before}


def test_zip_and_folder_layouts_give_the_same_tables(demo_zip, demo_folder, tmp_path):
    ingest(demo_zip, tmp_path / "z", holdout_fraction=0.2, seed=0)
    ingest(demo_folder, tmp_path / "f", holdout_fraction=0.2, seed=0)
    z = pd.read_parquet(tmp_path / "z" / "samples.parquet")
    f = pd.read_parquet(tmp_path / "f" / "samples.parquet")
    assert f["image"].str.startswith(str(demo_folder.resolve() / "images")).all()  # used in place
    assert z["image"].str.startswith(str((tmp_path / "z" / "unpacked").resolve())).all()
    pd.testing.assert_frame_equal(z.drop(columns="image"), f.drop(columns="image"))


def test_unpacking_is_skipped_when_parts_are_unchanged(demo_zip, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(demo_zip, src)
    ingest(src, tmp_path / "out")
    img = next((tmp_path / "out" / "unpacked" / "images").rglob("*.png"))
    stamp = img.stat().st_mtime_ns
    capsys.readouterr()
    ingest(src, tmp_path / "out", holdout_fraction=0.3)
    assert "already unpacked" in capsys.readouterr().out
    assert img.stat().st_mtime_ns == stamp
    part = sorted(src.glob("images.zip.part-*"))[0]
    part.write_bytes(part.read_bytes())  # same bytes, new mtime: unpack again
    ingest(src, tmp_path / "out")
    assert "unpacked" in capsys.readouterr().out and img.stat().st_mtime_ns != stamp


def test_images_purged_from_the_unpacked_cache_are_unpacked_again(demo_zip, tmp_path, capsys):
    """A scratch purge deleted some unpacked images: ingest blamed the data set ("image not found")
    and, with skip_bad_records, dropped those records. Now the cache is checked against the zip's
    member list and unpacked again; the tables equal those of the first run."""
    ingest(demo_zip, tmp_path / "out", eval_json=demo_zip / "eval.json")
    first = {n: (tmp_path / "out" / n).read_bytes() for n in ("samples.parquet", "elements.parquet")}
    images = sorted((tmp_path / "out" / "unpacked" / "images").rglob("*.png"))
    purged, cut = images[3], images[5]
    purged.unlink()
    cut.write_bytes(cut.read_bytes()[:100])  # half a file: same name, another size
    capsys.readouterr()
    summary = ingest(demo_zip, tmp_path / "out", eval_json=demo_zip / "eval.json", skip_bad_records=True)
    out = capsys.readouterr().out
    assert "2 unpacked files missing or changed" in out and purged.name in out, out
    assert summary["skipped"] == [] and purged.is_file() and cut.stat().st_size > 100
    assert first == {n: (tmp_path / "out" / n).read_bytes() for n in first}


def test_zip_members_cannot_escape_the_target(source, tmp_path):
    shutil.rmtree(source / "images")
    with zipfile.ZipFile(source / "images.zip.part-aa", "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(InputError, match="outside the target folder") as err:
        ingest(source, tmp_path / "out")
    assert "../evil.png" in str(err.value)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "out" / "unpacked").exists()


def test_a_second_ingest_into_the_same_folder_is_refused_while_one_runs(demo_folder, tmp_path):
    """Two ingests into one --out at once: the second replaced the unpacked images under the first,
    which blamed the data set ("image not found"). Now the second is refused, naming the folder."""
    import subprocess
    import sys

    from imatch import ingest as module

    out = tmp_path / "out"
    # the first ingest holds the lock (a child process, as a concurrent job would)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock\n"
                               f"with FileLock({str(tmp_path / '.out.imatch-ingest.lock')!r}):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match="another `imatch ingest` is writing this folder") as refused:
            module.ingest(demo_folder, out)
        assert str(out) in str(refused.value) and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    module.ingest(demo_folder, out)  # released: ingests
    assert (out / "samples.parquet").is_file()


def test_a_template_tag_in_an_eval_json_element_key_is_named():
    """(pyflakes found `path` undefined here: a NameError instead of the named refusal.)"""
    from pathlib import Path

    from imatch.ingest import _eval_elements

    with pytest.raises(InputError, match=r"element key 'a <image> \(object\)' holds '<image>'") as refused:
        _eval_elements({"total_score": 3, "element_score": {"a <image> (object)": 1}}, {"_elements": []},
                       Path("eval.json"), "record 1")
    assert str(refused.value).startswith("eval.json: record 1")


# ------------------------------------------------------------------------------------------------
# Parsing, record by record (no files of images): values by hand, every refusal by its message
# ------------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from imatch.ingest import (  # noqa: E402
    Skips, _eval_elements, _score, join_labels, load_records, parse_file, parse_record,
)

P = Path("train_list.json")
REC = {"prompt_id": "00110", "prompt": "A puffin sitting in a booth", "type": "real", "img_path": "SDXL/00110.png",
       "total_score": [4, 3, 3], "element_score": {"puffin (animal)": [1, 1, 1], "ring (donut) (object)": [0, 1, 0]},
       "promt_meaningless": [0, 0, 1], "split_confidence": [1, 0], "attribute_confidence": [1, 1, 1, 0],
       "fidelity_label": ["ok"]}


def test_a_record_parses_to_annotator_means():
    row, els = parse_record(REC, 0, P, require_labels=True)
    assert row == {"img_path": "SDXL/00110.png", "prompt_id": "00110", "prompt": "A puffin sitting in a booth",
                   "prompt_type": "real", "total_score": pytest.approx(10 / 3), "n_annotators": 3,
                   "prompt_meaningless": pytest.approx(1 / 3), "split_confidence": 0.5, "attribute_confidence": 0.75}
    assert els == [
        {"img_path": "SDXL/00110.png", "element": "puffin (animal)", "phrase": "puffin", "category": "animal",
         "score": 1.0},
        {"img_path": "SDXL/00110.png", "element": "ring (donut) (object)", "phrase": "ring (donut)",
         "category": "object", "score": pytest.approx(1 / 3)},
    ]
    # the correct spelling is read too; absent metadata and an unlabelled record give None
    plain = {k: v for k, v in REC.items() if k not in ("promt_meaningless", "split_confidence", "total_score",
                                                       "element_score")}
    row, els = parse_record({**plain, "prompt_meaningless": [1, 1]}, 3, P, require_labels=False)
    assert row["prompt_meaningless"] == 1.0 and row["split_confidence"] is None
    assert row["total_score"] is None and row["n_annotators"] == 0 and els == []
    # already averaged numbers (eval.json style) and empty lists
    row, els = parse_record({**REC, "total_score": 2.5, "element_score": {"a (b)": 0.25}, "split_confidence": []},
                            0, P, require_labels=True)
    assert (row["total_score"], row["n_annotators"], row["split_confidence"]) == (2.5, 1, None)
    assert els[0]["score"] == 0.25
    assert row["prompt_type"] == "real" and parse_record({**REC, "type": "synthetic"}, 0, P,
                                                         require_labels=True)[0]["prompt_type"] == "synthetic"


def test_annotator_scores_are_checked_against_their_scale():
    assert _score([1, 5], lo=1, hi=5, field="f", path=P, label="r") == (3.0, 2)
    assert _score(None, lo=1, hi=5, field="f", path=P, label="r") == (None, 0)
    assert _score([], lo=1, hi=5, field="f", path=P, label="r") == (None, 0)
    assert _score(0, lo=0, hi=1, field="f", path=P, label="r") == (0.0, 1)  # a bare number: one annotator
    for bad, why in [([0], "0 is out of range [1, 5]"), ([6], "6 is out of range [1, 5]"),
                     ([True], "True is not a finite number"), (["3"], "'3' is not a finite number"),
                     ([float("nan")], "nan is not a finite number"), ([float("inf")], "inf is not a finite number"),
                     ([10**400], "is out of range [1, 5]")]:
        with pytest.raises(InputError) as err:
            _score(bad, lo=1, hi=5, field="total_score", path=P, label="record 2")
        assert str(err.value).startswith("train_list.json: record 2: total_score: ") and why in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"prompt_id": None}, "missing required field 'prompt_id'"),
    ({"prompt": ""}, "missing required field 'prompt'"),
    ({"type": None}, "missing required field 'type'"),
    ({"img_path": ""}, "missing required field 'img_path'"),
    ({"prompt_id": 110}, "prompt_id must be a string, got 110"),
    ({"prompt": 3}, "prompt must be a string, got 3"),
    ({"type": ["real"]}, "type must be a string, got ['real']"),
    ({"img_path": 7}, "img_path must be a string, got 7"),
    ({"prompt": "a <image> of"}, "prompt holds '<image>', which ms-swift's templates read as a media or grounding tag, not text"),
    ({"prompt": "a <bbox> of"}, "prompt holds '<bbox>', which ms-swift's templates read as a media or grounding tag, not text"),
    ({"type": "fake"}, "type must be one of ['real', 'synthetic'], got 'fake'"),
    ({"img_path": "/abs/x.png"}, "img_path must be relative to the images folder: '/abs/x.png'"),
    ({"img_path": "a/../../x.png"}, "img_path must be relative to the images folder: 'a/../../x.png'"),
    ({"total_score": None}, "missing required field 'total_score' (labelled file)"),
    ({"total_score": [9]}, "total_score: 9 is out of range [1, 5]"),
    ({"element_score": None}, "missing required field 'element_score' (labelled file)"),
    ({"element_score": [1]}, "element_score must be an object, got list"),
    ({"element_score": {"puffin": [1]}}, "element key 'puffin' has no ' (<category>)' suffix"),
    ({"element_score": {"a <video> (object)": [1]}}, "element key 'a <video> (object)' holds '<video>', which ms-swift's templates read as a tag"),
    ({"element_score": {"a (object)": []}}, "element 'a (object)' has no annotator scores (labelled file)"),
    ({"element_score": {"a (object)": [2]}}, "element_score['a (object)']: 2 is out of range [0, 1]"),
    ({"promt_meaningless": [2]}, "promt_meaningless: 2 is out of range [0, 1]"),
    ({"split_confidence": [-1]}, "split_confidence: -1 is out of range [0, 1]"),
    ({"attribute_confidence": ["x"]}, "attribute_confidence: 'x' is not a finite number"),
    ({"attribute_confidence": [1, 2]}, "attribute_confidence: 2 is out of range [0, 1]"),
])
def test_each_bad_field_is_named_with_file_and_record(change, message):
    with pytest.raises(InputError) as err:
        parse_record({**REC, **change}, 4, P, require_labels=True)
    img = change.get("img_path", REC["img_path"])
    label = "record 4" + (f" (img_path={img!r})" if img is not None else "")
    assert str(err.value) == f"train_list.json: {label}: {message}"


def test_an_unlabelled_file_accepts_records_without_labels_but_checks_what_is_there():
    row, els = parse_record({**REC, "total_score": None, "element_score": {"a (object)": None}}, 0, P,
                            require_labels=False)
    assert row["total_score"] is None and els[0]["score"] is None and els[0]["category"] == "object"
    with pytest.raises(InputError) as err:
        parse_record([1], 5, P, require_labels=False)
    assert str(err.value) == "train_list.json: record 5: expected a JSON object, got list"
    bare = {k: v for k, v in REC.items() if k != "promt_meaningless"}  # neither spelling present
    assert parse_record(bare, 0, P, require_labels=True)[0]["prompt_meaningless"] is None


def test_files_are_read_as_lists_of_records_and_bad_records_skipped_when_allowed(tmp_path):
    path = tmp_path / "train_list.json"
    good2 = {**REC, "img_path": "SDXL/2.png"}
    path.write_text(json.dumps([REC, {**REC, "type": "fake"}, good2]))
    with pytest.raises(InputError, match="record 1 .*type must be one of"):
        parse_file(path, "train", require_labels=True)
    path.write_text(json.dumps([{**REC, "total_score": None}]))
    assert parse_file(path, "test", require_labels=False)[0][0]["total_score"] is None
    with pytest.raises(InputError, match="record 0 .*missing required field 'total_score' \\(labelled file\\)"):
        parse_file(path, "train", require_labels=True)
    path.write_text(json.dumps([REC, {**REC, "type": "fake"}, good2]))
    skips = Skips(True)
    rows, n = parse_file(path, "holdout", require_labels=True, skips=skips)
    assert n == 3 and [r["img_path"] for r in rows] == ["SDXL/00110.png", "SDXL/2.png"]
    assert [r["split"] for r in rows] == ["holdout", "holdout"] and len(rows[1]["_elements"]) == 2
    assert skips.rows == [{"file": str(path), "record": "record 1 (img_path='SDXL/00110.png')",
                           "img_path": "SDXL/00110.png", "reason": "type must be one of ['real', 'synthetic'], got 'fake'"}]
    assert skips.counts({str(path): 3, "other.json": 2}) == {str(path): {"read": 3, "kept": 2, "skipped": 1},
                                                             "other.json": {"read": 2, "kept": 2, "skipped": 0}}
    path.write_text(json.dumps([REC, "not a record"]))
    skips = Skips(True)
    assert len(parse_file(path, "train", require_labels=True, skips=skips)[0]) == 1
    assert skips.rows[0]["img_path"] is None and skips.rows[0]["record"] == "record 1"
    for text, message in [("[{", "malformed JSON at line 1 column 3: Expecting property name enclosed in double quotes"),
                          ('{"a": 1}', "expected a JSON list of records, got dict")]:
        path.write_text(text)
        with pytest.raises(InputError) as err:
            load_records(path)
        assert str(err.value) == f"{path}: {message}"
    path.write_bytes(b'["\xff"]')
    with pytest.raises(InputError) as err:
        load_records(path)
    assert str(err.value) == f"{path}: not UTF-8 text (invalid start byte at byte 2)"
    with pytest.raises(InputError) as err:
        load_records(tmp_path / "absent.json")
    assert str(err.value) == f"{tmp_path / 'absent.json'}: file not found"
    path.write_text(json.dumps([REC]))
    assert load_records(str(path)) == [REC]


def _val_rows():
    rec = {**REC, "total_score": None, "element_score": {"puffin (animal)": None, "ring (donut) (object)": None}}
    rows = []
    for img in ("v/1.png", "v/2.png"):
        row, els = parse_record({**rec, "img_path": img}, 0, Path("test.json"), require_labels=False)
        rows.append({**row, "split": "val", "_elements": [dict(e, img_path=img) for e in els]})
    return rows


def test_val_labels_are_joined_from_eval_json(tmp_path):
    path = tmp_path / "eval.json"
    labels = [{"img_path": "v/2.png", "total_score": 2.5, "element_score": {"ring (donut) (object)": 0.0,
                                                                           "puffin (animal)": 0.75}},
              {"img_path": "v/1.png", "total_score": [5, 4], "element_score": {"puffin (animal)": [1, 0],
                                                                              "ring (donut) (object)": 1}}]
    path.write_text(json.dumps(labels))
    kept, n = join_labels(_val_rows(), path)
    assert n == 2 and [r["img_path"] for r in kept] == ["v/1.png", "v/2.png"]
    assert [r["total_score"] for r in kept] == [4.5, 2.5]
    # element order of the inputs, values from eval.json
    assert [(e["element"], e["phrase"], e["category"], e["score"]) for e in kept[0]["_elements"]] == [
        ("puffin (animal)", "puffin", "animal", 0.5), ("ring (donut) (object)", "ring (donut)", "object", 1.0)]
    assert [e["score"] for e in kept[1]["_elements"]] == [0.75, 0.0]
    assert all(e["img_path"] == r["img_path"] for r in kept for e in r["_elements"])


def test_eval_json_problems_are_named_or_skipped(tmp_path):
    path = tmp_path / "eval.json"
    ok = {"img_path": "v/1.png", "total_score": 3, "element_score": {"puffin (animal)": 1, "ring (donut) (object)": 0}}
    ok2 = dict(ok, img_path="v/2.png")
    cases = [
        ([ok], "1 validation images have no labels, e.g. 'v/2.png'", None),
        ([ok, ok2, dict(ok, img_path="v/9.png")], "labels for an unknown image (not in the validation inputs)", "record 2"),
        ([ok, ok2, ok], "duplicate img_path", "record 2"),
        ([ok, {"total_score": 3}], "missing required field 'img_path'", "record 1"),
        ([ok, ["v/2.png"]], "missing required field 'img_path'", "record 1"),
        ([ok, dict(ok2, total_score=None)], "missing required field 'total_score'", "record 1"),
        ([ok, dict(ok2, total_score=7)], "total_score: 7 is out of range [1, 5]", "record 1"),
        ([ok, dict(ok2, element_score=None)], "missing required field 'element_score'", "record 1"),
        ([ok, dict(ok2, element_score={"puffin (animal)": 1})],
         "element keys ['puffin (animal)'] differ from the inputs' ['puffin (animal)', 'ring (donut) (object)']", "record 1"),
        ([ok, dict(ok2, element_score={"puffin (animal)": 1, "ring (donut) (object)": 3})],
         "element_score['ring (donut) (object)']: 3 is out of range [0, 1]", "record 1"),
    ]
    for labels, message, record in cases:
        path.write_text(json.dumps(labels))
        with pytest.raises(InputError) as err:
            join_labels(_val_rows(), path)
        bad = labels[int(record[-1])] if record else {}
        where = str(path) if record is None else f"{path}: {record}" + (
            f" (img_path={bad['img_path']!r})" if isinstance(bad, dict) and "img_path" in bad else "")
        assert str(err.value) == f"{where}: {message}"
    # skipping: the bad label is listed, and so is the input it leaves without labels
    path.write_text(json.dumps([ok, dict(ok2, total_score=7), dict(ok, img_path="v/9.png")]))
    skips = Skips(True)
    kept, n = join_labels(_val_rows(), path, skips=skips, val_path=Path("test.json"),
                          skipped_inputs=frozenset({"v/9.png"}))
    assert n == 3 and [r["img_path"] for r in kept] == ["v/1.png"]
    assert [(r["file"], r["img_path"], r["reason"]) for r in skips.rows] == [
        (str(path), "v/2.png", "total_score: 7 is out of range [1, 5]"),
        (str(path), "v/9.png", "labels for an unknown image (its input record was skipped)"),
        ("test.json", "v/2.png", f"no labels in {path}"),
    ]
    assert skips.rows[2]["record"] == "img_path='v/2.png'"
    # a label record whose img_path is not a string is listed without one
    path.write_text(json.dumps([ok, ok2, dict(ok, img_path=7)]))
    skips = Skips(True)
    assert len(join_labels(_val_rows(), path, skips=skips)[0]) == 2
    assert skips.rows == [{"file": str(path), "record": "record 2 (img_path=7)", "img_path": None,
                           "reason": "missing required field 'img_path'"}]


def test_eval_json_labels_of_an_input_without_elements():
    total, joined = _eval_elements({"total_score": [2, 3], "element_score": {"cat (animal)": [1, 1]}},
                                   {"img_path": "v/3.png", "_elements": []}, Path("eval.json"), "record 0")
    assert total == 2.5 and joined == [{"img_path": "v/3.png", "element": "cat (animal)", "phrase": "cat",
                                        "category": "animal", "score": 1.0}]
    with pytest.raises(InputError) as err:
        _eval_elements({"total_score": 3, "element_score": {"cat": 1}}, {"img_path": "v/3.png", "_elements": []},
                       Path("eval.json"), "record 0")
    assert str(err.value) == "eval.json: record 0: element key 'cat' has no ' (<category>)' suffix"


def test_holdout_size_is_the_rounded_fraction_of_prompts_with_a_train_side():
    ids = [f"{i:03d}" for i in range(10)]
    assert len(holdout_prompts(ids, 0.25, seed=0)) == 2  # round(2.5) = 2 (Python rounds to even)
    assert len(holdout_prompts(ids, 0.35, seed=0)) == 4  # round(3.5) = 4
    assert len(holdout_prompts(ids, 0.01, seed=0)) == 1  # at least one prompt held out
    assert len(holdout_prompts(ids, 0.99, seed=0)) == 9  # at least one prompt left for training
    assert len(holdout_prompts(["a", "b"], 0.1, seed=0)) == 1 and len(holdout_prompts(["a", "b"], 0.9, seed=0)) == 1
    assert holdout_prompts(ids, 0.0, seed=0) == set() and holdout_prompts(["a"], 0.5, seed=0) == set()
    assert holdout_prompts(ids, 0.3, seed=0) <= set(ids)
    # the choice is numpy's seeded permutation of the sorted ids
    perm = np.random.default_rng(5).permutation(10)[:3]
    assert holdout_prompts(ids[::-1], 0.3, seed=5) == {ids[i] for i in perm}
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"holdout fraction must be in \\[0, 1\\), got {bad}"):
            holdout_prompts(ids, bad, seed=0)


def documented_columns(table):
    """The column names docs/stages.md lists for `table` (the bullet `- `table`, one row per ...`),
    parenthesised remarks such as the split names left out."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "stages.md").read_text(encoding="utf-8")
    bullet = re.search(rf"^- `{re.escape(table)}`, one row per [^:]*:(.*?)(?=^- |^$)", text, re.S | re.M).group(1)
    names = re.findall(r"`([^`]*)`", bullet)
    masked, index = "", 0  # backticked names become placeholders, so that "(`train`, ...)" can be dropped
    for part in re.split(r"(`[^`]*`)", bullet):
        if part.startswith("`"):
            masked += f"@{index}@"
            index += 1
        else:
            masked += part
    while re.search(r"\([^()]*\)", masked):
        masked = re.sub(r"\([^()]*\)", "", masked)
    return [names[int(i)] for i in re.findall(r"@(\d+)@", masked)]


def test_the_tables_have_the_columns_docs_stages_lists(ingested):
    _, _, samples, elements = ingested
    assert documented_columns("samples.parquet") == list(samples.columns)
    assert documented_columns("elements.parquet") == list(elements.columns)
