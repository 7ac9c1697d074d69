"""Build the InternVL2.5 fidelity fixture (tests/fixtures/fidelity/internvl).

What it does
------------
1. Trains a tiny sentencepiece BPE model laid out like the InternLM2(.5) tokenizer that
   InternVL2.5-8B(-MPO) ships (<unk>=0, <s>=1, </s>=2; byte fallback; no dummy prefix;
   identity normalisation; digits split; the six chat specials <|plugin|> <|interpreter|>
   <|action_end|> <|action_start|> <|im_end|> <|im_start|> as the LAST sentencepiece pieces,
   like ids 92538..92543 of the real one) and wraps it in the ORIGINAL ``InternLM2Tokenizer``
   (internvl_chat/internvl/model/internlm2/tokenization_internlm2.py) with the nine InternVL
   tokens <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box> added right after
   the sentencepiece vocabulary (like ids 92544..92552), all special, add_bos_token=True
   (the class default, which the real tokenizer_config.json does not override).
2. Builds a tiny random ORIGINAL ``InternVLChatModel`` (InternViT + mlp1 + InternLM2) from the
   OpenGVLab/InternVL GitHub code, seeded, float32; every norm weight/bias and every InternViT
   layer scale (ls1/ls2) is perturbed so none is an identity; all weights are rounded to values
   exactly representable in bfloat16 (the converter casts to bfloat16, so conversion is lossless).
3. Saves it with the original ``save_pretrained`` under --work (NOT in the fixture), then converts
   it to the ``-hf`` layout (InternVLForConditionalGeneration) with transformers' own
   ``convert_internvl_weights_to_hf.py`` (path given with --converter; it is exec'd, never copied),
   driving its functions with local paths.  The few hard-coded hub names/sizes are replaced by
   exact, asserted source substitutions listed in CONVERTER_PATCHES and recorded in
   expected.json["notes"]["converter_patches"].
4. Writes deterministic test images, tiles them with the ORIGINAL ``dynamic_preprocess`` +
   ``build_transform`` (internvl_chat/internvl/train/dataset.py; only those functions are taken
   from the file, since the module imports video/ceph libraries), builds the ORIGINAL
   ``InternVLChatModel.chat()`` input (chat() itself is called with ``generate`` intercepted, so
   the input_ids are exactly chat()'s), runs ONE forward pass (image_flags all ones) and records
   the last-position logits and the answer-set probabilities.

Pinned sources
--------------
* OpenGVLab/InternVL @ 2410d1dbf208f0e799459aff9376e5747dbf41a2 (internvl_chat/), extracted with
  ``git -C <mirror> archive 2410d1dbf208f0e799459aff9376e5747dbf41a2 internvl_chat/internvl |
  tar -x -C /tmp/fid-internvl/src``
* huggingface/transformers ``src/transformers/models/internvl/convert_internvl_weights_to_hf.py``
  @ 015d3b273cbc4a72f2feb1da386896655a23b3da (16453 chars, sha256
  f12020549aec39d8ae6bd78cffffb515978aa61184de987da064e1021dafdad1; the InternVL2.5/InternVL3
  version with LM_TYPE_CORRESPONDENCE, run with transformers 4.52.4, the first release line that
  ships InternVLForConditionalGeneration).  Save it under /tmp only.

Venv recipe (one venv does everything; CPU only)
------------------------------------------------
    python3.11 -m venv /tmp/fid-internvl/venv
    /tmp/fid-internvl/venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/fid-internvl/venv/bin/pip install "transformers==4.52.4" "torchvision==0.28.*" \
        sentencepiece einops timm peft safetensors pillow numpy protobuf
  (resolved: transformers 4.52.4, tokenizers 0.21.4, torchvision 0.28.0, timm 1.0.31, peft 0.21.2,
   sentencepiece 0.2.3, numpy 2.4.6, pillow 13.0.0, safetensors 0.8.0, accelerate 1.15.0.)
  The PyPI torchvision wheel's C ops need CUDA torch; only its PIL transforms are used here, so
  ``torchvision._meta_registrations`` (fake kernels for nms/roi_align) is stubbed before import.

Cross-check (optional, done once): the ORIGINAL side re-run under transformers 4.37.2 (the version
InternVL's requirements/internvl_chat.txt pins; venv as above with "transformers==4.37.2"
"peft==0.10.0" "numpy<2") from the saved original checkpoint reproduced every case's pixel_values,
chat() input_ids, prompt and answer ids exactly and the logits bit-for-bit (max |dlogit| = 0).

Command (from /work/main)
-------------------------
    /tmp/fid-internvl/venv/bin/python tests/fidelity/make_internvl_fixture.py \
        --internvl-src /tmp/fid-internvl/src \
        --converter /tmp/fid-internvl/convert_internvl_weights_to_hf.py \
        --out tests/fixtures/fidelity/internvl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path

# torchvision from PyPI links CUDA torch; with the CPU torch its C ops cannot load and
# torchvision/_meta_registrations.py raises at import.  Only PIL transforms are used here.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

INTERNVL_COMMIT = "2410d1dbf208f0e799459aff9376e5747dbf41a2"
CONVERTER_COMMIT = "015d3b273cbc4a72f2feb1da386896655a23b3da"
CONVERTER_PATH = "src/transformers/models/internvl/convert_internvl_weights_to_hf.py"
CONVERTER_SHA256 = "f12020549aec39d8ae6bd78cffffb515978aa61184de987da064e1021dafdad1"

SEED = 1234
IMAGE_SIZE = 56
PATCH = 14
MAX_NUM = 12
NUM_IMAGE_TOKEN = int((IMAGE_SIZE // PATCH) ** 2 * 0.5**2)  # 4
LOGIT_SCALE = 3.0  # multiplies the lm head init std (1/sqrt(hidden)); see notes

CHAT_SPECIALS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# order of additional_special_tokens in InternVL2_5-8B(-MPO)/tokenizer_config.json
ADDITIONAL_SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>",
] + INTERNVL_TOKENS

OVERALL_QUERY = (
    "<image>Prompt: a red cube on the left of a blue ball\n"
    "How well does the image match the prompt? Answer with one letter from a (not at all) to o (perfectly)."
)
ELEMENT_QUERY = (
    "<image>Prompt: two green cones\nElement: green cone (object)\n"
    "How well is this element shown in the image? Answer with one digit from 1 (absent) to 7 (clearly present)."
)
LETTERS = [chr(c) for c in range(ord("a"), ord("o") + 1)]
DIGITS = [str(d) for d in range(1, 8)]


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
def corpus_lines() -> list[str]:
    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    words = (
        "a red cube on the left of a blue ball two green cones element object image prompt how well does "
        "match answer with one letter from not at all to perfectly is this shown in digit absent clearly "
        "present the and of yellow white black small large big round square circle triangle cat dog car tree "
        "house sky sun water left right top bottom behind front above below next photo picture shows there "
        "are three four five six seven eight nine ten man woman child holding sitting standing system user "
        "assistant score rate quality"
    ).split()
    rng = np.random.RandomState(SEED)
    lines = []
    for q in (OVERALL_QUERY, ELEMENT_QUERY):
        lines += [ln for ln in q.replace("<image>", "").split("\n") if ln] * 20
    lines += [system] * 10
    for _ in range(400):
        n = rng.randint(3, 12)
        lines.append(" ".join(rng.choice(words, size=n)))
    for c in LETTERS + DIGITS + list("pqrstuvwxyz") + [w.capitalize() for w in ("how", "prompt", "element", "answer")]:
        lines += [f"{c} ({c})", f"{c}: {c}"]
    lines += ["0 1 2 3 4 5 6 7 8 9 10 11 12", "( ) : . , ? ! - ' \" ;"] * 5
    return lines


def train_sentencepiece(work: Path) -> Path:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    sp_dir = work / "spm"
    sp_dir.mkdir(parents=True, exist_ok=True)
    corpus = sp_dir / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
    prefix = sp_dir / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    # append the chat specials as USER_DEFINED pieces at the end of the vocabulary
    m = sp_pb2.ModelProto()
    m.ParseFromString((prefix.with_suffix(".model")).read_bytes())
    existing = {p.piece for p in m.pieces}
    for tok in CHAT_SPECIALS:
        assert tok not in existing
        p = m.pieces.add()
        p.piece = tok
        p.score = 0.0
        p.type = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    out = sp_dir / "tokenizer.model"
    out.write_bytes(m.SerializeToString())
    return out


def make_original_tokenizer(sp_model: Path, orig_dir: Path):
    from transformers import AddedToken
    from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer

    tok = InternLM2Tokenizer(vocab_file=str(sp_model))
    sp_size = tok.vocab_size
    specials = [AddedToken(t, lstrip=False, rstrip=False, single_word=False, normalized=False, special=True)
                for t in ADDITIONAL_SPECIAL]
    tok.add_special_tokens({"additional_special_tokens": specials}, replace_additional_special_tokens=True)
    tok.save_pretrained(str(orig_dir))
    # mirror the hub's auto_map (informational; we load the class directly)
    cfg_path = orig_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                         "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tok = InternLM2Tokenizer.from_pretrained(str(orig_dir))
    ids = {t: tok.convert_tokens_to_ids(t) for t in CHAT_SPECIALS + INTERNVL_TOKENS}
    for i, t in enumerate(CHAT_SPECIALS):
        assert ids[t] == sp_size - len(CHAT_SPECIALS) + i, (t, ids[t])
    for i, t in enumerate(INTERNVL_TOKENS):
        assert ids[t] == sp_size + i, (t, ids[t])
    assert len(tok) == sp_size + len(INTERNVL_TOKENS)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    return tok


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def compat_shims() -> list[str]:
    """transformers renamed PretrainedConfig.is_composition (what the original config sets) to
    has_no_defaults_at_init; without it save_pretrained's to_diff_dict() instantiates
    InternVLChatConfig() with no llm_config, which the original code rejects."""
    from transformers import PretrainedConfig
    from internvl.model.internvl_chat import InternVLChatConfig

    done = []
    if hasattr(PretrainedConfig, "has_no_defaults_at_init") and InternVLChatConfig.is_composition:
        InternVLChatConfig.has_no_defaults_at_init = True
        done.append("InternVLChatConfig.has_no_defaults_at_init = True (= its is_composition = True under the "
                    "newer transformers name; only affects config serialisation)")
    return done


def build_original_model(vocab_size: int):
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel

    vision_config = dict(
        architectures=["InternVisionModel"],
        num_channels=3, patch_size=PATCH, image_size=IMAGE_SIZE,
        hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
        # as InternViT-300M-448px-V2_5 (the vision tower of InternVL2.5-8B):
        qkv_bias=True, qk_normalization=False, norm_type="layer_norm", hidden_act="gelu",
        layer_norm_eps=1e-6, dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0,
        initializer_range=0.02, initializer_factor=1.0, use_flash_attn=False,
    )
    llm_config = dict(
        architectures=["InternLM2ForCausalLM"],
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        # as internlm2_5-7b-chat inside InternVL2.5-8B:
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5, bias=False,
        rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
        attn_implementation="eager", use_cache=True,
    )
    config = InternVLChatConfig(
        vision_config=vision_config, llm_config=llm_config,
        use_backbone_lora=0, use_llm_lora=0, pad2square=False, select_layer=-1,
        force_image_size=IMAGE_SIZE, downsample_ratio=0.5, template="internvl2_5",
        dynamic_image_size=True, use_thumbnail=True, ps_version="v2",
        min_dynamic_patch=1, max_dynamic_patch=MAX_NUM,
    )
    torch.manual_seed(SEED)
    model = InternVLChatModel(config, use_flash_attn=False).float().eval()
    assert model.num_image_token == NUM_IMAGE_TOKEN
    init_weights(model)
    return model


def init_weights(model: torch.nn.Module) -> None:
    """Seeded init with O(1) activations; perturbed norms / layer scales; bf16-exact values."""
    g = torch.Generator().manual_seed(SEED + 1)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    done = set()
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        pref = f"{mname}." if mname else ""
        if isinstance(mod, torch.nn.Embedding):
            mod.weight.data = normal(mod.weight.shape, 1.0)
            done.add(pref + "weight")
        elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            std = fan_in ** -0.5
            if mname.endswith("language_model.output"):
                std *= LOGIT_SCALE
            mod.weight.data = normal(mod.weight.shape, std)
            done.add(pref + "weight")
            if mod.bias is not None:
                mod.bias.data = normal(mod.bias.shape, 0.1)
                done.add(pref + "bias")
        elif "Norm" in cls:
            mod.weight.data = normal(mod.weight.shape, 0.2, 1.0)
            done.add(pref + "weight")
            if getattr(mod, "bias", None) is not None:
                mod.bias.data = normal(mod.bias.shape, 0.1)
                done.add(pref + "bias")
    for name, p in model.named_parameters():
        if name.endswith((".ls1", ".ls2")):
            p.data = normal(p.shape, 0.2, 1.0)  # default initializer_factor (1.0) * ones, perturbed
            done.add(name)
        elif name.endswith(("class_embedding", "position_embedding")):
            p.data = normal(p.shape, 0.5)
            done.add(name)
    missing = [n for n, _ in model.named_parameters() if n not in done]
    assert not missing, missing
    for _, p in model.named_parameters():
        p.data = p.data.to(torch.bfloat16).to(torch.float32)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith((".ls1", ".ls2")) or name.startswith("mlp1.0"):
            assert not torch.allclose(p, torch.ones_like(p)) and not torch.allclose(p, torch.zeros_like(p)), name


# ----------------------------------------------------------------------------------------------
# original image code (functions taken verbatim from internvl_chat/internvl/train/dataset.py)
# ----------------------------------------------------------------------------------------------
def load_original_image_functions(src_root: Path) -> dict:
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    ds_path = src_root / "internvl" / "train" / "dataset.py"
    text = ds_path.read_text()
    tree = ast.parse(text)
    wanted = {"build_transform", "find_closest_aspect_ratio", "dynamic_preprocess", "expand2square"}
    ns: dict = {"T": T, "InterpolationMode": InterpolationMode, "Image": Image}
    const_text = (src_root / "internvl" / "train" / "constants.py").read_text()
    exec(compile(const_text, str(src_root / "internvl" / "train" / "constants.py"), "exec"), ns)
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            seg = ast.get_source_segment(text, node)
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(ds_path), "exec"), ns)
            found.add(node.name)
            assert seg
    assert found == wanted, found
    return ns


def make_images(img_dir: Path) -> list[dict]:
    img_dir.mkdir(parents=True, exist_ok=True)
    specs = [
        ("square", (56, 56), "RGB"),
        ("wide", (112, 56), "RGB"),
        ("tall", (56, 112), "RGB"),
        ("grid", (168, 112), "RGB"),
        ("small", (40, 30), "RGB"),
        ("gray", (60, 60), "L"),
        ("rgba", (84, 56), "RGBA"),
    ]
    out = []
    for k, (name, (w, h), mode) in enumerate(specs):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 255 * xx / max(w - 1, 1)
        gch = 255 * yy / max(h - 1, 1)
        b = 127 + 100 * np.sin((xx + 2 * yy) / (6.0 + k))
        arr = np.stack([r, gch, b], -1).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "RGB")
        d = ImageDraw.Draw(im)
        d.rectangle([w * 0.1, h * 0.15, w * 0.45, h * 0.6], fill=(220, 30, 30))
        d.ellipse([w * 0.55, h * 0.3, w * 0.9, h * 0.85], fill=(30, 60, 220))
        d.polygon([(w * 0.2, h * 0.95), (w * 0.35, h * 0.65), (w * 0.5, h * 0.95)], fill=(40, 200, 60))
        if mode == "L":
            im = im.convert("L")
        elif mode == "RGBA":
            alpha = (255 * (0.25 + 0.75 * xx / max(w - 1, 1))).astype(np.uint8)
            im = im.convert("RGBA")
            im.putalpha(Image.fromarray(alpha, "L"))
        path = img_dir / f"{name}.png"
        im.save(path, format="PNG", optimize=True)
        out.append({"name": name, "path": path, "size": [w, h], "mode": mode})
    return out


# ----------------------------------------------------------------------------------------------
# converter
# ----------------------------------------------------------------------------------------------
def converter_patches(img_ctx_id: int, im_end_id: int) -> list[tuple[str, str, str]]:
    """(why, old, new): exact substitutions applied to the converter source before exec."""
    return [
        ("image_token_id is hard-coded to the real InternLM2 <IMG_CONTEXT> id 92546",
         "        image_token_id = 92546\n",
         f"        image_token_id = {img_ctx_id}\n"),
        ("InternVLConfig.image_seq_length defaults to 256 (= the 448px model); the tiny model has "
         f"{NUM_IMAGE_TOKEN}",
         "        image_token_id=image_token_id,\n    )\n",
         f"        image_token_id=image_token_id,\n        image_seq_length={NUM_IMAGE_TOKEN},\n    )\n"),
        ("generation_config eos is hard-coded to the real <|im_end|> id 92542",
         "            eos_token_id=92542,\n",
         f"            eos_token_id={im_end_id},\n"),
        ("write_image_processor hard-codes the 448 px tile of the real model",
         'size={"height": 448, "width": 448},',
         f'size={{"height": {IMAGE_SIZE}, "width": {IMAGE_SIZE}}},'),
        ("(1) the released InternVLProcessor requires a video_processor: build it as the later converter versions "
         "do (InternVLVideoProcessor.from_pretrained(model_path)); (2) InternVLProcessor defaults image_seq_length "
         f"to 256 (= the 448px model's 32*32/4); the tiny model has {NUM_IMAGE_TOKEN}",
         "processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)",
         "from transformers import InternVLVideoProcessor\n"
         "    video_processor = InternVLVideoProcessor.from_pretrained(model_path)\n"
         "    processor = InternVLProcessor(image_processor=image_processor, video_processor=video_processor, "
         f"tokenizer=tokenizer, chat_template=chat_template, image_seq_length={NUM_IMAGE_TOKEN})"),
        ("this converter version predates InternVLProcessor's tokenizer.video_token (required by the released "
         "processor); declare it exactly as the later converter versions do",
         '                "context_image_token": "<IMG_CONTEXT>",\n            },\n        )\n\n'
         '    tokenizer.chat_template = chat_template',
         '                "context_image_token": "<IMG_CONTEXT>",\n                "video_token": "<video>",\n'
         '            },\n        )\n\n    tokenizer.chat_template = chat_template'),
        ("the converter's keys use the pre-release layout (vision_tower.*, language_model.model.*, "
         "language_model.lm_head.*, multi_modal_projector.*) but torch's load_state_dict(strict=False) does not "
         "apply the released class's _checkpoint_conversion_mapping, so every weight would silently stay random; "
         "map the keys with that same mapping and load strictly",
         "    missing_keys, unexpected_keys = model.load_state_dict(state_dict, strict=False)\n",
         "    import re as _re\n"
         "    _m = model._checkpoint_conversion_mapping\n"
         "    def _mapk(k):\n"
         "        for _p, _r in _m.items():\n"
         "            k2 = _re.sub(_p, _r, k)\n"
         "            if k2 != k:\n"
         "                return k2\n"
         "        return k\n"
         "    state_dict = {_mapk(k): v for k, v in state_dict.items()}\n"
         "    missing_keys, unexpected_keys = model.load_state_dict(state_dict, strict=True)\n"),
    ]


def load_converter(path: Path, patches):
    src = path.read_text(encoding="utf-8")
    sha = hashlib.sha256(src.encode("utf-8")).hexdigest()
    if sha != CONVERTER_SHA256:
        print(f"WARNING: converter sha256 {sha} != pinned {CONVERTER_SHA256}", file=sys.stderr)
    for why, old, new in patches:
        n = src.count(old)
        assert n == 1, (why, n)
        src = src.replace(old, new)
    mod = types.ModuleType("convert_internvl_weights_to_hf")
    mod.__file__ = str(path)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod, sha


def convert(conv, orig_dir: Path, hf_dir: Path, work: Path, orig_tok):
    from transformers import LlamaTokenizerFast
    from internvl.model.internvl_chat import InternVLChatModel

    key = str(orig_dir)
    conv.LM_TYPE_CORRESPONDENCE[key] = "llama"  # InternLM2 LLM, like OpenGVLab/InternVL2_5-8B-MPO

    class _AutoModelShim:  # the hub's trust_remote_code auto_map -> the original class itself
        @staticmethod
        def from_pretrained(path, trust_remote_code=None, **kw):
            return InternVLChatModel.from_pretrained(path, **kw)

    conv.AutoModel = _AutoModelShim

    # write_tokenizer reads "./intern_vl_hf_implem/tokenizer_internvl_llama_fast", made as its comment says:
    fast_dir = work / "intern_vl_hf_implem" / "tokenizer_internvl_llama_fast"
    if fast_dir.exists():
        shutil.rmtree(fast_dir)
    fast = LlamaTokenizerFast.from_pretrained(key, pad_token="</s>", legacy=False, from_slow=True)
    fast._tokenizer.pre_tokenizer.prepend_scheme = "never"
    fast.save_pretrained(str(fast_dir))
    # "then manually modifying added_tokens_decoder indices to match the original tokenizer": check they do
    fast_cfg = json.loads((fast_dir / "tokenizer_config.json").read_text())
    dec = {int(k): v["content"] for k, v in fast_cfg["added_tokens_decoder"].items()}
    want = {orig_tok.convert_tokens_to_ids(t): t for t in ["<unk>", "<s>", "</s>"] + CHAT_SPECIALS + INTERNVL_TOKENS}
    index_fixes = {}
    for i, t in want.items():
        if dec.get(i) != t:
            index_fixes[t] = {"fast": [k for k, v in dec.items() if v == t], "original": i}
    assert not index_fixes, f"added_tokens_decoder indices differ: {index_fixes}"

    cwd = os.getcwd()
    os.chdir(work)
    try:
        conv.write_tokenizer(save_dir=str(hf_dir), push_to_hub=False, path=key, hub_dir=None)
        conv.write_image_processor(save_dir=str(hf_dir), push_to_hub=False, hub_dir=None)
        conv.write_model(model_path=str(hf_dir), input_base_path=key, push_to_hub=False, hub_dir=None)
    finally:
        os.chdir(cwd)
    for p in hf_dir.glob("*.py"):
        p.unlink()
    return fast_cfg


# ----------------------------------------------------------------------------------------------
# reference outputs
# ----------------------------------------------------------------------------------------------
def chat_input_ids(model, tok, pixel_values, question):
    """Run the ORIGINAL chat() with generate() intercepted; return the input_ids it built."""
    captured = {}

    def fake_generate(pixel_values=None, input_ids=None, attention_mask=None, **kw):
        captured["input_ids"] = input_ids.clone()
        captured["attention_mask"] = attention_mask.clone()
        return torch.tensor([[kw["eos_token_id"]]])

    real = model.generate
    model.generate = fake_generate
    try:
        model.chat(tok, pixel_values, question, dict(max_new_tokens=1, do_sample=False))
    finally:
        model.generate = real
    return captured["input_ids"], captured["attention_mask"]


def build_prompt(model, question, n_tiles):
    """Mirror of chat()'s prompt construction (checked against chat()'s own input_ids)."""
    from internvl.conversation import get_conv_template

    template = get_conv_template(model.template)
    template.system_message = model.system_message
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    image_tokens = "<img>" + "<IMG_CONTEXT>" * model.num_image_token * n_tiles + "</img>"
    return query.replace("<image>", image_tokens, 1)


def answer_ids(tok, prompt, symbols):
    base = tok(prompt).input_ids
    ids = []
    for s in symbols:
        full = tok(prompt + s).input_ids
        assert full[: len(base)] == base and len(full) == len(base) + 1, (s, full[len(base) - 2:])
        ids.append(full[-1])
    assert len(set(ids)) == len(ids)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--internvl-src", required=True, type=Path,
                    help="folder holding internvl_chat/ extracted from OpenGVLab/InternVL @ pinned commit")
    ap.add_argument("--converter", required=True, type=Path, help="convert_internvl_weights_to_hf.py (under /tmp)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fid-internvl/work"),
                    help="scratch folder for the sentencepiece model and the ORIGINAL checkpoint (not in the fixture)")
    args = ap.parse_args()

    src_root = args.internvl_src.resolve() / "internvl_chat"
    sys.path.insert(0, str(src_root))
    out = args.out.resolve()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if out.exists():
        shutil.rmtree(out)
    (out / "hf").mkdir(parents=True)

    import sentencepiece
    import transformers
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    shims = compat_shims()

    # 1. tokenizer ------------------------------------------------------------------------
    orig_dir = work / "InternVL2_5-tiny-original"
    orig_dir.mkdir()
    sp_model = train_sentencepiece(work)
    tok = make_original_tokenizer(sp_model, orig_dir)
    vocab_size = len(tok)

    # 2. model ----------------------------------------------------------------------------
    model = build_original_model(vocab_size)
    model.save_pretrained(str(orig_dir), safe_serialization=True)
    from internvl.model.internvl_chat import InternVLChatModel
    from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer
    ref_model = InternVLChatModel.from_pretrained(str(orig_dir), torch_dtype=torch.float32, use_flash_attn=False).eval()
    tok = InternLM2Tokenizer.from_pretrained(str(orig_dir))
    sd_a, sd_b = model.state_dict(), ref_model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    model = ref_model

    # 3. conversion -----------------------------------------------------------------------
    img_ctx_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
    patches = converter_patches(img_ctx_id, im_end_id)
    conv, conv_sha = load_converter(args.converter.resolve(), patches)
    fast_cfg = convert(conv, orig_dir, out / "hf", work, tok)

    # 4. images + reference outputs ---------------------------------------------------------
    fns = load_original_image_functions(src_root)
    transform = fns["build_transform"](is_train=False, input_size=IMAGE_SIZE, normalize_type="imagenet")
    images = make_images(out / "images")
    queries = {"overall": OVERALL_QUERY, "element": ELEMENT_QUERY}
    plan = ["overall", "element", "overall", "element", "overall", "element", "overall"]

    tensors: dict[str, torch.Tensor] = {}
    cases = []
    symbols_ids = None
    with torch.no_grad():
        for img, task in zip(images, plan):
            name = f"{img['name']}_{task}"
            pil = Image.open(img["path"])
            assert pil.mode == img["mode"]
            tiles = fns["dynamic_preprocess"](pil.convert("RGB"), image_size=IMAGE_SIZE, use_thumbnail=True,
                                             max_num=MAX_NUM)
            pixel_values = torch.stack([transform(t) for t in tiles]).float()
            query = queries[task]
            question = "<image>\n" + query[len("<image>"):]
            prompt = build_prompt(model, question, len(tiles))
            enc = tok(prompt, return_tensors="pt")
            chat_ids, chat_mask = chat_input_ids(model, tok, pixel_values, question)
            assert torch.equal(chat_ids, enc.input_ids), name
            n_img_tok = int((chat_ids == img_ctx_id).sum())
            assert n_img_tok == NUM_IMAGE_TOKEN * len(tiles)
            out_fw = model(pixel_values=pixel_values, input_ids=chat_ids, attention_mask=chat_mask,
                           image_flags=torch.ones(len(tiles), 1, dtype=torch.long), return_dict=True)
            logits = out_fw.logits[0, -1].float()
            syms = LETTERS if task == "overall" else DIGITS
            ids = answer_ids(tok, prompt, syms)
            probs = torch.softmax(logits[ids], -1)
            tensors[f"{name}.input_ids"] = chat_ids[0].to(torch.int64).contiguous()
            tensors[f"{name}.pixel_values"] = pixel_values.contiguous()
            tensors[f"{name}.logits"] = logits.contiguous()
            tensors[f"{name}.answer_probs"] = probs.contiguous()
            tensors[f"{name}.answer_ids"] = torch.tensor(ids, dtype=torch.int64)
            cases.append({
                "name": name, "image": f"images/{img['path'].name}", "size": img["size"], "mode": img["mode"],
                "query": query, "task": task, "n_tiles": len(tiles), "prompt": prompt,
                "n_input_ids": int(chat_ids.shape[1]),
                "bos_prepended": bool(chat_ids[0, 0].item() == tok.bos_token_id),
                "answer_symbols": syms, "answer_ids": ids, "answer_pieces": tok.convert_ids_to_tokens(ids),
                "top_answer": syms[int(probs.argmax())], "top_answer_prob": float(probs.max()),
                "logits_absmax": float(logits.abs().max()), "logits_std": float(logits.std()),
            })
            print(f"{name:16s} tiles={len(tiles):2d} ids={chat_ids.shape[1]:3d} top={cases[-1]['top_answer']} "
                  f"p={probs.max():.3f} |logit|max={logits.abs().max():.2f} std={logits.std():.2f}")

    # 5. the converted model, in this venv, on the ORIGINAL inputs (weight conversion only) --------
    from transformers import InternVLForConditionalGeneration
    hf = InternVLForConditionalGeneration.from_pretrained(str(out / "hf"), torch_dtype=torch.float32).eval()
    conv_diff = 0.0
    with torch.no_grad():
        for c in cases:
            n = c["name"]
            lo = hf(input_ids=tensors[f"{n}.input_ids"][None], pixel_values=tensors[f"{n}.pixel_values"]).logits[0, -1]
            conv_diff = max(conv_diff, float((lo - tensors[f"{n}.logits"]).abs().max()))
    print(f"converted model ({transformers.__version__}) vs original, same input_ids/pixel_values: "
          f"max|dlogit| = {conv_diff:.3g}")
    assert conv_diff < 1e-3, conv_diff

    save_file(tensors, str(out / "expected.safetensors"), metadata={"format": "pt"})
    sym_ids = {}
    for syms in (LETTERS, DIGITS):
        ids = answer_ids(tok, cases[0]["prompt"], syms)
        sym_ids.update({s: {"id": i, "piece": p} for s, i, p in zip(syms, ids, tok.convert_ids_to_tokens(ids))})
    rel_out = os.path.relpath(out, Path.cwd())
    expected = {
        "source": {
            "repo": "OpenGVLab/InternVL", "commit": INTERNVL_COMMIT,
            "files": ["internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py",
                      "internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py",
                      "internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py",
                      "internvl_chat/internvl/model/internvl_chat/configuration_intern_vit.py",
                      "internvl_chat/internvl/model/internlm2/modeling_internlm2.py",
                      "internvl_chat/internvl/model/internlm2/configuration_internlm2.py",
                      "internvl_chat/internvl/model/internlm2/tokenization_internlm2.py",
                      "internvl_chat/internvl/conversation.py",
                      "internvl_chat/internvl/train/dataset.py (dynamic_preprocess, find_closest_aspect_ratio, "
                      "build_transform)"],
            "converter": {"repo": "huggingface/transformers", "path": CONVERTER_PATH, "commit": CONVERTER_COMMIT,
                          "sha256": conv_sha},
            "transformers": transformers.__version__, "torch": torch.__version__,
            "sentencepiece": sentencepiece.__version__,
            "pillow": Image.__version__, "numpy": np.__version__,
            "torchvision": sys.modules["torchvision"].__version__,
        },
        "command": (f"/tmp/fid-internvl/venv/bin/python tests/fidelity/make_internvl_fixture.py "
                    f"--internvl-src {args.internvl_src} --converter {args.converter} --out {rel_out}"),
        "max_num": MAX_NUM, "image_size": IMAGE_SIZE, "num_image_token": NUM_IMAGE_TOKEN,
        "system": model.system_message,
        "system_source": ("InternVLChatModel.__init__: config has no system_message, so self.system_message = "
                          "get_conv_template('internvl2_5').system_message (internvl_chat/internvl/conversation.py); "
                          "chat() sets template.system_message = self.system_message"),
        "template": model.template,
        "tokenizer": {
            "class": "InternLM2Tokenizer (original, slow, sentencepiece)",
            "add_bos_token": bool(tok.add_bos_token), "bos": [tok.bos_token, tok.bos_token_id],
            "eos": [tok.eos_token, tok.eos_token_id], "unk": [tok.unk_token, tok.unk_token_id],
            "pad": [tok.pad_token, tok.pad_token_id],
            "sp_vocab_size": tok.vocab_size, "len": len(tok),
            "special_ids": {t: tok.convert_tokens_to_ids(t) for t in CHAT_SPECIALS + INTERNVL_TOKENS},
            "answer_symbols": sym_ids,
            "hf_fast_tokenizer_recipe": ("LlamaTokenizerFast.from_pretrained(<original>, pad_token='</s>', legacy=False, "
                                         "from_slow=True); ._tokenizer.pre_tokenizer.prepend_scheme='never'; saved to "
                                         "./intern_vl_hf_implem/tokenizer_internvl_llama_fast (as the converter's comment "
                                         "says); its added_tokens_decoder ids already equal the original's, so no "
                                         "manual index edit was needed"),
        },
        "model": {
            "vision": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "patch_size": PATCH, "image_size": IMAGE_SIZE, "qkv_bias": True, "qk_normalization": False,
                       "norm_type": "layer_norm", "initializer_factor": 1.0},
            "llm": {"arch": "InternLM2ForCausalLM", "hidden_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                    "vocab_size": vocab_size, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                    "rms_norm_eps": 1e-5},
            "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "use_thumbnail": True,
            "dynamic_image_size": True, "max_dynamic_patch": MAX_NUM, "template": "internvl2_5",
            "init": ("seed %d; Linear/Conv N(0, 1/fan_in); embeddings N(0,1); biases N(0,0.1); norm weights "
                     "N(1,0.2), norm biases N(0,0.1); ls1/ls2 N(1,0.2); class/position embeddings N(0,0.5); "
                     "lm head std x LOGIT_SCALE=%s; all values rounded to bfloat16-exact float32" % (SEED + 1, LOGIT_SCALE)),
        },
        "cases": cases,
        "notes": {
            "forward": ("one forward pass of the ORIGINAL InternVLChatModel.forward(pixel_values, input_ids, "
                        "attention_mask, image_flags=ones) in float32 on CPU; logits = last position, full vocab; "
                        "input_ids are exactly those chat() built (generate intercepted); answer_probs = softmax of "
                        "logits over answer_ids (a..o or 1..7 as the ORIGINAL tokenizer encodes them after "
                        "'<|im_start|>assistant\\n')"),
            "bos": "the original tokenizer prepends <s> (add_bos_token=True); the prompt string itself has no <s>",
            "pixel_values": ("dynamic_preprocess(image.convert('RGB'), image_size=56, use_thumbnail=True, max_num=12) "
                             "then build_transform(is_train=False, input_size=56, normalize_type='imagenet'); "
                             "RGBA images are converted with PIL .convert('RGB') (alpha dropped, no compositing)"),
            "original_code_shims": shims + [
                "torchvision._meta_registrations stubbed before import (PyPI torchvision C ops need CUDA torch; "
                "only its PIL transforms are used)"],
            "crosscheck_transformers_4_37_2": ("original side re-run under transformers 4.37.2 (InternVL's pinned "
                                               "version): pixel_values, input_ids, prompts, answer ids identical; "
                                               "logits bit-identical"),
            "converter_patches": [{"why": w, "old": o, "new": n} for w, o, n in patches],
            "converter_driving": [
                "LM_TYPE_CORRESPONDENCE[<local original dir>] = 'llama' (as for OpenGVLab/InternVL2_5-8B-MPO)",
                "converter's AutoModel replaced by a shim whose from_pretrained(path, trust_remote_code, **kw) is "
                "InternVLChatModel.from_pretrained(path, **kw) from the pinned GitHub code (the hub's auto_map "
                "remote code is the same class)",
                "write_tokenizer run with cwd=<work> so its hard-coded ./intern_vl_hf_implem/tokenizer_internvl_llama_fast "
                "is the tokenizer made by the recipe in its comment",
                "functions called in main()'s order: write_tokenizer, write_image_processor, write_model; "
                "*.py removed from hf/ afterwards (none were written)",
            ],
            "weights_dtype": ("write_model loads the original in bfloat16 and saves bfloat16; all tiny weights are "
                              "bfloat16-exact so the conversion is lossless; load hf/ with torch_dtype=float32"),
            "converted_check": f"transformers {transformers.__version__} InternVLForConditionalGeneration on the "
                               f"ORIGINAL input_ids/pixel_values: max|dlogit| = {conv_diff:.3g}",
            "fast_tokenizer_config": {k: fast_cfg.get(k) for k in ("tokenizer_class", "add_bos_token",
                                                                    "add_eos_token", "legacy", "add_prefix_space")},
        },
    }
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print("wrote", out)


if __name__ == "__main__":
    main()
