"""Each kind of bad input: a clear error naming file and record, exit code 2, no output."""

from __future__ import annotations

import json
import math

import pytest


def _edit(path, change):
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))


def _first_img(source, name="train_list.json"):
    return json.loads((source / name).read_text())[0]["img_path"]


def malformed_json(source):
    (source / "train_list.json").write_text('[{"prompt_id": "00001",')
    return "train_list.json", "malformed JSON at line 1"


def missing_field(source):
    _edit(source / "train_list.json", lambda r: r[2].pop("prompt_id"))
    return "train_list.json", "record 2 (img_path="


def missing_total_in_train(source):
    _edit(source / "train_list.json", lambda r: r[1].update(total_score=None))
    return "train_list.json", "record 1 (img_path="


def missing_image(source):
    (source / "images" / _first_img(source)).unlink()
    return "train_list.json", "image not found"


def unreadable_image(source):
    (source / "images" / _first_img(source)).write_bytes(b"not a png at all")
    return "train_list.json", "unreadable image"


def truncated_image(source):
    path = source / "images" / _first_img(source)
    path.write_bytes(path.read_bytes()[:-40])
    return "train_list.json", "unreadable image"


def duplicate_img_path(source):
    _edit(source / "train_list.json", lambda r: r.append(dict(r[0])))
    return "train_list.json", "duplicate img_path"


def duplicate_across_files(source):
    first = _first_img(source)
    _edit(source / "final_test.json", lambda r: r[0].update(img_path=first))
    return "final_test.json", "duplicate img_path (also in"


def total_out_of_range(source):
    _edit(source / "train_list.json", lambda r: r[3].update(total_score=[3, 7]))
    return "train_list.json", "total_score: 7 is out of range [1, 5]"


def element_out_of_range(source):
    def change(r):
        key = next(iter(r[0]["element_score"]))
        r[0]["element_score"][key] = [1, 2]
    _edit(source / "train_list.json", change)
    return "train_list.json", "is out of range [0, 1]"


def nan_score(source):
    (source / "train_list.json").write_text(
        (source / "train_list.json").read_text().replace('"total_score": [', '"total_score": [NaN, ', 1))
    return "train_list.json", "nan is not a finite number"


def _add_element(source, key):
    _edit(source / "train_list.json", lambda r: r[0]["element_score"].update({key: [1, 1]}))


def element_without_category(source):
    _add_element(source, "puffin")
    return "train_list.json", "element key 'puffin' has no ' (<category>)' suffix"


def unknown_prompt_type(source):
    _edit(source / "train_list.json", lambda r: r[0].update(type="fictional"))
    return "train_list.json", "type must be one of"


def labels_for_unknown_image(source):
    _edit(source / "eval.json", lambda r: r.append(dict(r[0], img_path="nowhere/0.png")))
    return "eval.json", "labels for an unknown image"


def eval_keys_differ(source):
    def change(r):
        r[0]["element_score"] = {"something (object)": 1.0}
    _edit(source / "eval.json", change)
    return "eval.json", "differ from the inputs'"


def path_escape(source):
    _edit(source / "train_list.json", lambda r: r[0].update(img_path="../../etc/passwd"))
    return "train_list.json", "img_path must be relative"


def image_tag_in_prompt(source):
    _edit(source / "train_list.json", lambda r: r[1].update(prompt=r[1]["prompt"] + " <image>"))
    return "train_list.json", "prompt holds '<image>'"


def image_tag_in_element(source):
    _add_element(source, "<image> frame (object)")
    return "train_list.json", "holds '<image>'"


def sixteen_bit_image(source):
    """PIL turns a 16-bit PNG into a near-white RGB image: the model would see nothing."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((32, 32), 3000, dtype=np.uint16)).save(source / "images" / _first_img(source))
    return "train_list.json", "pixel mode 'I;16'"


CASES = [
    malformed_json, missing_field, missing_total_in_train, missing_image, unreadable_image, truncated_image,
    duplicate_img_path, duplicate_across_files, total_out_of_range, element_out_of_range, nan_score,
    element_without_category, unknown_prompt_type, labels_for_unknown_image, eval_keys_differ, path_escape,
    image_tag_in_prompt, image_tag_in_element, sixteen_bit_image,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_named_and_leaves_no_output(case, source, tmp_path, imatch):
    filename, message = case(source)
    out = tmp_path / "out"
    code, _, err = imatch("ingest", "--source", source, "--out", out)
    assert code == 2
    assert f"{source / filename}" in err, err
    assert message in err, err
    assert not (out / "samples.parquet").exists() and not (out / "elements.parquet").exists()


def test_nan_is_not_accepted_silently():
    # Python's json accepts NaN; the check must not rely on the parser rejecting it
    assert math.isnan(json.loads("[NaN]")[0])


FILE_LEVEL = {malformed_json}  # nothing to skip: the whole file is unusable
INPUT_FILES = ("train_list.json", "test.json", "final_test.json")


@pytest.mark.parametrize("case", [c for c in CASES if c not in FILE_LEVEL], ids=[c.__name__ for c in CASES if c not in FILE_LEVEL])
def test_skipping_lists_each_bad_record_and_the_counts_add_up(case, source, tmp_path, imatch):
    import pandas as pd

    filename, message = case(source)
    out = tmp_path / "out"
    code, _, err = imatch("ingest", "--source", source, "--out", out, "--skip-bad-records")
    assert code == 0, err
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert any(s["file"] == str(source / filename) and message in f"{s['record']}: {s['reason']}"
               for s in summary["skipped"]), summary["skipped"]
    assert f"skipped {len(summary['skipped'])} bad records" in err
    records = summary["records"]
    for name in (*INPUT_FILES, "eval.json"):
        counts = records[str(source / name)]
        assert counts["read"] == len(json.loads((source / name).read_text()))
        assert counts["read"] == counts["kept"] + counts["skipped"]
        assert counts["skipped"] == sum(s["file"] == str(source / name) for s in summary["skipped"])
    samples, elements = pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "elements.parquet")
    assert len(samples) == sum(records[str(source / n)]["kept"] for n in INPUT_FILES)
    assert samples["img_path"].is_unique and set(elements["img_path"]) <= set(samples["img_path"])
    labelled_val = samples[samples["split"] == "val"]
    assert len(labelled_val) == records[str(source / "eval.json")]["kept"] and labelled_val["total_score"].notna().all()


def test_a_file_level_error_stops_even_when_skipping(source, tmp_path, imatch):
    malformed_json(source)
    code, _, err = imatch("ingest", "--source", source, "--out", tmp_path / "out", "--skip-bad-records")
    assert code == 2 and "malformed JSON" in err and not (tmp_path / "out" / "samples.parquet").exists()


def test_without_bad_records_skipping_changes_no_table(source, tmp_path, imatch):
    assert imatch("ingest", "--source", source, "--out", tmp_path / "strict")[0] == 0
    assert imatch("ingest", "--source", source, "--out", tmp_path / "skip", "--skip-bad-records")[0] == 0
    for name in ("samples.parquet", "elements.parquet"):
        assert (tmp_path / "strict" / name).read_bytes().replace(b"strict", b"skip") == (tmp_path / "skip" / name).read_bytes()
    assert json.loads((tmp_path / "skip" / "ingest_summary.json").read_text())["skipped"] == []
