"""Training queries against --max_length, measured with each backbone's ms-swift template before
`swift sft` starts (a 5,000-character prompt stopped training mid-run with MaxLengthError)."""

from __future__ import annotations

import json

import pytest

from imatch import archs
from imatch.backbone import tiny_backbone
from imatch.instructions import build_overall, write_set
from imatch.lengths import check_lengths

import pandas as pd


@pytest.fixture(scope="module")
def train_set(ingested, tmp_path_factory):
    samples, elements = ingested
    folder = tmp_path_factory.mktemp("set")
    table = build_overall(pd.read_parquet(samples), pd.read_parquet(elements), "train").head(12)
    write_set(table, folder / "train.parquet", folder / "train.jsonl", {})
    return folder / "train.jsonl"


@pytest.mark.parametrize("arch", ["internvl", "qwen2_5_vl", "ovis2"])
def test_the_longest_query_is_measured_as_ms_swift_encodes_it(arch, train_set, tmp_path):
    """The estimate (text tokens + one encode per image size) is exact: the longest query equals
    ms-swift's own encode of every row, and a limit one token below it refuses that row."""
    model = tmp_path / "bb"
    tiny_backbone(arch, model, size="tiny", seed=0)
    spec = archs.get(arch)
    longest = check_lengths([train_set], spec, model, max_length=4096, max_pixels=16384, max_tiles=None)

    from swift import get_model_processor

    from imatch.score import make_template

    _, processor = get_model_processor(str(model), model_type=spec.swift_model_type, load_model=False,
                                       download_model=False, use_hf=True)
    template = make_template(processor, spec, max_pixels=16384)
    template.set_mode("train")
    rows = [json.loads(line) for line in train_set.read_text().splitlines()]
    exact = [len(template.encode(dict(r))["input_ids"]) for r in rows]
    assert longest == max(exact) > 50
    assert check_lengths([train_set], spec, model, max_length=longest, max_pixels=16384, max_tiles=None) == longest
    line = exact.index(longest) + 1
    with pytest.raises(Exception, match=f"line {line} \\(image {rows[line - 1]['images'][0]}\\)"):
        check_lengths([train_set], spec, model, max_length=longest - 1, max_pixels=16384, max_tiles=None)


def test_a_too_long_prompt_is_refused_before_training(train_set, tmp_path, imatch):
    model = tmp_path / "bb"
    tiny_backbone("internvl", model, size="tiny", seed=0)
    rows = [json.loads(line) for line in train_set.read_text().splitlines()]
    user = rows[4]["messages"][0]
    user["content"] = user["content"].replace("<image>", "<image>" + "a purple elephant " * 280, 1)  # ~5,000 characters
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = imatch("train", "--arch", "internvl", "--model", model, "--dataset", jsonl, "--out",
                            tmp_path / "model", "--scratch", tmp_path / "scratch", "--max-length", "2048",
                            "--tuner", "full", "--dtype", "float32", "--max-pixels", "16384")
    assert code == 2 and f"{jsonl}: line 5 (image {rows[4]['images'][0]})" in err, err
    assert "longer than max_length 2048" in err
    assert not (tmp_path / "scratch").exists() and not (tmp_path / "model").exists()  # swift never started
