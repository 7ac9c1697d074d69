"""Qwen2.5-VL-7B-Instruct in its native transformers form (`Qwen/Qwen2.5-VL-7B-Instruct`).

ms-swift knows it as model type and template `qwen2_5_vl`. Its template hard-codes the real
special-token ids (`<|image_pad|>` = 151655), so the tiny tokenizer pads its vocabulary with
unreachable fillers up to 151643 and puts Qwen's added tokens at their real ids; with fewer ids
training runs but no image ever reaches the model. Images are sized by ms-swift through
qwen_vl_utils from the `MAX_PIXELS` env var (set it at training and scoring alike): 200704 px =
at most 256 image tokens, the paper's budget; a 128x128 image becomes 140x140 = 25 tokens.
Tiny: 2-block vision tower and a 2-layer LLM with tied embeddings (the 151k-row head dominates).
`7b`: the real dimensions, random bf16 weights, for GPU benchmarks only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from imatch.archs import Arch, save_backbone
from imatch.archs.tokenizer import train_bpe

MAX_PIXELS = 200704  # 256 tokens of 28x28 pixels
MIN_PIXELS = 3136  # 4 tokens, qwen_vl_utils' default
# Qwen2.5's added tokens in id order from FIRST_ADDED; (text, special)
FIRST_ADDED = 151643
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
         ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
         ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
         ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
         ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
         ("<|repo_name|>", False), ("<|file_sep|>", False)]
# The real model's chat template, for plain-transformers use (ms-swift uses its own template).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIZES = {
    "tiny": dict(vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
                 text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256, max_position_embeddings=4096, max_window_layers=2),
                 mrope_section=[4, 6, 6], tie_word_embeddings=True, dtype=torch.float32),
    "7b": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, max_position_embeddings=128000, vocab_size=152064,
                         max_window_layers=28, sliding_window=32768),
               mrope_section=[16, 24, 24], tie_word_embeddings=False, dtype=torch.bfloat16),
}


def tokenizer():
    """The task's small BPE, padded with unreachable fillers so Qwen's added tokens get their real ids."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(train_bpe([]).to_str())
    vocab = data["model"]["vocab"]
    # Multi-character entries that no merge produces: the BPE model never emits them.
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), FIRST_ADDED)})
    tok = Tokenizer.from_str(json.dumps(data))
    for text, special in ADDED:
        added = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    for offset, (text, _) in enumerate(ADDED):
        if tok.token_to_id(text) != FIRST_ADDED + offset:
            raise AssertionError(f"{text} got id {tok.token_to_id(text)}, not {FIRST_ADDED + offset}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=131072)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config(size: str = "tiny"):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    spec = SIZES[size]
    text = dict(spec["text"])
    vocab = max(text.pop("vocab_size", 0), FIRST_ADDED + len(ADDED))
    ids = {text: FIRST_ADDED + i for i, (text, _) in enumerate(ADDED)}
    return Qwen2_5_VLConfig(
        vision_config=Qwen2_5_VLVisionConfig(out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                                             temporal_patch_size=2, window_size=112, tokens_per_second=2,
                                             **spec["vision"]),
        text_config=Qwen2_5_VLTextConfig(
            vocab_size=vocab, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=spec["tie_word_embeddings"],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": spec["mrope_section"]},
            **text),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def build(out: Path, size: str = "tiny", seed: int = 0) -> None:
    from transformers import (GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = tokenizer()
    cfg = config(size)
    torch.manual_seed(seed)
    # 7b: bf16 from the start (~17 GB), on the GPU when there is one (random init is much faster there).
    device = "cuda" if size != "tiny" and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=SIZES[size]["dtype"])
    model.generation_config = GenerationConfig(bos_token_id=cfg.text_config.bos_token_id,
                                               eos_token_id=[cfg.text_config.eos_token_id, cfg.text_config.bos_token_id],
                                               pad_token_id=cfg.text_config.pad_token_id, do_sample=False)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    save_backbone(out, model, processor)


ARCH = Arch(
    name="qwen2_5_vl",
    swift_model_type="qwen2_5_vl",
    swift_template="qwen2_5_vl",
    build=build,
    sizes=tuple(SIZES),
    head_modules=("lm_head", "embed_tokens"),
    env={"MAX_PIXELS": str(MAX_PIXELS)},
)


def forget_image_budget() -> None:
    """Undo ms-swift's once-per-process copy of the image budget into qwen_vl_utils' globals
    (`patch_qwen_vl_utils`, latched by `_patch`): their defaults come back and ms-swift patches
    them again from the environment at the next Qwen2.5-VL load."""
    import importlib
    import sys

    vision = sys.modules.get("qwen_vl_utils.vision_process")
    if vision is not None and hasattr(vision, "_patch"):
        del vision._patch
        importlib.reload(vision)


def fresh_image_budget() -> None:
    """Make the next Qwen2.5-VL load of this process read the image budget that MAX_PIXELS holds
    now. ms-swift derives IMAGE_MAX_TOKEN_NUM from MAX_PIXELS only when it is unset and copies it
    into qwen_vl_utils' globals at the first load of a process, never again: a second model loaded
    in the same process with another budget (a Scorer of two bundles, a notebook) encoded its
    images with the first one's, silently."""
    import os

    pixels = os.environ.get("MAX_PIXELS")
    if pixels:  # what ms-swift's compat_qwen_vl_utils derives in a fresh process (14 px patches, 2x2 merge)
        os.environ["IMAGE_MAX_TOKEN_NUM"] = str(int(pixels) // (14 * 2) ** 2)
    forget_image_budget()
