"""`imatch cost`: the GPU-hours of a config's training and scoring jobs, from measured rates, so a
cluster user knows what allocation to ask for before running anything.

The jobs are the workflow's own: `snakemake --dry-run --printshellcmds` of the config lists every
`imatch train` and `imatch score-set` command it would run, and each is read with that command's
own argument parser (which backbones, tasks and rounds are trained, which sets each round scores,
shards, prefix sharing: what Snakemake plans, not a copy of its rules). Each job's work is counted
from the data: images per split (an ingested `samples.parquet` with `--data`, or `--counts`),
elements per image, the augmented fraction of the config's training sets, epochs.

Rates are samples (answers) or queries per second on one GPU, per architecture, as `benchmarks/bench.py`
measures them (`--bench bench.json ...`, later files win; `--write-rates` keeps the summary):
`train` (per query), `train_compiled` (per query, `--compile`), `train_shared` (element queries,
prefix shared), each also with `_ckpt` (gradient checkpointing on, as the job's flags say), `score`,
`score_shared`. A backbone larger
than the one measured is charged by its parameter count (from its checkpoint name, e.g.
Ovis2-16B: 16/8 of Ovis2-8B): an estimate, said so in the table, unless a rate was measured at
its size (a result row with `params_b`, as `benchmarks/train_rate.py` writes it). A training job
whose layers are split over N GPUs (`--split-layers`) is charged N GPUs for its time.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

MEASURED_PARAMS_B = {"qwen2_5_vl": 7.0, "internvl": 8.0, "ovis2": 8.0}  # the `benchmarks/bench.py` backbones (7b / 8b)


def rates_from_bench(paths: list[Path]) -> dict:
    """Per architecture, the workflow's rate for each kind of work, from `benchmarks/bench.py` results
    (bench.json); a later file's measurement replaces an earlier one."""
    archs: dict[str, dict] = {}
    gpu = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        gpu = data["meta"].get("device_name", gpu)
        for row in data["rows"]:
            key = _rate_key(row)
            if key is None or not row.get("per_second"):
                continue
            entry = archs.setdefault(row["arch"], {})
            if row.get("params_b"):  # a run of one size of the architecture (benchmarks/train_rate.py)
                entry = entry.setdefault("by_size", {}).setdefault(f"{row['params_b']:g}", {})
            if key.startswith("train") and row["stage"] == "train" and entry.get(key, {}).get("stage") == "element-train":
                continue  # the per-query element rate, measured beside the shared one, is the like-for-like one
            compiled = "--compile" in str(entry.get("score", {}).get("variant"))
            if key == "score" and compiled and "--compile" not in str(row.get("variant")):
                continue  # the configs score compiled: an uncompiled rate does not replace a compiled one
            entry[key] = {"per_second": round(float(row["per_second"]), 3), "stage": row["stage"],
                          "variant": row.get("variant"), "batch": row.get("batch"), "image": row.get("image"),
                          "source": f"{Path(path).parent.name}/{Path(path).name}", "date": data["meta"].get("date")}
    return {"gpu": gpu, "archs": archs}


# variants a benchmark measures beside the workflow's own path, which no config runs: no rate
NOT_THE_WORKFLOW = ("cudnn=", "IMATCH_CUDNN_SDPA=", "liger=True", "profile=")


def _rate_key(row: dict) -> str | None:
    """train / train_shared (+ `_ckpt` with gradient checkpointing, `imatch train`'s default),
    score / score_shared."""
    stage, path, variant = row.get("stage"), row.get("path", ""), row.get("variant") or ""
    if any(switch in variant for switch in NOT_THE_WORKFLOW):
        return None
    ckpt = "" if "ckpt=False" in variant else "_ckpt"
    compiled = "_compiled" if "compile=True" in variant else ""
    if stage == "element-train":
        if "share=True" in variant:  # packed rows: never compiled by `imatch train` (train.compiles)
            return None if compiled else "train_shared" + ckpt
        return "train" + compiled + ckpt
    if stage == "train" and path == "workflow":
        return "train" + compiled + ckpt
    if stage == "element-score":
        return "score_shared" if path == "shared prefix" else "score"
    if stage == "score" and path.startswith("workflow") and row.get("image") == 448:
        return "score"
    return None


def planned_commands(configs: list[Path], workdir: Path) -> list[list[str]]:
    """The `imatch train` / `imatch score-set` commands of a dry run of the workflow."""
    exe = Path(sys.executable).parent / "snakemake"
    cmd = [str(exe) if exe.is_file() else "snakemake", "--dry-run", "--printshellcmds", "--forceall"]
    if configs:  # one flag for all: a second --configfile would replace the first
        cmd += ["--configfile", *map(str, configs)]
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"snakemake --dry-run failed:\n{(out.stderr + out.stdout)[-3000:]}")
    found = []
    for line in out.stdout.splitlines():
        line = line.strip().removeprefix("Shell command:").strip()
        if line.startswith(("imatch train ", "imatch score-set ")):
            found.append(shlex.split(line.split(" > ")[0])[1:])
    if not found:
        raise SystemExit("the dry run plans no training or scoring job (is everything already made? --forceall was given)")
    return found


