"""Stage `score-set`: QAlign closed-set scoring (paper Eq. 5-7), one forward pass per batch, no generation.

Each query goes through ms-swift's own template (the encoding used in training), the batch is
left-padded so the last position predicts the answer token, and only the logits of the answer
set are kept: the 15 letters a..o (overall) or the 7 digits 1..7 (element). Their softmax is the
probability vector; its expectation is the expected level, mapped back to a total score with
(l - 1) / 14 * 4 + 1 (overall) or compared with tau (element hit, Eq. 2). Output: one row per
query with the probability vector, expected level, argmax level and score.

One job scores every set a model is asked for (all splits; model loading and ms-swift start-up
cost more than scoring a small set), shard K of N of each set, in one table with a `view` column:
`seen` for the sets of `--instructions`, `blank` for those of `--blank-instructions`, whose images
are replaced by uniform grey ones of the same size: the control that shows whether a model's
scores come from the image at all. `gather-scores` joins the shards and checks that every query
of every set is there exactly once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imatch import archs, levels
from imatch.atomic import write_parquet
from imatch.devices import check_gpus
from imatch.errors import InputError

COLUMNS = ["id", "task", "split", "view", "img_path", "element", "probs", "expected_level", "argmax_level", "score", "hit"]


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


def _answer_logits_only(model) -> dict:
    """Ask the model for the logits of the last position only (the answer), where it can: the full
    (batch x length x vocabulary) head is most of a small model's scoring time."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def score_table(table: pd.DataFrame, model, processor, template, *, task: str, batch_size: int, tau: float,
                blank_dir: Path | None = None) -> pd.DataFrame:
    import torch

    keep = _answer_logits_only(model)
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
            logits = model(**kwargs, **keep).logits[:, -1, :].float()
            probs[start:start + len(rows)] = torch.softmax(logits[:, ids.to(logits.device)], dim=-1).cpu().numpy()
    lv = np.arange(1, len(symbols) + 1)
    expected = probs @ lv
    out = table[["id", "task", "split", "img_path", "element"]].copy()
    out["view"] = "seen" if blank_dir is None else "blank"
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
    p.add_argument("--instructions", type=Path, nargs="*", default=[],
                   help="instruction parquets (from `imatch instructions`) to score as they are")
    p.add_argument("--blank-instructions", type=Path, nargs="*", default=[],
                   help="instruction parquets to score with every image replaced by a grey one (control)")
    p.add_argument("--out", type=Path, required=True, help="score parquet (one row per query and view)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tau", type=float, default=levels.DEFAULT_TAU, help="element hit: expected level > tau")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max-pixels", type=int, default=200704, help="the same image budget as in training")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs this job asked for; fail if a different number is visible")
    p.add_argument("--shard", type=int, default=0, help="score only shard K (0-based) of --shards contiguous parts of each set")
    p.add_argument("--shards", type=int, default=1, help="number of shards each set is split into")
    p.set_defaults(func=_run)

    g = subparsers.add_parser("gather-scores", help="concatenate the shards of a scored set, checking coverage",
                              description=__doc__)
    g.add_argument("shards", type=Path, nargs="+", help="shard parquets of one model")
    g.add_argument("--instructions", type=Path, nargs="*", default=[], help="the sets scored as they are")
    g.add_argument("--blank-instructions", type=Path, nargs="*", default=[], help="the sets scored with grey images")
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(func=_run_gather)


def shard_of(table: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """Contiguous part `shard` of `shards` (deterministic: the set is sorted by id)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
    bounds = np.linspace(0, len(table), shards + 1).round().astype(int)
    return table.iloc[bounds[shard]:bounds[shard + 1]]


def expected_ids(seen: list[Path], blank: list[Path]) -> pd.DataFrame:
    """(view, id) of every query the scored sets hold, in scoring order."""
    frames = [pd.read_parquet(p, columns=["id"]).assign(view=view, source=str(p))
              for view, paths in (("seen", seen), ("blank", blank)) for p in paths]
    if not frames:
        raise ValueError("no instruction set given: pass --instructions and/or --blank-instructions")
    return pd.concat(frames, ignore_index=True)


def gather(paths: list[Path], seen: list[Path], blank: list[Path]) -> pd.DataFrame:
    parts = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    expected = expected_ids(seen, blank)
    dup = expected.duplicated(["view", "id"])
    if dup.any():
        raise InputError(expected.loc[dup, "source"].iloc[0], "query scored by two sets", f"id={expected.loc[dup, 'id'].iloc[0]!r}")
    dup = parts.duplicated(["view", "id"])
    if dup.any():
        raise InputError(paths[0], "shards overlap", f"view={parts.loc[dup, 'view'].iloc[0]} id={parts.loc[dup, 'id'].iloc[0]!r}")
    keys = pd.MultiIndex.from_frame(expected[["view", "id"]])
    have = pd.MultiIndex.from_frame(parts[["view", "id"]])
    missing = keys.difference(have)
    if len(missing) or len(parts) != len(expected):
        raise InputError(paths[0].parent, f"shards cover {len(parts)} of {len(expected)} queries",
                         f"e.g. missing {list(missing[:1])}")
    return parts.set_index(["view", "id"]).loc[keys].reset_index()[COLUMNS]


def _run_gather(args) -> int:
    out = gather(args.shards, args.instructions, args.blank_instructions)
    write_parquet(out, args.out)
    print(json.dumps({"rows": len(out), "shards": len(args.shards)}))
    return 0


def _run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
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
    sets = [(path, view) for view, paths in (("seen", args.instructions), ("blank", args.blank_instructions))
            for path in paths]
    if not sets:
        raise SystemExit("nothing to score: pass --instructions and/or --blank-instructions")
    tables = []
    for path, view in sets:
        table = pd.read_parquet(path)
        if table.empty:
            raise InputError(path, "no queries to score")
        tasks = set(table["task"])
        if len(tasks) != 1:
            raise InputError(path, f"expected one task, found {sorted(tasks)}")
        tables.append((shard_of(table, args.shard, args.shards), view, tasks.pop(), path))
    task = tables[0][2]
    for _, _, other, path in tables:
        if other != task:
            raise InputError(path, f"holds {other} queries, the other sets {task} ones (one model, one task)")
    if device == "cuda" and args.gpus > 1:
        device = "auto"  # a model too large for one GPU: its layers spread over all it was given
    start = time.time()
    model, processor, template = load(args.model, arch, device=device, dtype=args.dtype, base=args.base,
                                      max_pixels=args.max_pixels)
    t0 = time.time()
    parts = []
    with tempfile.TemporaryDirectory(prefix="imatch-blank-") as grey:  # the grey stand-in images
        for table, view, _, _ in tables:
            out = score_table(table, model, processor, template, task=task, batch_size=args.batch_size, tau=args.tau,
                              blank_dir=Path(grey) if view == "blank" else None)
            if len(out) != len(table):
                raise AssertionError("scoring changed the row count")
            parts.append(out)
    out = pd.concat(parts, ignore_index=True)
    elapsed = time.time() - t0
    write_parquet(out, args.out)
    print(json.dumps({"rows": len(out), "sets": len(tables), "task": task, "load_seconds": round(t0 - start, 2),
                      "seconds_per_query": round(elapsed / max(len(out), 1), 4)}))
    return 0
