#!/usr/bin/env bash
# How much fine-tuning a tiny pretrained backbone needs to learn alignment (issue 19), on a GPU
# machine: a demo data set ten times the embedded default's (demo seed 7, 1000 training prompts x 4
# simulated T2I models = 3600 training images after the 10 % holdout, 100 val prompts = 400 labelled
# val images, 128²), its overall and element instruction sets without augmentations (no metadata,
# element levels, prompt type or score perturbation), then one `imatch train` + `imatch score-set` per
# line of $RUNS, all at once on the one GPU: "name arch backbone task steps lr". backbone: a folder
# (an unpacked backbone) or `shipped-<arch>` (pretrained/tiny-<arch>.zip); task: ov (overall), el
# (element, packed rows) or ovs (overall on the first 80 prompts only: the default demo's size).
# The recipe is the embedded default's (config/config.yaml) (LoRA r16, ViT and aligner trained, 16 answers per step,
# cosine, lr as given). Prints, per run, val SRCC of the expected level against the labelled level,
# its spread, level accuracy against the majority rate and, for elements, hit accuracy (expected
# level > 3 against the annotators' mean > 0.5). The wheels of .whl/ are installed first.
# Measured: benchmarks/results/2026-12-01-h200-learnability/.
set -u
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > $OUT/pip.log 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD/workflow PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
I="python3 -m imatch"; G=/tmp/learnability; rm -rf $G; mkdir -p $G
$I demo-data --out $G/demo --seed 7 --train-prompts 1000 --val-prompts 100 --test-prompts 2 --image-size 128 \
  --layout folder --parts 1 > $OUT/prep.log 2>&1
$I ingest --source $G/demo --out $G/data --holdout-fraction 0.1 --seed 0 >> $OUT/prep.log 2>&1
S="--samples $G/data/samples.parquet --elements $G/data/elements.parquet"
for t in train val; do
  $I instructions --task overall $S --split $t --out $G/ov-$t.parquet --jsonl $G/ov-$t.jsonl >> $OUT/prep.log 2>&1
  $I instructions --task element $S --split $t --out $G/el-$t.parquet --jsonl $G/el-$t.jsonl >> $OUT/prep.log 2>&1
done
python3 - "$G" <<'P'
import json, shutil, sys
g = sys.argv[1]
rows = [json.loads(line) for line in open(f"{g}/ov-train.jsonl")]
small = [r for r in rows if int(r["images"][0].rsplit("/", 1)[1][:5]) <= 80]
open(f"{g}/ovs-train.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in small))
shutil.copy(f"{g}/ov-val.parquet", f"{g}/ovs-val.parquet")
print(f"training rows: overall {len(rows)}, overall of the first 80 prompts {len(small)}")
P
wc -l $G/*.jsonl
echo "setup $(( $(date +%s) - T0 )) s"

run() {
  local name=$1 arch=$2 bb=$3 task=$4 steps=$5 lr=$6 share="" s=$(date +%s)
  [ $task = el ] && share="--share-prefix"
  echo $task > $G/$name.task
  case $bb in shipped-*) $I pretrained-backbone --packed pretrained/tiny-${bb#shipped-}.zip --out $G/bb-$name \
    >> $OUT/$name.log 2>&1; bb=$G/bb-$name;; esac
  $I train --arch $arch --model $bb --dataset $G/$task-train.jsonl --out $G/m-$name --scratch $G/s-$name \
    --batch-size 8 --grad-accum 2 --dtype float32 --max-pixels 16384 --no-gradient-checkpointing --lr-scheduler cosine \
    --warmup-ratio 0.03 --weight-decay 0.01 --gpus 1 --threads 2 --save-steps 100000 --max-steps $steps $share \
    --tuner lora --lora-rank 16 --lora-alpha 32 --train-vit --train-aligner --learning-rate $lr >> $OUT/$name.log 2>&1 &&
  $I score-set --arch $arch --model $G/m-$name --base $bb --instructions $G/$task-val.parquet \
    --out $G/$name.val.parquet --batch-size 64 --dtype float32 --device cuda --tau 3 --max-pixels 16384 --workers 0 \
    --no-compile $share --gpus 1 --threads 2 >> $OUT/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - s )) s"
  cp $G/m-$name/training.json $G/$name.training.json 2>/dev/null
}
while read -r name arch bb task steps lr; do
  [ -n "$name" ] && run $name $arch $bb $task $steps $lr &
done <<< "$RUNS"
wait
python3 - "$G" <<'P' | tee $OUT/summary.txt
import glob, json, os, sys
import pandas as pd
from scipy.stats import spearmanr
g = sys.argv[1]
for f in sorted(glob.glob(f"{g}/*.val.parquet")):
    name = os.path.basename(f)[:-len(".val.parquet")]
    task = open(f"{g}/{name}.task").read().strip()
    m = pd.read_parquet(f"{g}/{'ov' if task == 'ovs' else task}-val.parquet").merge(pd.read_parquet(f), on="id")
    t, lvl = m["target_level"], m["expected_level"]
    line = (f"{name} rows {len(m)} SRCC {spearmanr(lvl, t)[0]:.3f} sd {lvl.std():.3f} "
            f"acc_level {(m['argmax_level'] == t).mean():.3f} maj_level {(t == t.mode()[0]).mean():.3f}")
    if task == "el":
        truth = m["label"] > 0.5
        line += (f" acc_hit {(m['hit'] == truth).mean():.3f} maj_hit {max(truth.mean(), 1 - truth.mean()):.3f}"
                 f" argmax {m['argmax_level'].value_counts().to_dict()}")
    curve = json.load(open(f"{g}/{name}.training.json"))["loss_curve"]
    print(line + f" loss {curve[0]['loss']:.2f}->{curve[-1]['loss']:.2f}", flush=True)
P
echo "total $(( $(date +%s) - T0 )) s"
