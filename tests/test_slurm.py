"""The workflow through a real SLURM cluster: the small demo, run once locally and once with every
job submitted by `sbatch` through Snakemake's SLURM executor, must give the same results.
One backbone and one round keep CI short; the three architectures through both rounds are
tests/test_workflow.py's local run.

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

import yaml

from imatch.reproducibility import compare
from wfhelpers import REPO, SMALL, copy_workflow, planned_jobs, snakemake, snakemake_command

SETUP = REPO / ".ci" / "setup_slurm.sh"
CTLD_LOG = Path("/var/log/slurm/slurmctld.log")  # where .ci/setup_slurm.sh points slurmctld
# One backbone, one round, one shard per model keep the SLURM run short on CI's 2 cores (each
# sbatch job pays start-up and status polling); every rule of the round runs through sbatch.
ONE_BACKBONE = {**SMALL, "backbones": [{"name": "tiny-internvl", "arch": "internvl", "source": "tiny", "seed": 0}],
                "rounds": 1, "score": {**SMALL["score"], "shards": 1}}


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


def test_the_demo_runs_through_slurm_like_a_local_run(cluster, tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text(yaml.safe_dump(ONE_BACKBONE))
    # the local run on one core, beside the SLURM run, which mostly waits on sbatch and polling
    local, _ = copy_workflow(tmp_path / "local")
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as out:
        local_run = subprocess.Popen(snakemake_command(local, configs=[config], cores=1), stdout=out,
                                     stderr=subprocess.STDOUT)
    wd, _ = copy_workflow(tmp_path / "slurm")
    profile = wd / "config" / "slurm-ci"
    started = time.time()
    try:
        snakemake(wd, "--profile", str(profile), configs=[config])
    finally:
        local_code = local_run.wait()
    wall = time.time() - started
    assert local_code == 0, local_log.read_text()[-3000:]
    # every job went through sbatch: the plugin logged it under its SLURM job id and rule, and
    # slurmctld recorded that job as finished with exit status 0
    jobs = slurm_jobs(wd)
    ran = set().union(*jobs.values())
    assert {"ingest", "train", "score", "gather_scores", "element_levels", "evaluate", "submission"} <= ran, jobs
    assert set(jobs) <= completed_by_slurmctld()
    print(f"\nthrough SLURM: {len(jobs)} sbatch jobs in {wall:.0f} s (the local run beside it)")
    # the same bytes as the local run, for every deterministic artifact (models: the same weights)
    table = compare(local / "results", wd / "results")
    assert len(table) > 30 and table[table["status"] != "identical"].empty, table[table["status"] != "identical"]
    # and a second run has nothing to do
    assert planned_jobs(snakemake(wd, "-n", "--profile", str(profile), configs=[config])) == set()
    # every artifact the SLURM jobs made matches its provenance record (jobs ran on a compute node)
    from imatch.provenance import audit

    for tree in (wd / "results", local / "results"):
        assert audit(tree) == [], (tree, audit(tree)[:10])
