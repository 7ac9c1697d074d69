"""The workflow through Snakemake: a full run on the demo (the session's `workflow` fixture,
conftest.py), then its rerun behaviour."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from wfhelpers import SMALL, planned_jobs, planned_outputs, snakemake, snakemake_command


def test_full_run_produces_metrics_and_submission(workflow):
    wd, _ = workflow
    table = pd.read_csv(wd / "results" / "metrics" / "summary.tsv", sep="\t")
    assert {("prior", "holdout"), ("prior", "val")} <= set(zip(table["predictor"], table["split"]))
    assert table["acc"].between(0, 1).all()
    # the prior predicts one value per prompt type: on a split of one type SRCC is undefined (null)
    val = table[table["predictor"] == "prior"].set_index("split").loc["val"]
    assert 0 < val["final"] < 1 and val["final"] == pytest.approx(val["srcc"] / 4 + val["plcc"] / 4 + val["acc"] / 2, abs=2e-4)
    assert (wd / "results" / "predictions" / "ensemble" / "test" / "submission.zip").is_file()
    assert all((wd / "results" / "logs" / f).is_file() for f in ("demo_data.log", "ingest.log", "metrics_summary.log"))


def test_every_job_leaves_a_log_and_a_benchmark_file(workflow):
    """Snakemake's benchmark file (wall time, memory) beside every job's log: on a cluster they
    give each stage's cost (`imatch cost` charges rates; these are what the jobs took)."""
    wd, _ = workflow
    logs = sorted((wd / "results" / "logs").rglob("*.log"))
    assert len(logs) > 60
    for log in logs:
        bench = wd / "results" / "benchmarks" / log.relative_to(wd / "results" / "logs").with_suffix(".tsv")
        assert bench.is_file(), bench
        row = pd.read_csv(bench, sep="\t").iloc[0]
        assert {"s", "max_rss", "cpu_time"} <= set(row.index), bench
        if log.parent.name in ("train", "score") and not log.name.endswith(".gather.log"):
            assert row["s"] > 1, bench  # training and scoring jobs: swift's start-up alone takes seconds


def test_the_tree_just_made_audits_clean_also_copied_and_damage_is_named(workflow, tmp_path):
    """`imatch audit` reported 18 problems on a fresh tree (79 on a copy): Snakemake's
    .snakemake_timestamp files, folder mtimes, stages writing into another's folder. Now a fresh
    tree and a `cp -a` copy audited from elsewhere report none, and each damage names its file."""
    wd, _ = workflow
    env = {**os.environ, "PYTHONPATH": str(wd / "workflow")}
    audit = [sys.executable, "-m", "imatch", "audit"]
    proc = subprocess.run([*audit, "results"], cwd=wd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and '"problems": 0' in proc.stdout, proc.stdout[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["records"] > 100
    copy = tmp_path / "scratch" / "results"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(wd / "results"), str(copy)], check=True)
    samples = pd.read_parquet(copy / "data" / "samples.parquet")
    samples.loc[0, "total_score"] = 5.0 if samples.loc[0, "total_score"] != 5.0 else 1.0  # an edited parquet
    samples.to_parquet(copy / "data" / "samples.parquet")
    model = copy / "models" / "tiny-ovis2" / "overall-r2"
    gone = next(n for n in ("adapter_model.safetensors", "model.safetensors") if (model / n).is_file())
    (model / gone).unlink()  # a deleted model file
    jsonl = sorted(copy.glob("instructions/*/train-*.jsonl"))[0]
    jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:3]))  # a truncated jsonl
    proc = subprocess.run([*audit, str(copy)], cwd=tmp_path, capture_output=True, text=True, env=env)
    lines = proc.stdout.splitlines()[:-1]
    assert proc.returncode == 1 and sorted(lines) == sorted([
        f"{copy}/data/samples.parquet: artifact changed since it was made",
        f"{model}/{gone}: missing",
        f"{jsonl}: artifact changed since it was made",
    ]), proc.stdout[-3000:]


def test_all_three_architectures_train_and_score(workflow):
    """Every model of the default (LoRA on the shipped pretrained backbones) moved every adapter of
    the LLM and of the vision tower off its zero start, and its answers depend on the image."""
    from safetensors.torch import load_file

    wd, _ = workflow
    for name, arch in [("tiny-internvl", "internvl"), ("tiny-qwen2_5_vl", "qwen2_5_vl"), ("tiny-ovis2", "ovis2")]:
        for task in ("overall", "element"):
            for round_ in ("r1", "r2"):
                model = wd / "results" / "models" / name / f"{task}-{round_}"
                record = json.loads((model / "training.json").read_text())
                assert record["arch"] == arch and record["global_step"] == 2 and record["loss_curve"]
                adapters = load_file(model / "adapter_model.safetensors")
                moved = {k for k, v in adapters.items() if "lora_B" in k and v.abs().max() > 0}
                assert moved == {k for k in adapters if "lora_B" in k}, (model, len(moved))
                assert any("language_model" in k for k in moved) and any("vision_tower" in k or "visual" in k for k in moved)
            # what the configured predictors need: round 1 labels val; round 2 is evaluated on
            # holdout and val (also with grey images: blank-ensemble) and submits test
            views = {"r1": {("val", "seen")},
                     "r2": {("holdout", "seen"), ("val", "seen"), ("test", "seen"), ("holdout", "blank"), ("val", "blank")}}
            for round_, wanted in views.items():
                scores = pd.read_parquet(wd / "results" / "scores" / name / f"{task}-{round_}" / "scores.parquet")
                assert set(zip(scores["split"], scores["view"])) == wanted
                assert not scores.duplicated(["view", "id"]).any()
                assert np.allclose(np.stack(scores["probs"]).sum(axis=1), 1, atol=1e-5)
            scores = pd.read_parquet(wd / "results" / "scores" / name / f"{task}-r2" / "scores.parquet")
            holdout = scores[scores["split"] == "holdout"].set_index(["view", "id"])["expected_level"]
            assert not np.allclose(holdout["seen"].sort_index(), holdout["blank"].sort_index(), atol=1e-6)
    levels = pd.read_parquet(wd / "results" / "element_levels" / "r2.parquet")
    assert levels["level"].between(1, 7).all()


