"""The tiny Qwen2.5-VL backbone: real special-token ids, images reaching the model through
ms-swift's own template, and a short `swift sft` run (the silent failure is an image never inserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # Qwen2.5-VL's image processor

from imatch import archs  # noqa: E402
from imatch.levels import ELEMENT_DIGITS, OVERALL_LETTERS  # noqa: E402

REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def arch():
    return archs.get("qwen2_5_vl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, arch) -> Path:
    out = tmp_path_factory.mktemp("qwen2_5_vl") / "tiny"
    arch.build(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """Six rows of 128x128 PNGs with one-letter answers, as the fine-tuning jsonl is written."""
    from PIL import Image, ImageDraw

    folder = tmp_path_factory.mktemp("rows")
    lines = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(image).ellipse((10 + 8 * i, 20, 100, 110), fill=colour)
        path = folder / f"{i}.png"
        image.save(path)
        lines.append({"messages": [{"role": "user", "content": f"<image>Prompt: a {colour} circle\nHow well ...?"},
                                   {"role": "assistant", "content": OVERALL_LETTERS[2 * i]}],
                      "images": [str(path.resolve())]})
    jsonl = folder / "train.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jsonl


def test_registry(arch):
    from imatch.archs import qwen2_5_vl

    assert arch is qwen2_5_vl.ARCH
    assert (arch.swift_model_type, arch.swift_template) == ("qwen2_5_vl", "qwen2_5_vl")
    assert set(arch.sizes) == {"tiny", "7b"} and "MAX_PIXELS" in arch.env


def test_tiny_loads_with_real_ids(model_dir, arch):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    tokenizer = processor.tokenizer
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    for symbol in OVERALL_LETTERS + ELEMENT_DIGITS:
        assert len(tokenizer.encode(symbol, add_special_tokens=False)) == 1, symbol
    # the fillers are never produced by ordinary text
    ids = tokenizer.encode("Prompt: a red circle <|filler_900|> 0123456789", add_special_tokens=False)
    assert max(ids) < 1000
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    assert model.config.image_token_id == REAL_IDS["<|image_pad|>"]
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer) == 151665
    names = [name for name, _ in model.named_modules()]
    for head in arch.head_modules:
        assert any(name.endswith(head) for name in names), head
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Prompt: a red circle"}]}],
        add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_7b_has_real_dimensions():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from imatch.archs import qwen2_5_vl

    config = qwen2_5_vl.config("7b")
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.intermediate_size,
            vision.num_heads) == (32, 1280, 3584, 3420, 16)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and not config.tie_word_embeddings
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656  # Qwen2.5-VL-7B-Instruct


def test_swift_template_inserts_image_and_labels_only_the_answer(model_dir, rows, arch, monkeypatch):
    pytest.importorskip("qwen_vl_utils")
    swift = pytest.importorskip("swift")
    for key, value in arch.env.items():
        monkeypatch.setenv(key, value)
    model, processor = swift.get_model_processor(str(model_dir), model_type=arch.swift_model_type,
                                                 download_model=False)
    template = swift.get_template(processor, template_type=arch.swift_template)
    template.set_mode("train")
    row = json.loads(rows.read_text().splitlines()[0])
    encoded = template.encode(row)
    ids, labels = encoded["input_ids"], encoded["labels"]

    with torch.no_grad():
        image_embeds = model.model.visual(encoded["pixel_values"], grid_thw=encoded["image_grid_thw"]).pooler_output
    n_image = ids.count(REAL_IDS["<|image_pad|>"])
    assert n_image == image_embeds.shape[0] == 25  # 128x128 -> 140x140 -> 5x5 merged patches
    assert ids.count(REAL_IDS["<|vision_start|>"]) == 1

    answer = processor.tokenizer.convert_tokens_to_ids(row["messages"][1]["content"])
    labelled = [(i, label) for i, label in enumerate(labels) if label != -100]
    first = labelled[0][0]
    assert [label for _, label in labelled[:2]] == [answer, REAL_IDS["<|im_end|>"]]
    assert ids[first] == answer and [i for i, _ in labelled] == list(range(first, first + len(labelled)))
    assert processor.tokenizer.decode([label for _, label in labelled[2:]]).strip() == ""  # ms-swift's "\n"

    # the image rows reach the forward pass: the loss changes when the image does
    batch = template.data_collator([encoded])
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "position_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    with torch.no_grad():
        loss = model(**inputs).loss
        blank = model(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).loss
    assert torch.isfinite(loss) and loss != blank


def test_swift_sft_tiny(model_dir, rows, arch, tmp_path):
    pytest.importorskip("qwen_vl_utils")
    pytest.importorskip("swift")
    cli = Path(sys.executable).parent / "swift"
    out = tmp_path / "sft"
    args = ["sft", "--model", model_dir, "--model_type", arch.swift_model_type, "--template", arch.swift_template,
            "--check_model", "false", "--tuner_type", "full", "--freeze_vit", "false", "--freeze_aligner", "false",
            "--torch_dtype", "float32", "--dataset", rows, "--split_dataset_ratio", "0", "--num_train_epochs", "1",
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--learning_rate", "1e-3", "--output_dir", out, "--add_version", "false", "--report_to", "none",
            "--dataloader_num_workers", "0", "--strict", "true"]
    run = subprocess.run([str(cli), *map(str, args)], env={**os.environ, **arch.env}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    logged = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    assert any(entry.get("global_step/max_steps") == "3/3" for entry in logged)
    # the image pads were in the training inputs
    assert f"{REAL_IDS['<|image_pad|>']}, {REAL_IDS['<|image_pad|>']}" in run.stdout + run.stderr
