"""Exact prefix sharing: the element queries of one image in one sequence, the shared part once.

Every element query of an image repeats the system prompt, the image and the prompt text; only
the element line, the question and the answer differ. Packed, the shared prefix is encoded once
and each element's suffix follows it, under an attention mask in which each suffix sees the
prefix and itself only, with the position ids it has in its own sample (Qwen2.5-VL's 3-D M-RoPE
included). Every token then computes what it computes in its own sample: the answer logits, the
losses and the gradients equal those of separate samples (`tests/test_prefix.py` checks it in
float32 on all three architectures).

How it stays exact without knowing the templates: each query is encoded on its own by ms-swift's
template (the training encoding, unchanged), and the packed row is cut from those encodings. The
shared prefix is their longest common run of token ids (never past the first label), so it holds
the same tokens at the same positions in every sample.
Position ids come from the template's own computation on one "virtual" sample per image (the
prefix and the longest suffix): a suffix token at index i of its sample gets the virtual
sample's position at index i. The queries put the image first (`imatch.prompts`), so its tokens
lie in the shared prefix and its tensors are taken once per image.

Used by `imatch train --share-prefix` (a `swift sft` plug-in: a training row whose user turns are
the queries of one or more images, one image path per turn, is packed by `encode`; batches of
packed rows get their masks in `data_collator`) and by `imatch score-set --share-prefix` (one
packed row per run of queries on one image file, at most 64, the tokens that predict the answers
moved to the end, so the logits are taken there only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TREE = "imatch_tree"  # per packed row: segment, branch and logical index of every token
TOKEN_KEYS = ("input_ids", "labels", "loss_scale", "mm_token_type_ids")  # one value per token
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # concatenated over the images of a row
FLASH_KEYS = ("text_position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# benchmark arms: "1" lets sdpa pick cuDNN's attention for the tree masks too, "0" keeps it out of
# per-query training as well (imatch.attention); unset: packed rows without it, the rest as sdpa picks
CUDNN_ENV = "IMATCH_CUDNN_SDPA"


def sdpa_backends() -> list:
    """The sdpa kernels for a packed row's boolean tree mask. Not cuDNN's: it builds an execution
    plan per shape (~1.9 / 2.4 ms of host time a forward / backward call against 0.2 / 0.75 ms on the
    GPU, every layer, and every packed batch has a new width), so a packed Qwen2.5-VL-7B step on an
    H200 ran 357 ms of kernels in ~600 ms; the memory-efficient kernel takes the same mask without
    that (element training 2.09x -> 2.79x the per-query rate, docs/performance.md). Same function."""
    from torch.nn.attention import SDPBackend

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if os.environ.get(CUDNN_ENV) == "1":
        backends.insert(0, SDPBackend.CUDNN_ATTENTION)
    return backends


def _image_key(image) -> str:
    if isinstance(image, dict):
        return image.get("path") or str(hash(image.get("bytes")))
    return str(image)


def separate(row: dict) -> list[dict] | None:
    """The single-query rows of a packed training row (user turns with one image path each, every
    turn followed by its answer), or None when `row` is an ordinary one-query row."""
    messages, images = row.get("messages") or [], row.get("images") or []
    users = [m for m in messages if m["role"] == "user"]
    if len(users) < 2:
        return None
    if len(images) != len(users) or [m["role"] for m in messages] != ["user", "assistant"] * len(users):
        raise ValueError(f"a packed row needs user/assistant turns with one image per user turn: {len(users)} user "
                         f"turns, {len(images)} images")
    return [{"messages": messages[2 * k:2 * k + 2], "images": [images[k]]} for k in range(len(users))]


def pack(encodings: list[dict], images: list[str], *, answers_last: bool = False) -> dict:
    """One packed encoding from the separate encodings of queries; `images[k]` names the image of
    encoding k, and the encodings of one image must be consecutive (one segment each).
    `answers_last`: move the last token of each suffix (the one that predicts the answer) to the
    end of the row, in query order (scoring: the logits are taken from the last positions)."""
    import torch

    if len(encodings) != len(images) or not encodings:
        raise ValueError("pack needs one image per encoding")
    unknown = set().union(*encodings) - set(TOKEN_KEYS) - set(IMAGE_KEYS) - {"length"}
    if unknown:
        raise ValueError(f"prefix sharing does not know how to pack {sorted(unknown)}")
    starts = [k for k in range(len(images)) if k == 0 or images[k] != images[k - 1]]
    if len(starts) != len(set(images)):
        raise ValueError("the queries of one image must be consecutive to share their prefix")
    chunks, tail = [], []  # (segment, branch, encoding, start, end): branch 0 is the shared prefix
    for s, (lo, hi) in enumerate(zip(starts, [*starts[1:], len(images)])):
        group = encodings[lo:hi]
        shared = _shared_length(group)
        chunks.append((s, 0, group[0], 0, shared))
        for k, e in enumerate(group):
            end = len(e["input_ids"])
            if answers_last:
                chunks.append((s, k + 1, e, shared, end - 1))
                tail.append((s, k + 1, e, end - 1, end))
            else:
                chunks.append((s, k + 1, e, shared, end))
    keys = [key for key in TOKEN_KEYS if encodings[0].get(key) is not None]
    if any((e.get(key) is not None) != (key in keys) for e in encodings for key in TOKEN_KEYS):
        raise ValueError("the encodings to pack differ in their keys")
    out, seg, branch, logical = {key: [] for key in keys}, [], [], []
    for s, b, e, a, z in chunks + tail:
        for key in keys:
            out[key].append(e[key][a:z])
        seg += [s] * (z - a)
        branch += [b] * (z - a)
        logical += range(a, z)
    for key in keys:
        out[key] = torch.cat(out[key]) if isinstance(out[key][0], torch.Tensor) else sum(map(list, out[key]), [])
    for key in IMAGE_KEYS:  # one image per segment, in segment order
        if encodings[0].get(key) is not None:
            out[key] = torch.cat([encodings[lo][key] for lo in starts])
    out["length"] = len(out["input_ids"])
    out[TREE] = [seg, branch, logical]
    return out


def _shared_length(group: list[dict]) -> int:
    """The longest run of token ids that every encoding of one image starts with, never reaching
    a label (the answers stay in the suffixes) nor the last token (every suffix keeps one)."""
    ids = [list(e["input_ids"]) for e in group]
    first_label = [next((i for i, y in enumerate(e["labels"]) if y != -100), len(e["input_ids"]))
                   if e.get("labels") is not None else len(e["input_ids"]) for e in group]
    limit = min(min(first_label), min(len(x) for x in ids) - 1)
    n = 0
    while n < limit and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def encode_row(template, row: dict, encode) -> dict | None:
    """`template.encode` of a training row: a packed row (see `separate`) is encoded query by
    query with `encode` (ms-swift's own) and packed; None for any other row (ms-swift's to encode)."""
    queries = separate(row if isinstance(row, dict) else {})
    if queries is None:
        return None
    encodings = [encode(template, q) for q in queries]
    return pack(encodings, [_image_key(q["images"][0]) for q in queries], answers_last=not template.is_training)


def collate(template, batch: list[dict], *, padding_to: int | None = None, original=None) -> dict:
    """ms-swift's collation of packed rows, then the tree mask (4-D, boolean: True = may attend)
    and each token's position ids in place of the causal ones."""
    import torch

    trees = [b[TREE] for b in batch]
    plain = [{k: v for k, v in b.items() if k != TREE} for b in batch]
    res = (original or type(template).data_collator)(template, plain, padding_to=padding_to)
    for key in FLASH_KEYS:  # packed-sequence hints for flash kernels: the mask below says it all
        res.pop(key, None)
    ids = res["input_ids"]
    rows, width = ids.shape
    left = (template.padding_side if template.is_training else "left") == "left"
    # numpy, not torch: torch's broadcast comparisons on the CPU took ~45 ms a 775-token row (numpy
    # ~1 ms), and scoring collates in the main process, where that starved the GPU
    mask = np.zeros((rows, 1, width, width), dtype=bool)
    placed = []
    for r, (seg, branch, logical) in enumerate(trees):
        n = len(seg)
        off = width - n if left else 0
        seg_a, br_a, lg_a = (np.asarray(x, dtype=np.int64) for x in (seg, branch, logical))
        allowed = ((seg_a[:, None] == seg_a[None, :]) & ((br_a[None, :] == 0) | (br_a[None, :] == br_a[:, None]))
                   & (lg_a[None, :] <= lg_a[:, None]))
        mask[r, 0, off:off + n, off:off + n] = allowed
        pads = np.r_[0:off, off + n:width]
        mask[r, 0, pads, pads] = True  # pads see themselves: no NaN rows
        placed.append((off, seg, branch, logical))
    res["attention_mask"] = torch.from_numpy(mask)
    res["position_ids"] = _positions(template, res, placed, rows, width)
    return res