def test_round_two_trains_on_train_plus_pseudo_labelled_val(workflow):
    wd, _ = workflow
    samples = pd.read_parquet(wd / "results" / "data" / "samples.parquet")
    pseudo = pd.read_parquet(wd / "results" / "pseudo" / "r1" / "samples.parquet")
    assert len(pseudo) == (samples["split"] == "val").sum() and (pseudo["split"] == "val").all()
    for task in ("overall", "element"):
        r1 = json.loads((wd / "results" / "models" / "tiny-ovis2" / f"{task}-r1" / "training.json").read_text())
        r2 = json.loads((wd / "results" / "models" / "tiny-ovis2" / f"{task}-r2" / "training.json").read_text())
        assert len(r1["dataset"]) == 1 and len(r2["dataset"]) == 2 and "val.pseudo-r1" in r2["dataset"][1]
        assert r2["dataset_rows"] > r1["dataset_rows"]


def test_ensemble_controls_submission_and_report(workflow):
    wd, _ = workflow
    table = pd.read_csv(wd / "results" / "metrics" / "summary.tsv", sep="\t")
    assert set(table["predictor"]) == {"prior", "text", "ensemble", "blank-ensemble"}
    ens = pd.read_parquet(wd / "results" / "predictions" / "ensemble" / "test" / "predictions.parquet")
    samples = pd.read_parquet(wd / "results" / "data" / "samples.parquet")
    assert sorted(ens["img_path"]) == sorted(samples.loc[samples["split"] == "test", "img_path"])
    assert (wd / "results" / "predictions" / "ensemble" / "test" / "submission.zip").is_file()
    for name in ("scatter_holdout.png", "scatter_val.png", "categories_val.png", "training_curves.png"):
        assert (wd / "results" / "report" / name).stat().st_size > 1000


