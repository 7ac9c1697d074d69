"""Command `convert-ovis2`: an original `AIDC-AI/Ovis2-*` checkpoint -> the native transformers layout.

The published Ovis2 checkpoints need their remote code, which no longer loads on transformers 5
(it imports the removed `HybridCache`). The conversion is a pure renaming of tensors, so it is
done here without that code: config.json and the safetensors shards are read directly, each tensor
is renamed (the ViT's fused `attn.qkv` is split into q/k/v, `pos_embed` loses its batch axis) and
written shard by shard, so a 34B checkpoint never has to fit in memory. The result is what
`Ovis2ForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` read: a
native config (Qwen2 text config + Ovis2 vision config), the source tokenizer plus the six Ovis2
image tokens, and an `Ovis2ImageProcessor` with the source's own resize and normalisation settings
(its `preprocessor_config.json`). How images are tiled is not stored here: the ms-swift template
tiles as the original does (`$MAX_PARTITION`, the backbone's `max_tiles`), and the loader takes the
vision features before the final norm as the original does (archs/ovis2_swift.py).

The key names are those of transformers' own converter as of transformers 5 (`rms_norm1`,
`attention.*`, `ffn.*`, `patch_embedding`, `visual_embeddings_table`); the pre-release names
(`layer_norm1`, `self_attn.*`, `mlp.*`, `visual_table`) no longer match the native modules.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from imatch.archs.ovis2 import OVIS_SPECIALS, image_seq_length, make_processor, native_config
from imatch.errors import InputError

# Applied in order to every key (regex, replacement); `attn.qkv` and `pos_embed` are handled after.
KEY_MAP = [
    (r"trunk\.blocks\.(\d+)\.norm_1\.", r"encoder.layers.\1.rms_norm1."),
    (r"trunk\.blocks\.(\d+)\.norm_2\.", r"encoder.layers.\1.rms_norm2."),
    (r"trunk\.blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^visual_tokenizer\.", "model.vision_tower."),
    (r"\.backbone\.", ".transformer."),
    (r"\.preprocessor\.", ".embeddings."),
    (r"\.patchifier\.proj\.", ".patch_embedding."),
    (r"\.patchifier\.norm\.", ".rms_norm."),
    (r"\.trunk\.post_trunk_norm\.", ".rms_norm."),
    (r"\.trunk\.blocks\.", ".encoder.layers."),
    (r"\.mlp\.fc1\.", ".ffn.gate_proj."),
    (r"\.mlp\.fc2\.", ".ffn.down_proj."),
    (r"\.mlp\.fc3\.", ".ffn.up_proj."),
    (r"\.head\.0\.", ".head_linear."),
    (r"\.head\.1\.", ".head_norm."),
    (r"^vte\.weight$", "model.visual_embeddings_table.weight"),
    (r"^llm\.model\.", "model.language_model."),
    (r"^llm\.lm_head\.", "lm_head."),
]
# Keys of the original config that describe the remote code, not the model.
DROP_KEYS = {"_name_or_path", "architectures", "auto_map", "model_type", "torch_dtype", "dtype", "use_bfloat16",
             "_attn_implementation_autoset", "_attn_implementation", "transformers_version", "use_flash_attn"}
SHARD_BYTES = 4 * 1024 ** 3


def native_keys(key: str, tensor, vision_hidden: int) -> list[tuple[str, object]]:
    """The native (name, tensor) pairs of one original tensor."""
    for pattern, repl in KEY_MAP:
        key = re.sub(pattern, repl, key)
    if ".attn.qkv." in key:
        d = vision_hidden
        if tensor.shape[0] != 3 * d:
            raise ValueError(f"{key}: fused qkv of {tensor.shape[0]} rows, expected 3 x {d}")
        return [(key.replace(".attn.qkv.", f".attention.{n}_proj."), tensor[i * d:(i + 1) * d].contiguous())
                for i, n in enumerate("qkv")]
    if key.endswith(".pos_embed"):
        return [(key[:-len("pos_embed")] + "position_embedding.weight", tensor[0].contiguous())]
    return [(key, tensor)]


def _source_config(src: Path) -> tuple[dict, dict, dict]:
    path = src / "config.json"
    if not path.is_file():
        raise InputError(path, "no config.json: not a model folder")
    cfg = json.loads(path.read_text())
    if "llm_config" not in cfg or "visual_tokenizer_config" not in cfg:
        raise InputError(path, "not an original Ovis2 config (no llm_config / visual_tokenizer_config)",
                         f"model_type={cfg.get('model_type')!r}")
    vt = dict(cfg["visual_tokenizer_config"])
    backbone = dict(vt.get("backbone_config") or {})
    if backbone.get("model_type", "aimv2") != "aimv2":
        raise InputError(path, f"unsupported vision backbone {backbone.get('model_type')!r} (only aimv2)")
    return cfg, vt, backbone


def _vision_config(vt: dict, backbone: dict) -> dict:
    layers = backbone.get("num_hidden_layers")
    if vt.get("depths"):  # the visual tokenizer may keep only the first `depths[0]` blocks
        layers = int(str(vt["depths"]).split("|")[0]) if isinstance(vt["depths"], str) else vt["depths"][0]
    if backbone.get("use_bias") or vt.get("drop_cls_token"):
        raise ValueError("AIMv2 variants with biases or a CLS token have no native Ovis2 counterpart")
    return dict(hidden_size=backbone["hidden_size"], intermediate_size=backbone["intermediate_size"],
                num_hidden_layers=layers, num_attention_heads=backbone["num_attention_heads"],
                num_channels=backbone.get("num_channels", 3), rms_norm_eps=backbone.get("rms_norm_eps", 1e-5),
                qkv_bias=bool(backbone.get("qkv_bias", False)), mlp_bias=False,
                vocab_size=vt["vocab_size"], hidden_stride=vt.get("hidden_stride", 1),
                tokenize_function=vt.get("tokenize_function", "softmax"))


def ovis_tokenizer(src: Path):
    """The source's Qwen2 tokenizer plus the Ovis2 image tokens (appended if missing, ids kept if present)."""
    from transformers import AutoTokenizer

    # plain Qwen2 tokenizer files; never the remote code the source's auto_map names (and no
    # "run custom code? [y/N]" prompt on a folder that has one)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    tokenizer.add_tokens(OVIS_SPECIALS, special_tokens=True)
    for token in OVIS_SPECIALS:
        if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise AssertionError(f"{token} is not a single token after conversion")
    return tokenizer


