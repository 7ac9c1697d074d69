"""Instruction sets: each switch changes exactly what it should; determinism; strict export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from imatch import levels
from imatch.augment import DEFAULT_RANGES, choose
from imatch.ingest import ingest
from imatch.variants import Registry


@pytest.fixture(scope="module")
def data(ingested):
    return ingested


@pytest.fixture(scope="module")
def augmented(data, tmp_path_factory):
    from imatch.cli import main

    out = tmp_path_factory.mktemp("aug")
    assert main(["augment", "--samples", str(data[0]), "--out", str(out / "aug.parquet"),
                 "--images", str(out / "images"), "--fraction", "0.5", "--seed", "3"]) == 0
    return out / "aug.parquet"


def build(imatch, data, tmp_path, name, *flags, split="train"):
    out = tmp_path / f"{name}.parquet"
    code, _, err = imatch("instructions", "--samples", data[0], "--elements", data[1], "--split", split,
                          "--out", out, "--jsonl", tmp_path / f"{name}.jsonl", *flags)
    assert code == 0, err
    return pd.read_parquet(out), [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]


def test_overall_targets_follow_eq3(imatch, data, tmp_path):
    table, rows = build(imatch, data, tmp_path, "o", "--task", "overall")
    samples = pd.read_parquet(data[0]).set_index("img_path")
    for r in table.itertuples():
        assert r.target == levels.overall_letter(levels.overall_level(samples.loc[r.img_path, "total_score"]))
    assert len(table) == (samples["split"] == "train").sum()
    assert [row["messages"][1]["content"] for row in rows] == list(table["target"])
    assert all(row["messages"][0]["content"].count("<image>") == 1 == len(row["images"]) for row in rows)


def test_metadata_switches_change_only_their_line(imatch, data, tmp_path):
    none, _ = build(imatch, data, tmp_path, "none", "--task", "overall")
    one, _ = build(imatch, data, tmp_path, "one", "--task", "overall", "--metadata", "split_confidence")
    assert list(none["target"]) == list(one["target"])
    samples = pd.read_parquet(data[0]).set_index("img_path")
    shown = 0
    for a, b, img in zip(none["query"], one["query"], one["img_path"]):
        # the one extra line, right after the prompt, states this image's value to two decimals
        value = samples.loc[img, "split_confidence"]
        line = "Element split uncertain: " + ("unknown" if pd.isna(value) else f"{value:.2f}")
        lines = a.splitlines()
        assert b.splitlines() == [lines[0], line, *lines[1:]]
        assert "Prompt meaningless" not in b
        shown += not pd.isna(value)
    assert shown and len(set(one["query"].str.extract(r"uncertain: (\S+)")[0])) > 1  # real, varying values


def test_element_levels_in_the_overall_query_are_eq4_of_ground_truth(imatch, data, tmp_path):
    table, _ = build(imatch, data, tmp_path, "el", "--task", "overall", "--element-levels", "ground-truth")
    elements = pd.read_parquet(data[1])
    for r in table.itertuples():
        mine = elements[elements["img_path"] == r.img_path]
        # every element of the image, in the order given, with the Eq. 4 level of its ground truth
        expected = [f"- {key}: {int(levels.element_level(score))}" for key, score in zip(mine["element"], mine["score"])]
        assert levels_block(r.query) == expected
    assert len(table) == (pd.read_parquet(data[0])["split"] == "train").sum()


def levels_block(query):
    """The '- key: level' lines of a query's element-levels block."""
    lines = query.splitlines()
    start = lines.index("Element levels (1 = absent, 7 = clearly present):") + 1
    return lines[start:-1]


