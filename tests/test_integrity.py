"""Integrity: sha256 manifests catch damaged downloads, backbones and models before they are used;
a write cut short by a full disk or refused by permissions leaves no artifact that looks complete.

The faults are real: a small tmpfs filled to the brim (ENOSPC), a folder the writer may not write
(EACCES; as root, with CAP_DAC_OVERRIDE dropped by `setpriv`), bytes changed on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-7]), "(truncated or replaced)"),
    "altered": (_flip_byte, "sha256 differs from the one recorded"),
    "missing": (lambda p: p.unlink(), "missing: listed in"),
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    from imatch.backbone import tiny_backbone

    out = tmp_path_factory.mktemp("bb") / "tiny-internvl"
    tiny_backbone("internvl", out, size="tiny", seed=0)
    return out


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_verify_names_a_damaged_file(damage, backbone, tmp_path, imatch):
    folder = tmp_path / "bb"
    shutil.copytree(backbone, folder)
    assert imatch("verify", folder)[0] == 0
    weights = folder / "model.safetensors"
    change, message = DAMAGE[damage]
    change(weights)
    code, _, err = imatch("verify", folder)
    assert code == 2 and str(weights) in err and message in err, err


def test_an_unlisted_file_in_a_model_folder_is_refused(backbone, tmp_path, imatch):
    folder = tmp_path / "bb"
    shutil.copytree(backbone, folder)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"x")
    code, _, err = imatch("verify", folder)
    assert code == 2 and "not listed in" in err and "model-00002-of-00002.safetensors" in err
    assert imatch("verify", "--allow-unlisted", folder)[0] == 0


def test_a_damaged_backbone_stops_training_and_scoring_before_loading(backbone, tmp_path, imatch):
    folder = tmp_path / "bb"
    shutil.copytree(backbone, folder)
    _flip_byte(folder / "model.safetensors")
    dataset = tmp_path / "set.jsonl"
    dataset.write_text('{"messages": []}\n')
    code, _, err = imatch("train", "--arch", "internvl", "--model", folder, "--dataset", dataset,
                          "--out", tmp_path / "model", "--scratch", tmp_path / "scratch")
    assert code == 2 and "model.safetensors: sha256 differs" in err, err
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "model").exists()  # swift never started
    queries = tmp_path / "q.parquet"
    import pandas as pd

    pd.DataFrame({"task": ["overall"]}).to_parquet(queries)
    code, _, err = imatch("score-set", "--arch", "internvl", "--model", folder, "--instructions", queries,
                          "--out", tmp_path / "scores.parquet", "--device", "cpu")
    assert code == 2 and "model.safetensors: sha256 differs" in err, err


def test_a_damaged_download_is_refused_by_ingest(mirror, tmp_path, imatch):
    fetched = tmp_path / "evalmuse"
    assert imatch("download", "--out", fetched, "--revision", "main")[0] == 0
    part = sorted(fetched.glob("images.zip.part-*"))[-1]
    part.write_bytes(part.read_bytes()[:-100])  # a copy cut short
    code, _, err = imatch("ingest", "--source", fetched, "--out", tmp_path / "data")
    assert code == 2 and f"{part}: " in err and "truncated" in err, err
    assert not (tmp_path / "data").exists()  # refused before anything was unpacked or written


# ---------------------------------------------------------------------------------------------
# Writes that fail: a full disk, a folder without write permission
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(path: Path, size_kb: int):
    """A real tmpfs of `size_kb` at `path` (needs root: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until only about `leave` bytes are free; return the ballast file."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    ballast.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return ballast


def _ingest(source: Path, out: Path, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, PY, "-m", "imatch", "ingest", "--source", str(source), "--out", str(out)],
                          capture_output=True, text=True)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name) if folder.exists() else []


