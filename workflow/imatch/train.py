"""Stage `train`: fine-tune a backbone on one instruction set with `swift sft` (the paper's engine).

The recipe (LoRA rank, unfrozen ViT and aligner, learning rate, schedule, epochs, batch) comes in
as flags. ms-swift writes its working checkpoints to a scratch folder that Snakemake does not own:
a killed job resumes from the last checkpoint when rerun, as long as the scratch folder belongs to
the same run (same command, same data: fingerprinted); a stale one is cleared. A resumed full
fine-tune continues from the checkpoint's weights (`restore_live_keys`), and a run whose last step
is already checkpointed trains nothing more (`finished`). Only on success is the final model (full
weights or LoRA adapter, without optimizer state) copied, atomically, to the declared output
together with `training.json`: resolved arguments, loss curve, package versions, data hash and
timings; the scratch folder is then removed (`--keep-scratch` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from imatch import archs, attention, blocks, gpu_memory, integrity, prefix, steptimer, swift_log
from imatch.atomic import atomic_path
from imatch.devices import check_gpus
from imatch.download import sha256_file
from imatch.errors import InputError
from imatch.lengths import check_lengths

PACKAGES = ["ms-swift", "transformers", "torch", "peft", "accelerate", "imatch"]
# checkpoint files that are training state, not the model
STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
FINGERPRINT = "imatch-run.json"
GPU_MEMORY = "gpu-memory.jsonl"  # what imatch.gpu_memory records in the scratch folder


def answers_per_row(args) -> int:
    """Element answers in one packed row: what one device trains on per optimizer step."""
    return args.batch_size * args.grad_accum


def swift_sft(arch: archs.Arch, model, datasets, output_dir, *, workers: int) -> list[str]:
    """The head of every `swift sft` command of ours: the model as its architecture's model type and
    template, the datasets as given (no split, strict), no versioned output folder, no reporting."""
    return [
        # `swift sft` as a module of this Python: works without the console script on PATH, and
        # ms-swift's launcher starts torchrun itself when NPROC_PER_NODE asks for several GPUs
        sys.executable, "-m", "swift.cli.main", "sft",
        "--model", str(model), "--model_type", arch.swift_model_type, "--template", arch.swift_template,
        "--check_model", "false", "--dataset", *map(str, datasets), "--split_dataset_ratio", "0",
        "--strict", "true", "--output_dir", str(output_dir), "--add_version", "false",
        "--report_to", "none", "--dataloader_num_workers", str(workers), "--dataset_num_proc", "1",
    ]


def recipe_flags(args, packed: bool = False) -> list[str]:
    """The `swift sft` flags of the fine-tuning recipe (paper Sec. 4.1 by default). With packed
    rows (`packed`: prefix sharing) one row holds all the answers a device trains on in an
    optimizer step (batch_size x grad_accum: the same loss, the mean over those answers, and the
    same step), so swift's batch is one row, without accumulation, and its length limit the sum
    of the queries' limits."""
    batch, accum, max_length = args.batch_size, args.grad_accum, args.max_length
    if packed:
        batch, accum, max_length = 1, 1, args.max_length * answers_per_row(args)
    flags = [
        "--tuner_type", args.tuner,
        "--freeze_vit", str(not args.train_vit).lower(),
        "--freeze_aligner", str(not args.train_aligner).lower(),
        "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay),
        "--warmup_ratio", str(args.warmup_ratio),
        "--lr_scheduler_type", args.lr_scheduler,
        "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", str(accum),
        "--max_length", str(max_length),
        "--seed", str(args.seed),
        "--data_seed", str(args.seed),
        "--save_steps", str(args.save_steps),
        "--save_total_limit", "2",
        "--logging_steps", "1",
    ]
    if args.max_steps:
        flags += ["--max_steps", str(args.max_steps)]
    if not packed:
        flags += ["--padding_side", getattr(args, "padding_side", "left")]
    if args.tuner == "lora":
        flags += ["--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_alpha),
                  "--target_modules", "all-linear"]
    if args.modules_to_save:
        flags += ["--modules_to_save", *args.modules_to_save]
    if args.max_pixels:
        flags += ["--max_pixels", str(args.max_pixels)]
    if args.dtype == "bfloat16":
        flags += ["--torch_dtype", "bfloat16", "--bf16", "true", "--fp16", "false"]
    else:
        flags += ["--torch_dtype", "float32", "--bf16", "false", "--fp16", "false"]
    if not args.gradient_checkpointing:
        flags += ["--gradient_checkpointing", "false"]
    if getattr(args, "liger", False):
        flags += ["--use_liger_kernel", "true"]
    return flags


