"""Ovis2 (native class) end to end on a tiny random model: build, ms-swift plug-in, LoRA, conversion.

Guards the two silent failures of the engine notes: vision-tower LoRA that never trains (weights
stay exactly 0 under reentrant gradient checkpointing) and `<image>` tokenised as text (it is no
single token in the real Ovis2-hf tokenizers, and in the tiny one built here neither).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from imatch import archs
from imatch.archs import ovis2
from imatch.levels import ELEMENT_DIGITS, OVERALL_LETTERS

PROMPT = "<image>Prompt: a red circle\nHow well does the image match the prompt?"
# What the template must produce for one image: `<image>` + newline inside the Qwen chat format.
REFERENCE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
             "Prompt: a red circle\nHow well does the image match the prompt?<|im_end|>\n<|im_start|>assistant\n")


def _png(path: Path, colour, size=(96, 80)) -> str:
    im = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(im).ellipse([10, 10, 60, 60], fill=colour)
    im.save(path)
    return str(path.resolve())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ovis2") / "tiny"
    ovis2.build(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def swift_template(tiny):
    import imatch.archs.ovis2_swift  # noqa: F401  (registers ovis2_hf in this process)
    from swift import get_model_processor, get_template

    model, processor = get_model_processor(str(tiny), model_type="ovis2_hf", torch_dtype=torch.float32,
                                           download_model=False, use_hf=True)
    template = get_template(processor, template_type="ovis2_hf")
    return model.eval(), processor, template


def test_registry_and_tiny_build_load_offline(tiny):
    from transformers import AutoProcessor, Ovis2ForConditionalGeneration

    arch = archs.get("ovis2")
    assert arch is ovis2.ARCH and arch.swift_model_type == arch.swift_template == "ovis2_hf"
    assert Path(arch.plugin).is_file() and set(arch.sizes) == {"tiny", "8b", "16b", "34b"}
    processor = AutoProcessor.from_pretrained(tiny)
    model = Ovis2ForConditionalGeneration.from_pretrained(tiny)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_ATOM>")
    assert model.config.visual_indicator_token_ids == tok.convert_tokens_to_ids(ovis2.INDICATOR_TOKENS)
    assert processor.image_seq_length == 64 and processor.image_processor.size["height"] == 224
    for symbol in OVERALL_LETTERS + ELEMENT_DIGITS:
        assert len(tok.encode(symbol, add_special_tokens=False)) == 1, symbol
    for special in ovis2.OVIS_SPECIALS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert len(tok.encode("<image>", add_special_tokens=False)) > 1  # as in the real tokenizers (bug 2)


def _native(processor, text, images):
    return processor(text=text, images=images, return_tensors="pt")


def test_template_matches_native_processor_and_labels_answer_only(tmp_path, swift_template):
    """A square one-tile image, where the native processor and the original agree (non-square and
    multi-tile images are the original's, tests/test_fidelity.py)."""
    model, processor, template = swift_template
    assert type(processor.image_processor).__name__ == "Ovis2ImageProcessorPil"  # the original's PIL resampling
    image = _png(tmp_path / "x.png", (220, 40, 40), size=(96, 96))
    template.set_mode("train")
    enc = template.encode({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "e"}],
                           "images": [image]})
    ref = _native(processor, REFERENCE + "e<|im_end|>\n", [Image.open(image)])
    assert enc["input_ids"] == ref["input_ids"][0].tolist()
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])
    crops = enc["pixel_values"].shape[0]
    assert (torch.tensor(enc["input_ids"]) == model.config.image_token_id).sum() == crops * processor.image_seq_length
    assert crops * processor.image_seq_length == 64
    labelled = [(i, t) for i, t in enumerate(enc["labels"]) if t != -100]
    tok = processor.tokenizer
    assert tok.decode([t for _, t in labelled]) == "e<|im_end|>\n"
    assert labelled[0][1] == tok.convert_tokens_to_ids("e") and labelled[0][0] == len(ref["input_ids"][0]) - 3


