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
