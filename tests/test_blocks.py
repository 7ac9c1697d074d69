"""Compiled transformer blocks in training (`imatch train --compile`, `imatch.blocks`): ms-swift
trains the same function as with eager blocks, LoRA's dropout included, and the blocks did run
compiled (a compile that silently fell back to eager would pass an equality check alone)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from imatch.backbone import tiny_backbone
from imatch.instructions import build_overall, write_set

PIXELS = 16384


@pytest.fixture(scope="module")
def overall_set(ingested, tmp_path_factory):
    samples, elements = ingested
    folder = tmp_path_factory.mktemp("overall")
    table = build_overall(pd.read_parquet(samples), pd.read_parquet(elements), "train")
    write_set(table, folder / "ov.parquet", folder / "ov.jsonl", {})
    rows = folder / "ov.jsonl"
    first = rows.read_text().splitlines()[:8]
    (folder / "eight.jsonl").write_text("".join(line + "\n" for line in first))
    return folder / "eight.jsonl"


def _train(arch, model, dataset, tmp_path, *flags):
    """`imatch train` in its own process (ms-swift prints the plug-in's lines to its stdout);
    returns (stdout, the logged steps)."""
    name = "-".join(flags) or "eager"
    out, scratch = tmp_path / f"model{name}", tmp_path / f"scratch{name}"
    proc = subprocess.run(
        [sys.executable, "-m", "imatch", "train", "--arch", arch, "--model", str(model), "--dataset", str(dataset),
         "--out", str(out), "--scratch", str(scratch), "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1",
         "--dtype", "float32", "--max-pixels", str(PIXELS), "--learning-rate", "1e-2", "--warmup-ratio", "0",
         "--lr-scheduler", "constant", "--no-gradient-checkpointing", "--keep-scratch", "--threads", "2", *flags],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [row for row in map(json.loads, (scratch / "logging.jsonl").read_text().splitlines()) if "grad_norm" in row]
    return proc.stdout, steps


def test_compiled_blocks_train_the_eager_function_with_lora_dropout(overall_set, tmp_path):
    """The paper's recipe (LoRA r16 on every linear layer, ViT and aligner trained, ms-swift's LoRA
    dropout 0.05) in float32 on the CPU, two optimizer steps of 4 queries: the compiled run logs the
    eager run's loss and gradient norm at step 1 and its loss after a step (so the dropout masks are
    the same draws and the update the same), while every decoder layer and vision block ran
    compiled."""
    model = tmp_path / "qwen"
    tiny_backbone("qwen2_5_vl", model, size="tiny", seed=0)
    _, eager = _train("qwen2_5_vl", model, overall_set, tmp_path)
    out, compiled = _train("qwen2_5_vl", model, overall_set, tmp_path, "--compile")
    blocks = int(re.search(r"imatch: compiled (\d+) transformer blocks", out)[1])
    graphs = int(re.search(r"imatch: (\d+) compiled graphs ran", out)[1])
    assert blocks >= 4 and graphs >= 2, out[-2000:]  # LLM layers and vision blocks, forward graphs at least
    assert len(eager) == len(compiled) == 2
    for step, key, tol in ((0, "loss", 1e-5), (0, "grad_norm", 1e-4), (1, "loss", 1e-5)):
        a, b = float(compiled[step][key]), float(eager[step][key])
        assert abs(a - b) <= tol * abs(b), (step, key, a, b)
    assert float(eager[1]["loss"]) != float(eager[0]["loss"])  # the step changed the model


def _train_args(*flags):
    from imatch.cli import build_parser

    return build_parser().parse_args(["train", "--arch", "qwen2_5_vl", "--model", "m", "--dataset", "d.jsonl",
                                      "--out", "o", "--scratch", "s", *flags])


@pytest.mark.parametrize("packed", [False, True])
def test_compile_reaches_swift_for_per_query_rows_only(packed, tmp_path):
    """`--compile` loads the plug-in and its callback into `swift sft` for per-query rows; packed
    rows (prefix sharing: 3.3x slower compiled on an H200) train eager, and the record says which."""
    from imatch import archs, blocks, train

    args = _train_args("--compile", "--share-prefix")
    cmd = train.swift_command(args, archs.get("qwen2_5_vl"), tmp_path, None, tmp_path / "packed.jsonl" if packed else None)
    plugins = cmd[cmd.index("--external_plugins") + 1:cmd.index("--callbacks")]
    callbacks = cmd[cmd.index("--callbacks") + 1:]
    assert (blocks.__file__ in plugins) is (not packed) and (blocks.NAME in callbacks) is (not packed)
    assert train.compiles(args, packed) is (not packed)
    eager = _train_args("--share-prefix")
    assert blocks.__file__ not in train.swift_command(eager, archs.get("qwen2_5_vl"), tmp_path, None, None)


def test_liger_with_compiled_blocks_is_refused_before_anything_loads():
    from imatch import train

    with pytest.raises(SystemExit, match="--liger cannot run with --compile"):
        train.check_placement(_train_args("--compile", "--liger"))
    train.check_placement(_train_args("--compile"))

