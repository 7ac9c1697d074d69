#!/usr/bin/env bash
# Pretraining recipes of the tiny backbones side by side on a GPU machine (issue 19): one
# `imatch pretrain-tiny` per line of $VARIANTS ("name gpu arch size lr batch steps types... [--flag
# value...]": what follows the first "--" reaches pretrain-tiny as it is, e.g. "--seed 1"), all at
# once, each on its GPU with $THREADS CPU threads and $WORKERS data-loading processes (default 2, 2),
# then each model's held-out accuracy per question type (corpus seed 2). Results: $OUT/sweep.tar.gz
# (the eval JSONs, the logs), $OUT/summary.txt and, with PACK=1, $OUT/<name>.zip of the best (OUT: any empty
# folder; the GPU machine's output folder there). The wheels of .whl/ are installed first (the GPU
# machine has torch, not ms-swift). The corpus is made with $CORPUS_FLAGS (--single-attribute: eight types).
# Measured: benchmarks/results/2026-12-01-h200-pretrain-sweep/.
set -u
SCENES=${SCENES:-4000}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/workflow PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=/tmp/sweep; rm -rf $W; mkdir -p $W/logs $W/packs
CORPUS_FLAGS=${CORPUS_FLAGS:---single-attribute}
python3 -m imatch pretrain-corpus --out $W/c1 --seed 1 --scenes $SCENES $CORPUS_FLAGS > $W/logs/corpus1.log 2>&1 &
python3 -m imatch pretrain-corpus --out $W/c2 --seed 2 --scenes 200 $CORPUS_FLAGS > $W/logs/corpus2.log 2>&1
wait
while read -r name gpu arch size lr batch steps types; do
  [ -z "$name" ] && continue
  extra=""; case "$types" in *--*) extra="--${types#*--}"; types="${types%%--*}";; esac
  ( start=$(date +%s)
    CUDA_VISIBLE_DEVICES=$gpu timeout ${RUN_LIMIT:-540} python3 -m imatch pretrain-tiny --arch $arch --size $size \
      --corpus $W/c1 --out $W/$name --steps $steps --learning-rate $lr --batch-size $batch --types $types $extra \
      --device cuda --workers ${WORKERS:-2} --threads ${THREADS:-2} --logging-steps 50 --eval-corpus $W/c2 --eval-limit ${EVAL_LIMIT:-0} ${PACK:+--pack $W/packs/$name.zip} > $W/logs/$name.log 2>&1
    echo "$name rc=$? seconds=$(( $(date +%s) - start ))" >> $W/logs/done.txt ) &
done <<< "$VARIANTS"
wait
cd $W && for f in logs/*.log; do n=$(basename $f .log); echo "== $n"; grep -E "train_speed|'loss'" $f | tail -2 | cut -c1-300; sed -n '/^type /,/^all /p' $f; done > $OUT/summary.txt
cat logs/done.txt >> $OUT/summary.txt
tar czf $OUT/sweep.tar.gz logs *.eval.json 2>/dev/null
# the files come back by at most 8: with PACK=1, the $KEEP (5) packed models whose best has_* answer
# is furthest above its majority rate
[ -n "${PACK:-}" ] && python3 - "$W" "$OUT" "${KEEP:-5}" <<'PY'
import json, shutil, sys
from pathlib import Path
w, out, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def gain(f):
    per = json.loads(f.read_text())["per_type"]
    return max((per[t]["accuracy"] - per[t]["majority_rate"] for t in ("has_shape", "has_colour") if t in per), default=-1)
ranked = sorted(((gain(f), f.name[:-len(".eval.json")]) for f in w.glob("*.eval.json")), reverse=True)
for g, name in ranked[:keep]:
    if (w / "packs" / f"{name}.zip").is_file():
        shutil.copy(w / "packs" / f"{name}.zip", out / f"{name}.zip")
        print(f"kept {name}.zip (has_* gain {g:+.3f})")
PY
cat $OUT/summary.txt
