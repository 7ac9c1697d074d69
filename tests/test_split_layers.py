"""`imatch train --split-layers` (one swift process, the model's layers over the GPUs) and
`--gpu-memory-cap` (each GPU capped, the split planned for cards of the cap; imatch.gpu_memory),
checked on the CPU with ms-swift's and transformers' own code: the flags as swift's argument
classes read them, the environment that decides swift's launcher and its device map, the plan
transformers makes for Ovis2-34B from the memory we give it, and the plug-in as swift imports it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from imatch import archs, gpu_memory, train

GIB = 2**30


def imatch_args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    train.add_parser(p.add_subparsers())
    return p.parse_args(["train", "--arch", "ovis2", "--model", str(tmp_path), "--dataset", str(tmp_path / "d.jsonl"),
                         "--out", str(tmp_path / "o"), "--scratch", str(tmp_path / "s"), *extra])


def swift_namespace(args, tmp_path):
    """The `swift sft` command built for `args`, read by swift's own parser (nothing unknown)."""
    from swift.arguments import SftArguments
    from transformers import HfArgumentParser

    cmd = train.swift_command(args, archs.get("ovis2"), tmp_path / "s", None)
    namespace, unknown = HfArgumentParser(SftArguments).parse_known_args(cmd[cmd.index("sft") + 1:])
    assert not unknown, unknown
    return namespace


