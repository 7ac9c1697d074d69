"""The workflow through Snakemake: a full run on the demo, then its rerun behaviour."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SMALL = {
    "demo": {"train_prompts": 16, "val_prompts": 5, "test_prompts": 3, "image_size": 64},
    "ingest": {"holdout_fraction": 0.25},
    "train": {"max_steps": 2, "save_steps": 2},  # the three tiny backbones: wiring, not learning
}


def snakemake(workdir: Path, *args: str, configs=(), check=True) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(workdir / "Snakefile"), "-d", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "config" / "config.yaml"), *map(str, configs), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.M)} - {"total"}


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """A copy of the workflow (so code edits stay private) that has run once on a small demo."""
    wd = tmp_path_factory.mktemp("wf")
    for item in ("Snakefile", "workflow", "config", "envs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, wd / item)
    small = wd / "small.yaml"
    small.write_text(yaml.safe_dump(SMALL))
    snakemake(wd, configs=[small])
    return wd, small


def test_full_run_produces_metrics_and_submission(workflow):
    wd, _ = workflow
    table = pd.read_csv(wd / "results" / "metrics" / "summary.tsv", sep="\t")
    assert {("prior", "holdout"), ("prior", "val")} <= set(zip(table["predictor"], table["split"]))
    assert table["acc"].between(0, 1).all()
    # the prior predicts one value per prompt type: on a split of one type SRCC is undefined (null)
    val = table[table["predictor"] == "prior"].set_index("split").loc["val"]
    assert 0 < val["final"] < 1 and val["final"] == pytest.approx(val["srcc"] / 4 + val["plcc"] / 4 + val["acc"] / 2, abs=2e-4)
    assert (wd / "results" / "predictions" / "prior" / "test" / "submission.zip").is_file()
    assert all((wd / "results" / "logs" / f).is_file() for f in ("demo_data.log", "ingest.log", "metrics_summary.log"))


def test_all_three_architectures_train_and_score(workflow):
    wd, _ = workflow
    for name, arch in [("tiny-internvl", "internvl"), ("tiny-qwen2_5_vl", "qwen2_5_vl"), ("tiny-ovis2", "ovis2")]:
        for task in ("overall", "element"):
            record = json.loads((wd / "results" / "models" / name / f"{task}-r1" / "training.json").read_text())
            assert record["arch"] == arch and record["global_step"] == 2 and record["loss_curve"]
            for split in ("holdout", "val"):  # the splits the predictors are evaluated on
                scores = pd.read_parquet(wd / "results" / "scores" / name / f"{task}-r1" / f"{split}.parquet")
                assert len(scores) and np.allclose(np.stack(scores["probs"]).sum(axis=1), 1, atol=1e-5)
    levels = pd.read_parquet(wd / "results" / "element_levels" / "r1" / "val.parquet")
    assert levels["level"].between(1, 7).all()
    table = pd.read_csv(wd / "results" / "metrics" / "summary.tsv", sep="\t")
    assert set(table["predictor"]) == {"prior", "tiny-internvl", "tiny-qwen2_5_vl", "tiny-ovis2"}


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
    assert all(".levels-r" in s for s in overall if not s.split("/")[1].startswith("train-"))
    assert any(s.endswith("/val.levels-r1.jsonl") for s in overall)
    assert sorted(s.split("/")[1].split("-")[0].removesuffix(".jsonl") for s in element) == [
        "holdout", "test", "train", "val"]


def planned_outputs(proc: subprocess.CompletedProcess) -> list[str]:
    return [o for line in re.findall(r"^\s+output: (.+)$", proc.stdout + proc.stderr, re.M) for o in line.split(", ")]


def test_flipping_a_switch_rebuilds_only_what_depends_on_it(workflow, tmp_path):
    wd, small = workflow
    off = tmp_path / "noaug.yaml"
    off.write_text(yaml.safe_dump({**SMALL, "instructions": {"overall": {"image_augmentation": False}}}))
    outputs = planned_outputs(snakemake(wd, "-n", configs=[off]))
    sets = [o for o in outputs if "/instructions/" in o]
    assert sets and all("/instructions/overall-" in o and "/train-" in o for o in sets)  # only the overall training set
    models = [o for o in outputs if "/models/" in o]
    assert len(models) == 3 and all(o.endswith("/overall-r1") for o in models)  # the overall models retrain
    assert not any("/augment/" in o or "/element_levels/" in o or "/data/" in o for o in outputs)
    typed = tmp_path / "notype.yaml"
    typed.write_text(yaml.safe_dump({**SMALL, "instructions": {"element": {"prompt_type": False}}}))
    outputs = planned_outputs(snakemake(wd, "-n", configs=[typed]))
    sets = [o for o in outputs if "/instructions/" in o and "/train-" in o]
    assert sets and all("/instructions/element-" in o for o in sets)  # the overall training set is kept
    assert not any("/augment/" in o or "/data/" in o for o in outputs)
    # flipping back is the configuration that was built: nothing to do
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()


def test_lint_is_clean(workflow):
    wd, small = workflow
    out = snakemake(wd, "--lint", configs=[small])
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_real_configuration_dry_runs(workflow):
    wd, _ = workflow
    jobs = planned_jobs(snakemake(wd, "-n", configs=[wd / "config" / "evalmuse.yaml"]))
    assert {"download", "ingest", "evaluate", "submission"} <= jobs and "demo_data" not in jobs


def test_report_builds(workflow, tmp_path):
    wd, small = workflow
    snakemake(wd, "--report", str(tmp_path / "report.zip"), configs=[small])
    assert (tmp_path / "report.zip").stat().st_size > 0


def test_code_change_reruns_only_that_stage_and_downstream(workflow):
    """Runs last: edits the copy's evaluate module, then brings the results up to date again."""
    wd, small = workflow
    module = wd / "workflow" / "imatch" / "evaluate.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    jobs = planned_jobs(snakemake(wd, "-n", configs=[small]))
    assert jobs == {"evaluate", "metrics_summary", "all"}
    snakemake(wd, configs=[small])
    assert planned_jobs(snakemake(wd, "-n", configs=[small])) == set()