def test_the_exported_ensemble_scores_like_the_workflow_from_anywhere(workflow, tmp_path, monkeypatch):
    """The bundle the workflow exports, copied elsewhere and read from another working directory
    (the API, the CLI, and the CLI on the results folder in place) gives the workflow's own test
    predictions for the same queries: totals and element levels within float32 noise, every hit.
    Before: `imatch score` read the query settings from relative dataset paths and silently
    scored without them when run from elsewhere (3.6219 vs 3.5836 for one image)."""
    wd, _ = workflow
    bundle = tmp_path / "copied" / "ens"
    shutil.copytree(wd / "results" / "bundle", bundle)  # moved to another machine, in effect
    described = json.loads((bundle / "bundle.json").read_text())
    members = sorted(f"{b}/{t}-r2" for b in ("tiny-internvl", "tiny-qwen2_5_vl", "tiny-ovis2") for t in ("overall", "element"))
    assert sorted(described["models"]) == members
    # its provenance names the six models and the three LoRA bases it copied, not the whole results folder
    record = json.loads((wd / "results" / "bundle.prov.json").read_text())
    bases = [f"backbones/{b}" for b in ("tiny-internvl", "tiny-qwen2_5_vl", "tiny-ovis2")]
    assert sorted(Path(i["absolute"]).relative_to(wd / "results").as_posix() for i in record["inputs"]) == sorted(
        [f"models/{m}" for m in members] + bases)
    samples = pd.read_parquet(wd / "results" / "data" / "samples.parquet")
    elements = pd.read_parquet(wd / "results" / "data" / "elements.parquet")
    test = samples[samples["split"] == "test"].reset_index(drop=True)
    keys = [elements.loc[elements["img_path"] == p, "element"].tolist() for p in test["img_path"]]
    metadata = {f: [None if pd.isna(v) else float(v) for v in test[f]]
                for f in ("prompt_meaningless", "split_confidence", "attribute_confidence")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from imatch import Scorer

    api = Scorer(bundle, device="auto")(images=list(test["image"]), prompts=list(test["prompt"]), elements=keys,
                                         prompt_types=list(test["prompt_type"]), metadata=metadata)
    pred = pd.read_parquet(wd / "results" / "predictions" / "ensemble" / "test" / "predictions.parquet").set_index("img_path")
    assert np.allclose(api["total_score"], pred.loc[test["img_path"], "total_score"], atol=1e-5, rtol=0)
    epred = pd.read_parquet(wd / "results" / "predictions" / "ensemble" / "test" / "element_predictions.parquet")
    mine = pd.DataFrame([{"img_path": p, **e} for p, row in zip(test["img_path"], api["elements"]) for e in row])
    joined = epred.merge(mine, on=["img_path", "element"], validate="one_to_one", suffixes=("", "_api"))
    assert len(joined) == len(epred) == len(mine) > 0
    assert np.allclose(joined["expected_level"], joined["expected_level_api"], atol=1e-5, rtol=0)
    assert (joined["score"].astype(bool) == joined["hit"]).all()

    # the CLI: a CSV with the user's own columns, images in a folder, into an --out with a stale file
    images = elsewhere / "imgs"
    images.mkdir()
    for i, path in enumerate(test["image"]):
        shutil.copy(path, images / f"gen{i}.png")
    table = pd.DataFrame({"image": [f"gen{i}.png" for i in range(len(test))], "prompt": test["prompt"],
                          "elements": ["; ".join(k) for k in keys], "prompt_type": test["prompt_type"],
                          **{f: v for f, v in metadata.items()}, "seed": range(len(test), 0, -1)})
    table.to_csv(elsewhere / "prompts.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(wd / "workflow")}
    for source, out in ((bundle, elsewhere / "out"), (wd / "results", elsewhere / "out-results")):
        out.mkdir()
        (out / "element_levels.parquet").write_text("stale")  # a file of an earlier run
        proc = subprocess.run([sys.executable, "-m", "imatch", "score", "--images", "imgs", "--prompts", "prompts.csv",
                               "--models", str(source), "--out", out.name], capture_output=True, text=True,
                              cwd=elsewhere, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "[INFO:swift]" not in proc.stderr and "FutureWarning" not in proc.stderr  # quiet by default
        assert sorted(p.name for p in out.iterdir()) == ["elements.csv", "scores.csv", "summary.html"]
        scores = pd.read_csv(out / "scores.csv")
        assert list(scores["seed"]) == list(table["seed"]) and list(scores["image"]) == list(table["image"])
        assert np.allclose(scores["total_score"], api["total_score"], atol=1e-6, rtol=0), source
        els = pd.read_csv(out / "elements.csv")
        assert len(els) == len(mine) and (els["hit"].to_numpy() == mine["hit"].to_numpy()).all()
        assert list(els["element"]) == [k for ks in keys for k in ks]  # the caller's order, not sorted
        page = (out / "summary.html").read_text()
        assert "gen0.png" in page and "data:image/jpeg;base64," in page and "file://" not in page
    assert not list(images.parent.glob("imgs.prov.json"))  # nothing written beside the user's images


def test_second_run_has_nothing_to_do(workflow):
    wd, small = workflow
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()


def test_changed_param_reruns_only_what_depends_on_it(workflow, tmp_path):
    wd, small = workflow
    changed = tmp_path / "seed.yaml"
    changed.write_text(yaml.safe_dump({**SMALL, "ingest": {"holdout_fraction": 0.25, "seed": 5}}))
    jobs = planned_jobs(snakemake(wd, "-n", configs=[changed]))
    assert "ingest" in jobs and "evaluate" in jobs and "demo_data" not in jobs


def test_changed_demo_size_regenerates_data(workflow, tmp_path):
    wd, _ = workflow
    changed = tmp_path / "size.yaml"
    changed.write_text(yaml.safe_dump({"demo": {**SMALL["demo"], "image_size": 80}}))
    assert {"demo_data", "ingest"} <= planned_jobs(snakemake(wd, "-n", configs=[changed]))


def test_instruction_sets_are_built(workflow):
    wd, _ = workflow
    sets = sorted(p.relative_to(wd / "results" / "instructions").as_posix()
                  for p in (wd / "results" / "instructions").rglob("*.jsonl"))
    overall = [s for s in sets if s.startswith("overall-")]
    element = [s for s in sets if s.startswith("element-")]
    # overall sets of evaluated splits state element levels predicted by the element models
    # (element augmentation is on by default); there is no overall set without them
    assert sum(s.split("/")[1].startswith("train-") for s in overall) == 1
    assert all(".levels-r" in s or ".pseudo-r" in s for s in overall if not s.split("/")[1].startswith("train-"))
    assert {s.split("/")[1] for s in overall if ".levels-r" in s} == {
        "val.levels-r1.jsonl", "holdout.levels-r2.jsonl", "val.levels-r2.jsonl", "test.levels-r2.jsonl",
        "holdout.levels-r2-blank.jsonl", "val.levels-r2-blank.jsonl"}
    # round 2 trains on val pseudo-labelled by round 1, in both tasks
    assert sum(s.endswith("/val.pseudo-r1.jsonl") for s in sets) == 2
    assert sorted(s.split("/")[1].split("-")[0].removesuffix(".jsonl") for s in element) == [
        "holdout", "test", "train", "val", "val.pseudo"]


def test_flipping_a_switch_rebuilds_only_what_depends_on_it(workflow, tmp_path):
    wd, small = workflow
    off = tmp_path / "noaug.yaml"
    off.write_text(yaml.safe_dump({**SMALL, "instructions": {"overall": {"image_augmentation": False}}}))
    outputs = planned_outputs(snakemake(wd, "-n", configs=[off]))
    sets = {o.split("/instructions/")[1] for o in outputs if "/instructions/" in o and o.endswith(".parquet")}
    # the overall training set; val pseudo-labelled by the round-1 ensemble (whose overall part
    # changed) in both tasks; round-2 overall sets, whose element levels come from the retrained
    # round-2 element models. Nothing else: no element training set, no round-1 levels.
    assert sum(s.startswith("overall-") and "/train-" in s for s in sets) == 1
    assert not any(s.startswith("element-") and "/train-" in s for s in sets)
    assert {s.split("/")[1] for s in sets if "pseudo" in s} == {"val.pseudo-r1.parquet"}
    assert not any("levels-r1" in s for s in sets)
    models = [o for o in outputs if "/models/" in o]
    assert sorted(o.rsplit("/", 1)[1] for o in models) == sorted(["overall-r1", "overall-r2", "element-r2"] * 3)
    assert {o.split("/element_levels/")[1] for o in outputs if "/element_levels/" in o} == {"r2.parquet", "r2-blank.parquet"}
    assert not any("/augment/" in o or "/data/" in o or "/backbones/" in o for o in outputs)
    typed = tmp_path / "notype.yaml"
    typed.write_text(yaml.safe_dump({**SMALL, "instructions": {"element": {"prompt_type": False}}}))
    outputs = planned_outputs(snakemake(wd, "-n", configs=[typed]))
    sets = [o for o in outputs if "/instructions/" in o and "/train-" in o]
    assert sets and all("/instructions/element-" in o for o in sets)  # the overall training set is kept
    assert not any("/augment/" in o or "/data/" in o for o in outputs)
    # flipping back is the configuration that was built: nothing to do
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()


def test_adding_a_backbone_trains_only_the_new_one(workflow, tmp_path):
    """With the pseudo-label and element-level sources pinned, the existing models are kept."""
    wd, _ = workflow
    base = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    names = [b["name"] for b in base["backbones"]]
    pinned = {**SMALL, "pseudo_labels": {"from": names}, "element_levels": {"from": names},
              "ensemble": {"overall": names, "element": names, "weights": "mean"}}
    before = tmp_path / "pinned.yaml"
    before.write_text(yaml.safe_dump(pinned))
    assert planned_jobs(snakemake(wd, "-n", configs=[before])) == set()  # pinning changes nothing
    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump({**pinned, "backbones": base["backbones"] + [
        {"name": "tiny-internvl-b", "arch": "internvl", "source": "tiny", "seed": 1}]}))
    models = [o for o in planned_outputs(snakemake(wd, "-n", configs=[more])) if "/models/" in o]
    assert models and all("/models/tiny-internvl-b/" in o for o in models)


def test_changing_one_learning_rate_retrains_that_backbone_first(workflow, tmp_path):
    wd, _ = workflow
    base = yaml.safe_load((wd / "config" / "config.yaml").read_text())
    assert base["train"]["learning_rate"] != 2e-3
    backbones = [dict(b, recipe={"learning_rate": 2e-3}) if b["name"] == "tiny-ovis2" else b for b in base["backbones"]]
    changed = tmp_path / "lr.yaml"
    changed.write_text(yaml.safe_dump({**SMALL, "backbones": backbones}))
    proc = snakemake(wd, "-n", "-p", configs=[changed])
    models = [o for o in planned_outputs(proc) if "/models/" in o]
    round1 = [o for o in models if o.endswith("-r1")]
    assert sorted(round1) == sorted(o for o in round1 if "/tiny-ovis2/" in o) and len(round1) == 2
    # round 2 of the others retrains too, since the pseudo labels come from every round-1 model;
    # the new rate reaches the training commands of tiny-ovis2 and of no other backbone
    lines = [line.strip().removeprefix("Shell command:").strip() for line in (proc.stdout + proc.stderr).splitlines()]
    commands = [c for c in lines if c.startswith("imatch train ")]
    ovis2 = [c for c in commands if "/models/tiny-ovis2/" in c]
    assert len(ovis2) == 4 and all("--learning-rate 0.002 " in c for c in ovis2)
    others = [c for c in commands if c not in ovis2]
    assert others and all(f"--learning-rate {base['train']['learning_rate']} " in c for c in others)


def test_ablation_rows_train_shared_variants_once_and_fill_the_tables(workflow, tmp_path):
    """Table 4 rows that differ only in the QAlign read-out share one model; Table 5 rows train
    element variants through the same rules; both tables come out with the judge's metrics."""
    wd, small = workflow
    rows = {"split": "holdout", "backbones": ["tiny-internvl"],
            "overall": [{"qalign": q, "validation": False, "element_levels": False, "image_augmentation": False}
                        for q in (False, True)],
            "element": [{"prompt_type": False, "score_perturbation": False}]}
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(yaml.safe_dump({**SMALL, "ablation": rows}))
    outputs = planned_outputs(snakemake(wd, "-n", configs=[ablation]))
    trained = sorted(o.rsplit("/", 1)[1] for o in outputs if "/ablation/models/" in o)
    assert len(trained) == 2 and trained[0].startswith("element-") and trained[0].endswith("-r2")
    assert trained[1].startswith("overall-") and trained[1].endswith("-r1")
    assert not any("/models/" in o and "/ablation/" not in o for o in outputs)  # the main models are kept
    snakemake(wd, configs=[ablation])
    overall = pd.read_csv(wd / "results" / "ablation" / "table_overall.tsv", sep="\t")
    assert list(overall["qalign"]) == [False, True] and {"tiny-internvl srcc", "tiny-internvl plcc"} <= set(overall)
    element = pd.read_csv(wd / "results" / "ablation" / "table_element.tsv", sep="\t")
    assert element["tiny-internvl acc"].between(0, 1).all()
    # one cell recomputed from the row's score table: SRCC (scipy) of the expected level, the
    # row without QAlign from the most likely letter
    from scipy.stats import spearmanr

    from imatch import levels

    (scores,) = (wd / "results" / "ablation" / "scores" / "tiny-internvl").glob("overall-*-r1/scores.parquet")
    samples = pd.read_parquet(wd / "results" / "data" / "samples.parquet")
    truth = samples[samples["split"] == "holdout"].set_index("img_path")["total_score"]
    seen = pd.read_parquet(scores).query("view == 'seen' and split == 'holdout'").set_index("img_path").loc[truth.index]
    for qalign, column in ((True, "expected_level"), (False, "argmax_level")):
        srcc = spearmanr(truth.to_numpy(), levels.level_to_total(seen[column].to_numpy(dtype=float)))[0]
        assert overall.set_index("qalign").loc[qalign, "tiny-internvl srcc"] == pytest.approx(srcc, abs=1e-4, nan_ok=True)
    effects = pd.read_csv(wd / "results" / "ablation" / "effects_overall.tsv", sep="\t")
    qalign = effects[(effects["component"] == "qalign") & (effects["metric"] == "srcc")].iloc[0]
    # nan when the 2-step model's most likely letter is one constant (no SRCC): then both are nan
    assert qalign["effect"] == pytest.approx(overall["tiny-internvl srcc"].diff().iloc[1], abs=2e-4, nan_ok=True)
    verdict = "undefined" if np.isnan(qalign["effect"]) else "one seed"
    assert (qalign["from"], qalign["to"], qalign["verdict"]) == ("base", "qalign", verdict)
    assert planned_jobs(snakemake(wd, "-n", configs=[ablation])) == set()


def test_ablation_seeds_train_one_model_per_seed_and_the_table_is_their_mean(workflow, tmp_path):
    """`ablation.seeds: [0, 1]`: the row's model is trained once per seed, with that seed (ms-swift's
    own record of its arguments), the two models score differently, and the table's SRCC is the
    mean of the two models' SRCCs against the holdout's total scores, recomputed here from their
    score tables with scipy; `sd` their sample standard deviation."""
    from scipy.stats import spearmanr

    from imatch import levels

    wd, small = workflow
    row = {"qalign": True, "validation": False, "element_levels": False, "image_augmentation": False}
    rows = {"split": "holdout", "backbones": ["tiny-internvl"], "overall": [row], "element": [], "seeds": [0, 1]}
    ablation = tmp_path / "seeds.yaml"
    ablation.write_text(yaml.safe_dump({**SMALL, "ablation": rows}))
    snakemake(wd, configs=[ablation])
    models = sorted((wd / "results" / "ablation" / "models" / "tiny-internvl").glob("overall-*.seed*-r1"))
    assert [m.name.rsplit(".", 1)[1] for m in models] == ["seed0-r1", "seed1-r1"]
    srcc = []
    samples = pd.read_parquet(wd / "results" / "data" / "samples.parquet")
    truth = samples[samples["split"] == "holdout"].set_index("img_path")["total_score"]
    expected = []
    for seed, model in enumerate(models):
        assert json.loads((model / "training.json").read_text())["swift_args"]["seed"] == seed
        scores = pd.read_parquet(wd / "results" / "ablation" / "scores" / "tiny-internvl" / model.name / "scores.parquet")
        seen = scores[(scores["view"] == "seen") & (scores["split"] == "holdout")].set_index("img_path")
        expected.append(seen.loc[truth.index, "expected_level"].to_numpy())
        srcc.append(spearmanr(truth.to_numpy(), levels.level_to_total(expected[-1]))[0])
    assert not np.allclose(expected[0], expected[1])  # the seed changed the model
    table = pd.read_csv(wd / "results" / "ablation" / "table_overall.tsv", sep="\t")
    assert len(table) == 1 and str(table.loc[0, "seeds"]) == "0 1"
    assert table.loc[0, "tiny-internvl srcc"] == pytest.approx(np.mean(srcc), abs=1e-4)  # the TSV keeps 4 decimals
    assert table.loc[0, "tiny-internvl srcc sd"] == pytest.approx(np.std(srcc, ddof=1), abs=1e-4)


def test_lint_is_clean(workflow):
    wd, small = workflow
    out = snakemake(wd, "--lint", configs=[small])
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_real_configuration_dry_runs(workflow):
    wd, _ = workflow
    proc = snakemake(wd, "-n", "-p", configs=[wd / "config" / "evalmuse.yaml"])
    jobs = planned_jobs(proc)
    assert {"download", "ingest", "evaluate", "submission"} <= jobs and "demo_data" not in jobs
    # five overall models and the paper's four element models (Ovis2-34B: tasks [overall]), two rounds each
    models = [o for o in planned_outputs(proc) if "/models/" in o]
    assert len(models) == 18 and not any("/ovis2-34b/element-" in m for m in models)
    combine = next(line for line in (proc.stdout + proc.stderr).splitlines()
                   if "imatch combine" in line and "predictions/ensemble/val/" in line)
    overall, element = combine.split("--overall ")[1].split(" --element ")
    assert overall.count("/overall-r2/scores.parquet") == 5
    assert element.split(" --")[0].count("/element-r2/scores.parquet") == 4
    # nothing of the CPU demo's recipe leaks into the real one (config.yaml is loaded first)
    lines = (proc.stdout + proc.stderr).splitlines()
    train = [line for line in lines if "imatch train " in line]
    assert len(train) == 18 and all(" --max-steps 0 " in t and " --varlen " in t for t in train)
    small = ("/qwen2_5-vl-7b/", "/internvl2_5-8b-mpo/", "/ovis2-8b/")  # measured to fit 80 GB without it
    assert all(("--no-gradient-checkpointing" in t) == any(b in t for b in small) for t in train)
    assert all(" --share-prefix " in t for t in train)  # packs element sets only (one query per image otherwise)
    scoring = [line for line in lines if "imatch score-set " in line]
    assert scoring and all(" --compile " in s and " --workers 8 " in s and "--batch-size 64" in s for s in scoring)
    assert all(" --share-prefix " in s for s in scoring)
    pseudo = next(line for line in lines if "imatch combine" in line and "predictions/ensemble-r1/val/" in line)
    overall, element = pseudo.split("--overall ")[1].split(" --element ")
    assert overall.count("/overall-r1/scores.parquet") == 5 and element.split(" --")[0].count("/element-r1/") == 4
    # the image budget of each backbone (docs/fidelity.md), the same in training and scoring
    tiles = {"/internvl2_5-8b-mpo/": "--max-tiles 12", "/ovis2-": "--max-tiles 9", "/qwen2_5-vl-7b/": None}
    for line in train + scoring:
        flag = next(v for k, v in tiles.items() if k in line)
        assert (" --max-tiles " in line) == (flag is not None) and (flag is None or f" {flag} " in line), line


def test_a_backbone_can_train_on_several_gpus_in_one_job(workflow, tmp_path):
    """Per-backbone GPUs reach the cluster request (gpu, cpus_per_gpu) and the stage (--gpus)."""
    wd, _ = workflow
    real = yaml.safe_load((wd / "config" / "evalmuse.yaml").read_text())
    real["backbones"][-1]["gpus"] = 2  # ovis2-34b
    overlay = tmp_path / "two.yaml"
    overlay.write_text(yaml.safe_dump({"backbones": real["backbones"], "resources": {"threads": 8}}))
    # (locally threads are capped at --cores; a cluster job gets what it asks for)
    text = snakemake(wd, "-n", "-p", "--cores", "16", configs=[wd / "config" / "evalmuse.yaml", overlay]).stdout
    jobs = [block for block in text.split("\n\n") if "rule train:" in block]
    big = [b for b in jobs if "models/ovis2-34b/" in b]
    assert len(big) == 2 and all("gpu=2" in b and "cpus_per_gpu=4" in b and "--gpus 2" in b for b in big)
    assert all("/ovis2-34b/overall-" in b for b in big)  # tasks: [overall] (Fig. 6: four element models)
    assert all("gpu=1" in b and "cpus_per_gpu=8" in b and "--gpus 1" in b for b in jobs if b not in big)


def test_report_builds(workflow, tmp_path):
    wd, small = workflow
    snakemake(wd, "--report", str(tmp_path / "report.zip"), configs=[small])
    import zipfile

    with zipfile.ZipFile(tmp_path / "report.zip") as report:
        names = report.namelist()
        # the metrics table is a page in the report, not only a download
        page = next(n for n in names if n.endswith("/summary.html"))
        text = report.read(page).decode()
    table = pd.read_csv(wd / "results" / "metrics" / "summary.tsv", sep="\t")
    assert "<table" in text and f"{table['final'].dropna().iloc[0]:.4f}" in text


def test_code_change_reruns_only_that_stage_and_downstream(workflow):
    """Runs last: edits the copy's evaluate module, then brings the results up to date again."""
    wd, small = workflow
    module = wd / "workflow" / "imatch" / "evaluate.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    jobs = planned_jobs(snakemake(wd, "-n", configs=[small]))
    # the figures use the judge's hit threshold (imatch.plots imports imatch.evaluate)
    assert jobs == {"evaluate", "metrics_summary", "plot_scatter", "plot_categories", "plot_curves", "all"}
    snakemake(wd, configs=[small])
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()


def test_a_killed_run_resumes_with_rerun_incomplete_and_ends_like_an_uninterrupted_one(workflow, tmp_path):
    """A copy of the finished run loses one model's two score shards and their gathered table, and
    Snakemake remakes that table one job at a time; the whole Snakemake process group is SIGKILLed
    (a lost login node) once one shard is written and the other's job has started. After
    `--unlock`, `--rerun-incomplete` redoes only the unfinished shard, and every artifact equals the
    uninterrupted run's, with nothing left to do."""
    from imatch.reproducibility import compare

    wd, _ = workflow
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy, symlinks=True)
    small = copy / "small.yaml"
    folder = "results/scores/tiny-internvl/overall-r2"
    target = f"{folder}/scores.parquet"
    shards = [copy / folder / "shards" / f"{k}.parquet" for k in (0, 1)]
    logs = [copy / f"results/logs/score/tiny-internvl_overall-r2.{k}.log" for k in (0, 1)]
    for path in (*shards, copy / target):
        path.unlink()
    old_logs = [p.stat().st_mtime_ns for p in logs]
    log = tmp_path / "killed-run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(snakemake_command(copy, target, configs=[small], cores=1), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def mtime(path):  # None while Snakemake has removed the log to prepare the job
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def started():  # score jobs whose log Snakemake removed or the shell opened in this run
        return [k for k in (0, 1) if mtime(logs[k]) != old_logs[k]]

    deadline = time.time() + 600
    while not (len(started()) == 2 and sum(p.exists() for p in shards) == 1):
        assert proc.poll() is None and time.time() < deadline, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and the job it runs
    proc.wait()
    done = 0 if shards[0].exists() else 1
    killed = 1 - done
    assert not shards[killed].exists()  # atomic writes: the killed job left nothing that looks complete
    done_at = shards[done].stat().st_mtime_ns

    # the killed Snakemake left its lock: a new run refuses to start until it is removed
    assert any((copy / ".snakemake" / "locks").iterdir())
    assert "cannot be locked" in snakemake(copy, target, "--rerun-incomplete", configs=[small], check=False).stderr
    snakemake(copy, "--unlock", configs=[small])
    outputs = planned_outputs(snakemake(copy, target, "-n", "--rerun-incomplete", configs=[small]))
    rel = [str(p.relative_to(copy)) for p in shards]
    assert rel[killed] in outputs and rel[done] not in outputs and target in outputs
    snakemake(copy, target, "--rerun-incomplete", configs=[small])
    assert shards[done].stat().st_mtime_ns == done_at  # the finished shard was not scored again
    table = compare(wd / "results", copy / "results")
    assert len(table) > 50 and table[table["status"] != "identical"].empty, table[table["status"] != "identical"]
    # the remade table has the same content: nothing downstream needs to run again
    assert planned_jobs(snakemake(copy, "-n", configs=[small])) == set()


def test_the_ensemble_predicts_every_image_and_element_key_once(workflow):
    wd, _ = workflow
    results = wd / "results"
    samples, elements = pd.read_parquet(results / "data" / "samples.parquet"), pd.read_parquet(results / "data" / "elements.parquet")
    splits = sorted(p.name for p in (results / "predictions" / "ensemble").iterdir() if p.is_dir())
    assert splits == ["holdout", "test", "val"]
    for split in splits:
        images = samples.loc[samples["split"] == split, "img_path"]
        keys = elements[elements["img_path"].isin(images)][["img_path", "element"]]
        pred = pd.read_parquet(results / "predictions" / "ensemble" / split / "predictions.parquet")
        pred_el = pd.read_parquet(results / "predictions" / "ensemble" / split / "element_predictions.parquet")
        assert pred["img_path"].is_unique and sorted(pred["img_path"]) == sorted(images)
        assert not pred_el.duplicated(["img_path", "element"]).any()
        assert sorted(map(tuple, pred_el[["img_path", "element"]].values)) == sorted(map(tuple, keys.values))
        assert pred["total_score"].notna().all() and pred_el["score"].notna().all()


def test_a_finished_tree_does_not_hide_config_errors(workflow, tmp_path):
    """On a finished results tree a wrong name planned nothing and exited 0; now Snakemake stops
    while parsing the config, naming the key. Values reaching a shell are quoted."""
    wd, small = workflow
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()  # finished
    for overlay, key in (({"ensemble": {"overall": ["tiny-ovis3"], "element": [], "weights": "mean"}}, "ensemble.overall"),
                         ({"submission": {"predictor": "ensembel"}}, "submission.predictor"),
                         ({"data": {"eval_json": "nowhere.json"}}, "data.eval_json")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(overlay))
        proc = snakemake(wd, "-n", configs=[small, bad], check=False)
        assert proc.returncode != 0 and f"config: {key}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # a read-only log folder: Snakemake deleted the previous submission.zip, then the job failed to
    # write its log; now refused at parse time (as root, permission bits bind only without the capability)
    target = wd / "results" / "predictions" / "ensemble" / "test" / "submission.zip"
    before, logs = target.read_bytes(), wd / "results" / "logs" / "submission"
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    logs.chmod(0o555)
    try:
        proc = subprocess.run([*(drop if os.geteuid() == 0 else []),
                               *snakemake_command(wd, "-f", str(target.relative_to(wd)), configs=[small])],
                              capture_output=True, text=True)
    finally:
        logs.chmod(0o755)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"log folder {logs} is not writable" in text, text[-3000:]
    assert target.read_bytes() == before
    backbones = yaml.safe_load((wd / "config" / "config.yaml").read_text())["backbones"]
    backbones[0]["recipe"] = {"lr_scheduler": "cosine; touch pwned"}
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text(yaml.safe_dump({"backbones": backbones}))
    text = snakemake(wd, "-n", "-p", configs=[small, quoted]).stdout
    assert "--lr-scheduler 'cosine; touch pwned'" in text and "--lr-scheduler cosine; touch" not in text


def test_jobs_keep_the_users_pythonpath_behind_the_package(tmp_path):
    """A user whose packages come from PYTHONPATH (a cluster module, a `pip install --target` folder)
    runs the workflow with it: the jobs put the checkout's package first and keep the rest. (The
    rules once replaced PYTHONPATH: on a GPU machine with ms-swift installed that way, every
    training job failed with "No module named 'swift'".) A sitecustomize.py on that PYTHONPATH
    records every Python process that sees it."""
    from wfhelpers import copy_workflow

    workdir, small = copy_workflow(tmp_path / "wf")
    site = tmp_path / "site"
    site.mkdir()
    seen = tmp_path / "seen.txt"
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"open({str(seen)!r}, 'a').write(' '.join(sys.orig_argv) + '\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = snakemake_command(workdir, "--until", "demo_data", "--config", f"results={tmp_path / 'results'}",
                            configs=[small])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = [line for line in seen.read_text().splitlines() if "-m imatch demo-data" in line]
    assert len(job) == 1, seen.read_text()


