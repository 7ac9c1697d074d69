"""Backbone fidelity: the workflow's path computes what the published models compute.

- Ovis2 and InternVL2.5: tiny random models written by the ORIGINAL modelling code (AIDC-AI/Ovis,
  OpenGVLab/InternVL at pinned commits, an older transformers in a throw-away venv) with the
  original's own inputs and last-position logits, committed under tests/fixtures/fidelity/ by
  tests/fidelity/make_*_fixture.py (their docstrings give the recipe). Here the workflow's own code
  (`imatch convert-ovis2`, `imatch.score.load`, the ms-swift template, `score_probs`) goes from the
  image file and the query to logits and answer probabilities, compared within 1e-4 in float32.
- Qwen2.5-VL (native in transformers, no conversion): the workflow's encoding equals the paper's
  pipeline built from its parts: ms-swift's template-level `max_pixels` shrink, then Qwen2.5-VL's
  own processor with PIL resampling and the model's chat template.
"""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imatch import archs, score
from imatch.levels import ELEMENT_DIGITS, OVERALL_LETTERS

FIXTURES = Path(__file__).parent / "fixtures" / "fidelity"


# ---- Qwen2.5-VL ---------------------------------------------------------------------------------

def _picture(path: Path, size: tuple[int, int]) -> str:
    """A non-uniform image (gradient + shapes), so resampling differences show."""
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2).astype(np.uint8)
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    draw.ellipse([w // 5, h // 5, w // 2, h // 2], fill=(220, 30, 30))
    draw.rectangle([w // 2, h // 2, 4 * w // 5, 4 * h // 5], fill=(20, 40, 200))
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / "tiny"
    arch = archs.get("qwen2_5_vl")
    arch.build(folder, "tiny", seed=0)
    from imatch.integrity import seal

    seal(folder)
    return folder, arch


# (w, h) of the sizes T2I models produce, and odd ones
QWEN_SIZES = [(128, 128), (1024, 1024), (1024, 768), (768, 1344), (512, 512), (300, 200), (2000, 500)]


@pytest.mark.parametrize("max_pixels", [200704, 16384])
def test_qwen_encoding_is_the_papers_pipeline(qwen, tmp_path, max_pixels):
    """ms-swift's `--max_pixels` shrink (what `swift sft --max_pixels` does to every image), then
    Qwen2.5-VL's own processor (PIL backend) and chat template: same ids, pixels and grid."""
    from swift.template.vision_utils import rescale_image
    from transformers import AutoImageProcessor, AutoProcessor

    folder, arch = qwen
    model, _, template = score.load(folder, arch, device="cpu", dtype="float32", max_pixels=max_pixels)
    pil = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert type(pil).__name__ == "Qwen2VLImageProcessorPil"
    reference = AutoProcessor.from_pretrained(folder, image_processor=pil)
    query = "<image>Prompt: a red circle\nHow well does the image match the prompt?"
    for size in QWEN_SIZES:
        path = _picture(tmp_path / f"{size[0]}x{size[1]}.png", size)
        enc = template.encode({"messages": [{"role": "user", "content": query}], "images": [path]})
        shrunk = rescale_image(Image.open(path).convert("RGB"), max_pixels)
        assert shrunk.width * shrunk.height <= max_pixels
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query[len("<image>"):]}]}]
        text = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ref = reference(text=text, images=[shrunk], return_tensors="pt")
        assert enc["input_ids"] == ref["input_ids"][0].tolist(), size
        assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"]), size
        assert torch.allclose(enc["pixel_values"], ref["pixel_values"], atol=1e-6), size
        t, gh, gw = ref["image_grid_thw"][0].tolist()
        assert gh * gw * 14 * 14 <= max(max_pixels, 28 * 28 * 4) * 1.25  # Qwen rounds to 28-pixel steps
        assert enc["input_ids"].count(151655) == gh * gw // 4