def compiles(args, packed: bool) -> bool:
    """`--compile` compiles the blocks of per-query rows only: packed rows (prefix sharing), a new
    length and mask every step, trained 3.3x slower compiled on an H200 (29.5 -> 8.9 answers/s,
    Qwen2.5-VL-7B, docs/performance.md), so they stay eager."""
    return bool(getattr(args, "compile", False)) and not packed


def splits_layers(args) -> bool:
    """One process whose model's layers are spread over the job's GPUs (`--split-layers` with
    two GPUs or more), instead of one data-parallel process per GPU."""
    return bool(getattr(args, "split_layers", False)) and args.gpus >= 2


def device_flags(args) -> list[str]:
    """`swift sft` flags of the model's placement. Split layers: `--device_map auto` (what ms-swift
    picks itself in one process that sees several GPUs, `swift.utils.env.is_mp`; said here rather
    than left to that guess) and, with a memory cap, `--max_memory` so that transformers plans the
    split for cards of the cap: `{0: bytes, 1: bytes, ...}`, which ms-swift reads with
    `ast.literal_eval` (integer keys: the GPUs)."""
    if not splits_layers(args):
        return []
    flags = ["--device_map", "auto"]
    if getattr(args, "gpu_memory_cap", 0):
        flags += ["--max_memory", repr(gpu_memory.max_memory(args.gpu_memory_cap, args.gpus))]
    return flags


def uses_gpu_memory_plugin(args) -> bool:
    return bool(getattr(args, "gpu_memory_cap", 0)) or splits_layers(args)


def swift_command(args, arch: archs.Arch, output_dir: Path, resume: Path | None, packed: Path | None = None) -> list[str]:
    """`packed`: the packed training set of prefix sharing (`imatch.prefix`), trained instead of
    --dataset, with the plug-in that encodes and masks its rows."""
    cmd = [
        *swift_sft(arch, args.model, [packed] if packed else args.dataset, output_dir, workers=args.workers),
        *recipe_flags(args, packed=packed is not None),
        *device_flags(args),
    ]
    plugins, callbacks = [swift_log.__file__, *([arch.plugin] if arch.plugin else [])], []
    if packed:
        plugins.append(prefix.__file__)
    if args.varlen:  # the vision tower's attention windows in one kernel (imatch.attention)
        plugins.append(attention.__file__)
        callbacks.append(attention.NAME)
    if compiles(args, packed is not None):  # each transformer block compiled (imatch.blocks)
        plugins.append(blocks.__file__)
        callbacks.append(blocks.NAME)
    if getattr(args, "step_times", None):  # per-step timings for the benchmark (imatch.steptimer)
        plugins.append(steptimer.__file__)
        callbacks.append(steptimer.NAME)
    if uses_gpu_memory_plugin(args):  # the cap on each GPU, each GPU's peak (imatch.gpu_memory)
        plugins.append(gpu_memory.__file__)
        callbacks.append(gpu_memory.NAME)
    if plugins:
        cmd += ["--external_plugins", *plugins]
    if callbacks:
        cmd += ["--callbacks", *callbacks]
    if resume is not None:
        cmd += ["--resume_from_checkpoint", str(resume)]
    return cmd


