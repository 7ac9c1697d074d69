"""Ovis2-8B (and 16B/34B) in its native transformers form (`Ovis2ForConditionalGeneration`).

The published `AIDC-AI/Ovis2-*` checkpoints are remote code that no longer loads on transformers 5;
`imatch convert-ovis2` (archs/ovis2_convert.py) rewrites them into this native layout. ms-swift
4.6 has no model type for the native class, so the plug-in archs/ovis2_swift.py registers model
type and template `ovis2_hf`. Tiny: a 2-layer vision tower on one 224-pixel tile (64 image tokens
after the 2x2 hidden stride, plus 3 indicator tokens) and a 2-layer Qwen2 LLM. `8b`: an
aimv2-huge-patch14-448 vision tower + a Qwen2.5-7B-sized LLM, random weights, bf16, for GPU
benchmarks only (one 448 tile = 256 image tokens, the paper's budget); `16b` / `34b` the same for
Ovis2-16B (aimv2-huge + Qwen2.5-14B) and Ovis2-34B (aimv2-1B + Qwen2.5-32B).
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


def _qwen2_5(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
             intermediate_size: int) -> dict:
    """A Qwen2.5-Instruct LLM of the published dimensions (the shared vocabulary, RoPE and norm)."""
    return dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size, vocab_size=152064,
                rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)


# The published vision trunks (visual vocabulary 65536, hidden stride 2).
AIMV2_HUGE_448 = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                      vocab_size=65536, hidden_stride=2)
AIMV2_1B_448 = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                    vocab_size=65536, hidden_stride=2)
SIZES = {
    "tiny": dict(image=224,
                 vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=256, hidden_stride=2),
                 text=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=256)),
    # GPU benchmarks: Ovis2-8B = aimv2-huge-patch14-448 + Qwen2.5-7B-Instruct, Ovis2-16B = aimv2-huge +
    # Qwen2.5-14B-Instruct, Ovis2-34B = aimv2-1B-patch14-448 + Qwen2.5-32B-Instruct.
    "8b": dict(image=448, vision=AIMV2_HUGE_448, text=_qwen2_5(3584, 28, 28, 4, 18944)),
    "16b": dict(image=448, vision=AIMV2_HUGE_448, text=_qwen2_5(5120, 48, 40, 8, 13824)),
    "34b": dict(image=448, vision=AIMV2_1B_448, text=_qwen2_5(5120, 64, 40, 8, 27648)),
}
PATCH = 14
# The original visual tokenizer's tiling (AIDC-AI/Ovis @ 52e5fdf, base_visual_tokenizer.py), which
# ms-swift's Ovis2 template calls with max_partition = $MAX_PARTITION (default 9).
DEFAULT_MAX_PARTITION = 9
COVERING_THRESHOLD = 0.9


def _partition(size: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Crop boxes of a (rows, cols) grid, row by row; the last row/column takes the remainder."""
    w, h = size
    row_height, col_width = h // grid[0], w // grid[1]
    return [(c * col_width, r * row_height, w if c == grid[1] - 1 else (c + 1) * col_width,
             h if r == grid[0] - 1 else (r + 1) * row_height)
            for r in range(grid[0]) for c in range(grid[1])]


def _covering_area(left: int, upper: int, right: int, lower: int, side: int) -> float:
    w, h = right - left, lower - upper
    w, h = max(w, h), min(w, h)
    if w > side:
        h, w = h / w * side, side
    return w * h


def best_grid(size: tuple[int, int], side: int, max_partition: int) -> tuple[int, int]:
    """The (rows, cols) grid the original picks: fewest tiles covering > 90 % of the image at tile
    resolution (ties: more coverage), else the best-covering grid (ties: fewer tiles)."""
    area = size[0] * size[1]
    grids = [(i, j) for i in range(1, max_partition + 1) for j in range(1, max_partition + 1) if i * j <= max_partition]
    ratios = [(g, sum(_covering_area(*box, side) for box in _partition(size, g)) / area) for g in grids]
    good = [x for x in ratios if x[1] > COVERING_THRESHOLD]
    if good:
        return sorted(good, key=lambda x: (x[0][0] * x[0][1], -x[1]))[0][0]
    return sorted(ratios, key=lambda x: (-x[1], x[0][0] * x[0][1]))[0][0]


def preprocess_image(image, image_processor, *, side: int, max_partition: int):
    """Pixel values (crops x 3 x side x side) and the (rows, cols) grid, as the original computes
    them: the whole image first when there are several crops; each crop resized to fit the tile
    with its aspect ratio kept (`image_processor`: resize, rescale, normalise), then zero-padded
    (in normalised space) to a square, centred. The native Ovis2ImageProcessor instead squashes
    the image onto a grid of tiles."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    grid = best_grid(image.size, side, max_partition)
    crops = [image.crop(box) for box in _partition(image.size, grid)]
    if len(crops) > 1:
        crops.insert(0, image)
    tiles = []
    for crop in crops:
        w, h = crop.size
        if w == h:
            nw = nh = side
        elif w > h:
            nw, nh = side, int(h / w * side)
        else:
            nh, nw = side, int(w / h * side)
        values = image_processor(images=crop, size={"height": nh, "width": nw}, crop_to_patches=False,
                                 return_tensors="pt")["pixel_values"]
        square = torch.zeros((1, 3, side, side), dtype=values.dtype)
        nh, nw = values.shape[2:]
        top, left = (side - nh) // 2, (side - nw) // 2
        square[:, :, top:top + nh, left:left + nw] = values
        tiles.append(square)
    return torch.cat(tiles), grid


def placeholder_tokens(grid: tuple[int, int], tokens_per_crop: int) -> list[str]:
    """The original's image placeholder sequence (construct_image_placeholders) in token names,
    each crop's atom expanded to its visual tokens: start, whole image, grid marker, then for
    several crops each row's crops separated by <IMG_COL>, rows separated by <IMG_ROW>; end."""
    atom = [IMAGE_TOKEN] * tokens_per_crop
    start, grid_marker, col, row, end = INDICATOR_TOKENS
    out = [start, *atom, grid_marker]
    rows, cols = grid
    if rows * cols > 1:
        for r in range(rows):
            for c in range(cols):
                out += atom
                if c < cols - 1:
                    out.append(col)
            if r < rows - 1:
                out.append(row)
    out.append(end)
    return out


def image_seq_length(image: int, hidden_stride: int) -> int:
    """Visual tokens per tile: (side / patch / stride)^2, with the native model's padding to the stride."""
    side = image // PATCH
    side = -(-side // hidden_stride)
    return side * side


def make_processor(tokenizer, *, image: int, seq_length: int, **pixels):
    """The native processor: tile size `image`, resize/normalisation `pixels` (CLIP's by default).
    Tiling is the template's (`preprocess_image`), not this processor's."""
    from transformers import Ovis2ImageProcessor, Ovis2Processor

    image_processor = Ovis2ImageProcessor(crop_to_patches=False, size={"height": image, "width": image}, **pixels)
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
    processor = make_processor(tokenizer, image=spec["image"], seq_length=seq)
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
    tiles_env="MAX_PARTITION",
    default_tiles=DEFAULT_MAX_PARTITION,
)
