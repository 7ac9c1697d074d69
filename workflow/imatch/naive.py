"""The plain transformers path: a backbone loaded and run as a transformers user would (sdpa,
the model's own processor and chat template, full logits). The reference the workflow's fast
scoring path is compared with (tests/test_performance.py) and the naive baseline of the benchmark
driver (benchmarks/bench.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imatch import archs


def load_plain(folder: Path, arch: archs.Arch, device, dtype, max_pixels: int | None = None):
    """The backbone as a plain transformers user loads it (`max_pixels`: Qwen's resize budget)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa",
                                                        device_map=device)
    processor = AutoProcessor.from_pretrained(folder)
    if max_pixels:
        open_budget(processor, max_pixels)
    processor.tokenizer.padding_side = "left"
    if arch.name == "ovis2":  # the original Ovis2's function (features before the final norm), as the workflow
        from imatch.archs.ovis2_swift import features_before_final_norm

        features_before_final_norm(model)
    return model.eval(), processor


def open_budget(processor, pixels: int) -> None:
    """Let Qwen2.5-VL's image processor keep images up to `pixels` (the built backbones carry the
    paper's 448² budget; the 1036² benchmark images must not be shrunk to it)."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if size is not None and "longest_edge" in size:
        image_processor.size = {**dict(size), "longest_edge": max(pixels, size["longest_edge"])}
    if getattr(image_processor, "max_pixels", None):
        image_processor.max_pixels = max(pixels, image_processor.max_pixels)


def plain_inputs(processor, images, queries, device, answers=None):
    """Chat-templated batch through the model's own processor (the answers appended for training)."""
    from PIL import Image

    texts = []
    for i, q in enumerate(queries):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.removeprefix("<image>")}]}]
        if answers is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=answers is None, tokenize=False))
    pil = [Image.open(p).convert("RGB") for p in images]
    return processor(text=texts, images=pil, return_tensors="pt", padding=True).to(device)


def plain_batches(processor, images, queries, batch_size) -> list:
    """The naive baseline's inputs, prepared before the clock starts (so it is the forward pass
    that is timed, as in the reference measurement)."""
    return [plain_inputs(processor, images[s:s + batch_size], queries[s:s + batch_size], "cpu")
            for s in range(0, len(queries), batch_size)]


def naive_score(model, batches, answer_ids, device, gaps=None) -> np.ndarray:
    """Plain transformers forward per batch, the whole (batch x length x vocabulary) logits."""
    import torch

    out = []
    with torch.inference_mode():
        for inputs in batches:
            inputs = inputs.to(device)
            if gaps is not None:
                gaps.mark()
            logits = model(**inputs).logits[:, -1, :]
            out.append(torch.softmax(logits[:, answer_ids].float(), dim=-1).cpu())
            if gaps is not None:
                gaps.mark()
    return torch.cat(out).numpy()