def test_multi_tile_grids_keep_rows_and_columns_apart(tmp_path, swift_template):
    """A wide image is split into columns (<IMG_COL> between its crops), a tall one into rows
    (<IMG_ROW>): transformers' native processor swaps the two. Whole image first, then the crops."""
    model, processor, template = swift_template
    tok = processor.tokenizer
    col, row = tok.convert_tokens_to_ids(["<IMG_COL>", "<IMG_ROW>"])
    template.set_mode("train")
    for size, cols, rows in (((400, 120), 1, 0), ((120, 400), 0, 1), ((224, 224), 0, 0)):
        image = _png(tmp_path / f"{size[0]}x{size[1]}.png", (40, 80, 220), size=size)
        enc = template.encode({"messages": [{"role": "user", "content": "<image>Which?"},
                                            {"role": "assistant", "content": "b"}], "images": [image]})
        ids = torch.tensor(enc["input_ids"])
        crops = enc["pixel_values"].shape[0]
        assert crops == (1 if size[0] == size[1] else 3), size  # 1 x 2 or 2 x 1 crops + the whole image
        assert (ids == model.config.image_token_id).sum() == crops * processor.image_seq_length
        assert (ids == col).sum() == cols and (ids == row).sum() == rows, size
        if crops > 1:  # the crops keep their aspect ratio: zero padding (the mean colour) around them
            assert (enc["pixel_values"][1:].abs().sum(dim=1) == 0).any()


def test_closed_set_scoring_through_template_equals_native(tmp_path, swift_template):
    """encode (no answer) -> data_collator (left pad) -> pre_forward_hook -> logits[:, -1] = native forward
    (square images, where the native processor's tiling is the original's)."""
    model, processor, template = swift_template
    images = [_png(tmp_path / "r.png", (220, 40, 40), size=(96, 96)),
              _png(tmp_path / "g.png", (40, 160, 60), size=(120, 120))]
    template.set_mode("transformers")
    queries = [PROMPT, PROMPT.replace("red circle", "green square made of many small tiles")]
    batch = template.data_collator([template.encode({"messages": [{"role": "user", "content": q}], "images": [p]})
                                    for q, p in zip(queries, images)])
    assert batch["attention_mask"][:, -1].all()  # left padding: the last position is the answer slot
    with torch.inference_mode():
        _, kwargs = template.pre_forward_hook(model, None, batch)
        logits = model(**kwargs).logits[:, -1]
        for row, (q, p) in enumerate(zip(queries, images)):
            text = REFERENCE.replace(PROMPT.replace("<image>", "<image>\n"), q.replace("<image>", "<image>\n"))
            ref = model(**_native(processor, text, [Image.open(p)])).logits[0, -1]
            assert torch.allclose(logits[row], ref, atol=1e-4), row


