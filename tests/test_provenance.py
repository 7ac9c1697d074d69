"""Provenance records beside every output, and `imatch audit` finding what changed."""

from __future__ import annotations

import json
import os

from imatch.provenance import audit


def test_audit_reports_changed_missing_and_stale(tmp_path, imatch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert imatch("demo-data", "--out", "results/source", "--train-prompts", "6", "--val-prompts", "2",
                  "--test-prompts", "0", "--image-size", "48", "--layout", "folder")[0] == 0
    assert imatch("ingest", "--source", "results/source", "--out", "results/data")[0] == 0
    assert imatch("ground-truth", "--samples", "results/data/samples.parquet", "--elements",
                  "results/data/elements.parquet", "--split", "val", "--out", "results/gt.json")[0] == 0
    rec = json.loads((tmp_path / "results" / "gt.json.prov.json").read_text())
    assert rec["command"][:2] == ["imatch", "ground-truth"]
    assert rec["inputs"]["results/data/samples.parquet"]["sha256"]
    assert rec["output_fingerprint"]["sha256"] and rec["versions"]["pandas"] and rec["git_revision"] is not None
    assert audit(tmp_path / "results") == []
    code, out, _ = imatch("audit", "results")
    assert code == 0 and '"problems": 0' in out

    (tmp_path / "results" / "gt.json").write_text("[]\n")  # an artifact edited by hand
    os.remove(tmp_path / "results" / "source" / "images" / "oracle-3" / "00001.png")  # an input gone
    problems = audit(tmp_path / "results")
    assert {"artifact": "results/gt.json", "problem": "artifact changed since it was made"} in problems
    assert any(p["problem"].startswith("input changed or missing: results/source") for p in problems)
    code, out, _ = imatch("audit", "results")
    assert code == 1 and "results/gt.json: artifact changed" in out
    (tmp_path / "results" / "gt.json").unlink()
    assert {"artifact": "results/gt.json", "problem": "artifact missing"} in audit(tmp_path / "results")
