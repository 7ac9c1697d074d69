"""torch.compile of each transformer block, for scoring (`imatch score-set --compile`) and training
(`imatch train --compile`).

Each block (LLM decoder layer, vision block) is compiled on its own, not the whole model: the
norms, activations, rotary, residual adds and, in training, the LoRA branches' casts, dropout and
scaling between the GEMMs fuse into fewer kernels, one compiled graph serves every layer of a kind,
and the first step compiles in about a minute instead of the many minutes of a whole-model graph
(the Trainer's own `torch_compile` had not finished its first step after 300 s on an H200).
The GEMMs stay the library's (same dtypes: LoRA's float32 adapters stay float32); random draws
stay eager's (`fallback_random`), so the compiled blocks compute the function of the eager ones.

Loaded by ms-swift as an external plug-in (`imatch train --compile`); registers the trainer
callback `imatch_compile_blocks`, which compiles the blocks of the model being trained when training
begins and prints how many blocks and graphs it compiled when it ends.
"""

from __future__ import annotations

NAME = "imatch_compile_blocks"
BLOCK_SUFFIXES = ("DecoderLayer", "VisionBlock", "EncoderLayer")


def compile_blocks(model) -> int:
    """Compile every transformer block of `model` in place (dynamic shapes: batches differ in
    length). Returns the number of blocks compiled."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._inductor.config.fallback_random = True  # dropout draws eager's masks
    blocks = [m for m in model.modules() if type(m).__name__.endswith(BLOCK_SUFFIXES)]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (0: nothing ran compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _swift_callback(args, trainer):
    from transformers import TrainerCallback

    class CompileBlocks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            print(f"imatch: compiled {compile_blocks(model)} transformer blocks", flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            print(f"imatch: {compiled_graphs()} compiled graphs ran", flush=True)

    return CompileBlocks()


if __name__ != "imatch.blocks":  # imported by `swift sft --external_plugins <this file>`
    from swift.callbacks import callbacks_map

    callbacks_map[NAME] = _swift_callback
