#!/usr/bin/env bash
# Which stages are bit-reproducible on a GPU, and by how much the others vary: the same inputs
# through `imatch train` and `imatch score-set` twice on one GPU, compared with `imatch compare-runs`.
# The CPU stages before them (demo-data, ingest, instructions) run once: they are byte-identical
# from run to run (tests/test_slurm.py, tests/test_workflow.py). Results: docs/reliability.md.
#
#   benchmarks/gpu_determinism.sh OUT [ARCH] [SIZE] [STEPS]
#   SIZE tiny (default) or the real one (7b / 8b, random weights); STEPS LoRA steps of the
#   fine-tune (default 30 for tiny, 0 = no training: the backbone itself is scored).
#   Comparisons printed (and written as OUT/<name>.tsv):
#     train-and-score  two fine-tunes of the same data and seed, each scored (if STEPS > 0)
#     score            run a's model scored a second time, same batch size
#     score-batch      run a's model scored with batch size 8 instead of 16
#   DEVICE=cpu DTYPE=float32 run it on the CPU (a check of the script, not a GPU figure).
set -euo pipefail
OUT=${1:?output folder}; ARCH=${2:-qwen2_5_vl}; SIZE=${3:-tiny}
STEPS=${4:-$([ "$SIZE" = tiny ] && echo 30 || echo 0)}
W=$OUT/work
IMAGE=$([ "$SIZE" = tiny ] && echo 224 || echo 448)
imatch demo-data --out "$W/source" --seed 0 --train-prompts 24 --val-prompts 16 --test-prompts 2 \
    --image-size "$IMAGE" --layout folder > /dev/null
imatch ingest --source "$W/source" --out "$W/data" --holdout-fraction 0 > /dev/null
for split in train val; do
    imatch instructions --task overall --split $split --samples "$W/data/samples.parquet" \
        --elements "$W/data/elements.parquet" --out "$W/sets/$split.parquet" --jsonl "$W/sets/$split.jsonl" > /dev/null
done
[ -d "$W/backbone" ] || imatch tiny-backbone --arch "$ARCH" --size "$SIZE" --out "$W/backbone" > /dev/null

score() {  # score MODEL OUT BATCH
    local base=""
    [ "$1" != "$W/backbone" ] && base="--base $W/backbone"
    imatch score-set --arch "$ARCH" --model "$1" $base --instructions "$W/sets/val.parquet" --out "$2" \
        --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" --batch-size "$3" --workers 4 --no-compile > /dev/null
}
model() {  # the model of run $1
    if [ "$STEPS" -gt 0 ]; then echo "$OUT/$1/results/models/m/overall-r1"; else echo "$W/backbone"; fi
}
for run in a b; do
    mkdir -p "$OUT/$run"
    if [ "$STEPS" -gt 0 ]; then
        imatch train --arch "$ARCH" --model "$W/backbone" --dataset "$W/sets/train.jsonl" \
            --out "$(model $run)" --scratch "$OUT/$run/scratch" --max-steps "$STEPS" --save-steps "$STEPS" \
            --batch-size 8 --learning-rate 1e-4 --dtype "${DTYPE:-bfloat16}" > "$OUT/$run/train.log" 2>&1
    fi
    score "$(model $run)" "$OUT/$run/results/scores/m/overall-r1.parquet" 16
done
compare() {  # compare NAME B-RUN STAGES...
    local name=$1 other=$2; shift 2
    echo "## $name"
    imatch compare-runs "$OUT/a/results" "$OUT/$other/results" --stages "$@" --out "$OUT/$name.tsv"
}
if [ "$STEPS" -gt 0 ]; then
    compare train-and-score b models scores
    score "$(model a)" "$OUT/a-again/results/scores/m/overall-r1.parquet" 16
    compare score a-again scores
else
    compare score b scores
fi
score "$(model a)" "$OUT/a-batch8/results/scores/m/overall-r1.parquet" 8
compare score-batch a-batch8 scores
