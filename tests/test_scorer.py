"""`imatch score` / `imatch.Scorer` inputs: every row checked before a model loads, named errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from imatch.errors import InputError
from imatch.predict import read_prompts
from imatch.scorer import check_inputs


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 24), colour).save(images / name)
    (images / "fake.png").write_text("not an image")
    return images


def _cli(imatch, folder, rows, tmp_path, suffix=".csv"):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    # --models names nothing: an input error must come first, before any model is looked at
    return imatch("score", "--images", folder, "--prompts", path, "--models", tmp_path / "no-models",
                  "--out", tmp_path / "out")


@pytest.mark.parametrize("rows, message", [
    ([{"image": "a.png", "prompt": ""}], "row 0: empty prompt"),
    ([{"image": "a.png", "prompt": "a car"}, {"image": "fake.png", "prompt": "a cat"}], "row 1: not a readable image"),
    ([{"image": "c.png", "prompt": "a car"}], "row 0: image not found"),
    ([{"image": "a.png", "prompt": "a car", "elements": "car"}], "row 0: element 'car' has no ' (<category>)' suffix"),
    ([{"image": "a.png", "prompt": "a <image> car"}], "row 0: prompt holds '<image>'"),
    ([{"image": "a.png", "prompt": "a car", "prompt_type": "fake"}], "row 0: prompt type must be one of"),
    ([{"image": "a.png", "prompt": "a car", "prompt_meaningless": 3}], "row 0: prompt_meaningless must be a number in [0, 1]"),
])
def test_a_bad_row_is_named_before_any_model_loads(rows, message, folder, tmp_path, imatch):
    code, _, err = _cli(imatch, folder, rows, tmp_path)
    assert code == 2 and message in err and "prompts.csv" in err, err
    assert "no-models" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [("", "not readable as CSV"), ("image,prompt\n", "no rows to score"),
                                             ("file,text\na.png,x\n", "missing column 'image'")])
def test_an_empty_or_headless_table_is_named(content, message, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as refused:
        read_prompts(path)
    assert str(path) in str(refused.value)


def test_blank_elements_repeated_images_and_every_format_are_read(folder, tmp_path):
    rows = [{"image": "a.png", "prompt": "a red square", "elements": "red square (object)", "seed": 1},
            {"image": "a.png", "prompt": "a blue square", "elements": None, "seed": 2},  # same image, other prompt
            {"image": "b.png", "prompt": "a blue square", "elements": "", "seed": 3}]
    for suffix in (".csv", ".json", ".jsonl"):
        path = tmp_path / f"p{suffix}"
        if suffix == ".csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        elif suffix == ".json":
            path.write_text(json.dumps(rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        table = read_prompts(path)
        assert list(table["seed"]) == [1, 2, 3], suffix
        samples, elements = check_inputs([folder / n for n in table["image"]], table["prompt"].tolist(),
                                         table["elements"].tolist(), label=str(path))
        assert list(samples["img_path"]) == ["row-0000000", "row-0000001", "row-0000002"]
        assert elements[["img_path", "element"]].values.tolist() == [["row-0000000", "red square (object)"]]


def test_a_bundle_without_settings_is_refused(tmp_path):
    from imatch import bundle
    from imatch.integrity import seal

    folder = tmp_path / "ens"
    folder.mkdir()
    described = {"format": 1, "tau": 3.0, "overall": {"members": ["m"], "weights": [1.0]},
                 "element": {"members": [], "weights": []}, "element_levels_from": None,
                 "models": {"m": {"task": "overall", "arch": "internvl", "folder": "models/m", "base": None,
                                  "settings": {"metadata": []}, "alphabet": list("abcdefghijklmno"),
                                  "image_budget": {"max_pixels": None, "max_tiles": None}}}}
    (folder / "bundle.json").write_text(json.dumps(described))
    seal(folder)
    with pytest.raises(InputError, match=r"model 'm': settings lack \['prompt_type', 'element_levels'\]"):
        bundle.load(folder)