def test_predicted_element_levels_are_taken_from_the_table_and_checked(imatch, data, tmp_path):
    elements = pd.read_parquet(data[1])
    samples = pd.read_parquet(data[0])
    val = elements[elements["img_path"].isin(samples.loc[samples["split"] == "val", "img_path"])]
    pred = val[["img_path", "element"]].assign(level=[(i % 7) + 1 for i in range(len(val))])
    pred.to_parquet(tmp_path / "levels.parquet")
    table, rows = build(imatch, data, tmp_path, "v", "--task", "overall", "--element-levels", tmp_path / "levels.parquet",
                        split="val")
    for r in table.itertuples():
        mine = pred[pred["img_path"] == r.img_path]
        assert levels_block(r.query) == [f"- {k}: {v}" for k, v in zip(mine["element"], mine["level"])]
    assert len(table) == (samples["split"] == "val").sum()
    assert all(len(row["messages"]) == 2 for row in rows)  # val is labelled: targets present
    pred.iloc[1:].to_parquet(tmp_path / "short.parquet")
    code, _, err = imatch("instructions", "--samples", data[0], "--elements", data[1], "--split", "val", "--task", "overall",
                          "--element-levels", tmp_path / "short.parquet", "--out", tmp_path / "x.parquet", "--jsonl", tmp_path / "x.jsonl")
    assert code == 2 and "short.parquet" in err and "1 elements have no level" in err and f"img_path={pred.iloc[0]['img_path']!r}" in err
    assert not (tmp_path / "x.parquet").exists()


def test_unlabelled_split_has_queries_without_targets(imatch, data, tmp_path):
    table, rows = build(imatch, data, tmp_path, "t", "--task", "element", split="test")
    assert table["target"].isna().all() and all(len(r["messages"]) == 1 for r in rows)


def test_prompt_type_switch_adds_exactly_the_type_line(imatch, data, tmp_path):
    plain, _ = build(imatch, data, tmp_path, "p", "--task", "element")
    typed, _ = build(imatch, data, tmp_path, "t", "--task", "element", "--prompt-type")
    samples = pd.read_parquet(data[0]).set_index("img_path")
    assert list(plain["id"]) == list(typed["id"]) and list(plain["target"]) == list(typed["target"])
    for a, b, img in zip(plain["query"], typed["query"], typed["img_path"]):
        assert b.replace(f"Prompt type: {samples.loc[img, 'prompt_type']}\n", "") == a


def test_element_targets_and_perturbation(imatch, data, tmp_path):
    plain, _ = build(imatch, data, tmp_path, "p", "--task", "element")
    pert, rows = build(imatch, data, tmp_path, "q", "--task", "element", "--perturb-epsilon", "1", "--perturb-seed", "4")
    elements = pd.read_parquet(data[1]).set_index(["img_path", "element"])
    for r in plain.itertuples():
        assert int(r.target) == levels.element_level(elements.loc[(r.img_path, r.element), "score"])
    assert list(pert["level"]) == list(plain["level"])  # the label is untouched, only the target moves
    assert (pert["target_level"] - pert["level"]).abs().max() == 1
    assert ((pert["target_level"] - pert["level"]) == pert["delta"]).all()
    assert list(pert["target"].astype(int)) == list(pert["target_level"])
    assert [r["messages"][1]["content"] for r in rows] == list(pert["target"])
    assert list(pert["query"]) == list(plain["query"])


def test_same_settings_give_identical_bytes(imatch, data, tmp_path, augmented):
    flags = ("--task", "overall", "--metadata", "prompt_meaningless", "--element-levels", "ground-truth",
             "--augmented", augmented)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        build(imatch, data, tmp_path / name, "x", *flags)
    assert (tmp_path / "a" / "x.parquet").read_bytes() == (tmp_path / "b" / "x.parquet").read_bytes()
    assert (tmp_path / "a" / "x.jsonl").read_bytes() == (tmp_path / "b" / "x.jsonl").read_bytes()


def test_augmented_images_join_the_training_set(imatch, data, tmp_path, augmented):
    base, _ = build(imatch, data, tmp_path, "b", "--task", "overall")
    aug, rows = build(imatch, data, tmp_path, "a", "--task", "overall", "--augmented", augmented)
    table = pd.read_parquet(augmented)
    assert len(aug) == len(base) + len(table)
    extra = aug[aug["augmentation"].notna()].set_index("img_path")
    originals = base.set_index("img_path")
    for r in table.itertuples():
        assert extra.loc[r.img_path, "image"] == r.image
        assert extra.loc[r.img_path, "target"] == originals.loc[r.img_path, "target"]  # labels kept
        assert extra.loc[r.img_path, "query"] == originals.loc[r.img_path, "query"]


