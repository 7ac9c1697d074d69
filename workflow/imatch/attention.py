"""Attention without a Python loop over the vision tower's windows.

Qwen2.5-VL's vision tower attends within 8x8-patch windows (and, in four layers, within each
image). Unless a flash-attention implementation is configured, transformers runs one `sdpa`
call per window: ~100 windows x 28 layers per 1036² image, thousands of tiny kernels per batch,
which is about half of the naive scoring time on an H200. `flash_attn` is not installed on our
GPU machines, so this module registers an attention implementation of its own,
`imatch_flash_varlen` (the name must contain "flash": that is how transformers decides to pass
`cu_seqlens` instead of splitting), that computes all windows in one kernel:

- on CUDA, torch's own variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`,
  with autograd, so training uses it too), when this torch has it;
- elsewhere (CPU, older torch), one `sdpa` call over the windows padded into a batch with a
  key-padding mask.

Every other attention call (the LLM's causal attention, InternViT's and Ovis2's per-tile
attention) is plain `sdpa`, with sdpa's masks. `enable(model)` switches a loaded model's vision
tower to it (the scoring stage); `swift sft --external_plugins <this file> --callbacks
imatch_flash_varlen` does the same for the model being trained.
"""

from __future__ import annotations

NAME = "imatch_flash_varlen"


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def padded_segments_attention(q, k, v, cu_seqlens, scale):
    """Non-causal attention within each segment of packed (tokens, heads, dim) tensors, as one
    sdpa call over the segments padded to the longest one."""
    import torch

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n, longest = len(lengths), int(lengths.max())
    total, heads, dim = q.shape
    segment = torch.repeat_interleave(torch.arange(n, device=q.device), lengths.to(q.device), output_size=total)
    position = torch.arange(total, device=q.device) - cu_seqlens.to(q.device)[segment]

    def pad(x):
        out = x.new_zeros(n, longest, heads, x.shape[-1])
        out[segment, position] = x
        return out.transpose(1, 2)  # (segments, heads, longest, dim)

    valid = torch.arange(longest, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :],
                                                           scale=scale)
    return out.transpose(1, 2)[segment, position]  # back to (tokens, heads, dim)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention interface: packed variable-length segments in one kernel when the
    caller passes `cu_seq_lens_q` (the vision tower's windows), sdpa otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
                               and not bool((cu_seq_lens_k == cu_seq_lens_q).all())):
        raise ValueError("imatch_flash_varlen handles one packed sequence with the same segments for q and k")
    if is_causal:
        raise ValueError("imatch_flash_varlen handles non-causal packed attention only (the vision tower's)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    kernel = _varlen_kernel()
    if kernel is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, scale=scaling)
    else:
        out = padded_segments_attention(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as flash implementations return


def backend(device_type: str, dtype) -> str:
    """Which kernel the vision windows get on this device: for the benchmark's table."""
    import torch

    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None:
        return "varlen flash (torch)"
    return "padded sdpa"


def register() -> str:
    """Make `imatch_flash_varlen` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def enable(model) -> int:
    """Switch the vision towers of a loaded model to `imatch_flash_varlen`; returns how many
    configs changed. Set after loading because transformers, seeing "flash" in a name at load
    time, looks for the `flash_attn` package; the attention modules read the name at call time."""
    from transformers import PreTrainedModel

    register()
    changed = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, PreTrainedModel) and config is not None and "vision" in type(config).__name__.lower():
            if config._attn_implementation in ("sdpa", NAME):
                config._attn_implementation = NAME
                changed.add(id(config))
    return len(changed)


def _swift_callback(args, trainer):
    """ms-swift trainer callback (`--callbacks imatch_flash_varlen`; built before the trainer has
    its model): enables the kernel on the model being trained when training begins."""
    from transformers import TrainerCallback

    class EnableVarlen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            print(f"imatch: vision attention -> {NAME} in {enable(model)} config(s)", flush=True)

    return EnableVarlen()


def register_with_swift() -> None:
    from swift.callbacks import callbacks_map

    callbacks_map[NAME] = _swift_callback


def cudnn_sdpa_off_if_asked() -> None:
    """IMATCH_CUDNN_SDPA=0 (a benchmark arm, imatch.prefix.CUDNN_ENV): no cuDNN attention in this
    training process, padded per-query batches included (packed rows never use it, see
    `imatch.prefix.sdpa_backends`); unset, sdpa picks its kernel as it would."""
    import os

    from imatch.prefix import CUDNN_ENV

    if os.environ.get(CUDNN_ENV) == "0":
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)


if __name__ != "imatch.attention":  # imported by `swift sft --external_plugins <this file>`
    register_with_swift()
    cudnn_sdpa_off_if_asked()