def _positions(template, res: dict, placed, rows: int, width: int):
    """Each token's position id in its own sample: its index there, or, for Qwen2.5-VL's M-RoPE,
    the template's 3-D positions of the virtual sample (prefix + longest suffix) of its image."""
    import torch

    if not hasattr(template, "_get_position_ids"):
        pos = torch.zeros(rows, width, dtype=torch.long)
        for r, (off, _, _, logical) in enumerate(placed):
            pos[r, off:off + len(logical)] = torch.tensor(logical)
        return pos
    ids = res["input_ids"]
    mm = res.get("mm_token_type_ids")
    virtual, owner = [], []  # token indices (into the padded row) of each virtual sample
    for r, (off, seg, branch, logical) in enumerate(placed):
        seg, branch, logical = np.array(seg), np.array(branch), np.array(logical)
        for s in np.unique(seg):
            in_seg = seg == s
            counts = {b: int((branch[in_seg] == b).sum()) for b in np.unique(branch[in_seg]) if b}
            longest = max(counts, key=lambda b: (counts[b], -b))
            take = np.flatnonzero(in_seg & ((branch == 0) | (branch == longest)))
            take = take[np.argsort(logical[take], kind="stable")]
            virtual.append(off + take)
            owner.append((r, off, s))
    vlen = max(len(v) for v in virtual)
    pad_id = template.tokenizer.pad_token_id
    v_ids = torch.full((len(virtual), vlen), pad_id, dtype=ids.dtype)
    v_mask = torch.zeros(len(virtual), vlen, dtype=torch.long)
    v_mm = torch.zeros(len(virtual), vlen, dtype=mm.dtype) if mm is not None else None
    for v, take in enumerate(virtual):
        r = owner[v][0]
        v_ids[v, :len(take)] = ids[r, take]
        v_mask[v, :len(take)] = 1
        if mm is not None:
            v_mm[v, :len(take)] = mm[r, take]
    inputs = {"input_ids": v_ids, "attention_mask": v_mask, "image_grid_thw": res.get("image_grid_thw")}
    if v_mm is not None:
        inputs["mm_token_type_ids"] = v_mm
    vpos = template._get_position_ids(inputs)["position_ids"][1:]  # (3, virtual, vlen): without the text row
    pos = torch.zeros(3, rows, width, dtype=vpos.dtype)
    v = 0
    for r, (off, seg, branch, logical) in enumerate(placed):
        seg, logical = np.array(seg), np.array(logical)
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            pos[:, r, off + where] = vpos[:, v, logical[where]]
            v += 1
    return pos


