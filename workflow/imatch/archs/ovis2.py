"""Ovis2-8B (and 16B/34B) in its native transformers form (`Ovis2ForConditionalGeneration`).

The published `AIDC-AI/Ovis2-*` checkpoints are remote code that no longer loads on transformers 5;
`imatch convert-ovis2` (archs/ovis2_convert.py) rewrites them into this native layout. ms-swift
4.6 has no model type for the native class, so the plug-in archs/ovis2_swift.py registers model
type and template `ovis2_hf`. Tiny: a 2-layer vision tower on one 224-pixel tile (64 image tokens
after the 2x2 hidden stride, plus 3 indicator tokens) and a 2-layer Qwen2 LLM. `8b`: an
aimv2-huge-patch14-448 vision tower + a Qwen2.5-7B-sized LLM, random weights, bf16, for GPU
benchmarks only (one 448 tile = 256 image tokens, the paper's budget).
"""

from __future__ import annotations

from pathlib import Path

from imatch.archs import Arch, save_backbone

IMAGE_TOKEN = "<IMG_ATOM>"
# Order matters: the native model maps indicator i to visual-vocabulary row V - 5 + i.
INDICATOR_TOKENS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
OVIS_SPECIALS = [IMAGE_TOKEN, *INDICATOR_TOKENS]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *OVIS_SPECIALS]
SYSTEM = "You are a helpful assistant."
# The converter's chat template (system line always present, `<image>\n` for image items).
CHAT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
SIZES = {
    "tiny": dict(image=224, max_patches=1,
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=256, hidden_stride=2),
                 text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256)),
    # Ovis2-8B: aimv2-huge-patch14-448 (visual vocabulary 65536, hidden stride 2) + Qwen2.5-7B-Instruct.
    "8b": dict(image=448, max_patches=1,
               vision=dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                           vocab_size=65536, hidden_stride=2),
               text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768)),
}
PATCH = 14


def image_seq_length(image: int, hidden_stride: int) -> int:
    """Visual tokens per tile: (side / patch / stride)^2, with the native model's padding to the stride."""
    side = image // PATCH
    side = -(-side // hidden_stride)
    return side * side


def make_processor(tokenizer, *, image: int, max_patches: int, seq_length: int):
    """The native processor with the converter's settings (squash each tile to image x image)."""
    from transformers import Ovis2ImageProcessor, Ovis2Processor

    image_processor = Ovis2ImageProcessor(crop_to_patches=True, max_patches=max_patches, min_patches=1,
                                          size={"height": image, "width": image})
    return Ovis2Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                          image_seq_length=seq_length)


def native_config(text: dict, vision: dict, *, image: int, image_token_id: int, indicator_ids: list[int],
                  tie_word_embeddings: bool = False, eos_token_id=None, pad_token_id=None, bos_token_id=None):
    """Ovis2Config from plain dicts; the top-level vocab/hidden sizes must mirror the LLM's."""
    from transformers import Ovis2Config, Ovis2VisionConfig, Qwen2Config

    text = dict(text)
    rope_theta = text.pop("rope_theta", None)
    if rope_theta is not None:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    text_config = Qwen2Config(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id, **text)
    vision_config = Ovis2VisionConfig(image_size=image, patch_size=PATCH,
                                      num_visual_indicator_tokens=len(indicator_ids), **vision)
    return Ovis2Config(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                       visual_indicator_token_ids=list(indicator_ids), vocab_size=text_config.vocab_size,
                       hidden_size=text_config.hidden_size, tie_word_embeddings=tie_word_embeddings)


def build(out: Path, size: str = "tiny", seed: int = 0) -> None:
    import torch
    from transformers import Ovis2ForConditionalGeneration, PreTrainedTokenizerFast

    from imatch.archs.tokenizer import train_bpe

    spec = SIZES[size]
    bpe = train_bpe(SPECIALS)
    # `<image>` is deliberately NOT a token, as in the real Ovis2-hf tokenizers (engine notes, bug 2).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    text = dict(spec["text"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.setdefault("max_position_embeddings", 4096)
    ids = tokenizer.convert_tokens_to_ids(OVIS_SPECIALS)
    config = native_config(text, spec["vision"], image=spec["image"], image_token_id=ids[0], indicator_ids=ids[1:],
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    seq = image_seq_length(spec["image"], spec["vision"]["hidden_stride"])
    torch.manual_seed(seed)
    # real size: random weights made in bf16 directly (~18 GB instead of ~36 GB in fp32)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    with torch.device("cuda" if size != "tiny" and torch.cuda.is_available() else "cpu"):  # faster init there
        model = Ovis2ForConditionalGeneration._from_config(config, dtype=dtype)
    processor = make_processor(tokenizer, image=spec["image"], max_patches=spec["max_patches"], seq_length=seq)
    save_backbone(out, model, processor)


ARCH = Arch(
    name="ovis2",
    swift_model_type="ovis2_hf",
    swift_template="ovis2_hf",
    build=build,
    sizes=tuple(SIZES),
    # the visual embedding table is the aligner's output layer; LoRA cannot wrap it (an nn.Embedding fed soft
    # tokens), so a trainable head includes it whole
    head_modules=("lm_head", "embed_tokens", "visual_embeddings_table"),
    plugin=str(Path(__file__).with_name("ovis2_swift.py")),
)
