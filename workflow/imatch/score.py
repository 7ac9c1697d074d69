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

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from imatch import archs, attention, blocks, integrity, levels, swift_log  # noqa: F401  (swift_log: a true log about remote code)
from imatch.atomic import write_parquet
from imatch.devices import check_gpus
from imatch.errors import InputError

class ScoringError(Exception):
    """A model whose answers are not probabilities (non-finite logits), with the first image."""


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
         max_pixels: int | None = None, max_tiles: int | None = None, varlen: bool = True,
         allow_unsealed: bool = False):
    """Model (base + LoRA adapter, or full weights) and ms-swift template in inference mode.
    `max_pixels`, `max_tiles`: the image budget the model was trained with (the template reads the
    tile budget from the environment, as ms-swift's own templates do).
    `varlen`: the vision tower's windows in one kernel (`imatch.attention`), not one per window."""
    import torch
    from swift import get_model_processor

    if arch.plugin:
        from swift.utils import import_external_file

        import_external_file(arch.plugin)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    adapter = (Path(model_dir) / "adapter_config.json").is_file()
    source = Path(base) if adapter else Path(model_dir)
    if adapter and base is None:
        raise InputError(model_dir, "a LoRA adapter needs --base (the backbone it was trained on)")
    for folder in (model_dir, base) if adapter else (model_dir,):
        # a damaged file stops here, named, before it is loaded; a trained model always has a
        # manifest (imatch train seals it): one without was altered, unless asked to read an old tree
        trained = (Path(folder) / "training.json").is_file()
        integrity.verify(folder, required=trained and not allow_unsealed)
    if arch.name == "qwen2_5_vl":
        from imatch.archs.qwen2_5_vl import fresh_image_budget

        fresh_image_budget()
    model, processor = get_model_processor(str(source), model_type=arch.swift_model_type, torch_dtype=torch_dtype,
                                           device_map=device, download_model=False, use_hf=True, attn_impl="sdpa")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir))
    if varlen:
        attention.enable(model)
    model.eval()
    return model, processor, make_template(processor, arch, max_pixels=max_pixels, max_tiles=max_tiles)


def make_template(processor, arch: archs.Arch, *, max_pixels: int | None, max_tiles: int | None = None):
    """The ms-swift template of `arch` for inference, with the image budget of training: the same
    generic pre-resize as `swift sft --max_pixels`, then at most `max_tiles` tiles (read by the
    template from the environment when it is made)."""
    from swift import get_template

    os.environ.update(arch.tiles_environment(max_tiles))
    template = get_template(processor, template_type=arch.swift_template, max_pixels=max_pixels or None)
    template.set_mode("transformers")
    return template


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


def length_order(images: list[str], queries: list[str]) -> np.ndarray:
    """Scoring order that batches queries of similar length together (image area first: it sets
    the visual token count; then the text), so little of a batch is padding. Stable, so equal
    keys keep the set's order; results are written back in the set's order."""
    from PIL import Image

    areas = []
    for path in images:
        with Image.open(path) as im:  # reads the header only
            areas.append(im.size[0] * im.size[1])
    return np.lexsort((np.array([len(q) for q in queries]), np.array(areas)))


class _Encoded:
    """The template's encoding of each query, for a DataLoader (worker processes encode the next
    batches while the GPU runs the current one)."""

    def __init__(self, template, images: list[str], queries: list[str]):
        self.template, self.images, self.queries = template, images, queries

    def __len__(self):
        return len(self.queries)

    def __getitem__(self, i):
        try:
            return self.template.encode({"messages": [{"role": "user", "content": self.queries[i]}],
                                         "images": [self.images[i]]})
        except Exception as exc:  # in a worker this reaches the scoring process as text naming the image
            raise InputError(self.images[i], f"cannot encode the query for this image: {exc!r}") from exc


class GpuGaps:
    """Time the device spends between batches (waiting for the host: data loading, encoding,
    Python) versus inside them, from CUDA events on the stream (host clock on a CPU)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self):
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def summary(self) -> dict:
        """Marks come in (start, end) pairs per batch; gaps are end(i) -> start(i + 1)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            span = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            span = [b - a for a, b in zip(self.marks, self.marks[1:])]
        busy, idle = sum(span[0::2]), sum(span[1::2])
        return {"batches": len(self.marks) // 2, "busy_seconds": busy, "idle_seconds": idle,
                "idle_fraction": idle / (busy + idle) if busy + idle else 0.0}


def _to_device(batch: dict, device) -> dict:
    """Asynchronous copy through pinned memory (ms-swift's own copy would block until the device
    has finished the previous batch)."""
    import torch

    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def score_probs(model, template, images: list[str], queries: list[str], answer_ids: list[int], *, batch_size: int,
                workers: int = 0, bucket: bool = True, desc: str = "score", gaps: GpuGaps | None = None,
                share_prefix: bool = False) -> np.ndarray:
    """Answer-set probabilities (queries x symbols), in the order given: one forward pass per
    batch, logits only at the answer position, batches of similar length, encoding in workers."""
    return answer_logits(model, template, images, queries, answer_ids, batch_size=batch_size, workers=workers,
                         bucket=bucket, desc=desc, gaps=gaps, softmax=True, share_prefix=share_prefix)