def test_augmentation_parameters_are_within_the_papers_ranges(augmented, data):
    table = pd.read_parquet(augmented)
    samples = pd.read_parquet(data[0])
    train = samples.loc[samples["split"] == "train", "img_path"]
    assert len(table) == round(0.5 * len(train)) and table["img_path"].isin(train).all()
    assert set(table["augmentation"]) == {"lighting", "grid", "crop"}
    for name, (lo, hi) in DEFAULT_RANGES.items():
        values = table.loc[table["augmentation"] == name, "parameter"]
        assert values.between(lo, hi).all(), name
    assert set(table.loc[table["augmentation"] == "lighting", "sign"]) <= {-1, 1}
    from PIL import Image
    checked = set()
    for r in table.itertuples():
        original = samples.set_index("img_path").loc[r.img_path, "image"]
        with Image.open(r.image) as a, Image.open(original) as o:
            before = np.asarray(o.convert("RGB")).astype(int)
            after = np.asarray(a.convert("RGB")).astype(int)
            assert a.size == o.size
            if len(np.unique(before.reshape(-1, 3), axis=0)) == 1:  # a blank canvas stays blank
                continue
            assert after.tobytes() != before.tobytes()
            # no transform of the paper is a mirror image
            assert not np.array_equal(after, before[:, ::-1]) and not np.array_equal(after, before[::-1])
            if r.augmentation == "lighting":
                # Eq. 11: every pixel shifted by sign * alpha of the full range (255), where not clipped
                shifted = before + r.sign * r.parameter * 255
                inside = (shifted > 1) & (shifted < 254)
                assert inside.sum() >= 100
                assert np.abs(after[inside] - shifted[inside]).max() <= 1.0
            elif r.augmentation == "crop":
                # Eq. 13: a crop of (1 - gamma) of the area, scaled back up: the picture is magnified,
                # so fewer distinct colours survive at the border than a flip or distortion keeps
                assert not np.array_equal(after, before)
            checked.add(r.augmentation)
    assert "lighting" in checked


def test_augmentation_subset_is_seeded():
    paths = [f"m/{i}.png" for i in range(200)]
    assert choose(paths, 0.1, 1) == choose(list(reversed(paths)), 0.1, 1)
    assert len(choose(paths, 0.1, 1)) == 20 and choose(paths, 0.1, 1) != choose(paths, 0.1, 2)


def test_augmentation_is_deterministic(data, tmp_path, augmented):
    from imatch.cli import main

    main(["augment", "--samples", str(data[0]), "--out", str(tmp_path / "a.parquet"), "--images", str(tmp_path / "img"),
          "--fraction", "0.5", "--seed", "3"])
    first = pd.read_parquet(augmented)
    second = pd.read_parquet(tmp_path / "a.parquet")
    pd.testing.assert_frame_equal(first.drop(columns="image"), second.drop(columns="image"))
    for a, b in zip(first["image"], second["image"]):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_element_key_without_category_is_a_clear_error(source, tmp_path, imatch):
    records = json.loads((source / "train_list.json").read_text())
    records[0]["element_score"]["no category here"] = [1, 0]
    (source / "train_list.json").write_text(json.dumps(records))
    code, _, err = imatch("ingest", "--source", source, "--out", tmp_path / "out")
    assert code == 2 and "'no category here' has no ' (<category>)' suffix" in err and "record 0" in err


def test_bad_level_table_is_refused(imatch, data, tmp_path):
    elements = pd.read_parquet(data[1])
    samples = pd.read_parquet(data[0])
    val = elements[elements["img_path"].isin(samples.loc[samples["split"] == "val", "img_path"])]
    val[["img_path", "element"]].assign(level=9).to_parquet(tmp_path / "bad.parquet")
    code, _, err = imatch("instructions", "--samples", data[0], "--elements", data[1], "--split", "val", "--task", "overall",
                          "--element-levels", tmp_path / "bad.parquet", "--out", tmp_path / "x.parquet", "--jsonl", tmp_path / "x.jsonl")
    assert code == 2 and "level 9 outside 1..7" in err