def _split_of(path: str) -> str:
    return re.split(r"[-.]", Path(path).name, maxsplit=1)[0]


def _task_of(path: str) -> str:
    return "element" if Path(path).parent.name.startswith("element") else "overall"


def _model_of(out: str) -> tuple[str, str, str]:
    """(backbone, task, round) from `.../models/<backbone>/<task>-<round>` or a scores shard."""
    parts = Path(out).parts
    i = max(i for i, p in enumerate(parts) if p in ("models", "scores"))
    task, round_ = parts[i + 2].split("-", 1)
    return parts[i + 1], task, round_


def params_b(backbone: dict) -> float | None:
    """Parameter count (billions) in a checkpoint name such as `AIDC-AI/Ovis2-34B`."""
    found = re.findall(r"(\d+(?:\.\d+)?)B", str(backbone.get("checkpoint") or ""))
    return float(found[-1]) if found else None


class Counts:
    """Queries per (task, split): images of the split, times elements per image for element sets,
    plus the augmented copies of a training split whose task augments images."""

    def __init__(self, images: dict[str, int], elements_per_image: float, augmented: dict[str, float]):
        self.images, self.elements, self.augmented = images, elements_per_image, augmented

    def queries(self, task: str, split: str) -> float:
        if split not in self.images:
            raise SystemExit(f"no image count for split {split!r}: give it with --counts {split}=N")
        n = self.images[split] * (1 + (self.augmented.get(task, 0.0) if split == "train" else 0.0))
        return n * (self.elements if task == "element" else 1)


def estimate(commands: list[list[str]], config: dict, counts: Counts, rates: dict, startup: float = 0.0) -> pd.DataFrame:
    """One row per job: its work, the rate it is charged, GPU-hours (+ `startup` seconds a job)."""
    from imatch.cli import build_parser

    parser = build_parser()
    backbones = {b["name"]: b for b in config["backbones"]}
    rows = []
    for argv in commands:
        args, _ = parser.parse_known_args(argv)
        if args.command == "train":
            backbone, task, round_ = _model_of(str(args.out))
            sets = [(task, _split_of(str(d))) for d in args.dataset]
            work = sum(counts.queries(t, s) for t, s in sets) * args.epochs
            if args.max_steps:
                work = min(work, args.max_steps * args.batch_size * args.grad_accum * max(1, args.gpus))
            packed = args.share_prefix and task == "element"
            kind = ("train_shared" if packed else "train") + ("_compiled" if args.compile and not packed else "") \
                + ("_ckpt" if args.gradient_checkpointing else "")
            stage = "train"
        else:
            backbone, task, round_ = _model_of(str(args.out))
            paths = [*args.instructions, *args.blank_instructions]
            work = sum(counts.queries(_task_of(str(p)), _split_of(str(p))) for p in paths) / args.shards
            kind = "score_shared" if args.share_prefix and task == "element" else "score"
            stage = "score"
        arch = backbones[backbone]["arch"]
        # sharing not measured: charged as per-query work; compiled blocks not measured: as eager ones
        fallback = kind.replace("_shared", "").replace("_compiled", "")
        size = params_b(backbones[backbone])
        sized = rates["archs"].get(arch, {}).get("by_size", {}).get(f"{size:g}", {}) if size else {}
        measured = sized if (sized.get(kind) or sized.get(fallback)) else rates["archs"].get(arch, {})
        rate = measured.get(kind) or measured.get(fallback)
        if rate is None:
            raise SystemExit(f"no measured {kind} rate for {arch} in the rates given")
        scale = 1.0 if measured is sized or not size else size / MEASURED_PARAMS_B[arch]
        note = "" if rate is measured.get(kind) else f"{kind} not measured: {fallback} rate"
        if measured is sized:
            note = "; ".join(filter(None, [f"measured at {size:g}B", note]))
        if scale > 1.05:
            note = "; ".join(filter(None, [note, f"charged x{scale:.2f} by parameter count (estimate)"]))
        # a job whose layers are split over N GPUs holds all N for its whole time; charged N x its time
        # at the one-GPU rate (Ovis2-34B: 1.45 samples/s per GPU split over two, 3.0-3.4 on one)
        held = args.gpus if stage == "train" and getattr(args, "split_layers", False) else 1
        if held > 1:
            note = "; ".join(filter(None, [note, f"layers split: {held} GPUs held"]))
        rows.append({"stage": stage, "backbone": backbone, "task": task, "round": round_, "work": work,
                     "per_second": rate["per_second"], "scale": scale,
                     "hours": (work / rate["per_second"] * scale + startup) * held / 3600, "note": note})
    return pd.DataFrame(rows)


