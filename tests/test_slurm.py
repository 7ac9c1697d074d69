"""The workflow through a real SLURM cluster: a copy of the suite's finished demo tree (the session's
`workflow` fixture, made by a local run) loses the outputs of one training and of the jobs of
every stage kind below it, and Snakemake's SLURM executor remakes them, every job through `sbatch`;
the remade tree must be the local run's, byte for byte. (The local run is the same one the
workflow, kill and audit tests use: no second local run of its own.)

A single-node cluster (munged, slurmctld, slurmd on loopback, no GPUs, no accounting) is started
by .ci/setup_slurm.sh and only the daemons it started are stopped at the end of the test session:
once SLURM is installed, every Snakemake start (the SLURM executor plugin runs `scontrol show
config` when it is imported) waits ~10 s for an absent controller, which made each later
`snakemake` call of the suite 10 s slower. Starting it needs
root and Debian packages (CI: .ci/run runs as root); elsewhere the test is skipped with the
reason, unless IMATCH_REQUIRE_SLURM=1 (set by .ci/run) turns a failed start into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from imatch.reproducibility import compare
from wfhelpers import REPO, planned_jobs, snakemake

SETUP = REPO / ".ci" / "setup_slurm.sh"
CTLD_LOG = Path("/var/log/slurm/slurmctld.log")  # where .ci/setup_slurm.sh points slurmctld
# What the SLURM run remakes: one round-2 training with its two score shards and gathered table
# (GPU stages, one sbatch job each), the holdout ground truth and one baseline (CPU stages, grouped
# into one sbatch job by the profile). Snakemake then remakes what reads them: the model predictors,
# evaluation, submission, export and the report's plots. Nothing here is read by round 1 or by the
# other backbones, so the run stays short on CI's 2 cores (each sbatch job pays start-up and the
# plugin's status polling).
REMADE = ["models/tiny-internvl/overall-r2", "models/tiny-internvl/overall-r2.prov.json",
          "scores/tiny-internvl/overall-r2", "data/ground_truth/holdout.json",
          "data/ground_truth/holdout.json.prov.json", "predictions/prior/holdout"]
THROUGH_SBATCH = {"ground_truth", "baseline", "train", "score", "gather_scores", "model_predictions", "evaluate",
                  "submission", "export", "metrics_summary", "plot_scatter", "plot_categories", "plot_curves"}


def _unavailable(reason: str):
    if os.environ.get("IMATCH_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (IMATCH_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")  # up until the session ends: see below
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _unavailable("starting SLURM daemons needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        _unavailable("neither SLURM nor apt-get to install it is available")
    env = {**os.environ, "SLURM_STATE_DIR": str(tmp_path_factory.mktemp("slurm-state"))}
    start = subprocess.run(["bash", str(SETUP), "start"], capture_output=True, text=True, env=env)
    if start.returncode != 0:
        _unavailable(f"{SETUP.name} failed:\n{start.stdout[-2000:]}\n{start.stderr[-2000:]}")
    yield
    subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, text=True, env=env)


def slurm_jobs(workdir: Path) -> dict[str, set[str]]:
    """{SLURM job id: rules it ran} from the plugin's per-job logs
    (.snakemake/slurm_logs/{rule,group}_<name>/.../<id>.log; a group job runs several rules)."""
    return {p.stem: set(re.findall(r"^(?:local)?rule (\w+):", p.read_text(), re.M))
            for p in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}


def completed_by_slurmctld() -> set[str]:
    """Job ids slurmctld recorded as finished with exit status 0 (its log outlives squeue's MinJobAge)."""
    text = CTLD_LOG.read_text()
    return set(re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS 0", text))


def test_the_demo_runs_through_slurm_like_a_local_run(cluster, workflow, tmp_path):
    local, _ = workflow
    wd = tmp_path / "slurm"
    shutil.copytree(local, wd, symlinks=True)
    small = wd / "small.yaml"
    for rel in REMADE:
        path = wd / "results" / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    profile = wd / "config" / "slurm-ci"
    planned = planned_jobs(snakemake(wd, "-n", "--profile", str(profile), configs=[small]))
    assert planned == THROUGH_SBATCH | {"all"}, planned
    started = time.time()
    snakemake(wd, "--profile", str(profile), configs=[small])
    wall = time.time() - started
    # every job went through sbatch: the plugin logged it under its SLURM job id and rule, and
    # slurmctld recorded that job as finished with exit status 0
    jobs = slurm_jobs(wd)
    assert set().union(*jobs.values()) == THROUGH_SBATCH, jobs
    assert set(jobs) <= completed_by_slurmctld()
    assert len(jobs) < sum(len(rules) for rules in jobs.values())  # the profile's groups: several rules, one job
    print(f"\nthrough SLURM: {len(jobs)} sbatch jobs in {wall:.0f} s")
    # the same bytes as the local run, for every deterministic artifact (the model: the same weights)
    assert all((wd / "results" / rel).exists() for rel in REMADE)
    table = compare(local / "results", wd / "results")
    assert len(table) > 30 and table[table["status"] != "identical"].empty, table[table["status"] != "identical"]
    # and a second run has nothing to do
    assert planned_jobs(snakemake(wd, "-n", "--profile", str(profile), configs=[small])) == set()
    # every artifact the SLURM jobs made matches its provenance record (jobs ran on a compute node)
    from imatch.provenance import audit

    assert audit(wd / "results") == [], audit(wd / "results")[:10]
