"""Build the Ovis2 fidelity fixture: a tiny random Ovis2 run through the ORIGINAL modelling code.

What it does
------------
It imports the original Ovis2 modelling code of AIDC-AI/Ovis (commit
52e5fdfafb0386997c703d1828b7a88493fee141, the last one holding the Ovis2 / AIMv2 code; the next
replaced it by Ovis2.5) from a folder given on the command line -- that code is never copied into
this repository -- and with it:

1. trains a tiny byte-level BPE tokenizer (Qwen2 style: NFC, Qwen2's split regex, byte-level,
   `<|endoftext|>` `<|im_start|>` `<|im_end|>` appended after the BPE vocabulary) and wraps it as
   `Qwen2TokenizerFast` (the class the original `QwenConversationFormatter` insists on);
2. writes a `preprocessor_config.json` shaped like the published Ovis2 ones (CLIPImageProcessor,
   no centre crop, bicubic, CLIP mean/std) for 56 x 56 tiles;
3. builds an original `Ovis` (Qwen2 LLM, `aimv2_visual_tokenizer` with an AIMv2 backbone) from
   configs, seeded random weights, every RMSNorm/LayerNorm weight (and LayerNorm bias), the
   AIMv2 position embedding and the (zero-initialised) Qwen2 q/k/v biases perturbed with seeded
   noise so that a missing or extra norm, position embedding or bias shows;
4. saves it with the original `save_pretrained` to `<out>/model/` (float32 safetensors, tokenizer,
   image processor), deletes any `*.py` the save copied, and RELOADS it from there with the
   original classes; everything below is computed by the reloaded model;
5. writes small deterministic PNG images to `<out>/images/` (one-tile, padded, multi-tile grids
   (1,3) (3,1) (2,2), and non-RGB modes L and RGBA);
6. for each case runs the original `preprocess_inputs(text, [image], max_partition=9)`, builds the
   attention mask as the original README does (`input_ids != pad_token_id`), runs ONE forward
   pass through the original `Ovis.forward` (= `merge_multimodal` + the LLM) and records the
   last position's logits and the softmax over the answer symbols' logits;
7. writes `<out>/expected.safetensors` (per case: input_ids, pixel_values, logits, answer_probs)
   and `<out>/expected.json` (provenance, per-case metadata, image processor dict, sensitivity
   evidence).

Throw-away environment (never a runtime dependency of the project)
-----------------------------------------------------------------
    mkdir -p /tmp/fid-ovis/src
    git -C <mirror of AIDC-AI/Ovis> archive 52e5fdfafb0386997c703d1828b7a88493fee141 \
        -- ovis requirements.txt setup.py | tar -x -C /tmp/fid-ovis/src
    (archiving the whole commit fails on a mirror that lacks the blob of docs/Ovis2_5_Tech_Report.pdf;
    only ovis/ is needed)
    python3.11 -m venv /tmp/fid-ovis/venv
    /tmp/fid-ovis/venv/bin/pip install torch==2.13.0            # CPU wheel; install it first, alone
    /tmp/fid-ovis/venv/bin/pip install transformers==4.46.2 tokenizers==0.20.3 safetensors \
        pillow==13.0.0 'numpy<2'
    DS_BUILD_OPS=0 /tmp/fid-ovis/venv/bin/pip install --no-build-isolation deepspeed==0.15.4
(transformers, tokenizers and deepspeed are the versions pinned by the original
requirements.txt; the original pins torch 2.4.0, 2.13.0 is what is available here.
`modeling_ovis.py` imports deepspeed at module level; only its ZeRO-3 paths use it.
Pillow is the project's own version (pyproject.toml), not the original's 10.3.0: Pillow's bicubic
downscaling changed between them (up to 3/255 on some pixels of a 56x150 -> 20x56 thumbnail, measured),
a library difference that is not what this fixture compares.)

Command (from the repository root)
----------------------------------
    /tmp/fid-ovis/venv/bin/python tests/fidelity/make_ovis2_fixture.py \
        --ovis-src /tmp/fid-ovis/src --out tests/fixtures/fidelity/ovis2

Deterministic (seeded), CPU, float32 throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

SOURCE_COMMIT = "52e5fdfafb0386997c703d1828b7a88493fee141"
COMMAND = ("/tmp/fid-ovis/venv/bin/python tests/fidelity/make_ovis2_fixture.py "
           "--ovis-src /tmp/fid-ovis/src --out tests/fixtures/fidelity/ovis2")

MAX_PARTITION = 9
TILE = 56
SEED = 0
INITIALIZER_RANGE = 0.2  # Qwen2 init std; 0.02 gives near-constant logits at hidden size 64
NORM_NOISE = 0.2         # norm weights := 1 + NORM_NOISE * randn (LayerNorm bias := NORM_NOISE * randn)
POS_EMBED_STD = 0.5      # AIMv2 pos_embed is zero-initialised by the original; made non-zero

OVERALL_QUERY = ("<image>Prompt: a red cube on the left of a blue ball\n"
                 "How well does the image match the prompt? "
                 "Answer with one letter from a (not at all) to o (perfectly).")
ELEMENT_QUERY = ("<image>Prompt: two green cones\nElement: green cone (object)\n"
                 "How well is this element shown in the image? "
                 "Answer with one digit from 1 (absent) to 7 (clearly present).")
OVERALL_SYMBOLS = list("abcdefghijklmno")
ELEMENT_SYMBOLS = list("1234567")

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the Qwen2 / Qwen2.5 models).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# name, file, (w, h), mode, task
CASES = [
    ("square", "square_56x56.png", (56, 56), "RGB", "overall"),
    ("wide", "wide_52x24.png", (52, 24), "RGB", "overall"),
    ("tall", "tall_24x52.png", (24, 52), "RGB", "element"),
    ("row3", "row3_150x56.png", (150, 56), "RGB", "overall"),
    ("col3", "col3_56x150.png", (56, 150), "RGB", "overall"),
    ("grid2x2", "grid2x2_110x100.png", (110, 100), "RGB", "element"),
    ("gray", "gray_56x40.png", (56, 40), "L", "overall"),
    ("rgba", "rgba_40x56.png", (40, 56), "RGBA", "overall"),
]
EXPECTED_GRIDS = {"square": (1, 1), "wide": (1, 1), "tall": (1, 1), "row3": (1, 3), "col3": (3, 1),
                  "grid2x2": (2, 2), "gray": (1, 1), "rgba": (1, 1)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ovis-src", required=True, type=Path,
                   help="folder holding the original `ovis/` package at commit " + SOURCE_COMMIT)
    p.add_argument("--out", required=True, type=Path, help="fixture folder to (re)write")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# tokenizer

def corpus() -> list[str]:
    lines = [
        OVERALL_QUERY.replace("<image>", ""), ELEMENT_QUERY.replace("<image>", ""),
        "system\nYou are a helpful assistant.", "user\n", "assistant\n",
        "Prompt: a red cube on the left of a blue ball", "Prompt: two green cones",
        "Element: green cone (object)", "Element: red cube (object)", "Element: blue ball (object)",
        "Element: left of (relation)", "Element: two (count)", "Element: green (attribute)",
        "How well does the image match the prompt?", "How well is this element shown in the image?",
        "Answer with one letter from a (not at all) to o (perfectly).",
        "Answer with one digit from 1 (absent) to 7 (clearly present).",
        "a b c d e f g h i j k l m n o", "1 2 3 4 5 6 7",
        "A photo of a cat sitting on a wooden table next to a yellow cup.",
        "Three small dogs are running across the green grass in the park.",
        "The image shows a tall building with many windows under a cloudy sky.",
        "An old man is reading a newspaper while drinking coffee in the morning.",
        "There is a white horse standing near the river, and the trees are orange.",
        "Two people hold umbrellas on a rainy street at night; the lights are bright.",
        "The quick brown fox jumps over the lazy dog. Is it shown clearly? Yes, perfectly.",
    ]
    return lines * 3


def build_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=480, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIALS)  # appended after the BPE vocabulary, as in Qwen2

    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json + merges.txt, as the Qwen2 folders have
    hf = Qwen2TokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                            tokenizer_file=str(folder / "tokenizer.json"), unk_token=None, bos_token=None,
                            eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
                            model_max_length=32768, clean_up_tokenization_spaces=False,
                            split_special_tokens=False)
    hf.save_pretrained(str(folder))
    return hf


# ----------------------------------------------------------------------------------------------
# image processor

def build_image_processor(folder: Path):
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": TILE}, resample=3,
        do_center_crop=False, crop_size={"height": TILE, "width": TILE},
        do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
    ip.save_pretrained(str(folder))
    return ip


# ----------------------------------------------------------------------------------------------
# images

def make_image(name: str, size: tuple[int, int], mode: str):
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    k = sum(map(ord, name))  # vary content per image
    r = 255 * (x / max(w - 1, 1))
    g = 255 * (y / max(h - 1, 1))
    b = 127.5 + 127.5 * np.sin((x + 2 * y) / 7.0 + k)
    rgb = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([w // 8, h // 6, w // 8 + max(w // 4, 3), h // 6 + max(h // 4, 3)], fill=(220, 30, 30))
    d.ellipse([w // 2, h // 2, w // 2 + max(w // 3, 4), h // 2 + max(h // 3, 4)], fill=(30, 60, 220))
    d.polygon([(w - 2, 1), (w - 2 - max(w // 5, 4), h // 3), (w - 2, h // 3)], fill=(40, 200, 60))
    d.line([(0, h - 1), (w - 1, 0)], fill=(250, 250, 250), width=1)
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        alpha = (255 * (0.25 + 0.75 * (x / max(w - 1, 1)))).astype(np.uint8)
        alpha[: h // 4, : w // 3] = 0  # fully transparent corner whose RGB is still non-trivial
        out = img.convert("RGBA")
        out.putalpha(Image.fromarray(alpha, "L"))
        return out
    return img


# ----------------------------------------------------------------------------------------------
# model

def perturb(model, torch):
    """Norm weights := 1 + NORM_NOISE*randn, LayerNorm bias := NORM_NOISE*randn, pos_embed := randn*std,
    any other constant parameter += NORM_NOISE*randn."""
    gen = torch.Generator().manual_seed(SEED + 1)
    touched = []
    with torch.no_grad():
        for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
            cls = type(module).__name__
            if cls.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + NORM_NOISE * torch.randn(module.weight.shape, generator=gen))
                touched.append(name + ".weight")
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(NORM_NOISE * torch.randn(module.bias.shape, generator=gen))
                    touched.append(name + ".bias")
        pe = model.visual_tokenizer.backbone.preprocessor.pos_embed
        pe.copy_(POS_EMBED_STD * torch.randn(pe.shape, generator=gen))
        touched.append("visual_tokenizer.backbone.preprocessor.pos_embed")
        # any other constant tensor (Qwen2's zero-initialised q/k/v biases) gets noise as well, so that
        # dropping it shows
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name not in touched and param.numel() > 1 and bool((param == param.flatten()[0]).all()):
                param.copy_(param + NORM_NOISE * torch.randn(param.shape, generator=gen))
                touched.append(name)
    return touched


def main():
    args = parse_args()
    src = args.ovis_src.resolve()
    if not (src / "ovis" / "model" / "modeling_ovis.py").is_file():
        sys.exit(f"{src}: no ovis/model/modeling_ovis.py (extract commit {SOURCE_COMMIT} there)")
    sys.path.insert(0, str(src))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import PIL
    import tokenizers
    import torch
    import transformers
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2Config

    import ovis.model  # noqa: F401  registers aimv2 / *_visual_tokenizer with the Auto classes
    from ovis.model.configuration_ovis import OvisConfig
    from ovis.model.modeling_ovis import Ovis
    from ovis.model.visual_tokenizer.aimv2_visual_tokenizer import Aimv2VisualTokenizerConfig
    from ovis.model.visual_tokenizer.configuration_aimv2 import AIMv2Config
    from ovis.util.constants import IMAGE_ATOM_ID, IMAGE_INDICATOR_IDS

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    model_dir = out / "model"
    img_dir = out / "images"
    img_dir.mkdir(parents=True)

    # 1-2. tokenizer and image processor, written where the original constructor reads them
    # (`Ovis.__init__` loads both from config.name_or_path).
    tokenizer = build_tokenizer(model_dir)
    image_processor = build_image_processor(model_dir)
    for s in OVERALL_SYMBOLS + ELEMENT_SYMBOLS:
        ids = tokenizer(s, add_special_tokens=False).input_ids
        assert len(ids) == 1, (s, ids)
    n_tok = len(tokenizer)
    vocab_size = int(math.ceil((n_tok + 16) / 64) * 64)  # padded like Qwen2's embedding, with spare rows

    # 3. the original model, from configs
    torch.manual_seed(SEED)
    llm_config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        initializer_range=INITIALIZER_RANGE, rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=False,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=None, max_window_layers=2,
        attention_dropout=0.0, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    backbone_config = AIMv2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
        image_size=TILE, patch_size=14, qkv_bias=False, use_bias=False)
    vt_config = Aimv2VisualTokenizerConfig(
        vocab_size=64, tokenize_function="softmax", tau=1.0, depths=None, drop_cls_token=False,
        backbone_config=backbone_config, hidden_stride=2)
    config = OvisConfig(
        llm_config=llm_config, visual_tokenizer_config=vt_config, multimodal_max_length=2048,
        hidden_size=llm_config.hidden_size, conversation_formatter_class="QwenConversationFormatter",
        llm_attn_implementation=None, disable_tie_weight=False)
    config._name_or_path = str(model_dir)
    # auto_map as in the published checkpoints (makes save_pretrained copy the code; deleted below)
    OvisConfig.register_for_auto_class()
    Ovis.register_for_auto_class("AutoModelForCausalLM")
    model = Ovis(config)
    touched = perturb(model, torch)
    model.config._name_or_path = "tiny-ovis2-fidelity"
    model.float().eval()

    # 4. save with the original save_pretrained, drop copied code, reload from the files
    model.save_pretrained(str(model_dir), safe_serialization=True)
    copied_code = sorted(p.name for p in model_dir.glob("*.py"))
    for p in model_dir.glob("*.py"):
        p.unlink()
    del model
    model = Ovis.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tokenizer = model.get_text_tokenizer()
    image_processor = model.get_visual_tokenizer().get_image_processor()
    assert type(tokenizer).__name__ == "Qwen2TokenizerFast"
    assert model.llm.dtype == torch.float32 and model.visual_tokenizer.dtype == torch.float32

    # 5-7. cases
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for name, fname, size, mode, task in CASES:
        img = make_image(name, size, mode)
        img.save(img_dir / fname, optimize=True)
        img = Image.open(img_dir / fname)
        img.load()
        assert img.size == size and img.mode == mode, (name, img.size, img.mode)

        query = OVERALL_QUERY if task == "overall" else ELEMENT_QUERY
        symbols = OVERALL_SYMBOLS if task == "overall" else ELEMENT_SYMBOLS
        # ms-swift renders the leading `<image>` tag as the image followed by "\n"
        text = "<image>\n" + query[len("<image>"):]
        prompt, input_ids, pixel_values = model.preprocess_inputs(text, [img], max_partition=MAX_PARTITION)

        ids = input_ids.tolist()
        start = ids.index(IMAGE_INDICATOR_IDS[0])
        end = ids.index(IMAGE_INDICATOR_IDS[4])
        ph = ids[start:end + 1]
        rows = ph.count(IMAGE_INDICATOR_IDS[3]) + 1
        atoms = ph.count(IMAGE_ATOM_ID)
        grid = (1, 1) if atoms == 1 else (rows, (atoms - 1) // rows)
        assert grid == EXPECTED_GRIDS[name], (name, grid)
        n_crops = pixel_values.shape[0]
        assert n_crops == (1 if grid == (1, 1) else 1 + grid[0] * grid[1])

        input_ids_b = input_ids.unsqueeze(0)
        attention_mask = torch.ne(input_ids_b, tokenizer.pad_token_id)
        with torch.inference_mode():
            out_fwd = model(input_ids=input_ids_b, attention_mask=attention_mask, labels=None,
                            pixel_values=[pixel_values])
            logits = out_fwd.logits[0, -1].float().clone()
            # the path `generate` takes (left padding) gives the same for one sample
            _, emb, _, am = model.merge_multimodal(text_input_ids=input_ids_b, text_attention_masks=attention_mask,
                                                   text_labels=None, pixel_values=[pixel_values], left_padding=True)
            logits_gen = model.llm(inputs_embeds=emb, attention_mask=am).logits[0, -1]
        assert torch.allclose(logits, logits_gen, atol=1e-5, rtol=0), (name, (logits - logits_gen).abs().max())
        sym_ids = [tokenizer.convert_tokens_to_ids(s) for s in symbols]
        probs = torch.softmax(logits[sym_ids], dim=-1)

        tensors[f"{name}.input_ids"] = input_ids.to(torch.int64).contiguous()
        tensors[f"{name}.pixel_values"] = pixel_values.float().contiguous()
        tensors[f"{name}.logits"] = logits.contiguous()
        tensors[f"{name}.answer_probs"] = probs.float().contiguous()
        cases.append({
            "name": name, "image": fname, "size": list(size), "mode": mode, "query": query, "task": task,
            "grid": list(grid), "n_crops": int(n_crops), "seq_len_text": len(ids),
            "seq_len_merged": int(am.shape[1]), "prompt": prompt, "answer_symbols": symbols,
            "answer_token_ids": sym_ids, "top_answer": symbols[int(probs.argmax())],
            "top_answer_prob": round(float(probs.max()), 6),
            "logits_absmax": round(float(logits.abs().max()), 6),
            "logits_min": round(float(logits.min()), 6), "logits_max": round(float(logits.max()), 6),
            "logits_std": round(float(logits.std()), 6),
        })
        print(f"{name:8s} size={size} grid={grid} crops={n_crops} top={cases[-1]['top_answer']} "
              f"logits[{float(logits.min()):.3f},{float(logits.max()):.3f}] std={float(logits.std()):.3f}")

    # sensitivity: the original takes the ViT features BEFORE post_trunk_norm (hidden_states[-1]).
    # Make hidden_states[-1] the post-norm tokens (as last_hidden_state) and measure the change.
    trunk = model.visual_tokenizer.backbone.trunk
    orig_forward = trunk.forward

    def forward_after_norm(tokens, mask=None, output_hidden_states=False):
        x, hs = orig_forward(tokens, mask, output_hidden_states=output_hidden_states)
        if hs is not None:
            hs = hs[:-1] + (x,)
        return x, hs

    sq = next(c for c in cases if c["name"] == "square")
    sq_ids = tensors["square.input_ids"].unsqueeze(0)
    trunk.forward = forward_after_norm
    try:
        with torch.inference_mode():
            alt = model(input_ids=sq_ids, attention_mask=torch.ne(sq_ids, tokenizer.pad_token_id), labels=None,
                        pixel_values=[tensors["square.pixel_values"]]).logits[0, -1]
    finally:
        trunk.forward = orig_forward
    post_norm_diff = float((alt - tensors["square.logits"]).abs().max())
    print(f"post_trunk_norm sensitivity (square): max|dlogits| = {post_norm_diff:.4f}")

    save_file(tensors, str(out / "expected.safetensors"), metadata={"source_commit": SOURCE_COMMIT})
    ip_dict = image_processor.to_dict()
    meta = {
        "source": {"repo": "AIDC-AI/Ovis", "commit": SOURCE_COMMIT, "transformers": transformers.__version__,
                   "torch": torch.__version__, "tokenizers": tokenizers.__version__, "pillow": PIL.__version__,
                   "numpy": np.__version__, "python": sys.version.split()[0]},
        "command": COMMAND,
        "max_partition": MAX_PARTITION,
        "tile": TILE,
        "vocab": {"tokenizer_len": n_tok, "llm_vocab_size": vocab_size,
                  "specials": {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS},
                  "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token},
        "image_placeholder_ids": {"IMAGE_ATOM_ID": IMAGE_ATOM_ID, "IMAGE_INDICATOR_IDS": IMAGE_INDICATOR_IDS},
        "attn_implementation": model.llm.config._attn_implementation,
        "cases": cases,
        "image_processor": ip_dict,
        "post_trunk_norm": {"case": "square", "max_abs_logit_diff": post_norm_diff,
                            "what": "original (ViT features = hidden_states[-1], before post_trunk_norm) vs the "
                                    "same model with the features taken after post_trunk_norm"},
        "init": {"seed": SEED, "llm_initializer_range": INITIALIZER_RANGE, "norm_noise": NORM_NOISE,
                 "pos_embed_std": POS_EMBED_STD, "perturbed": touched,
                 "other": "AIMv2 linears/conv and the Ovis head Linear: PyTorch default init (the original "
                          "defines no _init_weights for them); vte: nn.Embedding default N(0,1)"},
        "saved_code_deleted": copied_code,
        "notes": [
            "Prompt = original QwenConversationFormatter with the default system prompt and "
            "generation_preface='' (ends with '<|im_start|>assistant\\n'); no BOS is added.",
            "input_ids hold the original placeholders: -301 image start, -300 one image atom (a whole crop), "
            "-302 end of the thumbnail/first block, -303 column separator, -304 row separator, -305 image end.",
            "pixel_values: thumbnail (whole image) first, then the grid crops row-major; a grid of (1,1) has no "
            "thumbnail. Each crop is resized keeping aspect (longest side 56, int() truncation), then padded "
            "centred to 56x56 with 0 in the normalised space.",
            "Visual features: AIMv2 hidden_states[-1] = output of the last block BEFORE post_trunk_norm; "
            "post_trunk_norm.weight is in the checkpoint but unused.",
            "logits: Ovis.forward(input_ids, attention_mask=input_ids!=pad, labels=None, pixel_values=[pv]) "
            "in eval mode, last position, full LLM vocab (incl. padded rows); checked equal to the "
            "merge_multimodal(left_padding=True) path that generate uses.",
            "answer_probs: softmax over the logits of the answer symbols' token ids only.",
        ],
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    for p in out.rglob("*.safetensors"):
        p.chmod(0o644)  # safetensors writes 0600
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