CFG = {
    "overall": {"metadata": {"prompt_meaningless": True, "split_confidence": True, "attribute_confidence": True},
                "element_levels": True, "image_augmentation": True},
    "element": {"metadata": {"prompt_meaningless": True, "split_confidence": True, "attribute_confidence": True},
                "prompt_type": True, "image_augmentation": False,
                "score_perturbation": {"enabled": True, "epsilon": 1, "rate": 1.0, "seed": 0}},
    "image_augmentation": {"fraction": 0.1, "seed": 0, "lighting": [0.1, 0.5], "grid": [0.2, 0.8], "crop": [0.1, 0.5]},
}


def _names(cfg):
    reg = Registry(cfg)
    return {task: reg.add(task, cfg) for task in ("overall", "element")}


def test_variant_names_change_exactly_with_what_changes_a_set():
    import copy

    base = _names(CFG)
    assert base == _names(copy.deepcopy(CFG))  # same configuration, same artifacts
    flip_aug = copy.deepcopy(CFG)
    flip_aug["overall"]["image_augmentation"] = False
    n = _names(flip_aug)
    assert n["overall"][0] == base["overall"][0]  # eval sets untouched
    assert n["overall"][1] != base["overall"][1]  # training set differs
    assert n["element"] == base["element"]  # the other task untouched
    flip_meta = copy.deepcopy(CFG)
    flip_meta["element"]["metadata"]["split_confidence"] = False
    n = _names(flip_meta)
    assert n["element"][0] != base["element"][0] and n["overall"] == base["overall"]
    eps = copy.deepcopy(CFG)
    eps["element"]["score_perturbation"]["epsilon"] = 2
    n = _names(eps)
    assert n["element"][0] == base["element"][0] and n["element"][1] != base["element"][1]
    aug_seed = copy.deepcopy(CFG)
    aug_seed["image_augmentation"]["seed"] = 9  # element does not use augmentation: unchanged
    n = _names(aug_seed)
    assert n["element"] == base["element"] and n["overall"][1] != base["overall"][1]


# ------------------------------------------------------------------------------------------------
# build_overall / build_element / to_swift_rows / write_set on hand-made tables: every cell by hand
# ------------------------------------------------------------------------------------------------
from imatch.errors import InputError  # noqa: E402
from imatch.instructions import COLUMNS, build_element, build_overall, to_swift_rows, write_set  # noqa: E402

OQ = "How well does the image match the prompt? Answer with one letter from a (not at all) to o (perfectly)."
EQ = "How well is this element shown in the image? Answer with one digit from 1 (absent) to 7 (clearly present)."


def _hand_tables(tmp_path):
    samples = pd.DataFrame({
        "img_path": ["m/b.png", "m/a.png", "m/c.png", "m/v.png"], "prompt": ["pb", "pa", "pc", "pv"],
        "prompt_type": ["real", "synthetic", "real", "real"], "split": ["train", "train", "test", "val"],
        "total_score": [4.5, 2.0, np.nan, 3.0], "split_confidence": [0.5, np.nan, 0.0, 1.0],
        "image": [str(tmp_path / n) for n in ("b.png", "a.png", "c.png", "v.png")]})
    elements = pd.DataFrame({
        "img_path": ["m/a.png", "m/a.png", "m/b.png", "m/c.png", "m/v.png"],
        "element": ["y (color)", "x (object)", "z (animal)", "w (object)", "u (object)"],
        "score": [1.0, 0.25, 0.0, np.nan, 0.5]})
    augmented = pd.DataFrame({"img_path": ["m/a.png"], "aug_id": ["m/a.png#crop"], "image": [str(tmp_path / "aug.png")],
                              "augmentation": ["crop"], "parameter": [0.3], "sign": [1]})
    return samples, elements, augmented


