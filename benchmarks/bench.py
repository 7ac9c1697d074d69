"""The benchmark driver: the two GPU stages against a naive baseline, in one run, with a table.

Usage (from the checkout, the project installed): `python benchmarks/bench.py --help`. It lives
outside the package because no rule runs it; the results it wrote before 2026-11-30 name it by
its old name, `imatch bench`.

For each architecture it builds a random-weight backbone (the real size on a GPU; `--size tiny`
tests the benchmark itself on a CPU), makes overall-score queries on demo images of each size
(through `demo-data`, `ingest` and `instructions`, as the workflow does), and measures:

- scoring, naive: plain transformers (sdpa, full logits, the processor on the main thread,
  batches in the set's order) - versus the workflow's `score-set` path (`imatch.score`: the vision
  windows in one kernel, logits at the answer only, length-bucketed batches, encoding in worker
  processes, asynchronous copies). Both score the same queries; the table says how far apart
  their probabilities are (bf16).
- training, naive: a plain peft LoRA step (r16 on every linear of the LLM, ViT and aligner,
  gradient checkpointing, AdamW) - versus `imatch train` (`swift sft`, the paper's recipe, the
  flags the workflow passes) with its per-step timings (`--step-times`).

Throughput, achieved TFLOP/s (the FLOPs of one sample counted by torch's FlopCounterMode: the
forward with answer logits only for scoring; forward + backward without recomputation for
training), % of the bf16 peak (measured: a large bf16 GEMM on the same card; the card's dense
spec is printed beside it), peak memory, and the time the GPU waits for data between batches.
Writes bench.json and bench.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import archs, attention, blocks, levels
from imatch.atomic import atomic_path
from imatch.naive import load_plain, naive_score, open_budget, plain_batches, plain_inputs

SPEC_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense, SXM
SIZE_OF = {"qwen2_5_vl": "7b", "internvl": "7b", "ovis2": "8b"}


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device, reset=False) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def gemm_peak(device, dtype) -> float:
    """TFLOP/s of a large square GEMM: what this card delivers at best in this dtype."""
    import torch

    n = 8192 if torch.device(device).type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def spec_peak(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)


def imatch_cli(*argv, quiet=True) -> None:
    subprocess.run([sys.executable, "-m", "imatch", *map(str, argv)], check=True, stdout=subprocess.DEVNULL if quiet else None)


def query_set(work: Path, image_size: int, prompts: int, seed: int) -> pd.DataFrame:
    """Overall-score queries (with element levels, as round 2 asks them) on demo images."""
    folder = work / f"queries-{image_size}"
    table = folder / "overall-train.parquet"
    if not table.is_file():
        imatch_cli("demo-data", "--out", folder / "source", "--train-prompts", prompts, "--val-prompts", 2,
                   "--test-prompts", 0, "--image-size", image_size, "--seed", seed)
        imatch_cli("ingest", "--source", folder / "source", "--out", folder / "data", "--holdout-fraction", 0.1)
        imatch_cli("instructions", "--task", "overall", "--split", "train", "--samples", folder / "data/samples.parquet",
                   "--elements", folder / "data/elements.parquet", "--element-levels", "ground-truth",
                   "--out", table, "--jsonl", folder / "overall-train.jsonl")
    return pd.read_parquet(table)


def element_set(work: Path, image_size: int, prompts: int, seed: int) -> tuple[pd.DataFrame, Path]:
    """Element queries (one per image and element, prompt type stated) on demo images: the
    parquet table and the ms-swift jsonl of the training split."""
    folder = work / f"queries-{image_size}"
    query_set(work, image_size, prompts, seed)  # the demo data and its ingested tables
    table, jsonl = folder / "element-train.parquet", folder / "element-train.jsonl"
    if not table.is_file():
        imatch_cli("instructions", "--task", "element", "--split", "train", "--samples", folder / "data/samples.parquet",
                   "--elements", folder / "data/elements.parquet", "--prompt-type", "--out", table, "--jsonl", jsonl)
    return pd.read_parquet(table), jsonl


def count_flops(model, fn) -> float:
    """FLOPs of fn() by torch's FlopCounterMode, attention counted through the eager (matmul)
    implementation: the counter's sdpa formula rejects grouped-query shapes (torch 2.11)."""
    from torch.utils.flop_counter import FlopCounterMode

    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        if c._attn_implementation == "sdpa":
            c._attn_implementation_internal = "eager"
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- scoring


def timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def bench_scoring(arch, folder, sets, args, device, dtype, peak, report) -> None:
    import torch

    from imatch import score

    rows, probs = [], {}
    # naive first, on the model as transformers loads it
    budget = int(os.environ["MAX_PIXELS"])  # the largest image size, set in run(): no resizing
    # the yardstick for bf16 rounding: the first queries of each size through the naive path in float32
    model, processor = load_plain(folder, arch, device, torch.float32, max_pixels=budget)
    answer_ids = score.answer_token_ids(processor.tokenizer, levels.OVERALL_LETTERS)
    reference = {size: naive_score(model, plain_batches(processor, list(t["image"][:args.reference_queries]),
                                                        list(t["query"][:args.reference_queries]), 4), answer_ids, device)
                 for size, t in sets.items()}
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    model, processor = load_plain(folder, arch, device, dtype, max_pixels=budget)
    flops = {}
    for size, table in sets.items():
        images, queries = list(table["image"]), list(table["query"])
        with torch.inference_mode():
            inputs = plain_inputs(processor, images[:1], queries[:1], device)
            flops[size] = count_flops(model, lambda: model(**inputs, logits_to_keep=1))
            tokens = int(inputs["input_ids"].shape[1])
        for batch in args.batch_sizes[size]:
            prepared = plain_batches(processor, images, queries, batch)
            naive_score(model, prepared[:1], answer_ids, device)  # warm-up
            gaps = score.GpuGaps(device)
            _peak_memory(device, reset=True)
            p, seconds = timed(lambda: naive_score(model, prepared, answer_ids, device, gaps), device)
            probs[("naive", size, batch)] = p
            rows.append(_score_row(arch, "naive", size, batch, tokens, len(queries), seconds, flops[size], peak,
                                   _peak_memory(device), gaps.summary()))
            first = probs[("naive", size, args.batch_sizes[size][0])]
            # the bf16 noise floor: the same naive path, only the batch composition differs
            if batch != args.batch_sizes[size][0]:
                rows[-1]["max_abs_prob_diff"] = float(np.abs(p - first).max())
            rows[-1]["max_abs_prob_diff_fp32"] = float(np.abs(p[:len(reference[size])] - reference[size]).max())
            report(rows[-1])
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # the workflow's path: score.load (ms-swift template, the varlen kernel) + score.score_probs
    # MAX_PIXELS is read once by qwen_vl_utils
    model, processor, template = score.load(folder, arch, device=device, dtype=args.dtype, max_pixels=budget)
    open_budget(processor, budget)

    def workflow_row(path, size, batch, images, queries) -> dict:
        """Time score_probs over the set (after a warm-up) and compare it with the naive path."""
        start = time.perf_counter()
        score.score_probs(model, template, images[:2 * batch], queries[:2 * batch], answer_ids, batch_size=batch)
        warm = time.perf_counter() - start
        gaps = score.GpuGaps(device)
        _peak_memory(device, reset=True)
        p, seconds = timed(lambda: score.score_probs(model, template, images, queries, answer_ids, batch_size=batch,
                                                     workers=args.workers, gaps=gaps), device)
        ref = probs[("naive", size, batch)]
        naive = next(r for r in rows if r["path"] == "naive" and r["image"] == size and r["batch"] == batch)
        row = _score_row(arch, path, size, batch, naive["tokens"], len(queries), seconds, flops[size], peak,
                         _peak_memory(device), gaps.summary())
        row["max_abs_prob_diff"] = float(np.abs(p - ref).max())
        row["max_abs_level_diff"] = float(np.abs((p - ref) @ np.arange(1, 16)).max())
        row["max_abs_prob_diff_fp32"] = float(np.abs(p[:len(reference[size])] - reference[size]).max())
        row["speedup"] = row["per_second"] / naive["per_second"]
        row["vision_attention"] = attention.backend(torch.device(device).type, dtype)
        row["warmup_seconds"] = round(warm, 1)
        return row

    for size, table in sets.items():
        images, queries = list(table["image"]), list(table["query"])
        for batch in args.batch_sizes[size]:
            report(workflow_row("workflow", size, batch, images, queries))
        if args.profile:
            b = max(args.batch_sizes[size])
            profile(model, template, images[:b], queries[:b], answer_ids, b, device,
                    args.out / f"profile-{arch.name}-{size}.txt")
    if args.compile:  # the same path with every transformer block compiled
        print(f"compiled {blocks.compile_blocks(model)} blocks", flush=True)
        for size, table in sets.items():
            images, queries = list(table["image"]), list(table["query"])
            batch = max(args.batch_sizes[size])
            report(workflow_row("workflow+compile", size, batch, images, queries))
            if args.profile:
                profile(model, template, images[:batch], queries[:batch], answer_ids, batch, device,
                        args.out / f"profile-{arch.name}-{size}-compiled.txt")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def bench_element_scoring(arch, folder, table, args, device, report) -> None:
    """Element scoring, the workflow's path per query against the same path with the image's
    prefix shared (`--share-prefix`), same run, same queries: element queries per second and the
    largest difference of any answer probability (bf16 rounding)."""
    import torch

    from imatch import prefix, score

    model, processor, template = score.load(folder, arch, device=device, dtype=args.dtype,
                                            max_pixels=args.train_image ** 2)
    answer_ids = score.answer_token_ids(processor.tokenizer, levels.ELEMENT_DIGITS)
    images, queries = list(table["image"]), list(table["query"])
    per_image = len(table) / table["img_path"].nunique()
    compiled = False
    for use_compile in ([False, True] if args.compile else [False]):
        if use_compile and not compiled:
            print(f"compiled {blocks.compile_blocks(model)} blocks", flush=True)
            compiled = True
        probs = {}
        # the shared-prefix path twice: its own attention kernels, and with cuDNN's allowed (prefix.sdpa_backends)
        for share, batch, cudnn in ((False, args.element_batch, False), (True, args.element_image_batch, False),
                                    (True, args.element_image_batch, True)):
            os.environ.pop(prefix.CUDNN_ENV, None)
            if cudnn:
                os.environ[prefix.CUDNN_ENV] = "1"
            run = lambda n=None: score.score_probs(model, template, images[:n], queries[:n], answer_ids,  # noqa: E731
                                                   batch_size=batch, workers=args.workers, share_prefix=share)
            run(int(3 * batch * (per_image if share else 1)))  # warm-up (and compilation)
            _peak_memory(device, reset=True)
            gaps = score.GpuGaps(device)
            p, seconds = timed(lambda: score.score_probs(model, template, images, queries, answer_ids, batch_size=batch,
                                                         workers=args.workers, share_prefix=share, gaps=gaps), device)
            os.environ.pop(prefix.CUDNN_ENV, None)
            if cudnn:
                probs["cudnn"] = p
            else:
                probs[share] = p
            if args.profile and not cudnn:  # three batches' worth of queries (shared prefixes: 3 x `batch` images)
                n = int(3 * batch * (per_image if share else 1))
                profile(model, template, images[:n], queries[:n], answer_ids, batch, device,
                        args.out / f"profile-{arch.name}-element-{'shared' if share else 'per-query'}.txt",
                        share_prefix=share, workers=args.workers)
            row = {"arch": arch.name, "stage": "element-score", "path": "shared prefix" if share else "per query",
                   "variant": ("score-set --share-prefix (batch = images)" if share else "score-set")
                   + (" --compile" if use_compile else "") + (f" {prefix.CUDNN_ENV}=1" if cudnn else ""),
                   "image": args.train_image, "batch": batch, "items": len(queries), "seconds": round(seconds, 3),
                   "per_second": len(queries) / seconds, "peak_memory_gib": _peak_memory(device),
                   "gpu_idle_fraction": gaps.summary()["idle_fraction"], "elements_per_image": round(per_image, 2)}
            if share:
                base = next(r for r in report.rows if r["stage"] == "element-score" and r["path"] == "per query"
                            and r["variant"].endswith("--compile") == use_compile)
                row["speedup"] = row["per_second"] / base["per_second"]
                row["max_abs_prob_diff"] = float(np.abs(p - probs[False]).max())
                if cudnn:
                    row["max_abs_prob_diff_vs_default"] = float(np.abs(p - probs[True]).max())
            report(row)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def profile(model, template, images, queries, answer_ids, batch, device, path: Path, *, share_prefix=False,
            workers=0) -> None:
    """Where scoring time goes: torch.profiler's table of the heaviest operations (by device time
    and by host time) and a Chrome trace (gzip) of scoring all `queries` in batches of `batch`
    (queries, or images with `share_prefix`); `workers`: encoding in worker processes as the
    workflow does (0: on the main thread, where the profile sees it)."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from imatch import score

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        score.score_probs(model, template, images, queries, answer_ids, batch_size=batch,
                          share_prefix=share_prefix, workers=workers)
    tables = [prof.key_averages().table(sort_by=key, row_limit=25)
              for key in (["self_cuda_time_total"] if cuda else []) + ["cpu_time_total", "self_cpu_time_total"]]
    with atomic_path(path) as tmp:
        tmp.write_text("\n\n".join(tables))
    trace = path.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    with gzip.open(str(trace) + ".gz", "wb") as f:
        f.write(trace.read_bytes())
    trace.unlink()


SCORE_VARIANTS = {"naive": "transformers forward, sdpa, full logits, inputs prepared",
                  "workflow": "imatch score-set", "workflow+compile": "imatch score-set --compile"}


def _score_row(arch, path, size, batch, tokens, n, seconds, flops, peak, memory, gaps) -> dict:
    per_second = n / seconds
    return {"arch": arch.name, "stage": "score", "path": path, "variant": SCORE_VARIANTS[path], "image": size, "batch": batch, "tokens": tokens,
            "items": n, "seconds": round(seconds, 3), "per_second": per_second, "tflop_per_item": flops / 1e12,
            "tflops": per_second * flops / 1e12, "pct_peak": 100 * per_second * flops / 1e12 / peak,
            "peak_memory_gib": memory, "gpu_idle_fraction": gaps["idle_fraction"]}


# ---------------------------------------------------------------- image budget

BUDGET_SHAPES = ["1024x1024", "1024x768", "768x1344", "1536x640"]  # T2I output shapes (w x h)


def budget_image(work: Path, shape: str) -> Path:
    """A deterministic picture of one shape (gradient + shapes; content does not change the cost)."""
    from PIL import Image, ImageDraw

    path = work / "budget" / f"{shape}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = map(int, shape.split("x"))
        x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
        im = Image.fromarray(np.stack([x, y, (x + y) / 2], axis=2).astype(np.uint8))
        ImageDraw.Draw(im).ellipse([w // 5, h // 5, w // 2, h // 2], fill=(220, 30, 30))
        im.save(path)
    return path


def bench_budget(arch, folder, args, device, peak, report) -> None:
    """What each image budget costs in the workflow's scoring path (`score.load` + `score_probs`):
    every image is shrunk to `--budget-pixels` by the template (ms-swift's `--max_pixels`), then
    tiled into at most `max_tiles` tiles (InternVL, Ovis2; Qwen2.5-VL has none): tiles and tokens
    per image, and images per second, for each choice in `--budget-tiles` and each T2I shape."""
    import torch

    from imatch import prompts, score

    choices = [int(t) for t in args.budget_tiles] if arch.tiles_env else [None]
    model, processor, _ = score.load(folder, arch, device=device, dtype=args.dtype, max_pixels=args.budget_pixels)
    answer_ids = score.answer_token_ids(processor.tokenizer, levels.OVERALL_LETTERS)
    query = prompts.overall_query({"prompt": "a red ball on the left of a blue cube"})
    for tiles in choices:
        template = score.make_template(processor, arch, max_pixels=args.budget_pixels, max_tiles=tiles)
        for shape in BUDGET_SHAPES:
            image = str(budget_image(args.work, shape))
            enc = template.encode({"messages": [{"role": "user", "content": query}], "images": [image]})
            crops = int(enc["image_grid_thw"].shape[0]) if "image_grid_thw" in enc else int(enc["pixel_values"].shape[0])
            images, queries = [image] * args.budget_queries, [query] * args.budget_queries
            score.score_probs(model, template, images[:args.budget_batch], queries[:args.budget_batch], answer_ids,
                              batch_size=args.budget_batch)  # warm-up
            _peak_memory(device, reset=True)
            _, seconds = timed(lambda: score.score_probs(model, template, images, queries, answer_ids,
                                                         batch_size=args.budget_batch, workers=args.workers), device)
            report({"arch": arch.name, "stage": "budget", "path": "workflow",
                    "variant": f"max_pixels {args.budget_pixels}, max_tiles {tiles if tiles else '-'}",
                    "image": shape, "tiles": crops, "batch": args.budget_batch, "tokens": len(enc["input_ids"]),
                    "items": len(images), "seconds": round(seconds, 3), "per_second": len(images) / seconds,
                    "peak_memory_gib": _peak_memory(device)})
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


# ---------------------------------------------------------------- training


def naive_training(arch, folder, table, args, device, dtype, peak) -> dict:
    """A plain peft LoRA loop: what a user writes without a training engine."""
    import torch
    from peft import LoraConfig, get_peft_model

    model, processor = load_plain(folder, arch, device, dtype)
    processor.tokenizer.padding_side = "right"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    images, queries = list(table["image"]), list(table["query"])
    answers = [levels.OVERALL_LETTERS[int(lv) - 1] for lv in table["target_level"]]

    def batch(i, n):
        idx = [(i * n + k) % len(queries) for k in range(n)]
        inputs = plain_inputs(processor, [images[k] for k in idx], [queries[k] for k in idx], "cpu",
                              answers=[answers[k] for k in idx])
        labels = torch.full_like(inputs["input_ids"], -100)
        ends = inputs["attention_mask"].sum(1)  # right padding: the answer turn's last tokens
        for r, end in enumerate(ends.tolist()):
            labels[r, end - 3:end] = inputs["input_ids"][r, end - 3:end]
        return {**inputs, "labels": labels}

    one = {k: v.to(device) for k, v in batch(0, 1).items()}
    flops = count_flops(model, lambda: model(**one).loss.backward())
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-5, weight_decay=0.01)
    n = args.train_batch

    prepared = [{k: v.to(device) for k, v in batch(i, n).items()} for i in range(2 + args.train_steps)]

    def step(i):
        loss = model(**prepared[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(2):  # warm-up
        step(i)
    _peak_memory(device, reset=True)
    _, seconds = timed(lambda: [step(i) for i in range(2, 2 + args.train_steps)], device)
    per_second = n * args.train_steps / seconds
    del model, optimizer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"arch": arch.name, "stage": "train", "path": "naive", "image": args.train_image, "batch": n,
            "tokens": int(one["input_ids"].shape[1]), "items": n * args.train_steps, "seconds": round(seconds, 3),
            "per_second": per_second, "tflop_per_item": flops / 1e12, "tflops": per_second * flops / 1e12,
            "pct_peak": 100 * per_second * flops / 1e12 / peak, "peak_memory_gib": _peak_memory(device),
            "gpu_idle_fraction": None, "variant": "peft LoRA r16 all-linear, grad checkpointing, AdamW"}


def workflow_training(arch, folder, jsonl, naive, args, work, variant: dict) -> dict:
    """`imatch train` as the workflow runs it (the paper's recipe), with per-step timings."""
    name = "-".join(f"{k}{v}" for k, v in variant.items())
    out, times = work / f"train-{arch.name}-{name}", work / f"steps-{arch.name}-{name}.jsonl"
    shutil.rmtree(out, ignore_errors=True)  # a finished scratch folder would resume with nothing to do
    times.unlink(missing_ok=True)
    batch = variant.get("batch", args.train_batch)
    if batch > sum(1 for _ in open(jsonl)):
        raise ValueError(f"batch {batch} is larger than the {jsonl} training set: raise --prompts")
    warm = variant.get("warm", 3)  # steps not measured (a compiled variant compiles in its first steps)
    cmd = ["train", "--arch", arch.name, "--model", folder, "--dataset", jsonl, "--out", out / "model",
           "--scratch", out / "scratch", "--max-steps", args.train_steps + warm, "--batch-size", batch,
           "--save-steps", 10_000, "--step-times", times, "--max-pixels", args.train_image ** 2,
           "--workers", args.workers, "--dtype", args.dtype]
    if variant.get("ckpt") is False:
        cmd.append("--no-gradient-checkpointing")
    if variant.get("varlen") is False:
        cmd.append("--no-varlen")
    if variant.get("share"):
        cmd.append("--share-prefix")
    if variant.get("liger"):
        cmd.append("--liger")
    if variant.get("compile"):
        cmd.append("--compile")
    if variant.get("profile"):  # torch.profiler over these measured steps, beside the step times
        first, last = (warm + int(x) for x in str(variant["profile"]).split("-"))
        cmd += ["--profile-steps", f"{first}-{last}"]
    accum = variant.get("accum", 1)
    cmd += ["--grad-accum", accum]
    if args.device == "cpu":
        cmd += ["--tuner", "full"]  # tiny random models: the CPU recipe
    start = time.time()
    from imatch import prefix

    os.environ.pop(prefix.CUDNN_ENV, None)  # "cudnn": true / false, cuDNN attention allowed everywhere / nowhere
    if variant.get("cudnn") is not None:
        os.environ[prefix.CUDNN_ENV] = "1" if variant["cudnn"] else "0"
    try:
        imatch_cli(*cmd, quiet=False)
    finally:
        os.environ.pop(prefix.CUDNN_ENV, None)
    lines = [json.loads(x) for x in times.read_text().splitlines()]
    profiled = Path(str(times) + ".profile.txt")
    if variant.get("profile") and profiled.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(profiled, args.out / f"profile-train-{arch.name}-{name}.txt")
    steps = [x for x in lines if "step" in x][warm:]
    memory = next((x["peak_memory_gib"] for x in lines if "peak_memory_gib" in x), None)
    compute = sum(x["step_seconds"] for x in steps)
    wait = sum(x["wait_seconds"] or 0 for x in steps)
    per_second = batch * accum * len(steps) / (compute + wait)  # samples (answers) per second
    flops = naive["tflop_per_item"] * 1e12
    return {"arch": arch.name, "stage": "train", "path": "workflow", "image": args.train_image, "batch": batch,
            "tokens": naive["tokens"], "items": batch * accum * len(steps), "seconds": round(compute + wait, 3),
            "per_second": per_second, "tflop_per_item": flops / 1e12, "tflops": per_second * flops / 1e12,
            "pct_peak": 100 * per_second * flops / 1e12 / args.peak, "peak_memory_gib": memory,
            "gpu_idle_fraction": wait / (compute + wait), "speedup": per_second / naive["per_second"],
            "variant": "imatch train " + " ".join(f"{k}={v}" for k, v in variant.items()),
            "wall_seconds_with_startup": round(time.time() - start, 1)}


# ---------------------------------------------------------------- table


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"card: {meta['device_name']}, bf16 GEMM peak measured {meta['gemm_peak_tflops']:.0f} TFLOP/s"
            f" (spec dense {meta['spec_peak_tflops']}), torch {meta['torch']}, transformers {meta['transformers']},"
            f" {meta['date']}; vision attention: {meta.get('vision_attention')}\n`{meta.get('command')}`\n\n")
    cols = ["arch", "stage", "path", "variant", "image", "tiles", "batch", "tokens", "per_second", "speedup", "tflops",
            "pct_peak", "peak_memory_gib", "gpu_idle_fraction", "max_abs_prob_diff", "max_abs_prob_diff_fp32"]
    names = ["arch", "stage", "path", "variant", "image", "tiles", "batch", "tokens/item", "items/s", "x naive",
             "TFLOP/s", "% peak", "peak GiB", "GPU idle", "max abs dp vs naive", "max abs dp vs fp32"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def parse_batches(values: list[str], queries: int) -> tuple[dict[int, list[int]], dict[int, int]]:
    """`448:8,32 1036:4,16:256` -> batch sizes {448: [8, 32], 1036: [4, 16]} and queries per image
    size {448: queries, 1036: 256}"""
    batches, counts = {}, {}
    for v in values:
        size, sizes, *n = v.split(":")
        batches[int(size)] = [int(b) for b in sizes.split(",")]
        counts[int(size)] = int(n[0]) if n else queries
    return batches, counts


def run(args) -> dict:
    import torch
    import transformers

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    peak = gemm_peak(device, dtype)
    args.peak = peak
    args.batch_sizes, args.query_counts = parse_batches(args.score_batches, args.queries)
    meta = {"device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "gemm_peak_tflops": peak,
            "spec_peak_tflops": spec_peak(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/bench.py " + " ".join(args.argv),
            "vision_attention": attention.backend(device, dtype)}
    print(json.dumps(meta), flush=True)
    rows = []
    for name in args.arch:
        arch = archs.get(name)
        os.environ.update(arch.env)
        # no resizing below the largest image (scoring): after arch.env, which holds the paper's
        # budget; qwen_vl_utils reads it once, at import
        os.environ["MAX_PIXELS"] = str(max(args.batch_sizes) ** 2)
        size = args.size or SIZE_OF[name]
        folder = work / f"backbone-{name}-{size}"
        if not folder.is_dir():
            from imatch.backbone import tiny_backbone

            tiny_backbone(name, folder, size=size, seed=0)
        sets = {s: query_set(work, s, args.prompts, seed=0).head(args.query_counts[s]) for s in args.batch_sizes}
        report = Reporter(rows, args.out, meta)
        if "score" in args.stages:
            bench_scoring(arch, folder, sets, args, device, dtype, peak, report)
        if "element-score" in args.stages:
            table, _ = element_set(work, args.train_image, args.prompts, seed=0)
            bench_element_scoring(arch, folder, table.head(args.element_queries), args, device, report)
        if "element-train" in args.stages:
            _, jsonl = element_set(work, args.train_image, args.prompts, seed=0)
            naive = {"tflop_per_item": float("nan"), "tokens": None, "per_second": float("nan")}
            for variant in args.train_variants:
                try:
                    row = workflow_training(arch, folder, jsonl, naive, args, work, json.loads(variant))
                except subprocess.CalledProcessError as exc:
                    row = {"arch": arch.name, "path": "workflow", "variant": f"{variant}: failed ({exc})"}
                row.update(stage="element-train", tflops=None, pct_peak=None, speedup=None, tflop_per_item=None)
                base = next((r for r in rows if r.get("stage") == "element-train" and r.get("per_second")
                             and "share=True" not in r["variant"]), None)
                if base and row.get("per_second") and "share=True" in row["variant"]:
                    row["speedup"] = row["per_second"] / base["per_second"]
                report(row)
        if "budget" in args.stages:
            bench_budget(arch, folder, args, device, peak, report)
        if "train" in args.stages:
            train_set = query_set(work, args.train_image, args.prompts, seed=0)
            naive = naive_training(arch, folder, train_set, args, device, dtype, peak)
            report(naive)
            import gc

            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None  # the GPU to the swift process
            jsonl = work / f"queries-{args.train_image}" / "overall-train.jsonl"
            for variant in args.train_variants:
                try:
                    report(workflow_training(arch, folder, jsonl, naive, args, work, json.loads(variant)))
                except subprocess.CalledProcessError as exc:  # e.g. out of memory: say so, go on
                    report({"arch": arch.name, "stage": "train", "path": "workflow", "variant": f"{variant}: failed ({exc})"})
    save(args.out, meta, rows)
    return {"meta": meta, "rows": rows}


class Reporter:
    """Keeps each measurement, prints it and saves the tables (callable with a row)."""

    def __init__(self, rows: list[dict], out: Path, meta: dict):
        self.rows, self.out, self.meta = rows, out, meta

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        print(row, flush=True)
        save(self.out, self.meta, self.rows)


def save(out: Path, meta: dict, rows: list[dict]) -> None:
    """Written after every measurement: a run cut short keeps what it measured."""
    with atomic_path(out / "bench.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown(rows, meta))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["qwen2_5_vl"], help="qwen2_5_vl, internvl, ovis2")
    p.add_argument("--size", help="backbone size (default: the real one, 7b / 8b; `tiny` to test on a CPU)")
    p.add_argument("--stages", nargs="+", default=["score", "train"],
                   choices=["score", "train", "budget", "element-score", "element-train"],
                   help="budget: tokens and images/s of each image budget (--budget-tiles) on T2I image shapes")
    p.add_argument("--budget-pixels", type=int, default=200704, help="the template's pixel budget (paper: 200704)")
    p.add_argument("--budget-tiles", nargs="+", default=["1", "4", "9", "12"],
                   help="max_tiles choices measured for InternVL and Ovis2")
    p.add_argument("--budget-batch", type=int, default=16)
    p.add_argument("--budget-queries", type=int, default=64, help="queries per shape and choice")
    p.add_argument("--score-batches", nargs="+", default=["448:8,32", "1036:4,16"],
                   help="image size, batch sizes and (optionally) queries to score, e.g. 448:8,32 1036:4,16:256")
    p.add_argument("--queries", type=int, default=128, help="queries scored per image size")
    p.add_argument("--reference-queries", type=int, default=32,
                   help="queries per image size also scored in float32: how far each bf16 path is from it")
    p.add_argument("--prompts", type=int, default=40, help="demo prompts per image size (x 4 T2I models = images)")
    p.add_argument("--train-image", type=int, default=448, help="training image size (the paper's budget: 448)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=10, help="measured steps (after warm-up steps)")
    p.add_argument("--train-variants", nargs="*", default=['{"ckpt": false}'],
                   help='`imatch train` variants as JSON, e.g. {"ckpt": false, "batch": 32} {"varlen": false}')
    p.add_argument("--element-queries", type=int, default=512, help="element queries scored (element-score)")
    p.add_argument("--element-batch", type=int, default=64, help="element-score: queries per batch, per query")
    p.add_argument("--element-image-batch", type=int, default=16,
                   help="element-score: images per batch with shared prefixes")
    p.add_argument("--workers", type=int, default=4, help="data workers of the workflow's paths")
    p.add_argument("--compile", action="store_true", help="also score with every transformer block torch.compile'd")
    p.add_argument("--profile", action="store_true", help="also write torch.profiler tables of the workflow's scoring (and element scoring); a training "
                        "variant profiles its steps with \"profile\": \"FIRST-LAST\" (measured steps, 1-based)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--work", type=Path, default=Path("bench-work"), help="backbones and query sets (reused)")
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json and bench.md")
    return p



def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv  # recorded in the results
    result = run(args)
    print(markdown(result["rows"], result["meta"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
