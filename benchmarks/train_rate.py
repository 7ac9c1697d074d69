"""The training rate of one `imatch train` run (its training.json and the step timer's
step_times.jsonl) as a `benchmarks/bench.py` result file, so that `imatch cost --bench` can use runs
made outside the benchmark driver (benchmarks/ovis2_34b.sh: backbones too large for it).

    python benchmarks/train_rate.py TRAINING_JSON STEP_TIMES --arch ovis2 --params-b 34 \
        --gpu "NVIDIA H200" --date 2026-11-30 --out bench.json

The rate is samples (answers) per second over the steps after the first two (warm-up), per GPU
held: a run whose layers are split over N GPUs holds N of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WARM_UP = 2


def rate(training: dict, steps: list[dict]) -> dict:
    args = training["swift_args"]
    batch = args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]
    timed = [s["step_seconds"] for s in steps if "step_seconds" in s][WARM_UP:]
    if not timed:
        raise SystemExit(f"fewer than {WARM_UP + 1} timed steps: no rate")
    gpus = 1
    if training.get("parallelism") == "split-layers":
        gpus = sum(len(p["devices"]) for p in training["gpu_memory"]["processes"])
    per_process = batch * len(timed) / sum(timed)
    return {"batch": batch, "items": batch * len(timed), "seconds": round(sum(timed), 3), "gpus": gpus,
            "per_process": per_process, "per_second": per_process / gpus,
            "ckpt": bool(args.get("gradient_checkpointing"))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("training", type=Path, help="training.json of the run")
    p.add_argument("step_times", type=Path, help="step_times.jsonl of the run (imatch train --step-times)")
    p.add_argument("--arch", required=True)
    p.add_argument("--params-b", type=float, required=True, help="the backbone's size in billions (34 for Ovis2-34B)")
    p.add_argument("--gpu", required=True, help="the GPU's name, as bench.py records it")
    p.add_argument("--date", required=True)
    p.add_argument("--image", type=int, default=448)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    training = json.loads(a.training.read_text())
    steps = [json.loads(line) for line in a.step_times.read_text().splitlines() if line.strip()]
    r = rate(training, steps)
    variant = f"imatch train ckpt={r['ckpt']} size={a.params_b:g}b gpus={r['gpus']} ({training.get('parallelism')})"
    row = {"arch": a.arch, "stage": "train", "path": "workflow", "image": a.image, "batch": r["batch"],
           "items": r["items"], "seconds": r["seconds"], "per_second": r["per_second"], "params_b": a.params_b,
           "gpus": r["gpus"], "per_process": r["per_process"], "variant": variant,
           "loss": [round(x["loss"], 4) for x in training["loss_curve"]], "gpu_memory": training.get("gpu_memory")}
    meta = {"device_name": a.gpu, "date": a.date, "source": [a.training.name, a.step_times.name],
            "command": "python benchmarks/train_rate.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    a.out.write_text(json.dumps({"meta": meta, "rows": [row]}, indent=1) + "\n")
    print(f"{a.out}: {r['per_second']:.3f} samples/s per GPU ({r['gpus']} GPU(s), batch {r['batch']})")


if __name__ == "__main__":
    main()
