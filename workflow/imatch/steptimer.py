"""Per-step timings of a `swift sft` run, for `imatch train --step-times FILE` (the benchmark).

Loaded by ms-swift as an external plug-in; registers the trainer callback `imatch_step_times`,
which appends one JSON line per optimizer step to the file named by IMATCH_STEP_TIMES:
`step_seconds` (on_step_begin -> on_step_end, the device synchronised at the end, so it is the
step's compute) and `wait_seconds` (the previous step's end -> this step's begin: data loading,
collation, logging; the device has nothing to do then), plus the peak device memory at the end.
With IMATCH_PROFILE_STEPS=FIRST-LAST (`imatch train --profile-steps`), torch.profiler records those
optimizer steps and writes its tables (heaviest operations by device and by host time) beside the
timings file (`<file>.profile.txt`): where a step's time goes.
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
    span = os.environ.get("IMATCH_PROFILE_STEPS")
    first, last = (int(x) for x in span.split("-")) if span else (None, None)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin = self.end = self.profiler = None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if first is not None and state.global_step + 1 == first:  # global_step counts finished steps
                from torch.profiler import ProfilerActivity, profile

                cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self.profiler = profile(activities=[ProfilerActivity.CPU, *cuda])
                self.profiler.__enter__()
            self.begin = self._sync()

        def on_step_end(self, args, state, control, **kwargs):
            end = self._sync()
            row = {"step": state.global_step, "step_seconds": end - self.begin,
                   "wait_seconds": None if self.end is None else self.begin - self.end}
            self.end = end
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.profiler is not None and state.global_step == last:
                self.profiler.__exit__(None, None, None)
                averages = self.profiler.key_averages()
                keys = (["self_cuda_time_total"] if torch.cuda.is_available() else []) + ["self_cpu_time_total"]
                with open(path + ".profile.txt", "w") as f:
                    f.write(f"steps {first}-{last}\n\n" + "\n\n".join(
                        averages.table(sort_by=key, row_limit=40, max_name_column_width=90) for key in keys))
                self.profiler = None

        def on_train_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                with open(path, "a") as f:
                    f.write(json.dumps({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}) + "\n")

    return StepTimes()


if __name__ != "imatch.steptimer":  # imported by `swift sft --external_plugins <this file>`
    from swift.callbacks import callbacks_map

    callbacks_map[NAME] = _callback