def test_overall_rows_by_hand(tmp_path):
    samples, elements, augmented = _hand_tables(tmp_path)
    t = build_overall(samples, elements, "train", metadata=("split_confidence",), element_levels="ground-truth",
                      augmented=augmented)
    assert t.columns.tolist() == COLUMNS
    assert t["id"].tolist() == ["m/a.png", "m/a.png#crop", "m/b.png"] and t.index.tolist() == [0, 1, 2]
    assert t["img_path"].tolist() == ["m/a.png", "m/a.png", "m/b.png"]
    assert t["image"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "aug.png"), str(tmp_path / "b.png")]
    assert t["augmentation"].tolist() == [None, "crop", None] and t["aug_parameter"].tolist()[1] == 0.3
    assert t["aug_parameter"].isna().tolist() == [True, False, True] and t["aug_parameter"].dtype == np.float64
    assert build_overall(samples, elements, "train")["aug_parameter"].dtype == np.float64
    assert (t["task"] == "overall").all() and (t["split"] == "train").all() and t["element"].isna().all()
    # Eq. 3: 2.0 -> 4.5 -> 5 ('e'), 4.5 -> 13.25 -> 13 ('m'); the copy keeps its original's label
    assert t["label"].tolist() == [2.0, 2.0, 4.5]
    assert t["level"].tolist() == [5, 5, 13] and t["target_level"].tolist() == [5, 5, 13]
    assert str(t["level"].dtype) == "Int64" and str(t["delta"].dtype) == "Int64" and t["delta"].tolist() == [0, 0, 0]
    assert t["target"].tolist() == ["e", "e", "m"]
    a_query = ("<image>Prompt: pa\nElement split uncertain: unknown\nElement levels (1 = absent, 7 = clearly present):\n"
               "- y (color): 7\n- x (object): 3\n" + OQ)
    assert t["query"].tolist() == [a_query, a_query, "<image>Prompt: pb\nElement split uncertain: 0.50\nElement levels "
                                   "(1 = absent, 7 = clearly present):\n- z (animal): 1\n" + OQ]
    # an image without elements states an empty levels block
    lonely = build_overall(samples, elements[elements["img_path"] != "m/b.png"], "train", element_levels="ground-truth")
    assert lonely["query"].iloc[1] == "<image>Prompt: pb\nElement levels (1 = absent, 7 = clearly present):\n" + OQ
    # an unlabelled split: no level, no delta, no target; no levels block without the switch
    t = build_overall(samples, elements, "test")
    assert t["query"].tolist() == ["<image>Prompt: pc\n" + OQ]
    assert t["level"].isna().all() and t["target_level"].isna().all() and t["delta"].isna().all()
    assert t["target"].tolist() == [None] and np.isnan(t["label"].iloc[0])


def test_element_rows_by_hand(tmp_path):
    samples, elements, augmented = _hand_tables(tmp_path)
    t = build_element(samples, elements, "train", prompt_type=True, augmented=augmented)
    assert t.columns.tolist() == COLUMNS and t.index.tolist() == list(range(5))
    ids = ["m/a.png#crop|x (object)", "m/a.png#crop|y (color)", "m/a.png|x (object)", "m/a.png|y (color)",
           "m/b.png|z (animal)"]  # sorted by id ('#' sorts before '|')
    assert t["id"].tolist() == ids
    row = t.set_index("id")
    assert row.loc["m/a.png#crop|x (object)", "image"] == str(tmp_path / "aug.png")
    assert row.loc["m/a.png|x (object)", "image"] == str(tmp_path / "a.png")
    assert row.loc["m/a.png#crop|x (object)", "augmentation"] == "crop"
    assert row["element"].to_dict() == {i: i.split("|")[1] for i in ids}
    # Eq. 4: 1.0 -> 7, 0.25 -> 1.5 -> 2 + 1 = 3, 0.0 -> 1
    assert row["level"].to_dict() == {"m/a.png#crop|x (object)": 3, "m/a.png#crop|y (color)": 7,
                                      "m/a.png|x (object)": 3, "m/a.png|y (color)": 7, "m/b.png|z (animal)": 1}
    assert row["target"].tolist() == ["3", "7", "3", "7", "1"] and row["delta"].tolist() == [0] * 5
    assert row["label"].tolist() == [0.25, 1.0, 0.25, 1.0, 0.0] and str(t["level"].dtype) == "Int64"
    assert row.loc["m/b.png|z (animal)", "query"] == "<image>Prompt: pb\nPrompt type: real\nElement: z (animal)\n" + EQ
    meta = build_element(samples, elements, "train", metadata=("split_confidence",))
    assert meta["query"].iloc[2] == "<image>Prompt: pb\nElement split uncertain: 0.50\nElement: z (animal)\n" + EQ
    assert (t["task"] == "element").all()
    # Eq. 17 on the targets only, drawn in id order; the labels and levels stay
    p = build_element(samples, elements, "train", augmented=augmented, perturb={"epsilon": 1, "rate": 1.0, "seed": 0})
    assert p["level"].tolist() == t["level"].tolist() and p["label"].tolist() == t["label"].tolist()
    # seed 0 draws +1 for each of the five (numpy PCG64); 7 + 1 is clipped to 7, a delta of 0
    assert p["target_level"].tolist() == [4, 7, 4, 7, 2] and p["delta"].tolist() == [1, 0, 1, 0, 1]
    assert p["target"].tolist() == ["4", "7", "4", "7", "2"] and str(p["target_level"].dtype) == "Int64"
    assert p["query"].iloc[4] == "<image>Prompt: pb\nElement: z (animal)\n" + EQ  # no prompt type by default
    # unlabelled: nothing to perturb or target
    u = build_element(samples, elements, "test", perturb={"epsilon": 1, "rate": 1.0, "seed": 0})
    assert u["id"].tolist() == ["m/c.png|w (object)"] and u["target"].tolist() == [None]
    assert u["level"].isna().all() and u["target_level"].isna().all() and u["delta"].isna().all()


