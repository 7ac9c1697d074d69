"""`imatch download` through the hub boundary, pointed at a local mirror of the same layout."""

from __future__ import annotations

import hashlib
import json


def test_download_writes_a_sha256_manifest_of_what_it_fetched(mirror, tmp_path, imatch):
    out = tmp_path / "evalmuse"
    code, stdout, err = imatch("download", "--out", out, "--revision", "abc123")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["repo_id"] == "DY-Evalab/EvalMuse" and manifest["revision"] == "abc123"
    names = [f["path"] for f in manifest["files"]]
    assert "prompt_t2i.json" not in names and not (out / "prompt_t2i.json").exists()  # not a pattern
    assert sorted(names) == sorted(p.name for p in mirror.iterdir() if p.name != "prompt_t2i.json")
    for f in manifest["files"]:
        data = (out / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["size"] == len(data)


def test_rerun_fetches_only_what_is_missing(mirror, tmp_path, imatch):
    out = tmp_path / "evalmuse"
    imatch("download", "--out", out, "--revision", "main")
    kept = out / "train_list.json"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "test.json").unlink()
    code, _, _ = imatch("download", "--out", out, "--revision", "main")
    assert code == 0
    assert (out / "test.json").read_bytes() == (mirror / "test.json").read_bytes()
    assert kept.stat().st_mtime_ns == kept_mtime


def test_downloaded_folder_ingests(mirror, tmp_path, imatch):
    out = tmp_path / "evalmuse"
    imatch("download", "--out", out, "--revision", "main")
    code, _, err = imatch("ingest", "--source", out, "--out", tmp_path / "data")
    assert code == 0, err
