"""InternVL2.5-8B-MPO in its native transformers form (`OpenGVLab/InternVL2_5-8B-MPO-hf`).

ms-swift knows it as model type `internvl` with the `internvl_hf` template, which is not what the
paper's setup showed the original model (no system turn, other resampling); the plug-in
archs/internvl_swift.py registers model type and template `internvl2_5_hf`, ms-swift's own
`internvl2_5` encoding on the native class (docs/fidelity.md). Tiny: a 2-layer vision tower on one
224-pixel tile (64 image tokens after the pixel shuffle) and a 2-layer Qwen2-style LLM. `7b`: InternViT-300M + an InternLM2.5-7B-sized LLM, random weights, for GPU
benchmarks only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imatch.archs import Arch, save_backbone
from imatch.archs.tokenizer import train_bpe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
SIZES = {
    # tiny: layer scale 1 (not the real 0.1) so that a random 2-layer tower's features are not
    # drowned by the residual stream and a CPU fine-tune can learn from the image in minutes
    "tiny": dict(image=224, vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                        layer_scale_init_value=1.0),
                 text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256)),
    "7b": dict(image=448, vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
               text=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=92553)),
}


def build(out: Path, size: str = "tiny", seed: int = 0) -> None:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
                              InternVLVideoProcessor, PreTrainedTokenizerFast, Qwen2Config)
    from transformers import InternVLVisionConfig

    spec = SIZES[size]
    bpe = train_bpe(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    # as the official -hf conversion renders messages: an image item becomes `<IMG_CONTEXT>\n`, which
    # the processor expands to <img><IMG_CONTEXT>...</img> (ms-swift's internvl_hf template does the same)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = dict(spec["text"])
    vocab = max(text.pop("vocab_size", 0), len(tokenizer))
    patch = 14
    image_seq_length = (spec["image"] // patch) ** 2 // 4
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(image_size=spec["image"], patch_size=patch, **spec["vision"]),
        text_config=Qwen2Config(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                                bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, **text),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=image_seq_length,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    # real size: bf16 from the start, on the GPU when there is one (random init is much faster there)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    with torch.device("cuda" if size != "tiny" and torch.cuda.is_available() else "cpu"):
        model = InternVLForConditionalGeneration._from_config(config, dtype=dtype)
    image_processor = GotOcr2ImageProcessor(crop_to_patches=False, size={"height": spec["image"], "width": spec["image"]},
                                            max_patches=1, min_patches=1)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=image_seq_length,
                                  chat_template=tokenizer.chat_template)
    save_backbone(out, model, processor)


ARCH = Arch(
    name="internvl",
    swift_model_type="internvl2_5_hf",
    swift_template="internvl2_5_hf",
    build=build,
    sizes=tuple(SIZES),
    head_modules=("lm_head", "embed_tokens"),
    plugin=str(Path(__file__).with_name("internvl_swift.py")),
    tiles_env="MAX_NUM",
    default_tiles=12,
)