def swift_environment(args, arch: archs.Arch, scratch: Path) -> dict:
    """The environment of the `swift sft` process: the template's image budget, how many processes
    (data parallel: NPROC_PER_NODE, ms-swift's launcher then runs torchrun; split layers: one
    process that sees every GPU, so no NPROC_PER_NODE, even an inherited one), the plug-ins' files."""
    env = {**os.environ, **arch.swift_environment(args.max_pixels, args.max_tiles)}
    if splits_layers(args):
        env.pop("NPROC_PER_NODE", None)
        env.pop("SWIFT_SINGLE_DEVICE_MODE", None)  # would hide the split from ms-swift (is_mp)
    elif args.gpus > 1:  # ms-swift's launcher runs torchrun with one process per GPU
        env["NPROC_PER_NODE"] = str(args.gpus)
    if args.step_times:
        env["IMATCH_STEP_TIMES"] = str(Path(args.step_times).resolve())
        if getattr(args, "profile_steps", None):
            env["IMATCH_PROFILE_STEPS"] = args.profile_steps
    if args.threads:  # torch's CPU threads in the swift process: the cores this job was given
        env["OMP_NUM_THREADS"] = str(args.threads)
    if uses_gpu_memory_plugin(args):
        env[gpu_memory.CAP_ENV] = str(getattr(args, "gpu_memory_cap", 0) or 0)
        env[gpu_memory.RECORD_ENV] = str((scratch / GPU_MEMORY).resolve())
    return env


def checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def complete(checkpoint: Path) -> bool:
    """A checkpoint the trainer finished writing (a kill can leave a partial one behind)."""
    return (checkpoint / "trainer_state.json").is_file() and any(checkpoint.glob("*.safetensors"))


def check_against_sidecar(dataset: Path, rows: int) -> None:
    """A set written by `imatch instructions` has a sidecar `<set>.parquet.json` with its row count:
    a file cut at a line boundary is refused."""
    sidecar = dataset.with_suffix(".parquet.json")
    if not sidecar.is_file():
        return  # a set made by hand: nothing to compare with
    record = json.loads(sidecar.read_text())
    expected = (record.get("counts") or {}).get("rows")
    if expected is not None and rows != expected:
        raise InputError(dataset, f"{rows} rows, but {sidecar.name} records {expected} (cut short?)")


