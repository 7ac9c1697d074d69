"""Every training query against `--max_length`, before `swift sft` starts.

ms-swift encodes a query (template, image tokens) only when the trainer first draws it: a query
longer than `--max_length` (a 5,000-character prompt) stopped training at some step with
`MaxLengthError` and no record named, after the model had loaded. The instruction sets cannot
check it: they are shared by backbones whose tokenizers and image budgets differ. So `imatch
train` measures each query with the backbone's own tokenizer and ms-swift template first:

    length = text tokens of the query + (template and image tokens of its image's size)

The second term depends only on the image's size (the budget resizes and tiles by size), so one
real encode per distinct size gives it; queries whose estimate comes within `MARGIN` tokens of the
limit are encoded exactly. Over the limit: refused, naming the file, the line and the image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from imatch import archs
from imatch.errors import InputError

MARGIN = 32  # tokens: joining text and template can merge or split a few tokens at the seams


def _rows(dataset: Path) -> list[dict]:
    with open(dataset, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _text(row: dict) -> str:
    return "".join(m["content"] for m in row["messages"])


def check_lengths(datasets: list[Path], arch: archs.Arch, model: Path, *, max_length: int,
                  max_pixels: int | None, max_tiles: int | None) -> int:
    """Raise InputError for the first query longer than `max_length` tokens; return the longest."""
    from swift import get_model_processor, get_template
    from swift.utils import import_external_file

    if arch.plugin:
        import_external_file(arch.plugin)
    # the template as `swift sft` builds it: the environment it gets (tile budget; Qwen2.5-VL's resize
    # reads MAX_PIXELS) and --max_pixels
    os.environ.update(arch.swift_environment(max_pixels, max_tiles))
    _, processor = get_model_processor(str(model), model_type=arch.swift_model_type, load_model=False,
                                       download_model=False, use_hf=True)
    template = get_template(processor, template_type=arch.swift_template, max_pixels=max_pixels or None)
    template.set_mode("train")
    template.max_length = None  # the full length, never truncated here
    tokenizer = template.tokenizer

    def encoded(row: dict) -> int:
        return len(template.encode(dict(row))["input_ids"])

    sizes: dict[str, tuple[int, int]] = {}
    overhead: dict[tuple[int, int], int] = {}  # image size -> template + image tokens
    longest = 0
    for dataset in datasets:
        rows = _rows(Path(dataset))
        texts = [_text(r) for r in rows]
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for line, (row, n) in enumerate(tqdm(list(zip(rows, counts)), desc=f"query lengths {Path(dataset).name}",
                                             unit="query", mininterval=5), start=1):
            image = row["images"][0]
            if image not in sizes:
                with Image.open(image) as im:
                    sizes[image] = im.size
            size = sizes[image]
            if size not in overhead:
                overhead[size] = encoded(row) - n
            estimate = n + overhead[size]
            if estimate > max_length - MARGIN:
                estimate = encoded(row)
            if estimate > max_length:
                raise InputError(dataset, f"query of {estimate} tokens (text {n}) is longer than max_length "
                                          f"{max_length}: shorten the prompt or raise train.max_length",
                                 f"line {line} (image {image})")
            longest = max(longest, estimate)
    return longest
