"""Stage `score-set`: QAlign closed-set scoring (paper Eq. 5-7), one forward pass per batch, no generation.

Each query goes through ms-swift's own template (the encoding used in training), the batch is
left-padded so the last position predicts the answer token, and only the logits of the answer
set are kept: the 15 letters a..o (overall) or the 7 digits 1..7 (element). Their softmax is the
probability vector; its expectation is the expected level, mapped back to a total score with
(l - 1) / 14 * 4 + 1 (overall) or compared with tau (element hit, Eq. 2). Output: one row per
query with the probability vector, expected level, argmax level and score.

`--blank-images` replaces every image by a uniform grey one of the same size: the control that
shows whether a model's scores come from the image at all.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imatch import archs, levels
from imatch.atomic import write_parquet
from imatch.devices import check_gpus
from imatch.errors import InputError

COLUMNS = ["id", "task", "split", "img_path", "element", "probs", "expected_level", "argmax_level", "score", "hit"]


def answer_token_ids(tokenizer, symbols: list[str]) -> list[int]:
    ids = []
    for s in symbols:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"answer symbol {s!r} is not a single token in this tokenizer: {enc}")
        ids.append(enc[0])
    return ids


def load(model_dir: Path, arch: archs.Arch, *, device: str, dtype: str, base: Path | None = None,
         max_pixels: int | None = None):
    """Model (base + LoRA adapter, or full weights) and ms-swift template in inference mode."""
    import torch
    from swift import get_model_processor, get_template

    if arch.plugin:
        from swift.utils import import_external_file

        import_external_file(arch.plugin)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    adapter = (Path(model_dir) / "adapter_config.json").is_file()
    source = Path(base) if adapter else Path(model_dir)
    if adapter and base is None:
        raise InputError(model_dir, "a LoRA adapter needs --base (the backbone it was trained on)")
    model, processor = get_model_processor(str(source), model_type=arch.swift_model_type, torch_dtype=torch_dtype,
                                           device_map=device, download_model=False, use_hf=True)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir))
    model.eval()
    # the same generic pre-resize as `swift sft --max_pixels` applied in training
    template = get_template(processor, template_type=arch.swift_template, max_pixels=max_pixels or None)
    template.set_mode("transformers")
    return model, processor, template


def _blank(path: str, cache: dict) -> str:
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
    if size not in cache:
        target = Path(cache["_dir"]) / f"blank_{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (128, 128, 128)).save(target)
        cache[size] = str(target)
    return cache[size]


def score_table(table: pd.DataFrame, model, processor, template, *, task: str, batch_size: int, tau: float,
                blank_dir: Path | None = None) -> pd.DataFrame:
    import torch

    symbols = levels.OVERALL_LETTERS if task == "overall" else levels.ELEMENT_DIGITS
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = torch.tensor(answer_token_ids(tokenizer, symbols))
    blanks = {"_dir": str(blank_dir)} if blank_dir is not None else None
    probs = np.zeros((len(table), len(symbols)))
    with torch.inference_mode():
        for start in tqdm(range(0, len(table), batch_size), desc=f"score {task}", unit="batch", mininterval=5):
            rows = table.iloc[start:start + batch_size]
            encoded = []
            for r in rows.itertuples(index=False):
                image = _blank(r.image, blanks) if blanks is not None else r.image
                encoded.append(template.encode({"messages": [{"role": "user", "content": r.query}], "images": [image]}))
            batch = template.data_collator(encoded)
            _, kwargs = template.pre_forward_hook(model, None, batch)
            logits = model(**kwargs).logits[:, -1, :].float()
            probs[start:start + len(rows)] = torch.softmax(logits[:, ids.to(logits.device)], dim=-1).cpu().numpy()
    lv = np.arange(1, len(symbols) + 1)
    expected = probs @ lv
    out = table[["id", "task", "split", "img_path", "element"]].copy()
    out["probs"] = list(probs)
    out["expected_level"] = expected
    out["argmax_level"] = probs.argmax(axis=1) + 1
    if task == "overall":
        out["score"] = levels.level_to_total(expected)
        out["hit"] = None
    else:
        out["score"] = probs[:, lv > tau].sum(axis=1)  # P(level > tau)
        out["hit"] = levels.is_hit(expected, tau)
    return out[COLUMNS].reset_index(drop=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score-set", help="closed-set (QAlign) scoring of an instruction set", description=__doc__)
    p.add_argument("--arch", required=True, help="qwen2_5_vl, internvl or ovis2")
    p.add_argument("--model", type=Path, required=True, help="trained model folder (full weights or LoRA adapter)")
    p.add_argument("--base", type=Path, help="backbone folder, when --model is a LoRA adapter")
    p.add_argument("--instructions", type=Path, required=True, help="instruction parquet from `imatch instructions`")
    p.add_argument("--out", type=Path, required=True, help="predictions parquet")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tau", type=float, default=levels.DEFAULT_TAU, help="element hit: expected level > tau")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max-pixels", type=int, default=200704, help="the same image budget as in training")
    p.add_argument("--blank-images", action="store_true", help="control: replace every image by a grey one")
    p.add_argument("--gpus", type=int, default=0, help="GPUs this job asked for; fail if a different number is visible")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    arch = archs.get(args.arch)
    os.environ.update(arch.env)
    if args.max_pixels:
        os.environ["MAX_PIXELS"] = str(args.max_pixels)
    check_gpus(args.gpus)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("asked for a GPU but none is visible")
    table = pd.read_parquet(args.instructions)
    if table.empty:
        raise InputError(args.instructions, "no queries to score")
    tasks = set(table["task"])
    if len(tasks) != 1:
        raise InputError(args.instructions, f"expected one task, found {sorted(tasks)}")
    task = tasks.pop()
    start = time.time()
    model, processor, template = load(args.model, arch, device=device, dtype=args.dtype, base=args.base,
                                      max_pixels=args.max_pixels)
    blank_dir = args.out.parent / f".{args.out.name}.blank" if args.blank_images else None
    if blank_dir is not None:
        blank_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out = score_table(table, model, processor, template, task=task, batch_size=args.batch_size, tau=args.tau,
                      blank_dir=blank_dir)
    elapsed = time.time() - t0
    if len(out) != len(table):
        raise AssertionError("scoring changed the row count")
    write_parquet(out, args.out)
    print(json.dumps({"rows": len(out), "task": task, "load_seconds": round(t0 - start, 2),
                      "seconds_per_query": round(elapsed / len(out), 4)}))
    return 0