def test_a_full_disk_leaves_no_output_and_a_rerun_with_space_completes(source, tmp_path):
    reference = tmp_path / "reference"
    assert _ingest(source, reference).returncode == 0
    with small_disk(tmp_path / "disk", 512) as disk:
        ballast = _fill(disk, leave=4096)  # room for part of samples.parquet, not all of it
        out = disk / "data"
        proc = _ingest(source, out)
        assert proc.returncode != 0
        assert f"{out / 'samples.parquet'} not written" in proc.stderr and "No space left on device" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert not (out / "samples.parquet").exists() and not (out / "elements.parquet").exists()
        assert _leftovers(out) == []
        ballast.unlink()
        assert _ingest(source, out).returncode == 0
        for name in ("samples.parquet", "elements.parquet"):
            assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_a_full_disk_leaves_no_model_folder(tmp_path):
    with small_disk(tmp_path / "disk", 2048) as disk:
        _fill(disk, leave=64 * 1024)  # the tiny backbone's weights need more
        proc = subprocess.run([PY, "-m", "imatch", "tiny-backbone", "--arch", "internvl", "--out", str(disk / "bb")],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in disk.iterdir()) == ["ballast"]  # neither the folder nor its temp


def test_a_folder_without_write_permission_keeps_the_previous_outputs(source, tmp_path):
    out = tmp_path / "data"
    assert _ingest(source, out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (source / "train_list.json").write_text(json.dumps(json.loads((source / "train_list.json").read_text())[:-1]))
    # as root, permission bits bind only without CAP_DAC_OVERRIDE
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    out.chmod(0o555)
    try:
        proc = _ingest(source, out, *(drop if os.geteuid() == 0 else []))
    finally:
        out.chmod(0o755)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr and str(out) in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, nothing torn


def test_a_cut_training_set_is_refused(backbone, ingested, tmp_path, imatch):
    """A training jsonl cut at a line boundary (half its rows) was trained on; now `imatch train`
    checks it against the row count of the sidecar `imatch instructions` wrote, before swift starts."""
    samples, elements = ingested
    out, jsonl = tmp_path / "train.parquet", tmp_path / "train.jsonl"
    assert imatch("instructions", "--task", "overall", "--split", "train", "--samples", samples, "--elements",
                  elements, "--out", out, "--jsonl", jsonl)[0] == 0
    lines = jsonl.read_text().splitlines(keepends=True)
    assert json.loads((tmp_path / "train.parquet.json").read_text())["counts"]["rows"] == len(lines) > 2
    jsonl.write_text("".join(lines[: len(lines) // 2]))
    code, _, err = imatch("train", "--arch", "internvl", "--model", backbone, "--dataset", jsonl,
                          "--out", tmp_path / "model", "--scratch", tmp_path / "scratch")
    assert code == 2 and "train.jsonl" in err, err
    assert f"{len(lines) // 2} rows, but train.parquet.json records {len(lines)}" in err, err
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "model").exists()  # swift never started


def test_a_trained_model_without_its_manifest_is_not_scored(backbone, tmp_path, imatch):
    """A trained model folder always carries manifest.json (imatch train seals it); one without was
    tampered with and was scored anyway ("files not verified", exit 0). Old trees: --allow-unsealed."""
    import pandas as pd

    model = tmp_path / "model"
    shutil.copytree(backbone, model)
    (model / "training.json").write_text("{}")  # what makes it a trained model folder
    (model / "manifest.json").unlink()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "a.png")
    queries = tmp_path / "q.parquet"
    pd.DataFrame({"id": ["a.png"], "task": ["overall"], "split": ["val"], "img_path": ["a.png"], "element": [None],
                  "image": [str(tmp_path / "a.png")], "query": ["<image>Prompt: a red square\nHow well?"]}
                 ).to_parquet(queries)
    args = ["score-set", "--arch", "internvl", "--model", model, "--instructions", queries,
            "--out", tmp_path / "scores.parquet", "--device", "cpu", "--dtype", "float32"]
    code, _, err = imatch(*args)
    assert code == 2 and "no manifest.json" in err and str(model) in err, err
    assert not (tmp_path / "scores.parquet").exists()
    assert imatch(*args, "--allow-unsealed")[0] == 0 and len(pd.read_parquet(tmp_path / "scores.parquet")) == 1