def test_swift_sft_lora_trains_vision_tower(tmp_path, tiny):
    data = tmp_path / "train.jsonl"
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220)]
    rows = [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "abc"[i % 3]}],
             "images": [_png(tmp_path / f"{i}.png", colours[i % 3])]} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("swift")), "sft", "--model", str(tiny),
           "--model_type", "ovis2_hf", "--template", "ovis2_hf", "--external_plugins", ovis2.ARCH.plugin,
           "--check_model", "false", "--dataset", str(data), "--split_dataset_ratio", "0", "--strict", "true",
           "--tuner_type", "lora", "--freeze_vit", "false", "--freeze_aligner", "false",
           "--target_modules", "all-linear", "--modules_to_save", *ovis2.ARCH.head_modules,
           "--gradient_checkpointing", "true", "--vit_gradient_checkpointing", "true",  # the reentrant path
           "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
           "--learning_rate", "1e-3", "--torch_dtype", "float32", "--output_dir", str(out), "--add_version", "false",
           "--save_steps", "3", "--report_to", "none", "--dataloader_num_workers", "0", "--dataset_num_proc", "1",
           "--logging_steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    adapter = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    vision_b = {k: v for k, v in adapter.items() if "vision_tower.transformer.encoder" in k and "lora_B" in k}
    assert len(vision_b) == 2 * 7  # 2 layers x (q, k, v, out, gate, up, down)
    still_zero = [k for k, v in vision_b.items() if not v.abs().sum() > 0]
    assert not still_zero, f"vision-tower LoRA never trained: {still_zero[:3]}"
    assert any("head_linear.lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # aligner
    assert any("language_model" in k and "lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    for module in ovis2.ARCH.head_modules:  # modules_to_save
        assert any(k.endswith(f"{module}.weight") for k in adapter), module


def _to_original(native: dict, vision_hidden: int) -> dict:
    """Rename a native state dict to the original AIDC-AI/Ovis2 layout (written out independently of the converter)."""
    vt = "visual_tokenizer.backbone."
    fixed = {
        "lm_head.weight": "llm.lm_head.weight",
        "model.visual_embeddings_table.weight": "vte.weight",
        "model.vision_tower.head_linear.weight": "visual_tokenizer.head.0.weight",
        "model.vision_tower.head_norm.weight": "visual_tokenizer.head.1.weight",
        "model.vision_tower.head_norm.bias": "visual_tokenizer.head.1.bias",
        "model.vision_tower.transformer.embeddings.patch_embedding.weight": vt + "preprocessor.patchifier.proj.weight",
        "model.vision_tower.transformer.embeddings.patch_embedding.bias": vt + "preprocessor.patchifier.proj.bias",
        "model.vision_tower.transformer.embeddings.rms_norm.weight": vt + "preprocessor.patchifier.norm.weight",
        "model.vision_tower.transformer.rms_norm.weight": vt + "trunk.post_trunk_norm.weight",
    }
    per_layer = {"rms_norm1": "norm_1", "rms_norm2": "norm_2", "attention.out_proj": "attn.proj",
                 "ffn.gate_proj": "mlp.fc1", "ffn.down_proj": "mlp.fc2", "ffn.up_proj": "mlp.fc3"}
    out = {}
    for key, t in native.items():
        if key in fixed:
            out[fixed[key]] = t
        elif key.startswith("model.language_model."):
            out["llm.model." + key[len("model.language_model."):]] = t
        elif key == "model.vision_tower.transformer.embeddings.position_embedding.weight":
            out[vt + "preprocessor.pos_embed"] = t.unsqueeze(0)
        elif ".encoder.layers." in key:
            n, rest = key.split(".encoder.layers.")[1].split(".", 1)
            name, kind = rest.rsplit(".", 1)
            if name in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                if name == "attention.q_proj":
                    prefix = key.rsplit(".attention.q_proj.", 1)[0]
                    qkv = [native[f"{prefix}.attention.{c}_proj.{kind}"] for c in "qkv"]
                    assert qkv[0].shape[0] == vision_hidden
                    out[f"{vt}trunk.blocks.{n}.attn.qkv.{kind}"] = torch.cat(qkv)
            else:
                out[f"{vt}trunk.blocks.{n}.{per_layer[name]}.{kind}"] = t
        else:
            raise KeyError(key)
    return out


def test_convert_original_layout_round_trip(tmp_path, tiny):
    """Sharded source with an index -> every tensor back bit for bit. (That the converted model is
    the original's function is shown against the original code itself: tests/test_fidelity.py.)"""
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, Ovis2ForConditionalGeneration, PreTrainedTokenizerFast

    from imatch.archs import ovis2_convert

    native = load_file(tiny / "model.safetensors")
    config = json.loads((tiny / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    original = _to_original(native, vision["hidden_size"])
    assert len(original) == len(native) - 2 * 2  # q, k, v fused into one per layer
    src = tmp_path / "Ovis2-tiny"
    src.mkdir()
    keys = sorted(original)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: original[k].contiguous() for k in part}, str(src / name))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}))
    llm = {k: v for k, v in text.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    llm.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], torch_dtype="float32",
               rope_theta=text["rope_parameters"]["rope_theta"], tie_word_embeddings=False)
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Ovis"], "model_type": "ovis", "auto_map": {"AutoModelForCausalLM": "modeling_ovis.Ovis"},
        "conversation_formatter_class": "QwenConversationFormatter", "hidden_size": text["hidden_size"],
        "multimodal_max_length": 32768, "llm_attn_implementation": "flash_attention_2", "llm_config": llm,
        "visual_tokenizer_config": {
            "model_type": "aimv2_visual_tokenizer", "vocab_size": vision["vocab_size"],
            "hidden_stride": vision["hidden_stride"], "tokenize_function": "softmax", "tau": 1.0, "depths": None,
            "drop_cls_token": False, "use_indicators": False,
            "backbone_config": {"model_type": "aimv2", "hidden_size": vision["hidden_size"],
                                "intermediate_size": vision["intermediate_size"],
                                "num_hidden_layers": vision["num_hidden_layers"],
                                "num_attention_heads": vision["num_attention_heads"], "num_channels": 3,
                                "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                                "rms_norm_eps": vision["rms_norm_eps"], "qkv_bias": False, "use_bias": False}},
    }))
    PreTrainedTokenizerFast.from_pretrained(tiny).save_pretrained(src)
    (src / "preprocessor_config.json").write_text(json.dumps({  # as the published Ovis2 ones
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": False, "resample": 3,
        "size": {"shortest_edge": vision["image_size"]}, "crop_size": {"height": vision["image_size"],
                                                                    "width": vision["image_size"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))

    parser = argparse.ArgumentParser()
    ovis2_convert.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert-ovis2", "--src", str(src), "--out", str(tmp_path / "native")])
    assert args.func(args) == 0
    out = tmp_path / "native"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    converted = {}
    for shard in sorted(set(index["weight_map"].values())):
        converted.update(load_file(out / shard))
    assert set(converted) == set(native)
    for key, tensor in native.items():
        assert torch.equal(converted[key], tensor), key

    model = Ovis2ForConditionalGeneration.from_pretrained(out).eval()
    reference = Ovis2ForConditionalGeneration.from_pretrained(tiny).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_seq_length == 64 and model.config.image_token_id == reference.config.image_token_id
    inputs = processor(text=REFERENCE, images=[Image.open(_png(tmp_path / "c.png", (0, 0, 255)))], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_convert_adds_image_tokens_to_a_plain_qwen_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from imatch.archs.ovis2_convert import ovis_tokenizer
    from imatch.archs.tokenizer import train_bpe

    plain = PreTrainedTokenizerFast(tokenizer_object=train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                    eos_token="<|im_end|>", pad_token="<|endoftext|>")
    plain.save_pretrained(tmp_path)
    n = len(plain)
    tok = ovis_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids(ovis2.OVIS_SPECIALS) == list(range(n, n + 6))


def test_converter_reads_the_dtype_of_old_and_new_configs():
    """transformers < 4.56 writes `torch_dtype`, newer versions re-save the config with `dtype`."""
    from imatch.archs.ovis2_convert import source_dtype

    assert source_dtype({"llm_config": {"torch_dtype": "float16"}}) == "float16"
    assert source_dtype({"llm_config": {"dtype": "float32"}, "dtype": "bfloat16"}) == "float32"
    assert source_dtype({"llm_config": {}, "dtype": "float16"}) == "float16"
    assert source_dtype({"llm_config": {}}) == "bfloat16"


@pytest.mark.parametrize("size, vit, llm_billions", [("8b", 682_031_616, 7.62), ("16b", 682_031_616, 14.8),
                                                      ("34b", 1_236_531_200, 32.8)])
def test_real_size_backbones_have_the_published_parameter_counts(size, vit, llm_billions):
    """The random backbones of GPU benchmarks are the published architectures: the vision trunk has
    exactly the parameters Apple publishes for aimv2-huge-patch14-448 (Ovis2-8B/16B) and
    aimv2-1B-patch14-448 (Ovis2-34B), the LLM (with its untied head) the Hub's safetensors counts of
    Qwen2.5-7B/14B/32B-Instruct (7.62B, 14.8B, 32.8B). Built on the meta device: no memory, no weights."""
    import torch
    from transformers import Ovis2ForConditionalGeneration

    spec = ovis2.SIZES[size]
    config = ovis2.native_config(dict(spec["text"]), spec["vision"], image=spec["image"], image_token_id=151665,
                                 indicator_ids=[151666, 151667, 151668, 151669, 151670])
    with torch.device("meta"):
        model = Ovis2ForConditionalGeneration._from_config(config)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.model.vision_tower.transformer) == vit
    llm = count(model.model.language_model) + count(model.lm_head)
    assert llm / 1e9 == pytest.approx(llm_billions, abs=0.05)
