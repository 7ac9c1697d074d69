#!/usr/bin/env bash
# GPU check of the fine-tuning and scoring stages on a real-size random Qwen2.5-VL-7B, in bf16,
# through exactly the commands the workflow runs (imatch train / imatch score-set).
# Usage on a GPU machine with the project installed: [GPUS=2] bash benchmarks/gpu_check.sh [OUT_DIR]
# GPUS=2: training runs as one job on both GPUs (ms-swift's torchrun, one process per GPU) and
# scoring spreads the model over both; nvidia-smi samples show each GPU's memory and load.
set -euo pipefail
out=${1:-/tmp/imatch-gpu-check}
GPUS=${GPUS:-1}
mkdir -p "$out"
nvidia-smi --query-gpu=timestamp,index,memory.used,utilization.gpu --format=csv,noheader,nounits -l 1 > "$out/smi.csv" &
smi=$!
trap 'kill $smi 2>/dev/null || true' EXIT
TIMEFORMAT='  [%R s wall]'
run() { echo "+ $*"; time "$@"; }
python3 -c 'import torch; print("torch", torch.__version__, "GPUs:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
run python3 -m imatch demo-data --out "$out/source" --train-prompts 24 --val-prompts 4 --test-prompts 0 --image-size 448
run python3 -m imatch ingest --source "$out/source" --out "$out/data" --holdout-fraction 0.25
for split in train holdout; do
  run python3 -m imatch instructions --task overall --split $split --samples "$out/data/samples.parquet" \
    --elements "$out/data/elements.parquet" --metadata prompt_meaningless split_confidence attribute_confidence \
    --element-levels ground-truth --out "$out/overall-$split.parquet" --jsonl "$out/overall-$split.jsonl"
done
run python3 -m imatch tiny-backbone --arch qwen2_5_vl --size 7b --out "$out/qwen7b"
# the paper's recipe (LoRA r16 on LLM, ViT and aligner; bf16; 448x448 budget), 12 steps of 8
run python3 -m imatch train --arch qwen2_5_vl --model "$out/qwen7b" --dataset "$out/overall-train.jsonl" \
  --out "$out/model" --scratch "$out/scratch" --max-steps 12 --batch-size 8 --grad-accum 1 --save-steps 6 --gpus $GPUS
python3 -c "import json; r=json.load(open('$out/model/training.json')); print('loss curve', [round(p['loss'],3) for p in r['loss_curve']]); print('s/step', r['seconds_per_step_this_run'], r['devices'])"
run python3 -m imatch score-set --arch qwen2_5_vl --model "$out/model" --base "$out/qwen7b" --device cuda --dtype bfloat16 \
  --instructions "$out/overall-holdout.parquet" --out "$out/scores.parquet" --batch-size 16 --gpus $GPUS
python3 -c "import pandas as pd; p=pd.read_parquet('$out/scores.parquet'); print(p[['expected_level','argmax_level','score']].describe().to_string()); import numpy as np; print('probs sum', np.stack(p.probs).sum(1).min(), np.stack(p.probs).sum(1).max())"
kill $smi 2>/dev/null || true
python3 -c "
import pandas as pd
t = pd.read_csv('$out/smi.csv', names=['time', 'gpu', 'mem_mib', 'util'], skipinitialspace=True)
print(t.groupby('gpu').agg(peak_mem_gib=('mem_mib', lambda m: round(m.max() / 1024, 2)), busy_samples=('util', lambda u: int((u > 50).sum())), samples=('util', 'size')).to_string())"