MAX_PACKED = 64  # queries in one packed scoring row


class _Packed:
    """The queries of each image, encoded one by one by the template and packed into one row
    (`imatch.prefix.pack`, the tokens that predict the answers at the end of the row)."""

    def __init__(self, template, groups: list[tuple[str, list[str]]]):
        self.template, self.groups = template, groups

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        from imatch import prefix

        image, queries = self.groups[i]
        try:
            encodings = [self.template.encode({"messages": [{"role": "user", "content": q}], "images": [image]})
                         for q in queries]
        except Exception as exc:
            raise InputError(image, f"cannot encode the queries for this image: {exc!r}") from exc
        return prefix.pack(encodings, [image] * len(queries), answers_last=True)


def _shared_answer_logits(model, template, images, queries, answer_ids, *, batch_size, workers, bucket, desc, gaps,
                          softmax) -> np.ndarray:
    """`answer_logits` with prefix sharing: one packed row per image, `batch_size` rows (images) a
    batch; the logits of each row's last positions are its answers."""
    import torch
    from torch.nn.attention import sdpa_kernel
    from torch.utils.data import DataLoader

    from imatch import prefix

    # runs of consecutive queries on one image (a set lists an image's elements together), at most
    # MAX_PACKED a row: grey stand-ins share one file per image size, and must not pack a whole split
    runs: list[list[int]] = []
    for i, image in enumerate(images):
        if runs and images[runs[-1][-1]] == image and len(runs[-1]) < MAX_PACKED:
            runs[-1].append(i)
        else:
            runs.append([i])
    if bucket:  # by image area, then the text of the run's longest query
        longest = [max(run, key=lambda i: len(queries[i])) for run in runs]
        runs = [runs[j] for j in length_order([images[run[0]] for run in runs], [queries[i] for i in longest])]
    groups = [(images[run[0]], [queries[i] for i in run]) for run in runs]
    batches = [list(range(lo, min(lo + batch_size, len(groups)))) for lo in range(0, len(groups), batch_size)]
    ahead = -(-2 * batch_size // workers) if workers else None
    encoded = iter(DataLoader(_Packed(template, groups), batch_size=None, num_workers=workers, prefetch_factor=ahead,
                              collate_fn=lambda x: x))
    device = next(model.parameters()).device
    keep_ok = bool(_answer_logits_only(model))
    out = np.empty((len(queries), len(answer_ids)))
    ids = torch.tensor(answer_ids, device=device)
    done = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", mininterval=5):
            rows = [next(encoded) for _ in batch]
            width = max(len(groups[g][1]) for g in batch)
            if gaps is not None:
                gaps.mark()
            collated = prefix.collate(template, rows)
            _, kwargs = template.pre_forward_hook(model, None, _to_device(collated, device))
            with sdpa_kernel(prefix.sdpa_backends()):
                logits = model(**kwargs, **({"logits_to_keep": width} if keep_ok else {})).logits[:, -width:, :]
            picked = logits[:, :, ids].float()
            done.append((batch, width, torch.softmax(picked, dim=-1) if softmax else picked))  # no sync per batch
            if gaps is not None:
                gaps.mark()
    for batch, width, picked in done:
        picked = picked.cpu().numpy()
        for r, g in enumerate(batch):
            out[runs[g]] = picked[r, width - len(runs[g]):]
    return out


def answer_logits(model, template, images: list[str], queries: list[str], answer_ids: list[int], *, batch_size: int,
                  workers: int = 0, bucket: bool = True, desc: str = "score", gaps: GpuGaps | None = None,
                  softmax: bool = False, share_prefix: bool = False) -> np.ndarray:
    """The last position's logits of `answer_ids` (queries x ids; their softmax with `softmax`),
    in the order given: the scoring path of `score_probs`, also for checks against other code.
    `share_prefix`: the queries of one image in one packed row (`imatch.prefix`), its shared
    prefix (image, prompt) encoded once."""
    import torch
    from torch.profiler import record_function
    from torch.utils.data import DataLoader

    if share_prefix:
        return _shared_answer_logits(model, template, images, queries, answer_ids, batch_size=batch_size,
                                     workers=workers, bucket=bucket, desc=desc, gaps=gaps, softmax=softmax)
    order = length_order(images, queries) if bucket else np.arange(len(queries))
    dataset = _Encoded(template, [images[i] for i in order], [queries[i] for i in order])
    device = next(model.parameters()).device
    # one query per worker task, so that all workers encode every batch (a whole batch per worker
    # would make the first one wait for one process to encode it); padding happens here
    ahead = -(-2 * batch_size // workers) if workers else None  # per worker: two batches in flight in all
    encoded = iter(DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=ahead,
                              collate_fn=lambda x: x))
    loader = (template.data_collator([next(encoded) for _ in range(min(batch_size, len(order) - start))])
              for start in range(0, len(order), batch_size))
    keep = _answer_logits_only(model)
    out = []
    with torch.inference_mode():
        ids = None
        for batch in tqdm(loader, desc=desc, unit="batch", total=-(-len(order) // batch_size), mininterval=5):
            if gaps is not None:
                gaps.mark()
            with record_function("imatch.pre_forward_hook"):
                _, kwargs = template.pre_forward_hook(model, None, _to_device(batch, device))
            with record_function("imatch.forward"):
                logits = model(**kwargs, **keep).logits[:, -1, :]
            if ids is None:
                ids = torch.tensor(answer_ids, device=logits.device)
            picked = logits[:, ids].float()
            out.append(torch.softmax(picked, dim=-1) if softmax else picked)  # stays on the device: no sync per batch
            if gaps is not None:
                gaps.mark()
    probs = np.empty((len(order), len(answer_ids)))
    probs[order] = torch.cat(out).cpu().numpy() if out else np.empty((0, len(answer_ids)))
    return probs


def score_table(table: pd.DataFrame, model, processor, template, *, task: str, batch_size: int, tau: float,
                blank_dir: Path | None = None, workers: int = 0, bucket: bool = True,
                share_prefix: bool = False) -> pd.DataFrame:
    """`share_prefix`: element queries of one image in one packed row (exact; overall queries, one
    per image, have nothing to share and are scored one by one)."""
    symbols = levels.OVERALL_LETTERS if task == "overall" else levels.ELEMENT_DIGITS
    tokenizer = getattr(processor, "tokenizer", processor)
    blanks = {"_dir": str(blank_dir)} if blank_dir is not None else None
    images = [_blank(p, blanks) if blanks is not None else p for p in table["image"]]
    probs = score_probs(model, template, images, list(table["query"]), answer_token_ids(tokenizer, symbols),
                        batch_size=batch_size, workers=workers, bucket=bucket, desc=f"score {task}",
                        share_prefix=share_prefix and task == "element")
    bad = ~np.isfinite(probs).all(axis=1) | (np.abs(probs.sum(axis=1) - 1) > 1e-3)
    if bad.any():  # a diverged model (NaN / inf logits): refuse, never write "NaN expected"
        row = table.iloc[int(bad.argmax())]
        raise ScoringError(f"{int(bad.sum())} of {len(probs)} {task} queries got non-finite answer probabilities "
                           f"(a diverged model?), first: image {row['img_path']}"
                           + (f" element {row['element']}" if task == "element" else ""))
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
    p.add_argument("--max-tiles", type=int, default=None,
                   help="the same tile budget as in training (InternVL, Ovis2; default: ms-swift's, 12 / 9)")
    p.add_argument("--allow-unsealed", action="store_true",
                   help="score a trained model folder without manifest.json (made before manifests existed)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs this job asked for; fail if a different number is visible")
    p.add_argument("--shard", type=int, default=0, help="score only shard K (0-based) of --shards contiguous parts of each set")
    p.add_argument("--shards", type=int, default=1, help="number of shards each set is split into")
    p.add_argument("--workers", type=int, default=0,
                   help="processes encoding the next batches (images, template) while the model runs; 0: in line")
    p.add_argument("--varlen", action=argparse.BooleanOptionalAction, default=True,
                   help="the vision tower's attention windows in one kernel (imatch.attention), not one call each")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile every transformer block (GPU: fuses the work between GEMMs; ~40 s once)")
    p.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=False,
                   help="element sets: the queries of an image in one packed row, its image and prompt encoded once "
                        "(imatch.prefix; the same probabilities); --batch-size then counts images")
    p.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=True,
                   help="batch queries of similar length together (less padding); output keeps the set's order")
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
    os.environ.update(arch.swift_environment(args.max_pixels, args.max_tiles))
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
                                      max_pixels=args.max_pixels, max_tiles=args.max_tiles, varlen=args.varlen,
                                      allow_unsealed=args.allow_unsealed)
    if args.compile:
        print(f"compiled {blocks.compile_blocks(model)} transformer blocks", flush=True)
    t0 = time.time()
    parts = []
    with tempfile.TemporaryDirectory(prefix="imatch-blank-") as grey:  # the grey stand-in images
        for table, view, _, path in tables:
            try:
                out = score_table(table, model, processor, template, task=task, batch_size=args.batch_size,
                                  tau=args.tau, blank_dir=Path(grey) if view == "blank" else None,
                                  workers=args.workers, bucket=args.bucket, share_prefix=args.share_prefix)
            except ScoringError as exc:  # nothing is written: the model is named, and the image
                raise InputError(args.model, f"scoring {path} ({view}): {exc}") from None
            if len(out) != len(table):
                raise AssertionError("scoring changed the row count")
            parts.append(out)
    out = pd.concat(parts, ignore_index=True)
    elapsed = time.time() - t0
    write_parquet(out, args.out)
    print(json.dumps({"rows": len(out), "sets": len(tables), "task": task, "load_seconds": round(t0 - start, 2),
                      "seconds_per_query": round(elapsed / max(len(out), 1), 4)}))
    return 0