def test_element_levels_from_a_table_are_rounded_and_checked(tmp_path):
    samples, elements, _ = _hand_tables(tmp_path)
    levels_table = pd.DataFrame({"img_path": ["m/b.png", "m/a.png", "m/a.png"],
                                 "element": ["z (animal)", "x (object)", "y (color)"], "level": [6.6, 3.4, 1.0]})
    levels_table.to_parquet(tmp_path / "lv.parquet")
    t = build_overall(samples, elements, "train", element_levels=tmp_path / "lv.parquet")
    # the elements' own order (y before x), levels rounded to whole numbers
    assert [q.splitlines()[2:-1] for q in t["query"]] == [["- y (color): 1", "- x (object): 3"], ["- z (animal): 7"]]

    def refused(table, split="train", source=None):
        table.to_parquet(tmp_path / "bad.parquet")
        with pytest.raises(InputError) as err:
            build_overall(samples, elements, split, element_levels=source or tmp_path / "bad.parquet")
        return str(err.value)

    bad = tmp_path / "bad.parquet"
    assert refused(pd.concat([levels_table, levels_table.iloc[[1]].assign(level=5.0)])) == (
        f"{bad}: img_path='m/a.png' element='x (object)': duplicate element level")
    assert refused(levels_table.iloc[[0, 2]]) == f"{bad}: img_path='m/a.png' element='x (object)': 1 elements have no level"
    assert refused(levels_table.assign(level=[6.6, 3.4, 7.2])) == (
        f"{bad}: img_path='m/a.png' element='y (color)': level 7.2 outside 1..7")
    assert refused(levels_table.assign(level=[0.5, 3.4, 1.0])) == (
        f"{bad}: img_path='m/b.png' element='z (animal)': level 0.5 outside 1..7")
    # the edges 1 and 7 are levels
    levels_table.assign(level=[7.0, 1.0, 1.0]).to_parquet(tmp_path / "edge.parquet")
    assert len(build_overall(samples, elements, "train", element_levels=tmp_path / "edge.parquet")) == 2
    # ground truth needs labels
    assert refused(levels_table, split="test", source="ground-truth") == (
        "elements.parquet: img_path='m/c.png' element='w (object)': ground-truth element levels need labels")


def test_augmented_images_must_belong_to_the_split(tmp_path):
    samples, elements, augmented = _hand_tables(tmp_path)
    with pytest.raises(InputError) as err:
        build_overall(samples, elements, "val", augmented=augmented)
    assert str(err.value) == "augmented table: img_path='m/a.png': 1 augmented images are not in this split"


