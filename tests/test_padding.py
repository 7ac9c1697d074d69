"""Left-padded training batches (`imatch train --padding-side left`, the default): every row ends
with its answer, so ms-swift's `logits_to_keep` computes the vocabulary-sized head for the answer's
positions only. The reference is a batch that is not padded at all: the same rows one per
micro-batch, accumulated. Were the left padding attended to, or other positions' logits kept for
the answer, the losses would differ (checked: ms-swift's collator with the padding unmasked fails
it on InternVL and Qwen2.5-VL, loss 4e-5 and gradient norm 7e-3 apart). A row's positions shifted
by its padding would not show: the three LLMs' rotary embeddings see relative positions only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from imatch.backbone import tiny_backbone
from imatch.instructions import build_overall, to_swift_rows
from twosteps import assert_trained_alike, two_steps

ROWS = 6


@pytest.fixture(scope="module")
def rows_of_unequal_length(ingested):
    """Overall queries of six images whose prompts differ in length (so a batch of them is padded)."""
    samples, elements = ingested
    table = build_overall(pd.read_parquet(samples), pd.read_parquet(elements), "train")
    rows = to_swift_rows(table)
    picked, lengths = [], set()
    for row in rows:
        n = len(row["messages"][0]["content"])
        if n not in lengths:
            picked.append(row)
            lengths.add(n)
        if len(picked) == ROWS:
            break
    assert len(picked) == ROWS and max(lengths) - min(lengths) >= 20, sorted(lengths)
    return picked


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl", "ovis2"])
def test_a_left_padded_batch_trains_like_unpadded_rows(arch, rows_of_unequal_length, tmp_path, imatch):
    """One batch of six rows, left-padded, against the same six rows one per micro-batch (six
    accumulated, nothing padded): ms-swift logs the same loss and gradient norm at step 1 and the
    same loss after the step. A full fine-tune: LoRA's dropout would draw other masks."""
    tiny_backbone(arch, tmp_path / "bb", size="tiny", seed=0)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows_of_unequal_length))
    logs = {name: two_steps(imatch, arch, tmp_path / "bb", jsonl, tmp_path / name, tmp_path / f"{name}.scratch",
                            "--no-share-prefix", "--padding-side", "left", "--batch-size", batch, "--grad-accum", accum)
            for name, batch, accum in (("padded", ROWS, 1), ("unpadded", 1, ROWS))}
    assert_trained_alike(logs["padded"], logs["unpadded"])