def test_a_second_qwen_load_in_one_process_encodes_with_its_own_budget(qwen, tmp_path, monkeypatch):
    """Two Qwen2.5-VL loads in one process with different image budgets (a Scorer of two bundles):
    each encodes a 1024² image as a fresh process with that budget does (a workflow job: MAX_PIXELS
    set, as `imatch score-set` and the Scorer set it). ms-swift latches the first load's budget."""
    import subprocess
    import sys

    folder, arch = qwen
    big = _picture(tmp_path / "big.png", (1024, 1024))
    probe = ("import os, sys; from pathlib import Path; from imatch import archs, score; arch = archs.get('qwen2_5_vl');"
             "t = score.load(Path(sys.argv[1]), arch, device='cpu', dtype='float32', max_pixels=int(os.environ['MAX_PIXELS']))[2];"
             "print(t.encode({'messages': [{'role': 'user', 'content': '<image>x'}], 'images': [sys.argv[2]]})"
             "['image_grid_thw'].tolist())")
    grids, fresh = {}, {}
    for budget in (16384, 200704):
        monkeypatch.setenv("MAX_PIXELS", str(budget))
        _, _, template = score.load(folder, arch, device="cpu", dtype="float32", max_pixels=budget)
        enc = template.encode({"messages": [{"role": "user", "content": "<image>x"}], "images": [big]})
        grids[budget] = enc["image_grid_thw"].tolist()
        env = {k: v for k, v in os.environ.items() if k != "IMAGE_MAX_TOKEN_NUM"}
        out = subprocess.run([sys.executable, "-c", probe, str(folder), big], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        fresh[budget] = eval(out.stdout.strip().splitlines()[-1])
    assert grids == fresh and grids[16384] != grids[200704], (grids, fresh)


def test_qwen_demo_budget_rounding(qwen, tmp_path):
    """The demo's 16,384-pixel budget on its 128x128 images: no shrink (128^2 = 16,384), then
    Qwen's rounding to 28-pixel steps gives 140x140 = 25 tokens; the paper's 200,704 on a 1024^2
    image gives 448x448 = 256 tokens."""
    folder, arch = qwen
    _, _, template = score.load(folder, arch, device="cpu", dtype="float32", max_pixels=16384)
    enc = template.encode({"messages": [{"role": "user", "content": "<image>x"}],
                           "images": [_picture(tmp_path / "d.png", (128, 128))]})
    assert enc["image_grid_thw"].tolist() == [[1, 10, 10]] and enc["input_ids"].count(151655) == 25
    _, _, template = score.load(folder, arch, device="cpu", dtype="float32", max_pixels=200704)
    enc = template.encode({"messages": [{"role": "user", "content": "<image>x"}],
                           "images": [_picture(tmp_path / "p.png", (1024, 1024))]})
    assert enc["image_grid_thw"].tolist() == [[1, 32, 32]] and enc["input_ids"].count(151655) == 256


# ---- Ovis2 --------------------------------------------------------------------------------------

def _fixture(name: str):
    import json

    from safetensors.torch import load_file

    folder = FIXTURES / name
    return folder, json.loads((folder / "expected.json").read_text()), load_file(folder / "expected.safetensors")


@pytest.fixture(scope="module")
def ovis2_converted(tmp_path_factory):
    """The original tiny Ovis2 converted by `imatch convert-ovis2` (the workflow's rule command)."""
    from imatch.cli import main

    folder, expected, tensors = _fixture("ovis2")
    out = tmp_path_factory.mktemp("ovis2") / "native"
    assert main(["convert-ovis2", "--src", str(folder / "model"), "--out", str(out)]) == 0
    arch = archs.get("ovis2")
    loaded = score.load(out, arch, device="cpu", dtype="float32", max_pixels=None,
                        max_tiles=expected["max_partition"])
    return folder, expected, tensors, loaded


def _ovis2_ids(original: list[int], tokenizer, per_crop: int) -> list[int]:
    """The original's ids with its negative image placeholders named as the native tokens."""
    from imatch.archs.ovis2 import IMAGE_TOKEN, INDICATOR_TOKENS

    names = {-300: [IMAGE_TOKEN] * per_crop, **{-301 - i: [t] for i, t in enumerate(INDICATOR_TOKENS)}}
    out = []
    for i in original:
        out += tokenizer.convert_tokens_to_ids(names[i]) if i < 0 else [i]
    return out


def test_ovis2_converted_encoding_equals_the_original(ovis2_converted):
    """Image file + query -> the ms-swift template of the workflow: the original's pixels
    (aspect kept, zero-padded, whole image first), tiles and placeholder order (rows, columns)."""
    folder, expected, tensors, (model, processor, template) = ovis2_converted
    grids = {tuple(c["grid"]) for c in expected["cases"]}
    assert {(1, 1)} < grids and any(r > 1 and c > 1 for r, c in grids)  # the fixture covers several tiles
    for case in expected["cases"]:
        name = case["name"]
        enc = template.encode({"messages": [{"role": "user", "content": case["query"]}],
                               "images": [str(folder / "images" / case["image"])]})
        reference = tensors[f"{name}.pixel_values"]
        assert enc["pixel_values"].shape == reference.shape, name
        assert torch.allclose(enc["pixel_values"], reference, atol=1e-5), (name, (enc["pixel_values"] - reference).abs().max())
        ids = _ovis2_ids(tensors[f"{name}.input_ids"].tolist(), processor.tokenizer, processor.image_seq_length)
        assert enc["input_ids"] == ids, name


def scores_as_the_original(model, processor, template, expected, tensors, images):
    """Last-position logits (every vocabulary entry) and answer probabilities through the scoring
    code of `imatch score-set` (batched, left-padded, images of several sizes per batch), within
    1e-4 of the original model's, every case; answer ids are the original tokenizer's."""
    cases = expected["cases"]
    queries = [c["query"] for c in cases]
    vocab = tensors[f"{cases[0]['name']}.logits"].numel()
    logits = score.answer_logits(model, template, images, queries, list(range(vocab)), batch_size=3)
    for row, case in enumerate(cases):
        diff = np.abs(logits[row] - tensors[f"{case['name']}.logits"].numpy()).max()
        assert diff < 1e-4, (case["name"], diff)
    for task, symbols in (("overall", OVERALL_LETTERS), ("element", ELEMENT_DIGITS)):
        rows = [i for i, c in enumerate(cases) if c["task"] == task]
        ids = score.answer_token_ids(processor.tokenizer, symbols)
        assert ids == cases[rows[0]].get("answer_token_ids", cases[rows[0]].get("answer_ids"))
        probs = score.score_probs(model, template, [images[i] for i in rows], [queries[i] for i in rows], ids,
                                  batch_size=4)
        for i, row in enumerate(rows):
            reference = tensors[f"{cases[row]['name']}.answer_probs"].numpy()
            assert np.abs(probs[i] - reference).max() < 1e-4, cases[row]["name"]


def test_ovis2_converted_scores_as_the_original(ovis2_converted):
    folder, expected, tensors, (model, processor, template) = ovis2_converted
    images = [str(folder / "images" / c["image"]) for c in expected["cases"]]
    scores_as_the_original(model, processor, template, expected, tensors, images)


# ---- InternVL2.5 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def internvl_loaded(tmp_path_factory):
    """The -hf conversion (transformers' own converter) of an original tiny InternVL2.5, loaded the
    way `imatch score-set` loads a downloaded backbone."""
    import shutil

    from imatch.integrity import seal

    folder, expected, tensors = _fixture("internvl")
    hf = tmp_path_factory.mktemp("internvl") / "hf"
    shutil.copytree(folder / "hf", hf)
    seal(hf)  # as `imatch download-backbone` seals a download
    loaded = score.load(hf, archs.get("internvl"), device="cpu", dtype="float32", max_pixels=None,
                        max_tiles=expected["max_num"])
    return folder, expected, tensors, loaded


def test_internvl_encoding_equals_the_original(internvl_loaded):
    """Image file + query -> the workflow's template: the original chat() prompt (InternVL2.5's
    system turn, BOS, <img> + <IMG_CONTEXT> x tiles x tokens + </img>) and its PIL tiles
    (dynamic_preprocess with the thumbnail, bicubic, ImageNet normalisation), answer ids included."""
    folder, expected, tensors, (model, processor, template) = internvl_loaded
    assert max(c["n_tiles"] for c in expected["cases"]) > 3  # several tiles, with rows and columns
    for case in expected["cases"]:
        name = case["name"]
        enc = template.encode({"messages": [{"role": "user", "content": case["query"]}],
                               "images": [str(folder / case["image"])]})
        assert enc["input_ids"] == tensors[f"{name}.input_ids"].tolist(), name
        reference = tensors[f"{name}.pixel_values"]
        assert enc["pixel_values"].shape == reference.shape, name
        assert torch.allclose(enc["pixel_values"].float(), reference, atol=1e-5), name
        symbols = OVERALL_LETTERS if case["task"] == "overall" else ELEMENT_DIGITS
        assert score.answer_token_ids(processor.tokenizer, symbols) == case["answer_ids"], name


def test_internvl_scores_as_the_original(internvl_loaded):
    folder, expected, tensors, (model, processor, template) = internvl_loaded
    images = [str(folder / c["image"]) for c in expected["cases"]]
    scores_as_the_original(model, processor, template, expected, tensors, images)


def test_max_tiles_is_each_templates_own_setting():
    """One key, the variable each ms-swift template reads; null = ms-swift's default (the paper's)."""
    assert archs.get("internvl").tiles_environment(None) == {"MAX_NUM": "12"}
    assert archs.get("ovis2").tiles_environment(None) == {"MAX_PARTITION": "9"}
    assert archs.get("ovis2").tiles_environment(4) == {"MAX_PARTITION": "4"}
    assert archs.get("qwen2_5_vl").tiles_environment(None) == {}
    with pytest.raises(ValueError, match="max_pixels"):
        archs.get("qwen2_5_vl").tiles_environment(4)
    with pytest.raises(ValueError):
        archs.get("internvl").tiles_environment(0)
