"""Provenance records beside every output, and `imatch audit` naming what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from imatch.provenance import audit


@pytest.fixture
def tree(tmp_path, imatch, monkeypatch):
    """demo-data -> ingest -> ground-truth, run from tmp_path (relative paths, as Snakemake gives them)."""
    monkeypatch.chdir(tmp_path)
    assert imatch("demo-data", "--out", "results/source", "--train-prompts", "6", "--val-prompts", "2",
                  "--test-prompts", "0", "--image-size", "48", "--layout", "folder")[0] == 0
    assert imatch("ingest", "--source", "results/source", "--out", "results/data")[0] == 0
    assert imatch("ground-truth", "--samples", "results/data/samples.parquet", "--elements",
                  "results/data/elements.parquet", "--split", "val", "--out", "results/data/ground_truth/val.json")[0] == 0
    return tmp_path / "results"


def test_records_hold_content_and_the_inputs_they_were_made_from(tree):
    rec = json.loads((tree / "data" / "ground_truth" / "val.json.prov.json").read_text())
    assert rec["command"][:2] == ["imatch", "ground-truth"] and rec["versions"]["pandas"] and rec["git_revision"] is not None
    samples = next(i for i in rec["inputs"] if i["path"] == "results/data/samples.parquet")
    assert samples["relative"] == "../samples.parquet" and os.path.isabs(samples["absolute"])
    made = json.loads((tree / "data" / "samples.parquet.prov.json").read_text())["output_fingerprint"]
    assert set(samples["print"]) == {"artifact"} and made["sha256"]  # the input is known by its own record
    source = json.loads((tree / "source.prov.json").read_text())["output_fingerprint"]
    assert source["kind"] == "dir" and "train_list.json" in source["files"]
    assert all("mtime" not in json.dumps(v) for v in source["files"].values())
    # ingest records its three tables, not its --out folder that other stages write into
    assert not (tree / "data.prov.json").exists() and (tree / "data" / "ingest_summary.json.prov.json").is_file()


def test_a_fresh_tree_a_copy_and_a_moved_tree_audit_clean(tree, tmp_path, imatch):
    (tree / "source" / ".snakemake_timestamp").write_text("")  # what Snakemake adds to directory() outputs
    assert audit(tree) == []
    copy, moved = tmp_path / "elsewhere" / "copy", tmp_path / "elsewhere" / "moved"
    shutil.copytree(tree, copy)  # new mtimes everywhere (what a copy that rounds them does, and worse)
    assert subprocess.run(["cp", "-a", str(tree), str(tmp_path / "twin")]).returncode == 0
    shutil.move(str(tmp_path / "twin"), str(moved))
    os.chdir(tmp_path / "elsewhere")  # audited from another working directory
    for folder in ("copy", "moved"):
        assert audit(folder) == [], folder
        code, out, _ = imatch("audit", folder)
        assert code == 0 and '"problems": 0' in out, out


def test_audit_names_the_file_that_changed(tree, imatch):
    (tree / "data" / "ground_truth" / "val.json").write_text("[]\n")  # an artifact edited by hand
    (tree / "source" / "images" / "oracle-3" / "00002.png").unlink()  # a file of a folder artifact deleted
    (tree / "source" / "extra.txt").write_text("x")  # and one added
    problems = {p.get("line") or f"{p['artifact']}: {p['problem']}" for p in audit(tree)}
    root = str(tree)
    assert f"{root}/data/ground_truth/val.json: artifact changed since it was made" in problems
    assert f"{root}/source/images/oracle-3/00002.png: missing" in problems
    assert f"{root}/source/extra.txt: not part of the artifact when it was made" in problems
    code, out, _ = imatch("audit", tree)
    assert code == 1 and f"{root}/source/images/oracle-3/00002.png: missing" in out
    (tree / "data" / "ground_truth" / "val.json").unlink()
    assert {"artifact": f"{root}/data/ground_truth/val.json", "problem": "artifact missing"} in audit(tree)


def test_a_remade_input_makes_its_users_stale(tree, imatch):
    """ingest rerun with another holdout: the ground truth made from the old tables is stale."""
    assert imatch("ingest", "--source", "results/source", "--out", "results/data", "--holdout-fraction", "0.5")[0] == 0
    problems = audit(tree)
    assert {p["artifact"] for p in problems} == {str(tree / "data" / "ground_truth" / "val.json")}, problems
    assert any(p["problem"] == "input changed since the artifact was made: " + str(tree / "data" / "samples.parquet")
               for p in problems), problems
