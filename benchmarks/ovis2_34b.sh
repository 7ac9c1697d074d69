#!/usr/bin/env bash
# Ovis2-34B (random weights of the real size) trained with the paper's recipe on GPUs capped at
# 80 GiB: by default ONE `swift sft` process with the layers split over two GPUs (issue 17 item 3);
# SPLIT=0 trains on one GPU (CAP=79: an 80 GB card), as config/evalmuse.yaml runs it.
#
# What runs: demo data (448x448 images) -> ingest -> overall instruction set -> `imatch tiny-backbone
# --arch ovis2 --size 34b` (built on the GPU in bf16, ~70 GB written) -> `imatch train` with the
# recipe config/evalmuse.yaml gives the ovis2-34b backbone (LoRA r16 on the LLM, the ViT and the
# aligner, batch 8 x grad_accum 2, gradient checkpointing, --split-layers --gpu-memory-cap 80, up to
# 9 tiles) for STEPS optimizer steps, with `--gpus 2`.
# What it reports ($OUT_DIR): summary.json / summary.md (loss per step, each GPU's peak memory as
# the training process saw it and as nvidia-smi saw it, samples/s, wall times of data, build and
# training), training.json (imatch train's record), step_times.jsonl, smi.csv, run.log.
# It fails (exit 1, after writing everything) when a check fails: the model not split over both
# GPUs, a GPU past the cap, a loss that is not finite or does not fall.
#
# Usage, 2 GPUs, the project's dependencies importable (python3 -m imatch works):
#   bash benchmarks/ovis2_34b.sh OUT_DIR [WORK_DIR]          (WORK_DIR default /tmp/imatch-ovis2-34b)
# Rerun on the same machine: data and backbone already in WORK_DIR are kept, training reruns.
# The same wiring on a CPU, tiny backbone (the check this repository can run without a GPU):
#   SIZE=tiny DEVICE=cpu STEPS=3 PYTHON=.venv/bin/python bash benchmarks/ovis2_34b.sh OUT_DIR
# Other knobs: STEPS (8), CAP (80, GiB), SPLIT (1: two GPUs, layers split; 0: one GPU), PROMPTS (40).
# The rate for `imatch cost`: python benchmarks/train_rate.py OUT_DIR/training.json OUT_DIR/step_times.jsonl ...
set -euo pipefail
out=${1:?usage: bash benchmarks/ovis2_34b.sh OUT_DIR [WORK_DIR]}
work=${2:-/tmp/imatch-ovis2-34b}
SIZE=${SIZE:-34b}
export SPLIT=${SPLIT:-1}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-8}
CAP=${CAP:-80}
PROMPTS=${PROMPTS:-40}
PY=${PYTHON:-python3}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
work=$(cd "$work" && pwd)
cd "$(dirname "$0")/.."  # the repository: config/evalmuse.yaml
log="$out/run.log"
exec > >(tee -a "$log") 2>&1
now() { date +%s%N; }
since() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }  # seconds since now()
say() { echo "[$(date +%H:%M:%S)] $*"; }
die() { say "FAILED: $*"; exit 1; }
t0=$(now)

case "$DEVICE" in
  cuda) GPUS=$((SPLIT ? 2 : 1)); EXTRA=() ;;
  # CPU: no GPU to split over or cap (the plug-in is then a no-op); float32, no worker processes
  cpu) GPUS=0; EXTRA=(--dtype float32 --workers 0 --threads "$(nproc)") ;;
  *) die "DEVICE must be cuda or cpu, not $DEVICE" ;;
esac

say "ovis2_34b.sh SIZE=$SIZE DEVICE=$DEVICE STEPS=$STEPS CAP=$CAP out=$out work=$work"
$PY - "$DEVICE" "$GPUS" <<'PY' || die "the machine is not what this run needs"
import sys, torch, transformers
device, gpus = sys.argv[1], int(sys.argv[2])
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("GPUs:", [(torch.cuda.get_device_name(i), round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)) for i in range(n)])
if device == "cuda" and n != gpus:
    sys.exit(f"{n} GPUs visible, this run needs {gpus}")
import swift  # ms-swift: from the carried wheels on the GPU machine
print("ms-swift", getattr(swift, "__version__", "?"))
PY

smi=
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 > "$out/smi.csv" &
  smi=$!
  trap '[ -n "$smi" ] && kill $smi 2>/dev/null || true' EXIT
fi