def test_swift_rows_and_the_written_set(tmp_path):
    samples, elements, _ = _hand_tables(tmp_path)
    for name in ("a.png", "b.png", "c.png", "aug.png"):
        (tmp_path / name).write_bytes(b"png")
    t = build_overall(samples, elements, "train")
    rows = to_swift_rows(t)
    assert rows == [
        {"messages": [{"role": "user", "content": "<image>Prompt: pa\n" + OQ}, {"role": "assistant", "content": "e"}],
         "images": [str(tmp_path / "a.png")]},
        {"messages": [{"role": "user", "content": "<image>Prompt: pb\n" + OQ}, {"role": "assistant", "content": "m"}],
         "images": [str(tmp_path / "b.png")]}]
    assert to_swift_rows(build_element(samples, elements, "test")) == [
        {"messages": [{"role": "user", "content": "<image>Prompt: pc\nElement: w (object)\n" + EQ}],
         "images": [str(tmp_path / "c.png")]}]
    with pytest.raises(AssertionError, match=r"^m/a.png: query must hold exactly one <image> tag$"):
        to_swift_rows(t.assign(query=t["query"] + "<image>"))
    with pytest.raises(AssertionError, match=r"^m/a.png: query must hold exactly one <image> tag$"):
        to_swift_rows(t.assign(query=t["query"].str.replace("<image>", "")))
    with pytest.raises(AssertionError, match=r"^m/a.png: target 'z' outside the overall answer set$"):
        to_swift_rows(t.assign(target="z"))
    with pytest.raises(AssertionError, match=r"^m/a.png: target '8' outside the overall answer set$"):
        to_swift_rows(t.assign(target="8"))
    (tmp_path / "b.png").unlink()
    with pytest.raises(InputError) as err:
        to_swift_rows(t)
    assert str(err.value) == f"{tmp_path / 'b.png'}: id='m/b.png': image of an instruction row is missing"
    with pytest.raises(InputError, match="image of an instruction row is missing"):
        to_swift_rows(t.iloc[:1].assign(image="a.png"))  # relative: refused even where it exists
    (tmp_path / "b.png").write_bytes(b"png")

    p = build_element(samples, elements, "train", perturb={"epsilon": 1, "rate": 1.0, "seed": 0})
    write_set(p, tmp_path / "set.parquet", tmp_path / "set.jsonl", {"task": "element", "seed": 0})
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "set.parquet"), p)
    lines = (tmp_path / "set.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == to_swift_rows(p)
    sidecar = json.loads((tmp_path / "set.parquet.json").read_text())
    # seed 0 draws -1 -1 -1 for x (3 -> 2), y (7 -> 6) and z (1 -> 1, clipped: not perturbed)
    assert p["target_level"].tolist() == [2, 6, 1]
    assert sidecar == {"settings": {"task": "element", "seed": 0},
                       "counts": {"rows": 3, "with_target": 3, "augmented": 0, "perturbed": 2}}
    samples.loc[1, "prompt"] = "ünïcode"
    write_set(build_overall(samples, elements, "train", augmented=_hand_tables(tmp_path)[2]), tmp_path / "o.parquet",
              tmp_path / "o.jsonl", {})
    assert "ünïcode" in (tmp_path / "o.jsonl").read_text(encoding="utf-8")  # not \\u-escaped
    assert json.loads((tmp_path / "o.parquet.json").read_text())["counts"] == {
        "rows": 3, "with_target": 3, "augmented": 1, "perturbed": 0}
    write_set(build_element(samples, elements, "test"), tmp_path / "u.parquet", tmp_path / "u.jsonl", {})
    assert json.loads((tmp_path / "u.parquet.json").read_text())["counts"] == {  # unlabelled: none perturbed
        "rows": 1, "with_target": 0, "augmented": 0, "perturbed": 0}


def test_duplicate_instruction_ids_are_a_bug_not_a_set(tmp_path):
    from imatch.instructions import _finish

    samples, elements, _ = _hand_tables(tmp_path)
    t = build_overall(samples, elements, "train")
    with pytest.raises(AssertionError, match=r"^duplicate instruction id 'm/a.png'$"):
        _finish(pd.concat([t, t.iloc[[0]]]))


def test_the_element_levels_source_is_ground_truth_or_a_table_path():
    from pathlib import Path

    from imatch.instructions import _levels_source

    assert _levels_source("ground-truth") == "ground-truth" and isinstance(_levels_source("ground-truth"), str)
    assert _levels_source("r1/levels.parquet") == Path("r1/levels.parquet")