# what the original's image processor (CLIPImageProcessor) settings mean for the native one
IMAGE_PROCESSOR_KEYS = ("image_mean", "image_std", "resample", "rescale_factor", "do_rescale", "do_normalize",
                        "do_convert_rgb")


def image_processor_settings(src: Path, image: int) -> dict:
    """Resize/normalisation settings of the source's preprocessor_config.json (the original loads
    its image processor from the checkpoint folder); refused if the original could not use it or
    would tile at another size than the ViT's `image`."""
    path = src / "preprocessor_config.json"
    if not path.is_file():
        raise InputError(path, "no preprocessor_config.json: the original Ovis2 reads its image processor there")
    cfg = json.loads(path.read_text())
    if not cfg.get("do_resize", True) or cfg.get("do_center_crop", False):
        raise InputError(path, "the original Ovis2 needs do_resize true and do_center_crop false",
                         f"do_resize={cfg.get('do_resize')!r} do_center_crop={cfg.get('do_center_crop')!r}")
    tile = (cfg.get("crop_size") or {}).get("height", image)
    if tile != image:  # the original tiles at crop_size; its position embeddings are for image_size
        raise InputError(path, f"crop_size {tile} differs from the ViT's image_size {image}")
    return {k: cfg[k] for k in IMAGE_PROCESSOR_KEYS if k in cfg}