def test_a_pretrained_backbone_is_the_shipped_file_unpacked_and_checked(tmp_path):
    """`source: pretrained`: the backbone job restores the packed file named by the backbone (or
    pretrained/tiny-<arch>.zip) byte for byte; a file that differs from the folder's manifest
    stops the job with its name, and a missing one is refused before anything runs."""
    from wfhelpers import copy_workflow

    from imatch import backbone, integrity

    workdir, small = copy_workflow(tmp_path / "wf")
    built = tmp_path / "built"
    backbone.tiny_backbone("internvl", built, size="tiny", seed=5)
    ship = workdir / "shipped"
    ship.mkdir()
    backbone.pack(built, ship / "iv.zip")
    integrity.seal(ship)
    config = tmp_path / "pretrained.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "backbones": [
        {"name": "iv-pre", "arch": "internvl", "source": "pretrained", "checkpoint": "shipped/iv.zip"}],
        "evaluate": {"splits": ["holdout"], "predictors": ["prior", "iv-pre"]}}))
    out = tmp_path / "results" / "backbones" / "iv-pre"
    snakemake(workdir, str(out), configs=[small, config])
    unpacked = sorted(p.name for p in out.iterdir() if p.name != ".snakemake_timestamp")  # Snakemake's own
    assert unpacked == sorted(p.name for p in built.iterdir())
    for f in built.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name

    # damaged after sealing: the job fails naming the file, and leaves no backbone folder
    shutil.rmtree(out)
    data = (ship / "iv.zip").read_bytes()
    (ship / "iv.zip").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    proc = snakemake(workdir, str(out), configs=[small, config], check=False)
    assert proc.returncode != 0 and not out.exists()
    log = (tmp_path / "results" / "logs" / "backbones" / "iv-pre.log").read_text()
    assert "shipped/iv.zip" in log and "sha256 differs" in log

    # a missing file: the config check names it before any job starts
    config.write_text(config.read_text().replace("shipped/iv.zip", "shipped/none.zip"))
    proc = snakemake(workdir, "-n", str(out), configs=[small, config], check=False)
    assert proc.returncode != 0 and "shipped/none.zip does not exist" in proc.stdout + proc.stderr


