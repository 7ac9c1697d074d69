"""Every GPU job says which GPUs it sees and refuses to run on fewer (or more) than it asked for.

On a cluster a job that silently falls back to the CPU, or sees all GPUs of a node, wastes hours.
"""

from __future__ import annotations

import os


def check_gpus(expected: int) -> str:
    """Return a one-line description of the visible GPUs; raise SystemExit if the count differs."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    line = (f"visible GPUs: {count} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            + (": " + ", ".join(names) if names else ""))
    print(line, flush=True)
    if expected and count != expected:
        raise SystemExit(f"asked for {expected} GPU(s) but {count} are visible")
    return line
