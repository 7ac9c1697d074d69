"""The plans of the shipped configs as Snakemake sees them (`snakemake -n -p --forceall`): one
sorted record per job (rule, data inputs, outputs, log, benchmark, wildcards, resources, shell
command), compared with the committed snapshots in tests/fixtures/plans/ by test_plan.py, so a
refactoring of the rule files that changes what runs, or how, cannot pass unnoticed.

After an intended change:  .venv/bin/python tests/plans.py --write   (and read the diff).
Code inputs (workflow/imatch/*.py, from `code()`) are left out: they change with every import.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("config", "ablation", "evalmuse")
SNAPSHOTS = REPO / "tests" / "fixtures" / "plans"


def plan(name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--configfile",
                          f"config/{name}.yaml", "--config", "results=results/plan"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    jobs: list[list[str]] = []
    job: list[str] | None = None
    for line in out.splitlines():
        if re.match(r"^(local)?rule \w+:", line):
            job = [line.rstrip(":").removeprefix("local")]
            jobs.append(job)
        elif job is not None and re.match(r"^    (input|output|log|benchmark|wildcards|resources): ", line):
            key, value = line.strip().split(": ", 1)
            items = value.split(", ")
            if key == "resources":  # tmpdir is the machine's
                items = [v for v in items if not v.startswith("tmpdir=")]
            if key == "input":
                items = sorted({v for v in items if not v.startswith("workflow/imatch/")})
            job.append(f"  {key}: {', '.join(items)}")
        elif job is not None and line.startswith("Shell command: "):
            job.append("  shell: " + line.removeprefix("Shell command: "))
    return "".join(sorted("\n".join(j) + "\n" for j in jobs))


def snapshot(name: str) -> Path:
    return SNAPSHOTS / f"{name}.txt.gz"


def write(name: str) -> None:
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    snapshot(name).write_bytes(gzip.compress(plan(name).encode(), mtime=0))


def committed(name: str) -> str:
    return gzip.decompress(snapshot(name).read_bytes()).decode()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    for name in CONFIGS:
        write(name)
        print(f"wrote {snapshot(name).relative_to(REPO)}")