def test_the_default_plans_the_shipped_backbones_and_random_yaml_builds_random_ones(tmp_path):
    """The embedded default: the three backbones come from pretrained/ (no random build) and the
    paper's LoRA recipe in short reaches every training command; config/random.yaml on top of it
    builds the three random backbones and trains them fully, as the default did before issue 19."""
    from wfhelpers import copy_workflow

    def trainings(proc):
        lines = [line.strip().removeprefix("Shell command:").strip() for line in (proc.stdout + proc.stderr).splitlines()]
        return [c for c in lines if c.startswith("imatch train ")]

    workdir, _ = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "-n", "-p", "--forceall")
    jobs = planned_jobs(proc)
    assert "backbone_pretrained" in jobs and "backbone_tiny" not in jobs
    text = proc.stdout + proc.stderr
    for arch in ("internvl", "ovis2", "qwen2_5_vl"):
        assert f"imatch pretrained-backbone --packed pretrained/tiny-{arch}.zip" in text
    lora = trainings(proc)
    assert len(lora) == 12
    assert all("--tuner lora" in t and "--lora-rank 16" in t and "--train-vit" in t and "--grad-accum 2" in t
               and "--max-steps 60" in t for t in lora), lora[0]

    proc = snakemake(workdir, "-n", "-p", "--forceall", configs=[workdir / "config" / "random.yaml"])
    jobs = planned_jobs(proc)
    assert "backbone_tiny" in jobs and "backbone_pretrained" not in jobs
    full = trainings(proc)
    assert len(full) == 12
    assert all("--tuner full" in t and "--learning-rate 0.005" in t and "--max-steps 30" in t and "--grad-accum 1" in t
               for t in full), full[0]