def summarise(jobs: pd.DataFrame) -> pd.DataFrame:
    keys = ["stage", "backbone", "task", "round"]
    table = jobs.groupby(keys, sort=False).agg(jobs=("hours", "size"), work=("work", "sum"), per_second=("per_second", "first"),
                                               hours=("hours", "sum"), note=("note", "first")).reset_index()
    return table


def markdown(table: pd.DataFrame, header: str) -> str:
    lines = [header, "", "| stage | backbone | task | round | jobs | samples / queries | per second (measured) | GPU-hours | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.stage} | {r.backbone} | {r.task} | {r.round} | {r.jobs} | {r.work:,.0f} | {r.per_second:g} "
                     f"| {r.hours:.2f} | {r.note} |")
    by_stage = table.groupby("stage")["hours"].sum()
    lines += ["", " · ".join(f"{stage}: **{hours:.2f}** GPU-hours" for stage, hours in by_stage.items())
              + f" · in all: **{table['hours'].sum():.2f} GPU-hours**"]
    return "\n".join(lines) + "\n"


def _parse_counts(values: list[str]) -> dict[str, int]:
    out = {}
    for v in values:
        split, _, n = v.partition("=")
        out[split] = int(n)
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cost", help="GPU-hours of a config's training and scoring jobs, from measured rates",
                              description=__doc__)
    p.add_argument("configs", nargs="*", type=Path, metavar="CONFIG",
                   help="config files as given to snakemake with --configfile (on top of config/config.yaml)")
    p.add_argument("--bench", type=Path, nargs="+", help="bench.json files of `benchmarks/bench.py` (later files win)")
    p.add_argument("--rates", type=Path, help="a rates file, as --write-rates writes it (benchmarks/rates-h200.json)")
    p.add_argument("--write-rates", type=Path, help="write the rates read from --bench here and stop")
    p.add_argument("--data", type=Path, help="an ingest output folder: images per split and elements per image")
    p.add_argument("--counts", nargs="*", default=[], help="images per split, e.g. train=31080 holdout=1637 val=10000 test=5000")
    p.add_argument("--elements-per-image", type=float, help="element queries per image (default: from --data)")
    p.add_argument("--startup-seconds", type=float, default=0.0,
                   help="GPU seconds each job spends before its work (imports, model loading, compilation; "
                        "~100 s for a 7B on an H200 as `benchmarks/bench.py` measured it); default 0: the work alone")
    p.add_argument("--workdir", type=Path, default=Path("."), help="the workflow's folder (default: .)")
    p.add_argument("--out", type=Path, help="also write the table (markdown) and the jobs (JSON beside it) here")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from imatch import config_checks

    if args.bench:
        rates = rates_from_bench(args.bench)
        if args.write_rates:
            args.write_rates.write_text(json.dumps(rates, indent=1) + "\n")
            print(f"wrote {args.write_rates}")
            return 0
    elif args.rates:
        rates = json.loads(args.rates.read_text())
    else:
        raise SystemExit("give measured rates: --bench bench.json ... or --rates rates.json")
    config, _ = config_checks.load(args.configs, args.workdir)
    images, per_image = _parse_counts(args.counts), args.elements_per_image
    if args.data:
        samples = pd.read_parquet(args.data / "samples.parquet", columns=["img_path", "split"])
        elements = pd.read_parquet(args.data / "elements.parquet", columns=["img_path"])
        images = {**samples["split"].value_counts().to_dict(), **images}
        per_image = per_image or len(elements) / samples["img_path"].nunique()
    if per_image is None:
        raise SystemExit("give --elements-per-image (or --data)")
    aug = config["instructions"]["image_augmentation"]["fraction"]
    augmented = {task: aug if config["instructions"][task]["image_augmentation"] else 0.0 for task in ("overall", "element")}
    commands = planned_commands(args.configs, args.workdir)
    jobs = estimate(commands, config, Counts(images, per_image, augmented), rates, startup=args.startup_seconds)
    table = summarise(jobs)
    header = (f"GPU-hours on one {rates.get('gpu')} per job, from measured rates; images per split {images}, "
              f"{per_image:g} elements per image, augmented fraction {augmented}, {args.startup_seconds:g} s start-up a job; configs: "
              + " + ".join(str(c) for c in ["config/config.yaml", *args.configs]))
    text = markdown(table, header)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(jobs.to_json(orient="records", indent=1))
    return 0