def shares(datasets: list[Path]) -> bool:
    """Whether any image of these training sets has more than one query (else nothing is shared)."""
    seen = set()
    for dataset in datasets:
        with open(dataset, encoding="utf-8") as fh:
            for line in fh:
                key = _image_key(json.loads(line)["images"][0])
                if key in seen:
                    return True
                seen.add(key)
    return False


def pack_rows(datasets: list[Path], out: Path, *, answers: int, seed: int) -> dict:
    """Write the training rows of `datasets` (ms-swift jsonl, one query per row) as packed rows of
    `answers` queries each (the last one shorter): the queries of each image consecutive, images
    in a seeded random order, an image split over two rows where a row fills up (its prefix is
    then encoded in both). So every optimiser step trains on as many element answers as the
    unpacked recipe (`answers` = its per-device batch, one packed row per device and step)."""
    by_image: dict[str, list[dict]] = {}
    n = 0
    for dataset in datasets:
        with open(dataset, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if len(row["images"]) != 1 or len(row["messages"]) != 2:
                    raise ValueError(f"{dataset}: line {n + 1}: prefix sharing packs one-image, one-answer rows")
                by_image.setdefault(_image_key(row["images"][0]), []).append(row)
                n += 1
    order = np.random.default_rng(seed).permutation(len(by_image))
    keys = list(by_image)
    packed, current = [], []
    for i in order:
        for row in by_image[keys[i]]:
            current.append(row)
            if len(current) == answers:
                packed.append(current)
                current = []
    if current:
        packed.append(current)
    with open(out, "w", encoding="utf-8") as fh:
        for rows in packed:
            messages = [m for r in rows for m in r["messages"]]
            fh.write(json.dumps({"messages": messages, "images": [r["images"][0] for r in rows]}, ensure_ascii=False) + "\n")
    images_per_row = [len({_image_key(r["images"][0]) for r in rows}) for rows in packed]
    return {"queries": n, "rows": len(packed), "answers_per_row": answers, "images": len(by_image),
            "prefixes_encoded": int(sum(images_per_row))}


def install() -> None:
    """Route ms-swift's `Template.encode` and `Template.data_collator` through the packing above
    (packed rows and batches only; everything else as before). Idempotent."""
    import multiprocessing
    import sys

    from swift.template import Template

    if getattr(Template, "_imatch_prefix", False):
        return
    import torch
    from torch.nn.attention import SDPBackend

    if SDPBackend.CUDNN_ATTENTION not in sdpa_backends():  # this process trains packed rows (see sdpa_backends)
        torch.backends.cuda.enable_cudnn_sdp(False)
    if sys.platform.startswith("linux"):
        # dataloader workers must inherit these methods: a spawned or forkserver worker imports
        # ms-swift afresh and would encode a packed row as a multi-turn chat, silently
        multiprocessing.set_start_method("fork", force=True)
    encode, data_collator = Template.encode, Template.data_collator

    def packed_encode(self, inputs, return_template_inputs=False, return_length=False):
        out = encode_row(self, inputs, lambda t, q: encode(t, q)) if isinstance(inputs, dict) else None
        if out is None:
            return encode(self, inputs, return_template_inputs=return_template_inputs, return_length=return_length)
        if return_length:
            out["lengths"] = [out["length"]]
        else:
            out.pop("length", None)
        return out

    def packed_collator(self, batch, *, padding_to=None):
        if batch and isinstance(batch[0], dict) and TREE in batch[0]:
            return collate(self, batch, padding_to=padding_to, original=data_collator)
        return data_collator(self, batch, padding_to=padding_to)

    Template.encode, Template.data_collator = packed_encode, packed_collator
    Template._imatch_prefix = True


if __name__ != "imatch.prefix":  # imported by `swift sft --external_plugins <this file>`
    install()