def swift_view(env: dict, monkeypatch, n_gpu: int):
    """What ms-swift decides from the environment of its process on a machine with `n_gpu` GPUs:
    (does its launcher start torchrun, is it a model-parallel run (`is_mp`: device_map over GPUs))."""
    import swift.utils
    from swift.cli.main import use_torchrun
    from swift.utils.env import is_mp

    for key in ("NPROC_PER_NODE", "NNODES", "SWIFT_SINGLE_DEVICE_MODE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "WORLD_SIZE"):
        if key in env:
            monkeypatch.setenv(key, env[key])
        else:
            monkeypatch.delenv(key, raising=False)
    # this machine has no GPU: the one thing not run here is the device count
    monkeypatch.setattr(swift.utils, "get_device_count", lambda: n_gpu)
    return use_torchrun(), is_mp()


def test_split_layers_runs_one_swift_process_whose_device_map_spreads_the_model(tmp_path, monkeypatch):
    from swift.arguments import ModelArguments

    monkeypatch.setenv("NPROC_PER_NODE", "2")  # even one inherited from the job's environment is dropped
    monkeypatch.setenv("SWIFT_SINGLE_DEVICE_MODE", "1")
    args = imatch_args(tmp_path, "--gpus", "2", "--split-layers", "--gpu-memory-cap", "80")
    env = train.swift_environment(args, archs.get("ovis2"), tmp_path / "s")
    assert "NPROC_PER_NODE" not in env and "SWIFT_SINGLE_DEVICE_MODE" not in env
    assert swift_view(env, monkeypatch, n_gpu=2) == (False, True)  # no torchrun; device_map over the GPUs
    ns = swift_namespace(args, tmp_path)
    assert ns.device_map == "auto"
    ModelArguments._init_device_map(ns)
    ModelArguments._init_max_memory(ns)  # swift's own reading of --max_memory
    assert ns.device_map == "auto" and ns.max_memory == {0: 80 * GIB, 1: 80 * GIB}
    assert str(Path(gpu_memory.__file__)) in ns.external_plugins and gpu_memory.NAME in ns.callbacks
    assert env[gpu_memory.CAP_ENV] == "80.0"
    assert env[gpu_memory.RECORD_ENV] == str((tmp_path / "s" / train.GPU_MEMORY).resolve())
    # the recipe is untouched: the step's batch is the recipe's (one process), checkpointing on
    assert ns.per_device_train_batch_size == 8 and ns.gradient_checkpointing is True


def test_the_default_stays_one_data_parallel_process_per_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    args = imatch_args(tmp_path, "--gpus", "2")
    env = train.swift_environment(args, archs.get("ovis2"), tmp_path / "s")
    assert env["NPROC_PER_NODE"] == "2" and gpu_memory.CAP_ENV not in env
    ns = swift_namespace(args, tmp_path)
    assert ns.device_map is None and ns.max_memory is None  # swift's default: cuda:<local rank>
    assert str(Path(gpu_memory.__file__)) not in ns.external_plugins and gpu_memory.NAME not in ns.callbacks
    # under torchrun each of the two processes has one GPU: not model parallel
    assert swift_view({**env, "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, monkeypatch, n_gpu=2)[1] is False
    assert swift_view(env, monkeypatch, n_gpu=2)[0] is True  # the launcher starts torchrun


def test_a_cap_without_split_caps_each_process_and_plans_nothing(tmp_path):
    ns = swift_namespace(imatch_args(tmp_path, "--gpus", "2", "--gpu-memory-cap", "40"), tmp_path)
    assert ns.device_map is None and ns.max_memory is None and gpu_memory.NAME in ns.callbacks
    # one GPU or none: nothing to split, no placement flags (the CPU run of benchmarks/ovis2_34b.sh)
    for gpus in ("0", "1"):
        args = imatch_args(tmp_path, "--gpus", gpus, "--split-layers", "--gpu-memory-cap", "80")
        assert not train.splits_layers(args) and train.device_flags(args) == []
        assert "NPROC_PER_NODE" not in train.swift_environment(args, archs.get("ovis2"), tmp_path / "s")


def test_what_cannot_run_split_is_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="--liger cannot run with --split-layers"):
        train.check_placement(imatch_args(tmp_path, "--gpus", "2", "--split-layers", "--liger"))
    with pytest.raises(SystemExit, match="--gpu-memory-cap -1.0"):
        train.check_placement(imatch_args(tmp_path, "--gpu-memory-cap", "-1"))
    train.check_placement(imatch_args(tmp_path, "--gpus", "2", "--liger"))  # data parallel: liger allowed


def _ovis2_34b_on_meta():
    import torch
    from transformers import Ovis2ForConditionalGeneration

    from imatch.archs import ovis2

    spec = ovis2.SIZES["34b"]
    config = ovis2.native_config({**spec["text"], "vocab_size": 151671}, spec["vision"], image=spec["image"],
                                 image_token_id=151665, indicator_ids=list(range(151666, 151671)))
    with torch.device("meta"):
        return Ovis2ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)


def _bytes_per_device(model, device_map: dict) -> dict:
    out: dict = {}
    for name, param in model.named_parameters():
        key = name
        while key not in device_map and "." in key:
            key = key.rsplit(".", 1)[0]
        device = device_map.get(key, device_map.get(""))
        out[device] = out.get(device, 0) + param.numel() * param.element_size()
    return out


def test_the_34b_split_is_planned_for_two_80_gib_cards(capsys):
    """transformers' device_map="auto" (what swift's from_pretrained call gets) on the real-size
    Ovis2-34B (on the meta device), with the max_memory `--gpu-memory-cap 80 --gpus 2` passes: the
    whole model on GPUs 0 and 1, balanced (~33 GiB of weights each), nothing on the CPU or disk;
    with 30 GiB cards it would not fit (the cap is what the plan obeys)."""
    from transformers.integrations.accelerate import _get_device_map

    model = _ovis2_34b_on_meta()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 68e9 < total < 71e9  # ~69.7 GB of bf16 weights
    plan = _bytes_per_device(model, _get_device_map(model, "auto", gpu_memory.max_memory(80, 2), None))
    assert set(plan) == {0, 1} and sum(plan.values()) == total
    assert all(0.4 * total < b < min(0.6 * total, 80 * GIB) for b in plan.values()), plan
    # the LLM's decoder layers stay whole (transformers' no-split modules) and the head is on the last GPU
    device_map = _get_device_map(model, "auto", gpu_memory.max_memory(80, 2), None)
    assert device_map["lm_head"] == 1 and device_map["model.vision_tower"] == 0
    small = _bytes_per_device(model, _get_device_map(model, "auto", gpu_memory.max_memory(30, 2), None))
    assert set(small) - {0, 1}, "30 GiB cards hold less than the model: the rest is put off the GPUs"


def test_the_cap_is_the_share_of_the_card_and_never_more_than_all_of_it():
    h200 = 150_754_820_096  # torch's total_memory of an H200 (143,771 MiB)
    assert gpu_memory.fraction(80, h200) == pytest.approx(80 * GIB / h200) == pytest.approx(0.5698, abs=1e-4)
    assert gpu_memory.fraction(80, 85_029_158_912) == 1.0  # an 80 GB H100 (79.2 GiB): no cap
    assert gpu_memory.fraction(40, 80 * GIB) == 0.5
    for bad in (0, -1):
        with pytest.raises(ValueError, match="must be positive"):
            gpu_memory.fraction(bad, h200)
    assert gpu_memory.max_memory(79.5, 3) == {0: int(79.5 * GIB), 1: int(79.5 * GIB), 2: int(79.5 * GIB)}
    with pytest.raises(ValueError):
        gpu_memory.max_memory(80, 0)


def test_each_process_caps_its_own_gpus():
    assert gpu_memory.process_devices(2, {}) == [0, 1]  # one process over both (split layers)
    assert gpu_memory.process_devices(2, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == [1]  # torchrun rank 1
    assert gpu_memory.process_devices(4, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == [0, 2]  # MP + DDP
    assert gpu_memory.process_devices(0, {}) == []


def test_the_plugin_is_a_no_op_without_cuda_and_records_what_it_saw(tmp_path, monkeypatch):
    """Imported as swift imports plug-ins (by path), with a cap set, on this machine without CUDA:
    nothing capped, no error; its callback is registered and writes one line at the end of training."""
    import torch
    from swift.callbacks import callbacks_map
    from swift.utils.utils import import_external_file

    assert not torch.cuda.is_available()
    record = tmp_path / "gpu-memory.jsonl"
    monkeypatch.setenv(gpu_memory.CAP_ENV, "80")
    monkeypatch.setenv(gpu_memory.RECORD_ENV, str(record))
    assert gpu_memory.apply_cap(80) == [] and gpu_memory.peaks() == []
    module = import_external_file(gpu_memory.__file__)
    assert module.CAPPED == [] and callbacks_map[gpu_memory.NAME] is module._callback
    callback = module._callback(None, None)
    callback.on_train_end(None, type("State", (), {"global_step": 6})(), None)
    assert gpu_memory.read_records(record) == [{"local_rank": int(os.environ.get("LOCAL_RANK", -1)), "global_step": 6,
                                                "cap_gib": 80.0, "devices": []}]
    assert gpu_memory.read_records(tmp_path / "none.jsonl") == []
    assert json.loads(record.read_text().splitlines()[0])["cap_gib"] == 80.0


def test_the_34b_script_runs_its_wiring_through_swift_sft_on_the_cpu(tmp_path):
    """benchmarks/ovis2_34b.sh end to end with the tiny Ovis2 on the CPU (SIZE=tiny DEVICE=cpu): demo
    data, the ovis2-34b recipe read from config/evalmuse.yaml plus the split and the cap, the backbone,
    `imatch train` with the cap's plug-in, and the report. On the CPU nothing is split or capped;
    the GPU run (2 GPUs) is the same script with SIZE=34b (docs/performance.md)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SIZE": "tiny", "DEVICE": "cpu", "STEPS": "1", "PROMPTS": "6", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(repo / "benchmarks" / "ovis2_34b.sh"), str(tmp_path / "out"), str(tmp_path / "work")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["checks"] and all(summary["checks"].values())
    assert summary["parallelism"] == "single" and summary["gpu_memory_cap_gib"] == 80
    assert summary["recipe"]["lora_rank"] == 16 and summary["recipe"]["freeze_vit"] is False
    assert summary["recipe"]["freeze_aligner"] is False and summary["recipe"]["gradient_checkpointing"] is True
    assert summary["samples_per_step"] == 16 and len(summary["loss_per_step"]) == 1
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["gpu_memory"]["processes"][0]["devices"] == []  # the plug-in ran, no CUDA to cap
    assert "--split-layers" in (tmp_path / "out" / "run.log").read_text()