# ---- data: demo images of 448x448, the overall instruction set of train (as gpu_check.sh makes it)
t=$(now)
if [ ! -s "$work/overall-train.jsonl" ]; then
  rm -rf "$work/source" "$work/data"
  $PY -m imatch demo-data --out "$work/source" --train-prompts "$PROMPTS" --val-prompts 4 --test-prompts 0 --image-size 448
  $PY -m imatch ingest --source "$work/source" --out "$work/data" --holdout-fraction 0.1
  $PY -m imatch instructions --task overall --split train --samples "$work/data/samples.parquet" \
    --elements "$work/data/elements.parquet" --metadata prompt_meaningless split_confidence attribute_confidence \
    --element-levels ground-truth --out "$work/overall-train.parquet" --jsonl "$work/overall-train.jsonl"
fi
rows=$(wc -l < "$work/overall-train.jsonl")
data_s=$(since "$t")
say "training set: $rows queries ($data_s s)"

# ---- the recipe config/evalmuse.yaml gives ovis2-34b, as the workflow's train job gets it
recipe=$($PY - <<'PY'
from pathlib import Path
from imatch import config_checks
from imatch.plan import Plan
config, _ = config_checks.load([Path("config/evalmuse.yaml")], Path("."))
print(Plan(config).recipe_flags("ovis2-34b"))
PY
) || die "could not read the ovis2-34b recipe of config/evalmuse.yaml"
say "recipe of ovis2-34b in config/evalmuse.yaml: $recipe"
placement=(--gpu-memory-cap "$CAP")
[ "$SPLIT" = 1 ] && placement+=(--split-layers)  # the 80 GB alternative of config/evalmuse.yaml's comment

# ---- the backbone: random weights of the real size, built on the GPU in bf16 (kept for a rerun)
t=$(now)
backbone="$work/backbone-ovis2-$SIZE"
if [ ! -s "$backbone/manifest.json" ]; then
  if [ "$SIZE" != tiny ]; then
    free_gb=$(df -P -BG "$work" | awk 'NR==2 {gsub("G", "", $4); print $4}')
    [ "$free_gb" -ge 80 ] || die "$work has $free_gb GB free; the $SIZE backbone needs ~70 GB"
  fi
  $PY -m imatch tiny-backbone --arch ovis2 --size "$SIZE" --out "$backbone"
fi
build_s=$(since "$t")
say "backbone $backbone: $(du -sh "$backbone" | cut -f1) ($build_s s)"

# ---- training: the recipe, then what this run changes (later flags win): steps, the cap, one final save
rm -rf "$work/model" "$work/scratch" "$out/step_times.jsonl"
t=$(now)
# shellcheck disable=SC2086  # the recipe is a list of flags
$PY -m imatch train --arch ovis2 --model "$backbone" --dataset "$work/overall-train.jsonl" \
  --out "$work/model" --scratch "$work/scratch" $recipe --max-steps "$STEPS" --save-steps 10000 \
  "${placement[@]}" --gpus "$GPUS" --step-times "$out/step_times.jsonl" "${EXTRA[@]}" \
  || die "imatch train failed (see run.log)"
train_s=$(since "$t")
cp "$work/model/training.json" "$out/training.json"
[ -n "$smi" ] && { kill "$smi" 2>/dev/null || true; smi=; }

# ---- the report, and the checks that make the run fail loudly
$PY - "$out" "$DEVICE" "$SIZE" "$CAP" "$data_s" "$build_s" "$train_s" "$(since "$t0")" <<'PY'
import json, math, os, sys
from pathlib import Path

out, device, size, cap = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
data_s, build_s, train_s, total_s = map(float, sys.argv[5:9])
record = json.loads((out / "training.json").read_text())
args = record["swift_args"] or {}
batch = args.get("per_device_train_batch_size", 0) * args.get("gradient_accumulation_steps", 0)
rows = [json.loads(line) for line in (out / "step_times.jsonl").read_text().splitlines() if line.strip()]
steps = [r for r in rows if "step_seconds" in r]
warm = 2 if len(steps) > 4 else 0  # the first steps' warm-up (allocator, kernels) left out of the rate
measured = steps[warm:]
samples_per_s = batch * len(measured) / sum(r["step_seconds"] for r in measured) if measured else None
# with the data wait between steps (and, split over GPUs, the last GPU's optimizer tail: the step timer
# synchronises the first GPU only)
with_wait = batch * len(measured) / sum(r["step_seconds"] + (r["wait_seconds"] or 0) for r in measured) if measured else None
loss = [round(p["loss"], 4) for p in record["loss_curve"]]
processes = (record.get("gpu_memory") or {}).get("processes") or []
gpus = [d for p in processes for d in p["devices"]]
smi = {}
if (out / "smi.csv").is_file():
    for line in (out / "smi.csv").read_text().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4 and parts[2].isdigit():
            smi[int(parts[1])] = max(smi.get(int(parts[1]), 0), int(parts[2]) / 1024)
