"""`imatch compare-runs`: what the determinism claims are checked with must itself tell apart
identical runs, runs that differ in numbers (and by how much) and runs that differ otherwise."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from imatch.ingest import ingest
from imatch.reproducibility import by_stage, compare


@pytest.fixture
def runs(tmp_path, demo_folder):
    """Two run folders that ingested their own copy of the same source (absolute paths differ)."""
    out = []
    for name in ("a", "b"):
        shutil.copytree(demo_folder, tmp_path / name / "source")
        ingest(tmp_path / name / "source", tmp_path / name / "results" / "data", holdout_fraction=0.25)
        out.append(tmp_path / name / "results")
    return out


def test_the_same_run_in_another_folder_is_identical(runs, imatch):
    a, b = runs
    assert pd.read_parquet(a / "data" / "samples.parquet")["image"].iloc[0].startswith(str(a.parent))
    table = compare(a, b)
    assert set(table["artifact"]) == {"data/samples.parquet", "data/elements.parquet", "data/ingest_summary.json"}
    assert (table["status"] == "identical").all()
    assert imatch("compare-runs", a, b, "--require-identical")[0] == 0


def test_numbers_that_moved_are_measured_and_other_changes_are_flagged(runs, imatch, tmp_path):
    a, b = runs
    elements = pd.read_parquet(b / "data" / "elements.parquet")
    elements.loc[3, "score"] += 0.004
    elements.to_parquet(b / "data" / "elements.parquet")
    samples = pd.read_parquet(b / "data" / "samples.parquet")
    samples.loc[0, "prompt"] = "another prompt"
    samples.to_parquet(b / "data" / "samples.parquet")
    (a / "data" / "extra.json").write_text("{}")
    table = compare(a, b).set_index("artifact")
    assert table.loc["data/elements.parquet", "status"] == "differs"
    assert table.loc["data/elements.parquet", "max_abs_diff"] == pytest.approx(0.004)
    assert table.loc["data/elements.parquet", "detail"] == f"score 0.004 (1/{len(elements)} rows)"
    assert table.loc["data/samples.parquet", "status"] == "differs"
    assert np.isnan(table.loc["data/samples.parquet", "max_abs_diff"])  # more than numbers changed
    assert table.loc["data/extra.json", "status"] == "only in a"
    stages = by_stage(compare(a, b)).set_index("stage")
    assert stages.loc["data", "artifacts"] == 4 and stages.loc["data", "identical"] == 1
    code, out, _ = imatch("compare-runs", a, b, "--require-identical", "--out", tmp_path / "t.tsv")
    assert code == 1 and "3 of 4 artifacts are not identical" in out
    assert len(pd.read_csv(tmp_path / "t.tsv", sep="\t")) == 4
