"""Running the workflow from tests: a private copy, a small configuration, dry-run parsing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
SMALL = {
    "demo": {"train_prompts": 16, "val_prompts": 5, "test_prompts": 3, "image_size": 64},
    "ingest": {"holdout_fraction": 0.25},
    "train": {"max_steps": 2, "save_steps": 2},  # the three tiny backbones: wiring, not learning
    "score": {"batch_size": 32, "dtype": "float32", "device": "cpu", "tau": 3, "shards": 2},
    "evaluate": {"splits": ["holdout", "val"], "predictors": ["prior", "text", "ensemble", "blank-ensemble"]},
}


def copy_workflow(dest: Path) -> tuple[Path, Path]:
    """The workflow's files in `dest` (so code edits stay private) and the small config file."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in ("Snakefile", "workflow", "config", "envs", "pretrained"):
        src = REPO / item
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    small = dest / "small.yaml"
    small.write_text(yaml.safe_dump(SMALL))
    return dest, small


def snakemake_command(workdir: Path, *args: str, configs=(), cores: int = 2) -> list[str]:
    # targets and flags first: --configfile takes every word after it
    return [str(SNAKEMAKE), "-s", str(workdir / "Snakefile"), "-d", str(workdir), "--cores", str(cores), *args,
            "--configfile", str(workdir / "config" / "config.yaml"), *map(str, configs)]


def snakemake(workdir: Path, *args: str, configs=(), check=True) -> subprocess.CompletedProcess:
    cmd = snakemake_command(workdir, *args, configs=configs)
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


def planned_outputs(proc: subprocess.CompletedProcess) -> list[str]:
    return [o for line in re.findall(r"^\s+output: (.+)$", proc.stdout + proc.stderr, re.M) for o in line.split(", ")]