def source_dtype(cfg: dict) -> str:
    """The checkpoint's dtype: `torch_dtype` (transformers < 4.56) or `dtype` (a config re-saved by
    a newer transformers), of the LLM config or the top level."""
    for section in (cfg.get("llm_config") or {}, cfg):
        for key in ("torch_dtype", "dtype"):
            if section.get(key):
                return section[key]
    return "bfloat16"


def _shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    found = sorted(src.glob("*.safetensors"))
    if not found:
        raise InputError(src, "no safetensors weights")
    return found


def _expected(config) -> dict:
    """Native parameter names and shapes, from a model built on the meta device (no memory)."""
    import torch
    from transformers import Ovis2ForConditionalGeneration

    with torch.device("meta"):
        model = Ovis2ForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(src_dir, out_dir) -> Path:
    """Write the native checkpoint of the original Ovis2 checkpoint in `src_dir` to `out_dir`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    cfg, vt, backbone = _source_config(src)
    vision = _vision_config(vt, backbone)
    image = backbone.get("image_size", 448)
    tokenizer = ovis_tokenizer(src)
    pixels = image_processor_settings(src, image)
    text = {k: v for k, v in cfg["llm_config"].items() if k not in DROP_KEYS}
    tie = bool(text.pop("tie_word_embeddings", False))
    special = {k: text.pop(k, None) for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(OVIS_SPECIALS)
    dtype = source_dtype(cfg)
    config = native_config(text, vision, image=image, image_token_id=ids[0], indicator_ids=ids[1:],
                           tie_word_embeddings=tie, **special)
    config.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config.architectures = ["Ovis2ForConditionalGeneration"]
    expected = _expected(config)

    out.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, n = {}, {}, 0, 0
    seen = set()

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for path in _shards(src):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for name, tensor in native_keys(key, f.get_tensor(key), vision["hidden_size"]):
                    if name not in expected:
                        raise ValueError(f"{path.name}: {key} -> {name} is not a native Ovis2 parameter")
                    if tuple(tensor.shape) != expected[name]:
                        raise ValueError(f"{key} -> {name}: shape {tuple(tensor.shape)}, native {expected[name]}")
                    if name in seen:
                        raise ValueError(f"{name} written twice")
                    seen.add(name)
                    shard[name] = tensor
                    size += tensor.numel() * tensor.element_size()
                    if size >= SHARD_BYTES:
                        flush()
    flush()
    missing = set(expected) - seen - ({"lm_head.weight"} if tie else set())
    if missing:
        raise ValueError(f"native parameters missing from the source: {sorted(missing)[:8]}")
    # rename the shards to the usual "of N" names and write the index
    total = n
    renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    for old, new in renames.items():
        (out / old).rename(out / new)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}, indent=2))

    config.save_pretrained(out)
    seq = image_seq_length(image, vision["hidden_stride"])
    make_processor(tokenizer, image=image, seq_length=seq, **pixels).save_pretrained(out)
    if (src / "generation_config.json").is_file():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert-ovis2", help="original AIDC-AI/Ovis2-* checkpoint -> native transformers layout",
                              description=__doc__)
    p.add_argument("--src", type=Path, required=True,
                   help="folder of the original checkpoint (config.json, *.safetensors, tokenizer files)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the native checkpoint to")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from imatch.atomic import atomic_path
    from imatch.integrity import seal, verify

    if not args.src.is_dir():
        raise InputError(args.src, "not a folder")
    verify(args.src)
    with atomic_path(args.out, directory=True) as tmp:
        convert(args.src, tmp)
        seal(tmp, converted_from=str(args.src))
    index = json.loads((args.out / "model.safetensors.index.json").read_text())
    print(json.dumps({"out": str(args.out), "tensors": len(index["weight_map"])}))
    return 0
