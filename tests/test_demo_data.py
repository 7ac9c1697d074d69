"""The generated data set: deterministic, and its labels follow what is drawn."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from imatch import demo_data


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(n_train_prompts=6, n_val_prompts=2, n_test_prompts=1, image_size=48)
    demo_data.generate(tmp_path / "a", seed=5, **kwargs)
    demo_data.generate(tmp_path / "b", seed=5, **kwargs)
    demo_data.generate(tmp_path / "c", seed=6, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_labels_follow_model_fidelity(demo_zip):
    """Simulated T2I models with fewer rendering errors get higher scores: labels carry signal."""
    records = json.loads((demo_zip / "train_list.json").read_text())
    by_model = {}
    for r in records:
        by_model.setdefault(r["img_path"].split("/")[0], []).append(np.mean(r["total_score"]))
    means = {m: np.mean(v) for m, v in by_model.items()}
    ordered = sorted(demo_data.T2I_MODELS, key=demo_data.T2I_MODELS.get, reverse=True)  # worst first
    assert [means[m] for m in ordered] == sorted(means[m] for m in ordered)


def test_total_score_tracks_element_hits(demo_zip):
    records = json.loads((demo_zip / "train_list.json").read_text())
    frac = [np.mean([np.mean(v) for v in r["element_score"].values()]) for r in records]
    total = [np.mean(r["total_score"]) for r in records]
    assert np.corrcoef(frac, total)[0, 1] > 0.7


def test_images_of_one_prompt_differ(demo_folder):
    records = json.loads((demo_folder / "train_list.json").read_text())
    pid = records[0]["prompt_id"]
    blobs = {(demo_folder / "images" / r["img_path"]).read_bytes() for r in records if r["prompt_id"] == pid}
    assert len(blobs) == len(demo_data.T2I_MODELS)
