"""Scoring in shards: every query of every set and view scored exactly once, or a named error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imatch.ensemble import combine, element_levels
from imatch.errors import InputError
from imatch.score import COLUMNS, gather, shard_of


def instruction_set(tmp_path, name, split, n):
    table = pd.DataFrame({"id": [f"{split}/{i}.png" for i in range(n)], "task": "overall", "split": split})
    path = tmp_path / f"{name}.parquet"
    table.to_parquet(path)
    return path


def scored(sets, shards, tmp_path):
    """What `score-set --shard k` writes for each k: a fake score per query, contiguous parts of each set."""
    paths = []
    for k in range(shards):
        rows = []
        for path, view in sets:
            part = shard_of(pd.read_parquet(path), k, shards)
            rows.append(part.assign(view=view, img_path=part["id"], element=None, probs=[np.ones(15) / 15] * len(part),
                                    expected_level=8.0, argmax_level=1, score=3.0, hit=None))
        out = tmp_path / f"shard{k}.parquet"
        pd.concat(rows)[COLUMNS].to_parquet(out)
        paths.append(out)
    return paths


def test_shards_gather_back_to_every_set_and_view_in_order(tmp_path):
    val = instruction_set(tmp_path, "val", "val", 7)
    test = instruction_set(tmp_path, "test", "test", 3)
    shards = scored([(val, "seen"), (test, "seen"), (val, "blank")], 3, tmp_path)
    out = gather(shards, [val, test], [val])
    assert len(out) == 17
    assert list(out["view"]) == ["seen"] * 10 + ["blank"] * 7
    assert list(out["id"][:7]) == [f"val/{i}.png" for i in range(7)]


def test_a_missing_or_repeated_shard_is_an_error(tmp_path):
    val = instruction_set(tmp_path, "val", "val", 7)
    shards = scored([(val, "seen")], 3, tmp_path)
    with pytest.raises(InputError, match="cover 5 of 7"):
        gather(shards[:2], [val], [])
    with pytest.raises(InputError, match="overlap"):
        gather([*shards, shards[0]], [val], [])
    with pytest.raises(InputError, match="cover 7 of 14"):  # blank view asked for, never scored
        gather(shards, [val], [val])


def test_predictions_read_one_split_and_view_of_a_model_table(tmp_path):
    """One table per model holds all splits and both views: combine and element levels pick theirs."""
    def table(task, rows):
        t = pd.DataFrame(rows, columns=["img_path", "split", "view", "expected_level"])
        t["task"], t["element"] = task, None if task == "overall" else "red (color)"
        t["id"] = t["img_path"] if task == "overall" else t["img_path"] + "|red (color)"
        t["score"] = (t["expected_level"] - 1) / 14 * 4 + 1
        path = tmp_path / f"{task}.parquet"
        t.to_parquet(path)
        return path

    overall = table("overall", [("a.png", "val", "seen", 15.0), ("a.png", "val", "blank", 1.0),
                                ("b.png", "test", "seen", 8.0)])
    element = table("element", [("a.png", "val", "seen", 6.0), ("a.png", "val", "blank", 1.0),
                                ("b.png", "test", "seen", 2.0)])
    total, el = combine([overall], [element], tau=3, split="val", view="blank")
    assert total["total_score"].tolist() == [1.0] and el["score"].tolist() == [0.0]
    total, el = combine([overall], [element], tau=3, split="val")
    assert total["total_score"].tolist() == [5.0] and el["score"].tolist() == [1.0]
    assert element_levels([element])["level"].tolist() == [6, 2]  # every split of the seen view
    with pytest.raises(InputError, match="no blank scores of the test split"):
        combine([overall], [element], tau=3, split="test", view="blank")
