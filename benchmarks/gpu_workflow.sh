#!/usr/bin/env bash
# The whole two-round workflow of config/gpu-check.yaml on this machine's GPU through Snakemake,
# then one table of every job's time and memory from Snakemake's benchmark files.
# Usage on a GPU machine with the project installed: [GPU_SLOTS=2] bash benchmarks/gpu_workflow.sh [OUT_DIR]
# GPU_SLOTS=2 lets two GPU jobs share one H200 (a training job peaks at ~60 GiB, a scoring job ~20).
set -euo pipefail
out=${1:-results/gpu-check}
mkdir -p "$out"
start=$(date +%s)
# greedy scheduler: one GPU needs no ILP (and the GPU machine need not have pulp)
${SNAKEMAKE:-snakemake} --cores "$(nproc)" --resources gpu="${GPU_SLOTS:-1}" --configfile config/gpu-check.yaml \
  --config results="$out" --scheduler greedy --rerun-incomplete --keep-going 2>&1 | tee "$out.snakemake.log" | grep -E "^(rule|localrule) |Finished job|Error|error" || true
echo "wall: $(( $(date +%s) - start )) s"
python3 - "$out" <<'PY'
import glob, os, sys
import pandas as pd
root = sys.argv[1]
rows = []
for f in sorted(glob.glob(f"{root}/benchmarks/**/*.tsv", recursive=True)):
    t = pd.read_csv(f, sep="\t")
    rows.append({"job": os.path.relpath(f, f"{root}/benchmarks").removesuffix(".tsv"), "seconds": round(t["s"].iloc[0], 1),
                 "max_rss_gib": round(t["max_rss"].iloc[0] / 1024, 2)})
table = pd.DataFrame(rows)
print(table.to_markdown(index=False) if hasattr(table, "to_markdown") else table.to_string(index=False))
print(f"\n{len(table)} jobs with a benchmark file, {table['seconds'].sum():.0f} s of job time")
table.to_csv(f"{root}/benchmarks.tsv", sep="\t", index=False)
PY
