"""Per-step timings of a `swift sft` run, for `imatch train --step-times FILE` (the benchmark).

Loaded by ms-swift as an external plug-in; registers the trainer callback `imatch_step_times`,
which appends one JSON line per optimizer step to the file named by IMATCH_STEP_TIMES:
`step_seconds` (on_step_begin -> on_step_end, the device synchronised at the end, so it is the
step's compute) and `wait_seconds` (the previous step's end -> this step's begin: data loading,
collation, logging; the device has nothing to do then), plus the peak device memory at the end.
"""

from __future__ import annotations

import json
import os
import time

NAME = "imatch_step_times"


def _callback(args, trainer):
    import torch
    from transformers import TrainerCallback

    path = os.environ["IMATCH_STEP_TIMES"]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = self._sync()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._sync()
            row = {"step": state.global_step, "step_seconds": end - self.begin,
                   "wait_seconds": None if self.end is None else self.begin - self.end}
            self.end = end
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                with open(path, "a") as f:
                    f.write(json.dumps({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}) + "\n")

    return StepTimes()


if __name__ != "imatch.steptimer":  # imported by `swift sft --external_plugins <this file>`
    from swift.callbacks import callbacks_map

    callbacks_map[NAME] = _callback