def stop_process_tree(proc, grace: float = 30.0) -> None:
    """SIGTERM to a child and all its descendants (ms-swift's launcher starts more processes), then
    SIGKILL to whatever is left after `grace` seconds."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def finished(checkpoint: Path) -> bool:
    """A checkpoint at the last step of its run: resuming it would train a step past the end."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def restore_live_keys(checkpoint: Path) -> None:
    """Make a full fine-tune's checkpoint resumable. transformers 5 saves InternVL and Qwen2.5-VL
    weights under their original checkpoint names (a reverse key mapping), but the Trainer resumes
    by `load_state_dict(strict=False)` of those names: nothing matches, and training silently goes
    on from the backbone's weights. Rewrite the weights under the live module names (what
    `from_pretrained` maps them to), atomically; LoRA adapters are resumed by peft and left as they are."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForImageTextToText

    if (checkpoint / "adapter_config.json").is_file():
        return
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype="auto", device_map="cpu")
    with torch.no_grad():
        tmp = checkpoint / "model.safetensors.imatch-tmp"
        save_model(model, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, checkpoint / "model.safetensors")  # the Trainer reads this one before any shards
    for shard in [*checkpoint.glob("model-*-of-*.safetensors"), checkpoint / "model.safetensors.index.json"]:
        shard.unlink(missing_ok=True)


def prepare_scratch(scratch: Path, fingerprint: dict) -> Path | None:
    """Keep the scratch folder only if it belongs to this run; return the checkpoint to resume."""
    record = scratch / FINGERPRINT
    if scratch.exists() and (not record.is_file() or json.loads(record.read_text()) != fingerprint):
        print(f"scratch {scratch} belongs to another run: clearing it")
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(fingerprint, indent=1))
    done = [c for c in checkpoints(scratch) if complete(c)]
    for partial in set(checkpoints(scratch)) - set(done):
        shutil.rmtree(partial)
    return done[-1] if done else None


def loss_curve(logging_jsonl: Path) -> list[dict]:
    """Loss per optimizer step. logging.jsonl is appended across resumed runs: steps redone after
    a resume appear twice, and the later entry is the one the final model descends from."""
    by_step = {}
    for line in logging_jsonl.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "global_step/max_steps" in row:
            step = int(str(row["global_step/max_steps"]).split("/")[0])
            by_step[step] = {"step": step, "loss": float(row["loss"]),
                             "learning_rate": float(row.get("learning_rate", "nan")),
                             "token_acc": float(row.get("token_acc", "nan"))}
    return [by_step[k] for k in sorted(by_step)]


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_placement(args) -> None:
    """Refuse what cannot run: a bad cap, liger with compiled blocks or split layers (before anything loads)."""
    if getattr(args, "gpu_memory_cap", 0) < 0:
        raise SystemExit(f"--gpu-memory-cap {args.gpu_memory_cap}: a cap in GiB, > 0 (0: none)")
    if getattr(args, "liger", False) and getattr(args, "compile", False):
        raise SystemExit("--liger cannot run with --compile: Dynamo fails to trace liger-kernel's Triton autograd "
                         "functions inside a compiled block (torch 2.11, an H200 run: docs/performance.md); "
                         "the compiled blocks fuse the same norms and activations themselves")
    if splits_layers(args) and getattr(args, "liger", False):  # ms-swift refuses it after loading the model
        raise SystemExit("--liger cannot run with --split-layers: ms-swift's liger kernels do not support a "
                         "model spread over GPUs (device_map)")


def train(args) -> dict:
    arch = archs.get(args.arch)
    check_placement(args)
    if getattr(args, "profile_steps", None) and not args.step_times:
        raise SystemExit("--profile-steps needs --step-times (the profile is written beside the timings)")
    gpu_line = check_gpus(args.gpus)
    if getattr(args, "split_layers", False) and args.gpus < 2:
        print(f"--split-layers with {args.gpus} GPU(s): nothing to split, one process as without it")
    n_rows, data_hash = 0, []
    for dataset in args.dataset:
        if not Path(dataset).is_file():
            raise InputError(dataset, "training set not found")
        rows = sum(1 for _ in open(dataset, encoding="utf-8"))
        if rows == 0:
            raise InputError(dataset, "training set is empty")
        check_against_sidecar(Path(dataset), rows)
        data_hash.append(sha256_file(Path(dataset)))
        n_rows += rows
    integrity.verify(args.model)  # the backbone, before swift loads it
    # a query over --max_length would stop swift at the step that first draws it, the record unnamed
    longest = check_lengths(args.dataset, arch, args.model, max_length=args.max_length,
                            max_pixels=args.max_pixels, max_tiles=args.max_tiles)
    print(f"longest query: {longest} tokens (max_length {args.max_length})")
    tiles = arch.tiles_environment(args.max_tiles)  # env: ms-swift's templates read the tile budget there
    packed = args.scratch / "packed.jsonl" if args.share_prefix and prefix.shares(args.dataset) else None
    fingerprint = {"command": swift_command(args, arch, args.scratch, None, packed), "data_sha256": data_hash,
                   "tiles": tiles}
    resume = prepare_scratch(args.scratch, fingerprint)
    packing = None
    if packed is not None:  # deterministic: the same bytes on a resume
        packing = prefix.pack_rows(args.dataset, packed, answers=answers_per_row(args), seed=args.seed)
        print(f"prefix sharing: {packing['queries']} queries of {packing['images']} images in {packing['rows']} rows "
              f"of {answers_per_row(args)} answers, {packing['prefixes_encoded']} prefixes encoded", flush=True)
    if getattr(args, "compile", False) and packed is not None:
        print("--compile: packed rows train with eager blocks (compiled, they were measured slower)", flush=True)
    done = resume is not None and finished(resume)
    if done:  # a finished run whose output was not written (killed, or a failed copy): nothing to train
        print(f"{resume} is the last step of this run: nothing left to train, making the output from it")
    elif resume is not None:
        print(f"resuming from {resume}")
        restore_live_keys(resume)
    env = swift_environment(args, arch, args.scratch)
    (args.scratch / GPU_MEMORY).unlink(missing_ok=True)  # this run's peaks only
    cmd = swift_command(args, arch, args.scratch, resume, packed)
    start = time.time()
    if not done:
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, env=env)
        try:
            returncode = proc.wait()
        except BaseException:  # SIGTERM (imatch.cli), Ctrl-C: never leave swift training on as an orphan
            stop_process_tree(proc)
            raise
        if returncode != 0:
            raise SystemExit(f"swift sft failed with exit code {returncode}; checkpoints kept in {args.scratch}")
    wall = time.time() - start
    final = [c for c in checkpoints(args.scratch) if complete(c)]
    if not final:
        raise SystemExit(f"swift sft finished without a checkpoint in {args.scratch}")
    final = final[-1]
    curve = loss_curve(args.scratch / "logging.jsonl")
    state = json.loads((final / "trainer_state.json").read_text())
    steps_this_run = state.get("global_step", 0) - (int(resume.name.split("-")[1]) if resume else 0)
    record = {
        "arch": arch.name,
        "base_model": str(args.model),
        "dataset": [str(d) for d in args.dataset],
        "dataset_rows": n_rows,
        "dataset_sha256": data_hash,
        "resumed_from": None if resume is None else resume.name,
        "global_step": state.get("global_step"),
        "max_steps": state.get("max_steps"),
        "wall_seconds_this_run": round(wall, 2),
        "seconds_per_step_this_run": round(wall / max(1, steps_this_run), 4),  # includes start-up
        "devices": gpu_line,
        # one process over the GPUs (layers split) or one per GPU; the cap and each GPU's peak
        "parallelism": "split-layers" if splits_layers(args) else ("data-parallel" if args.gpus > 1 else "single"),
        "gpu_memory": None if not uses_gpu_memory_plugin(args) else {
            "cap_gib": getattr(args, "gpu_memory_cap", 0) or None,
            "max_memory": gpu_memory.max_memory(args.gpu_memory_cap, args.gpus)  # the split's plan
            if getattr(args, "gpu_memory_cap", 0) and splits_layers(args) else None,
            "processes": gpu_memory.read_records(args.scratch / GPU_MEMORY)},
        "swift_command": cmd,
        "swift_args": json.loads((args.scratch / "args.json").read_text()) if (args.scratch / "args.json").is_file() else None,
        "loss_curve": curve,
        "versions": versions(),
        "adapter": (final / "adapter_config.json").is_file(),
        "prefix_sharing": packing,
        "compiled_blocks": compiles(args, packed is not None),  # imatch.blocks (--compile, per-query rows)
        # what every image was reduced to: the template's pixel budget, then at most max_tiles tiles
        "image_budget": {"max_pixels": args.max_pixels or None, "max_tiles": args.max_tiles, "env": tiles},
    }
    with atomic_path(args.out, directory=True) as tmp:
        for item in final.iterdir():
            if item.name in STATE_FILES:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / "training.json").write_text(json.dumps(record, indent=1))
        integrity.seal(tmp)  # scoring checks the adapter against it before loading
    if not args.keep_scratch:  # the output is sealed: its checkpoints (most of the disk) are not needed
        shutil.rmtree(args.scratch, ignore_errors=True)
    return record


def add_recipe_arguments(p) -> None:
    g = p.add_argument_group("recipe (defaults: the paper's, Sec. 4.1)")
    g.add_argument("--tuner", choices=["lora", "full"], default="lora")
    g.add_argument("--lora-rank", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--train-vit", action=argparse.BooleanOptionalAction, default=True, help="LoRA on (or full training of) the ViT")
    g.add_argument("--train-aligner", action=argparse.BooleanOptionalAction, default=True, help="train the cross-modal aligner")
    g.add_argument("--modules-to-save", nargs="*", default=[], help="modules trained fully beside LoRA")
    g.add_argument("--learning-rate", type=float, default=4e-5)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--lr-scheduler", default="cosine")
    g.add_argument("--epochs", type=float, default=1)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs decide)")
    g.add_argument("--batch-size", type=int, default=8, help="per device")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--max-pixels", type=int, default=200704, help="image budget in pixels (paper: 200704)")
    g.add_argument("--max-length", type=int, default=2048)
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--varlen", action=argparse.BooleanOptionalAction, default=True,
                   help="the vision tower's attention windows in one kernel (imatch.attention), not one call each")
    g.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="train the queries of an image in one packed row, its image and prompt encoded once "
                        "(imatch.prefix; exact; only sets with several queries per image are packed)")
    g.add_argument("--liger", action=argparse.BooleanOptionalAction, default=False,
                   help="liger-kernel's Triton kernels in swift sft (fused linear cross-entropy: the vocabulary-sized "
                        "logits are never materialised; RMSNorm, SwiGLU, RoPE); needs `pip install liger-kernel` and a GPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile every transformer block in swift sft (imatch.blocks: the LoRA branches' casts, "
                        "dropout and the norms between the GEMMs fuse; same function, eager's dropout masks; "
                        "the first steps compile, ~1 min on a GPU). Per-query rows only: packed rows "
                        "(--share-prefix) stay eager, where compiling was measured slower")
    g.add_argument("--save-steps", type=int, default=200, help="checkpoint interval (resume granularity)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="dataloader workers")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a backbone on an instruction set with swift sft",
                              description=__doc__)
    p.add_argument("--arch", required=True, help="qwen2_5_vl, internvl or ovis2")
    p.add_argument("--model", type=Path, required=True, help="backbone folder (native transformers layout)")
    p.add_argument("--dataset", type=Path, nargs="+", required=True,
                   help="ms-swift jsonl file(s) from `imatch instructions` (round 2: train + pseudo-labelled val)")
    p.add_argument("--out", type=Path, required=True, help="folder receiving the final model and training.json")
    p.add_argument("--scratch", type=Path, required=True, help="working folder for checkpoints (resume)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs this job asked for; fail if a different number is visible")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default, every core)")
    p.add_argument("--split-layers", action=argparse.BooleanOptionalAction, default=False,
                   help="with --gpus N >= 2: ONE swift process over the N GPUs, the model's layers split over them "
                        "(ms-swift's device_map=auto, run one GPU after the other), for a model too big for one card "
                        "(Ovis2-34B on 80 GB cards); --batch-size is then the step's whole batch. Default: one "
                        "data-parallel process per GPU (torchrun), each holding the whole model")
    p.add_argument("--gpu-memory-cap", type=float, default=0, metavar="GIB",
                   help="cap each GPU of the training process at GIB GiB (torch's per-process memory fraction, "
                        "imatch.gpu_memory; an allocation past it fails as on a card of that size), and with "
                        "--split-layers plan the split for cards of GIB GiB (swift's --max_memory); "
                        "0: no cap. Each GPU's peak memory goes to training.json")
    p.add_argument("--step-times", type=Path, help="append per-step compute / data-wait seconds here (JSON lines)")
    p.add_argument("--profile-steps", metavar="FIRST-LAST", type=_step_span,
                   help="with --step-times: torch.profiler over these optimizer steps (1-based), its tables written "
                        "to <step-times>.profile.txt")
    p.add_argument("--padding-side", choices=["left", "right"], default="left",
                   help="where swift pads a batch of per-query rows. Left: every row ends with its answer, so "
                        "ms-swift's logits_to_keep keeps only the answer's few positions; right (ms-swift's default) "
                        "keeps, in every row, every position from the batch's earliest answer on: vocabulary-sized "
                        "logits for as many positions as the rows' lengths differ (Qwen2.5-VL's 151,665 columns: "
                        "4x the step time of a tiny model on the CPU). "
                        "The same loss and gradients (tests/test_padding.py); packed rows are never padded")
    p.add_argument("--keep-scratch", action="store_true",
                   help="keep the working checkpoints after the output is written (default: removed)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="most tiles per image (InternVL MAX_NUM, Ovis2 max_partition; default: ms-swift's, 12 / 9); "
                        "not for Qwen2.5-VL, whose budget is --max-pixels alone")
    add_recipe_arguments(p)
    p.set_defaults(func=_run)


def _step_span(text: str) -> str:
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST optimizer steps (1-based), got {text!r}")
    return text


def _run(args) -> int:
    record = train(args)
    last = record["loss_curve"][-1]["loss"] if record["loss_curve"] else None
    print(json.dumps({"global_step": record["global_step"], "final_loss": last, "wall_seconds": record["wall_seconds_this_run"]}))
    return 0
