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
