"""GPU memory of a `swift sft` run: each GPU capped at a number of GiB, and each one's peak recorded
(`imatch train --gpu-memory-cap GIB`, `--split-layers`).

Loaded by ms-swift as an external plug-in (`--external_plugins <this file> --callbacks
imatch_gpu_memory`). At import, in the training process, it caps PyTorch's allocator on every GPU
that process uses at IMATCH_GPU_MEMORY_CAP_GIB GiB (unset or 0: no cap):
`torch.cuda.set_per_process_memory_fraction(cap / total, device)`, so an allocation past the cap
fails with an out-of-memory error, as it would on a card of that size (an 80 GB card on an H200).
What the cap does not cover: the CUDA context of the process (~0.5 GiB per GPU, outside the
allocator) and other processes. A cap at or above the card's memory is no cap (fraction 1).

The GPUs of the process: every visible one (one process, layers split over them by swift's
device_map), or under torchrun (data parallel) this rank's own. Dataloader workers replay plug-in
imports (ms-swift's `patch_dataloader_external_plugins`): they touch no GPU and cap nothing.

The cap also bounds where swift places the layers: `imatch train --split-layers` passes
`--max_memory` = `max_memory(cap, gpus)`, so transformers' `device_map="auto"` plans the split
for cards of `cap` GiB (it balances the weights over the GPUs, at most `cap` on each), not for the
free memory of the cards at hand.

The callback `imatch_gpu_memory` appends one JSON line per process to IMATCH_GPU_MEMORY at the end
of training: for each of its GPUs the peak allocated and reserved GiB (`torch.cuda.max_memory_*`,
loading included), the card's total, the cap and the fraction. Without CUDA nothing is capped and
the line has no devices.
"""

from __future__ import annotations

import json
import os

NAME = "imatch_gpu_memory"
CAP_ENV = "IMATCH_GPU_MEMORY_CAP_GIB"
RECORD_ENV = "IMATCH_GPU_MEMORY"
GIB = 2**30


def fraction(cap_gib: float, total_bytes: int) -> float:
    """The share of a card of `total_bytes` that `cap_gib` GiB is, at most 1 (a cap at or above
    the card's memory is no cap)."""
    if cap_gib <= 0:
        raise ValueError(f"a memory cap must be positive, not {cap_gib} GiB")
    if total_bytes <= 0:
        raise ValueError(f"a card of {total_bytes} bytes")
    return min(1.0, cap_gib * GIB / total_bytes)


def max_memory(cap_gib: float, gpus: int) -> dict[int, int]:
    """transformers' `max_memory` for the device map: `cap_gib` GiB (in bytes) on each of `gpus`
    GPUs, nothing elsewhere."""
    if gpus < 1:
        raise ValueError("no GPU to plan for")
    return {i: int(cap_gib * GIB) for i in range(gpus)}


def process_devices(n_gpu: int, environ=None) -> list[int]:
    """The GPUs this process uses: all visible ones, or under torchrun (LOCAL_WORLD_SIZE > 1) this
    rank's share, as ms-swift assigns them (local_rank, local_rank + world, ...)."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("LOCAL_WORLD_SIZE") or 1)
    rank = max(0, int(environ.get("LOCAL_RANK", -1)))
    if world <= 1:
        return list(range(n_gpu))
    return list(range(rank, n_gpu, world))


def _in_dataloader_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def apply_cap(cap_gib: float, environ=None) -> list[dict]:
    """Cap every GPU of this process at `cap_gib` GiB; one record per GPU capped (none without CUDA)."""
    import torch

    if not torch.cuda.is_available() or _in_dataloader_worker():
        return []
    records = []
    for device in process_devices(torch.cuda.device_count(), environ):
        total = torch.cuda.get_device_properties(device).total_memory
        share = fraction(cap_gib, total)
        torch.cuda.set_per_process_memory_fraction(share, device)
        records.append({"device": device, "total_gib": round(total / GIB, 3), "cap_gib": cap_gib,
                        "fraction": round(share, 6)})
        print(f"imatch: cuda:{device} capped at {cap_gib} GiB of {total / GIB:.1f} (fraction {share:.4f})",
              flush=True)
    return records


def peaks(environ=None) -> list[dict]:
    """Peak allocated / reserved GiB of every GPU of this process since it started."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [{"device": d, "peak_allocated_gib": round(torch.cuda.max_memory_allocated(d) / GIB, 3),
             "peak_reserved_gib": round(torch.cuda.max_memory_reserved(d) / GIB, 3)}
            for d in process_devices(torch.cuda.device_count(), environ)]


def read_records(path) -> list[dict]:
    """The lines the callback wrote (one per process), [] when there is no file."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


CAPPED: list[dict] = []  # what apply_cap did in this process


def _callback(args, trainer):
    from transformers import TrainerCallback

    path = os.environ.get(RECORD_ENV)

    class GpuMemory(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            if not path:
                return
            caps = {c["device"]: c for c in CAPPED}
            devices = [{**p, **{k: v for k, v in caps.get(p["device"], {}).items() if k != "device"}} for p in peaks()]
            row = {"local_rank": int(os.environ.get("LOCAL_RANK", -1)), "global_step": state.global_step,
                   "cap_gib": float(os.environ.get(CAP_ENV) or 0) or None, "devices": devices}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return GpuMemory()


if __name__ != "imatch.gpu_memory":  # imported by `swift sft --external_plugins <this file>`
    from swift.callbacks import callbacks_map

    _cap = float(os.environ.get(CAP_ENV) or 0)
    if _cap:
        CAPPED.extend(apply_cap(_cap))
    callbacks_map[NAME] = _callback
