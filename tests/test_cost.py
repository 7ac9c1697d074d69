"""`imatch cost`: the GPU-hours of the jobs Snakemake plans, from measured rates; the committed
H200 rates are what the committed benchmark results say."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from imatch import cost

REPO = Path(__file__).resolve().parents[1]
RATES = {"gpu": "test card", "archs": {arch: {"train": {"per_second": 10.0}, "train_shared": {"per_second": 20.0},
                                              "score": {"per_second": 100.0}, "score_shared": {"per_second": 200.0}}
                                       for arch in ("internvl", "qwen2_5_vl", "ovis2")}}


def test_the_demo_jobs_are_costed_from_counts_rates_and_the_recipe(tmp_path, imatch):
    """The embedded default: 3 backbones x 2 tasks x 2 rounds trained. With 100 training images
    (10 % augmented copies for the overall task), 2 elements per image and 40 val images (pseudo-
    labelled for round 2), the training work is 110 / 200 answers in round 1, 150 / 280 in round 2,
    each capped at the recipe's 30 steps x 8; element answers at the shared-prefix rate."""
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps(RATES))
    out = tmp_path / "cost.md"
    code, text, err = imatch("cost", "--rates", rates, "--counts", "train=100", "holdout=20", "val=40", "test=10",
                             "--elements-per-image", "2", "--workdir", REPO, "--out", out)
    assert code == 0, err
    jobs = json.loads(out.with_suffix(".json").read_text())
    train = {(j["backbone"], j["task"], j["round"]): j for j in jobs if j["stage"] == "train"}
    backbones = ["tiny-internvl", "tiny-qwen2_5_vl", "tiny-ovis2"]
    assert set(train) == set(itertools.product(backbones, ["overall", "element"], ["r1", "r2"]))
    for b in backbones:
        assert train[(b, "overall", "r1")]["work"] == pytest.approx(110)
        assert train[(b, "element", "r1")]["work"] == pytest.approx(200)
        assert train[(b, "overall", "r2")]["work"] == pytest.approx(150)
        assert train[(b, "element", "r2")]["work"] == pytest.approx(240)  # 280, capped by max_steps 30 x batch 8
        assert train[(b, "overall", "r1")]["hours"] == pytest.approx(110 / 10 / 3600)
        assert train[(b, "element", "r1")]["hours"] == pytest.approx(200 / 20 / 3600)  # share_prefix: on in the demo
    scores = [j for j in jobs if j["stage"] == "score"]
    assert scores and all(j["per_second"] == (200.0 if j["task"] == "element" else 100.0) for j in scores)
    work = {(j["backbone"], j["task"], j["round"]): j["work"] for j in scores}
    for b in backbones:  # round 1 scores val only (pseudo labels); round 2 the evaluated splits, also grey
        assert work[(b, "overall", "r1")] == 40 and work[(b, "element", "r1")] == 80
        assert work[(b, "overall", "r2")] == 20 + 40 + 10 + 20 + 40 and work[(b, "element", "r2")] == 2 * 130
    total = sum(j["hours"] for j in jobs)
    assert f"in all: **{total:.2f} GPU-hours**" in text


def test_a_missing_rate_or_count_is_named(tmp_path, imatch):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"gpu": "x", "archs": {"internvl": RATES["archs"]["internvl"]}}))
    with pytest.raises(SystemExit, match="no measured train_shared rate for (qwen2_5_vl|ovis2)"):
        imatch("cost", "--rates", rates, "--counts", "train=100", "holdout=20", "val=40", "test=10",
               "--elements-per-image", "2", "--workdir", REPO)
    rates.write_text(json.dumps(RATES))
    with pytest.raises(SystemExit, match="no image count for split '(val|holdout|test)'"):
        imatch("cost", "--rates", rates, "--counts", "train=100", "--elements-per-image", "2", "--workdir", REPO)


def test_the_committed_h200_rates_are_the_committed_benchmarks():
    """benchmarks/rates-h200.json is rates_from_bench of the result files it names, in date order."""
    committed = json.loads((REPO / "benchmarks" / "rates-h200.json").read_text())
    sources = sorted({v["source"] for entry in committed["archs"].values() for v in entry.values()})
    files = [REPO / "benchmarks" / "results" / s for s in sources]
    order = ["2026-11-26-h200/score-qwen2_5_vl.json", "2026-11-26-h200/score-internvl-ovis2.json",
             "2026-11-26-h200/train-qwen2_5_vl.json", "2026-11-30-h200-prefix/qwen2_5_vl.json",
             "2026-11-30-h200-prefix/internvl.json", "2026-11-30-h200-prefix/ovis2.json",
             "2026-11-30-h200-prefix/internvl-no-ckpt.json", "2026-11-30-h200-prefix/ovis2-no-ckpt.json"]
    assert set(sources) <= set(order)
    assert cost.rates_from_bench([REPO / "benchmarks" / "results" / f for f in order]) == committed
    assert all(f.is_file() for f in files)
    qwen = committed["archs"]["qwen2_5_vl"]
    assert qwen["train_shared"]["per_second"] > 1.8 * qwen["train"]["per_second"]


def test_the_gpu_check_config_plans_the_real_fast_paths(tmp_path, imatch):
    """config/gpu-check.yaml (the whole workflow on one GPU): two rounds of one real-size random
    backbone, every training and scoring job with the real config's fast paths."""
    out = tmp_path / "cost.md"
    code, text, err = imatch("cost", REPO / "config" / "gpu-check.yaml", "--rates", REPO / "benchmarks" / "rates-h200.json",
                             "--counts", "train=216", "holdout=24", "val=40", "test=20", "--elements-per-image", "4",
                             "--workdir", REPO, "--out", out)
    assert code == 0, err
    jobs = json.loads(out.with_suffix(".json").read_text())
    assert sorted((j["stage"], j["task"], j["round"]) for j in jobs) == sorted(
        itertools.product(["train", "score"], ["overall", "element"], ["r1", "r2"]))
    rates = json.loads((REPO / "benchmarks" / "rates-h200.json").read_text())["archs"]["qwen2_5_vl"]
    for j in jobs:  # no checkpointing, shared element prefixes: the measured rates of those paths
        kind = {"train": "train", "score": "score"}[j["stage"]] + ("_shared" if j["task"] == "element" else "")
        assert j["per_second"] == rates[kind]["per_second"], j


def test_counts_come_from_the_ingested_tables(ingested, tmp_path, imatch):
    """--data: images per split and elements per image of an ingest output, as the tables hold them."""
    import pandas as pd

    samples, elements = ingested
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps(RATES))
    out = tmp_path / "cost.md"
    code, text, err = imatch("cost", "--rates", rates, "--data", samples.parent, "--workdir", REPO, "--out", out)
    assert code == 0, err
    table = pd.read_parquet(samples)
    per_image = len(pd.read_parquet(elements)) / table["img_path"].nunique()
    assert f"{per_image:g} elements per image" in text
    jobs = json.loads(out.with_suffix(".json").read_text())
    r1 = next(j for j in jobs if j["stage"] == "score" and j["task"] == "element" and j["round"] == "r1")
    assert r1["work"] == pytest.approx((table["split"] == "val").sum() * per_image)  # round 1 scores val only