swift_s = record["wall_seconds_this_run"]
summary = {
    "size": size, "device": device, "devices": record["devices"], "versions": record["versions"],
    "parallelism": record["parallelism"], "swift_device_map": args.get("device_map"),
    "swift_max_memory": args.get("max_memory"), "gpu_memory_cap_gib": cap,
    "recipe": {k: args.get(k) for k in ("tuner_type", "lora_rank", "lora_alpha", "freeze_vit", "freeze_aligner",
                                        "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                                        "gradient_checkpointing", "torch_dtype", "max_pixels")},
    "samples_per_step": batch, "steps": record["global_step"], "loss_per_step": loss,
    "samples_per_second": None if samples_per_s is None else round(samples_per_s, 3),
    "samples_per_second_with_data_wait": None if with_wait is None else round(with_wait, 3),
    "rate_over_steps": f"steps {warm + 1}-{len(steps)} (first {warm} left out as warm-up)",
    "step_seconds": [round(r["step_seconds"], 3) for r in steps],
    "peak_gib_per_gpu_in_training_process": gpus,
    "peak_gib_per_gpu_nvidia_smi": {k: round(v, 2) for k, v in sorted(smi.items())},
    "wall_seconds": {"data": round(data_s, 1), "build_backbone": round(build_s, 1),
                     "imatch_train": round(train_s, 1), "swift_sft": swift_s,
                     "steps": round(sum(r["step_seconds"] + (r["wait_seconds"] or 0) for r in steps), 1),
                     "swift_start_load_and_save": round(swift_s - sum(r["step_seconds"] + (r["wait_seconds"] or 0)
                                                                      for r in steps), 1),
                     "whole_script": round(total_s, 1)},
}
checks = {"loss finite": bool(loss) and all(math.isfinite(x) for x in loss),
          "steps trained": record["global_step"] == len(steps) and bool(steps),
          "the training process wrote its GPU memory": len(processes) == 1}
if device == "cuda":
    if os.environ["SPLIT"] == "1":
        checks["one process over two GPUs"] = record["parallelism"] == "split-layers" and len(gpus) == 2
        checks["the model is split (both GPUs > 10 GiB)"] = len(gpus) == 2 and all(g["peak_allocated_gib"] > 10 for g in gpus)
    checks["every GPU within the cap"] = bool(gpus) and all(g["peak_reserved_gib"] <= cap for g in gpus)
    checks["the cap is in force on every GPU"] = bool(gpus) and all(g.get("cap_gib") == cap for g in gpus)
    checks["loss falls (last < first)"] = len(loss) > 1 and loss[-1] < loss[0]
summary["checks"] = checks
(out / "summary.json").write_text(json.dumps(summary, indent=1))
md = [f"# Ovis2-{size} training, {summary['parallelism']}, {device}", "",
      f"- devices: {summary['devices']}",
      f"- swift device_map {summary['swift_device_map']}, max_memory {summary['swift_max_memory']}, cap {cap} GiB",
      f"- {summary['steps']} steps of {batch} samples; loss per step: {loss}",
      f"- samples/s: {summary['samples_per_second']} ({summary['samples_per_second_with_data_wait']} with the wait "
      f"between steps; {summary['rate_over_steps']}); step s: {summary['step_seconds']}",
      "- peak per GPU (training process): " + "; ".join(
          f"cuda:{g['device']} {g['peak_allocated_gib']} GiB allocated / {g['peak_reserved_gib']} reserved "
          f"of {g.get('total_gib')} (cap {g.get('cap_gib')}, fraction {g.get('fraction')})" for g in gpus),
      f"- peak per GPU (nvidia-smi, every process): {summary['peak_gib_per_gpu_nvidia_smi']}",
      f"- wall seconds: {summary['wall_seconds']}",
      "- checks: " + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items())]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
failed = [k for k, v in checks.items() if not v]
if failed:
    sys.exit(f"FAILED checks: {failed}")
PY
say "done: $out/summary.md"
