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


def fake_level(view, query_id):
    """A distinct expected level per (view, id): 1 + index/10 (+ 5 for the blank view)."""
    return 1 + int(query_id.split("/")[1].split(".")[0]) / 10 + (5 if view == "blank" else 0) + (
        2 if query_id.startswith("test/") else 0)


def scored(sets, shards, tmp_path):
    """What `score-set --shard k` writes for each k: a fake score per query, contiguous parts of each set."""
    paths = []
    for k in range(shards):
        rows = []
        for path, view in sets:
            part = shard_of(pd.read_parquet(path), k, shards)
            # a distinct value per (view, query), so that values moved against their ids show
            level = [fake_level(view, i) for i in part["id"]]
            rows.append(part.assign(view=view, img_path=part["id"], element=None, probs=[np.ones(15) / 15] * len(part),
                                    expected_level=level, argmax_level=[int(v) for v in level],
                                    score=[(v - 1) / 14 * 4 + 1 for v in level], hit=None))
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
    ids = [f"val/{i}.png" for i in range(7)] + [f"test/{i}.png" for i in range(3)] + [f"val/{i}.png" for i in range(7)]
    assert list(out["id"]) == ids  # the order of the sets as given, each in its own (id) order
    assert list(out.columns) == COLUMNS
    # every value stays with its query: written out by hand, not recomputed with fake_level
    assert out["expected_level"].tolist() == pytest.approx(
        [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 3.0, 3.1, 3.2, 6.0, 6.1, 6.2, 6.3, 6.4, 6.5, 6.6])
    assert out["argmax_level"].tolist() == [1] * 7 + [3] * 3 + [6] * 7
    assert out["score"].tolist() == pytest.approx([(v - 1) / 14 * 4 + 1 for v in out["expected_level"]])
    assert (out["img_path"] == out["id"]).all() and out["hit"].isna().all()
    # shards in another order gather to the same table
    pd.testing.assert_frame_equal(gather(shards[::-1], [val, test], [val]), out)


def test_shards_are_contiguous_parts_of_the_sorted_set():
    table = pd.DataFrame({"id": [f"q{i:02d}" for i in range(10)]})
    parts = [shard_of(table, k, 3)["id"].tolist() for k in range(3)]
    # bounds round(linspace(0, 10, 4)) = 0, 3, 7, 10
    assert parts == [[f"q{i:02d}" for i in range(0, 3)], [f"q{i:02d}" for i in range(3, 7)],
                     [f"q{i:02d}" for i in range(7, 10)]]
    assert shard_of(table, 0, 1)["id"].tolist() == table["id"].tolist()
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=f"shard {bad} is not in 0..2"):
            shard_of(table, bad, 3)


def test_a_query_in_two_sets_is_an_error(tmp_path):
    val = instruction_set(tmp_path, "val", "val", 4)
    again = instruction_set(tmp_path, "again", "val", 2)
    shards = scored([(val, "seen")], 2, tmp_path)
    with pytest.raises(InputError) as err:
        gather(shards, [val, again], [])
    assert str(err.value) == f"{again}: id='val/0.png': query scored by two sets"
    with pytest.raises(ValueError, match="^no instruction set given: pass --instructions and/or --blank-instructions$"):
        gather(shards, [], [])


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


def test_gather_refusals_name_the_file_and_the_first_query(tmp_path):
    val = instruction_set(tmp_path, "val", "val", 7)
    for name in ("s", "extra", "both"):
        (tmp_path / name).mkdir()
    shards = scored([(val, "seen")], 3, tmp_path / "s")  # bounds 0, 2, 5, 7
    with pytest.raises(InputError) as err:
        gather(shards[:2], [val], [])
    assert str(err.value) == f"{tmp_path / 's'}: e.g. missing [('seen', 'val/5.png')]: shards cover 5 of 7 queries"
    (tmp_path / "elsewhere").mkdir()
    moved = tmp_path / "elsewhere" / "shard1.parquet"
    moved.write_bytes(shards[1].read_bytes())
    with pytest.raises(InputError) as err:  # named by the folder of the first shard given
        gather([shards[0], moved], [val], [])
    assert str(err.value).startswith(f"{tmp_path / 's'}: ")
    with pytest.raises(InputError) as err:  # every query there, and more: a shard of a set not asked for
        gather(scored([(val, "seen"), (val, "blank")], 3, tmp_path / "extra"), [val], [])
    assert str(err.value) == f"{tmp_path / 'extra'}: e.g. missing []: shards cover 14 of 7 queries"
    with pytest.raises(InputError) as err:
        gather([shards[1], *shards], [val], [])
    assert str(err.value) == f"{shards[1]}: view=seen id='val/2.png': shards overlap"
    four = instruction_set(tmp_path, "four", "val", 4)
    both = scored([(four, "seen"), (four, "blank")], 4, tmp_path / "both")  # shard 0: val/0 seen, val/0 blank
    with pytest.raises(InputError) as err:
        gather([both[0], *both], [four], [four])
    assert str(err.value) == f"{both[0]}: view=seen id='val/0.png': shards overlap"

    def one_id(name, query_id):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame({"id": [query_id], "task": "overall", "split": "val"}).to_parquet(path)
        return path

    a1, a2 = one_id("a1", "val/2.png"), one_id("a2", "val/1.png")
    with pytest.raises(InputError) as err:
        gather(shards, [val, a1, a2], [])
    assert str(err.value) == f"{a1}: id='val/2.png': query scored by two sets"
