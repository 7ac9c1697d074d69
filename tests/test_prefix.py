"""Exact prefix sharing (`imatch.prefix`): the element queries of an image packed into one sequence
compute what they compute as separate samples: per-answer losses, LoRA and ViT gradients, scoring
probabilities, on tiny models of all three architectures in float32 on the CPU, through ms-swift's
own templates; and `swift sft` trains packed rows as it trains separate samples."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from imatch import archs, levels, prefix
from imatch.backbone import tiny_backbone
from imatch.instructions import build_element, write_set
from twosteps import assert_trained_alike, two_steps

ARCHS = ["internvl", "qwen2_5_vl", "ovis2"]
PIXELS = 16384


@pytest.fixture(scope="module")
def element_set(ingested, tmp_path_factory):
    samples, elements = ingested
    folder = tmp_path_factory.mktemp("elements")
    table = build_element(pd.read_parquet(samples), pd.read_parquet(elements), "train")
    write_set(table, folder / "el.parquet", folder / "el.jsonl", {})
    return folder / "el.parquet", folder / "el.jsonl"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bb")
    for arch in ARCHS:
        tiny_backbone(arch, folder / arch, size="tiny", seed=0)
    return folder


def _rows_of_images(jsonl, n_images):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    images = list(dict.fromkeys(r["images"][0] for r in rows))[:n_images]
    return [r for r in rows if r["images"][0] in images]


def _lora_model_and_template(arch, model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from swift import get_model_processor

    from imatch.score import make_template

    spec = archs.get(arch)
    os.environ.update(spec.swift_environment(PIXELS, None))
    if spec.plugin:
        from swift.utils import import_external_file

        import_external_file(spec.plugin)
    torch.manual_seed(0)
    model, processor = get_model_processor(str(model_dir), model_type=spec.swift_model_type, download_model=False,
                                           use_hf=True, attn_impl="sdpa", torch_dtype=torch.float32)
    # LoRA on every linear layer of the LLM, ViT and aligner (the paper's recipe), B random so
    # that every adapter matrix gets a gradient
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    template = make_template(processor, spec, max_pixels=PIXELS)
    template.set_mode("train")
    template.model = model
    return model, template


def _loss_and_grads(model, template, batch):
    """Per-label-token losses and the gradients of their mean (the trainer's loss)."""
    import torch

    _, kwargs = template.pre_forward_hook(model, None, batch)
    logits = model(**kwargs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    losses = torch.nn.functional.cross_entropy(logits[keep], labels[keep].to(logits.device), reduction="none")
    model.zero_grad()
    losses.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_element_queries_train_as_separate_samples(arch, element_set, backbones):
    """The element answers of two images: as separate samples (ms-swift's collation) and as one
    packed row (two prefixes, one suffix each): every answer token's loss and every LoRA gradient (LLM,
    vision tower, aligner) within 1e-5; a plain causal mask over the same row is far off."""
    import torch
    from swift.template import Template

    model, template = _lora_model_and_template(arch, backbones / arch)
    rows = _rows_of_images(element_set[1], 2)
    assert len({r["images"][0] for r in rows}) == 2 and len(rows) >= 6
    separate = template.data_collator([Template.encode(template, dict(r)) for r in rows])
    packed_row = {"messages": [m for r in rows for m in r["messages"]], "images": [r["images"][0] for r in rows]}
    encoded = prefix.encode_row(template, packed_row, lambda t, q: Template.encode(t, q))
    packed = prefix.collate(template, [encoded], original=Template.data_collator)
    assert packed["input_ids"].shape[1] < 0.7 * int(separate["attention_mask"].sum())  # the prefixes are shared

    loss_a, grads_a = _loss_and_grads(model, template, separate)
    loss_b, grads_b = _loss_and_grads(model, template, packed)
    assert len(loss_a) == len(loss_b) == 3 * len(rows)  # answer, <|im_end|>, newline of each query
    assert torch.allclose(loss_a, loss_b, atol=1e-5, rtol=0), (loss_a - loss_b).abs().max()
    vision = [n for n in grads_a if "lora" in n and ("visual" in n or "vision" in n)]
    assert vision and all(grads_a[n].abs().max() > 0 for n in vision)  # the ViT's adapters are trained
    assert set(grads_a) == set(grads_b) and len(grads_a) > 40
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    assert worst < 1e-5, worst

    wrong = dict(packed, attention_mask=torch.tril(torch.ones_like(packed["attention_mask"])))  # suffixes see each other
    loss_c, _ = _loss_and_grads(model, template, wrong)
    assert (loss_a - loss_c).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_scoring_equals_per_element_scoring(arch, element_set, backbones):
    """Every element query of the set scored with its image's prefix encoded once: the 7 answer
    probabilities equal per-query scoring within 1e-5, in the set's order."""
    from imatch.score import answer_token_ids, load, score_probs

    spec = archs.get(arch)
    os.environ.update(spec.swift_environment(PIXELS, None))
    model, processor, template = load(backbones / arch, spec, device="cpu", dtype="float32", max_pixels=PIXELS)
    table = pd.read_parquet(element_set[0])
    ids = answer_token_ids(getattr(processor, "tokenizer", processor), levels.ELEMENT_DIGITS)
    args = (model, template, list(table["image"]), list(table["query"]), ids)
    alone = score_probs(*args, batch_size=16)
    shared = score_probs(*args, batch_size=4, share_prefix=True)
    assert shared.shape == alone.shape == (len(table), 7)
    assert np.abs(shared - alone).max() < 1e-5
    assert np.abs(alone - alone[::-1]).max() > 1e-3  # the order matters: answers differ between queries



def test_grey_images_are_packed_per_image_run_and_capped(element_set, backbones, tmp_path, monkeypatch):
    """The blank view: every image of a size becomes one grey file. Queries are packed by runs of
    the same image file in the set's order, at most MAX_PACKED a row, never a whole split in one
    row; the probabilities equal per-query scoring (prompts that differ are simply not shared)."""
    from imatch import score

    spec = archs.get("internvl")
    os.environ.update(spec.swift_environment(PIXELS, None))
    model, processor, template = score.load(backbones / "internvl", spec, device="cpu", dtype="float32",
                                            max_pixels=PIXELS)
    table = pd.read_parquet(element_set[0]).head(40)
    cache = {"_dir": str(tmp_path)}
    greys = [score._blank(p, cache) for p in table["image"]]
    assert len(set(greys)) == 1 < table["img_path"].nunique()
    ids = score.answer_token_ids(processor.tokenizer, levels.ELEMENT_DIGITS)
    rows = []
    real_pack = prefix.pack
    monkeypatch.setattr(prefix, "pack", lambda enc, imgs, **kw: rows.append(len(enc)) or real_pack(enc, imgs, **kw))
    monkeypatch.setattr(score, "MAX_PACKED", 3)
    shared = score.score_probs(model, template, greys, list(table["query"]), ids, batch_size=4, share_prefix=True)
    alone = score.score_probs(model, template, greys, list(table["query"]), ids, batch_size=16)
    assert np.abs(shared - alone).max() < 1e-5
    assert sum(rows) == len(table) and max(rows) == 3 and len(rows) == -(-40 // 3)


def test_pack_rows_keeps_answers_per_step_and_every_query(element_set, tmp_path):
    """Rows of exactly `answers` queries (the last one the rest), each image's queries consecutive,
    every query exactly once, seeded: the same bytes twice, another order with another seed."""
    jsonl = element_set[1]
    stats = prefix.pack_rows([jsonl], tmp_path / "a.jsonl", answers=8, seed=1)
    prefix.pack_rows([jsonl], tmp_path / "b.jsonl", answers=8, seed=1)
    prefix.pack_rows([jsonl], tmp_path / "c.jsonl", answers=8, seed=2)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()
    original = [json.loads(line) for line in jsonl.read_text().splitlines()]
    packed = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    sizes = [len(r["images"]) for r in packed]
    assert sizes[:-1] == [8] * (len(packed) - 1) and 0 < sizes[-1] <= 8 and sum(sizes) == len(original)
    queries = sorted(json.dumps(q) for r in packed for q in prefix.separate(r))
    assert queries == sorted(json.dumps(r) for r in original)
    for r in packed:  # an image never comes back later in a row
        runs = [k for k, img in enumerate(r["images"]) if k == 0 or img != r["images"][k - 1]]
        assert len(runs) == len(set(r["images"]))
    assert stats["queries"] == len(original) and stats["rows"] == len(packed)
    assert stats["images"] < stats["prefixes_encoded"] < len(original)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_swift_sft_trains_packed_rows_like_separate_samples(arch, element_set, backbones, tmp_path, imatch):
    """`imatch train --share-prefix` against `--no-share-prefix` on the same answers, an optimizer
    step over all of them (unpacked: two accumulated micro-batches; packed: one row): ms-swift logs
    the same loss and gradient norm at step 1, and the same loss after the step (the plug-in's mask
    and positions reach the trainer, and a packed row weighs its answers as accumulation does). A full fine-tune: LoRA's
    dropout would draw other masks for other token layouts (the LoRA gradients are compared, without
    dropout, above)."""
    rows = _rows_of_images(element_set[1], 2)
    rows = rows[:len(rows) // 2 * 2]  # two micro-batches of half of them unpacked, one packed row
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = {}
    for share in ("--share-prefix", "--no-share-prefix"):
        out, scratch = tmp_path / f"model{share}", tmp_path / f"scratch{share}"
        logs[share] = two_steps(imatch, arch, backbones / arch, jsonl, out, scratch, share,
                                "--batch-size", len(rows) // 2, "--grad-accum", 2)
        record = json.loads((out / "training.json").read_text())
        assert (record["prefix_sharing"] is not None) == (share == "--share-prefix")
    assert_trained_alike(logs["--share-prefix"], logs["--no-share-prefix"])


@pytest.mark.parametrize("asked", [False, True])
def test_the_packed_training_process_keeps_cudnn_attention_out_unless_asked(asked):
    """ms-swift imports the plug-in into the `swift sft` process; there it switches cuDNN's sdpa
    kernel off (its per-shape plans made a packed H200 step 2.09x the per-query rate instead of
    2.79x, docs/performance.md), and the scoring path runs its forward without it;
    IMATCH_CUDNN_SDPA=1 (the benchmark's other arm) keeps it. The vision-attention plug-in, loaded
    by every training, leaves sdpa's choice alone unless IMATCH_CUDNN_SDPA=0."""
    import subprocess
    import sys

    from torch.nn.attention import SDPBackend

    from imatch import attention

    def cudnn_after_importing(plugin, value):
        env = {k: v for k, v in os.environ.items() if k != prefix.CUDNN_ENV} | ({prefix.CUDNN_ENV: value} if value else {})
        code = ("import torch; from swift.utils import import_external_file; "
                f"import_external_file({plugin!r}); print(torch.backends.cuda.cudnn_sdp_enabled())")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        return out.split()[-1] == "True"

    assert cudnn_after_importing(prefix.__file__, "1" if asked else None) is asked
    assert cudnn_after_importing(attention.__file__, None if asked else "0") is asked
    os.environ.pop(prefix.CUDNN_ENV, None)
    if asked:
        os.environ[prefix.CUDNN_ENV] = "1"
    assert (SDPBackend.CUDNN_ATTENTION in prefix.sdpa_backends()) is asked
    assert SDPBackend.EFFICIENT_ATTENTION in prefix.sdpa_backends()  # the kernel that takes a boolean mask
