"""Fine-tuning and closed-set scoring through ms-swift, on the tiny InternVL (the fastest on a CPU).

The wiring proof: a tiny random backbone fine-tuned until it memorises a small set in which the
text cannot tell the images apart (four images per prompt, different scores, plain queries)
ranks those images like their targets, and grey images at scoring time destroy that ranking.
Labels, answer tokens, image insertion and the QAlign expectation must all be right for it to pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from imatch import archs, levels
from imatch.ingest import ingest
from imatch.instructions import build_element, build_overall, to_swift_rows

PY = sys.executable
# cosine, not a constant 5e-3: at a constant rate the fit ends wherever it oscillates, which
# depends on the CPU's float kernels (SRCC 0.50-0.76 on an AMD EPYC, >= 0.9 elsewhere); decayed
# to zero it settles (0.99 on the EPYC)
FAST = ["--tuner", "full", "--warmup-ratio", "0", "--lr-scheduler", "cosine", "--dtype", "float32",
        "--max-pixels", "16384", "--no-gradient-checkpointing"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The demo's default image size: at 64 px the shapes are too small for a tiny ViT to memorise fast."""
    from imatch import demo_data

    src = tmp_path_factory.mktemp("source") / "demo"
    demo_data.generate(src, seed=0, n_train_prompts=20, n_val_prompts=2, n_test_prompts=0, image_size=128,
                       layout="folder")
    out = tmp_path_factory.mktemp("tables")
    ingest(src, out, holdout_fraction=0.2, seed=0)
    return pd.read_parquet(out / "samples.parquet"), pd.read_parquet(out / "elements.parquet")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone") / "internvl"
    subprocess.run([PY, "-m", "imatch", "tiny-backbone", "--arch", "internvl", "--out", str(out)], check=True,
                   capture_output=True)
    return out


def write_set(table: pd.DataFrame, folder, name):
    table.to_parquet(folder / f"{name}.parquet")
    with open(folder / f"{name}.jsonl", "w") as fh:
        for row in to_swift_rows(table):
            fh.write(json.dumps(row) + "\n")
    return folder / f"{name}.parquet", folder / f"{name}.jsonl"


def imatch(*args, check=True, **kwargs):
    proc = subprocess.run([PY, "-m", "imatch", *map(str, args)], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"imatch {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def memorisation_set(table: pd.DataFrame, n_prompts: int) -> pd.DataFrame:
    """Prompts whose images got at least three different target levels; the queries of one prompt
    are identical, so only the image can tell its rows apart."""
    by_prompt = table.assign(pid=table["img_path"].str.split("/").str[1])
    spread = by_prompt.groupby("pid")["target_level"].nunique()
    keep = sorted(spread[spread >= 3].index)[:n_prompts]
    chosen = by_prompt[by_prompt["pid"].isin(keep)].drop(columns="pid").reset_index(drop=True)
    assert chosen.groupby(chosen["img_path"].str.split("/").str[1])["query"].nunique().max() == 1
    return chosen


def train_and_score(backbone, train_set, tmp_path, steps, lr):
    parquet, jsonl = train_set
    run = imatch("train", "--arch", "internvl", "--model", backbone, "--dataset", jsonl, "--out", tmp_path / "model",
                 "--scratch", tmp_path / "scratch", "--learning-rate", lr, "--max-steps", steps, "--batch-size", "16",
                 "--save-steps", "1000", "--max-tiles", "1", *FAST)
    # the native backbone ships no code: the log no longer claims trust_remote_code=True (imatch.swift_log)
    log = run.stdout + run.stderr
    assert "no remote code runs" in log and "with trust_remote_code=True" not in log, log[-3000:]
    # the tile budget reached swift sft (its template reads MAX_NUM) and is recorded for `imatch score`
    budget = json.loads((tmp_path / "model" / "training.json").read_text())["image_budget"]
    assert budget == {"max_pixels": 16384, "max_tiles": 1, "env": {"MAX_NUM": "1"}}
    scores = {}
    for blank in (False, True):
        out = tmp_path / f"scores{'-blank' if blank else ''}.parquet"
        imatch("score-set", "--arch", "internvl", "--model", tmp_path / "model",
               "--blank-instructions" if blank else "--instructions", parquet, "--out", out,
               "--dtype", "float32", "--max-pixels", "16384")
        scores[blank] = pd.read_parquet(out)
    return scores


def test_overall_model_memorises_from_the_image(backbone, tables, tmp_path):
    samples, elements = tables
    table = memorisation_set(build_overall(samples, elements, "train"), n_prompts=4)
    scores = train_and_score(backbone, write_set(table, tmp_path, "overall"), tmp_path, steps=250, lr=5e-3)
    seen = spearmanr(scores[False]["expected_level"], table["target_level"])[0]
    blind = spearmanr(scores[True]["expected_level"], table["target_level"])[0]
    assert seen >= 0.9, scores[False]["expected_level"].round(1).tolist()
    assert blind < 0.5
    # the score column is Eq. 7 mapped back to 1..5
    assert np.allclose(scores[False]["score"], levels.level_to_total(scores[False]["expected_level"]))


def test_element_model_memorises_from_the_image(backbone, tables, tmp_path):
    samples, elements = tables
    table = build_element(samples, elements, "train")
    table = table.assign(pid=table["img_path"].str.split("/").str[1])
    # one colour element per prompt: the query names it, only the image says whether it is there
    table = table[table["element"].str.endswith("(color)")]
    table = table[table["element"] == table.groupby("pid")["element"].transform("min")]
    table = table[table.groupby("pid")["target_level"].transform("nunique") >= 3]
    table = table[table["pid"].isin(sorted(table["pid"].unique())[:4])].drop(columns="pid").reset_index(drop=True)
    assert len(table) == 16
    scores = train_and_score(backbone, write_set(table, tmp_path, "element"), tmp_path, steps=250, lr=5e-3)
    seen = spearmanr(scores[False]["expected_level"], table["target_level"])[0]
    blind = spearmanr(scores[True]["expected_level"], table["target_level"])[0]
    assert seen >= 0.9, list(zip(scores[False]["expected_level"].round(1), table["target_level"]))
    assert blind < 0.5
    assert (scores[False]["hit"] == (scores[False]["expected_level"] > 3)).all()


def test_batched_scores_equal_a_direct_forward_of_each_query(backbone, tables, tmp_path):
    """Left padding, the answer position, the token ids and Eq. 5-7, checked one query at a time."""
    import torch

    from imatch.score import answer_token_ids, load

    samples, elements = tables
    table = build_overall(samples, elements, "holdout", metadata=["prompt_meaningless"]).head(6)
    parquet, _ = write_set(table, tmp_path, "q")
    out = tmp_path / "scores.parquet"
    imatch("score-set", "--arch", "internvl", "--model", backbone, "--instructions", parquet, "--out", out,
           "--batch-size", "4", "--dtype", "float32", "--max-pixels", "16384")
    batched = pd.read_parquet(out)
    model, processor, template = load(backbone, archs.get("internvl"), device="cpu", dtype="float32", max_pixels=16384)
    ids = answer_token_ids(processor.tokenizer, levels.OVERALL_LETTERS)
    for row, got in zip(table.itertuples(), batched.itertuples()):
        enc = template.encode({"messages": [{"role": "user", "content": row.query}], "images": [row.image]})
        _, kwargs = template.pre_forward_hook(model, None, template.data_collator([enc]))
        with torch.inference_mode():
            logits = model(**kwargs).logits[0, -1, ids].numpy()
        assert got.expected_level == pytest.approx(float(levels.expected_level(logits)), abs=1e-4)
        assert np.allclose(got.probs, np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), atol=1e-5)
        assert got.argmax_level == int(np.argmax(logits)) + 1


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _losses(folder: Path) -> list[float]:
    return [p["loss"] for p in json.loads((folder / "training.json").read_text())["loss_curve"]]


def test_killed_training_resumes_from_its_last_checkpoint(backbone, tables, tmp_path):
    """SIGKILL of a full fine-tune after checkpoint-10 of 40, then the same command: it ends with the
    uninterrupted run's loss curve and weights. (transformers 5 saves InternVL's weights under other
    names than the Trainer resumes with: without `restore_live_keys` step 11 restarted from the
    backbone, loss ~6 instead of the uninterrupted run's.)"""
    samples, elements = tables
    parquet, jsonl = write_set(build_overall(samples, elements, "train").head(32), tmp_path, "small")
    common = ["--arch", "internvl", "--model", str(backbone), "--dataset", str(jsonl), "--learning-rate", "1e-3",
              "--max-steps", "40", "--batch-size", "4", "--save-steps", "5", *FAST]
    imatch("train", *common, "--out", tmp_path / "reference", "--scratch", tmp_path / "reference-scratch")
    args = [PY, "-m", "imatch", "train", *common, "--out", str(tmp_path / "model"), "--scratch", str(tmp_path / "scratch")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (tmp_path / "scratch" / "checkpoint-10" / "trainer_state.json").is_file():
        time.sleep(0.5)
        assert proc.poll() is None, "training ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: imatch and the swift process it started
    proc.wait()
    assert not (tmp_path / "model").exists()  # nothing that looks complete
    done = imatch(*args[3:])
    assert "resuming from" in done.stdout
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["global_step"] == 40
    resumed = int(record["resumed_from"].split("-")[1])
    assert resumed >= 10
    # one loss per step over both runs: the steps redone after the resume replace the killed run's
    assert [p["step"] for p in record["loss_curve"]] == list(range(1, 41))
    reference = _losses(tmp_path / "reference")
    assert reference[resumed] < reference[0] - 1  # it had learned something by then, to lose
    assert np.allclose(_losses(tmp_path / "model"), reference, atol=1e-3), (_losses(tmp_path / "model"), reference)
    weights, expected = _weights(tmp_path / "model"), _weights(tmp_path / "reference")
    assert weights.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.allclose(weights[key], tensor, atol=1e-5), key
    assert not any(p.name in {"optimizer.pt", "scheduler.pt"} for p in (tmp_path / "model").iterdir())
    assert not (tmp_path / "scratch").exists()  # removed once the output was sealed


def test_a_finished_training_is_not_trained_again(backbone, tables, tmp_path):
    """A rerun that finds the scratch of a finished run (its output lost, or `snakemake -f`) makes the
    output from the last checkpoint: no step past max_steps, the same weights and loss curve."""
    samples, elements = tables
    _, jsonl = write_set(build_overall(samples, elements, "train").head(16), tmp_path, "s")
    base = ["train", "--arch", "internvl", "--model", backbone, "--dataset", jsonl, "--scratch", tmp_path / "scratch",
            "--max-steps", "4", "--batch-size", "4", "--save-steps", "2", "--learning-rate", "1e-3",
            "--keep-scratch", *FAST]
    imatch(*base, "--out", tmp_path / "m1")
    again = imatch(*base, "--out", tmp_path / "m2")
    assert "nothing left to train" in again.stdout and "swift.cli.main" not in again.stdout
    assert [c.name for c in sorted((tmp_path / "scratch").glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    for name in ("m1", "m2"):
        assert json.loads((tmp_path / name / "training.json").read_text())["global_step"] == 4
    assert _losses(tmp_path / "m2") == _losses(tmp_path / "m1")
    first, second = _weights(tmp_path / "m1"), _weights(tmp_path / "m2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_stale_scratch_folder_is_not_resumed(backbone, tables, tmp_path):
    samples, elements = tables
    _, jsonl = write_set(build_overall(samples, elements, "train").head(16), tmp_path, "s")
    base = ["train", "--arch", "internvl", "--model", backbone, "--dataset", jsonl, "--out", tmp_path / "m1",
            "--scratch", tmp_path / "scratch", "--max-steps", "4", "--batch-size", "4", "--save-steps", "2",
            "--keep-scratch", *FAST]
    imatch(*base, "--learning-rate", "1e-3")
    other = imatch(*[tmp_path / "m2" if a == tmp_path / "m1" else a for a in base], "--learning-rate", "2e-3")
    assert "belongs to another run" in other.stdout and "resuming" not in other.stdout


def test_a_diverged_model_is_refused_at_scoring(backbone, tables, tmp_path):
    """Non-finite logits (a fine-tune that diverged) were scored with exit 0 as `NaN expected`; now
    score-set stops, naming the model, the set and the first image, and writes nothing."""
    import shutil

    from safetensors.torch import load_file, save_file

    from imatch.integrity import seal

    samples, elements = tables
    parquet, _ = write_set(build_overall(samples, elements, "train").head(4), tmp_path, "few")
    broken = tmp_path / "diverged"
    shutil.copytree(backbone, broken)
    weights = load_file(broken / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head] = torch.full_like(weights[head], float("nan"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "manifest.json").unlink()
    seal(broken)
    out = tmp_path / "scores.parquet"
    proc = imatch("score-set", "--arch", "internvl", "--model", broken, "--instructions", parquet, "--out", out,
                  "--dtype", "float32", "--max-pixels", "16384", check=False)
    first = pd.read_parquet(parquet)["img_path"].iloc[0]
    assert proc.returncode == 2 and str(broken) in proc.stderr and "non-finite" in proc.stderr, proc.stderr[-2000:]
    assert "few.parquet" in proc.stderr and first in proc.stderr
    assert not out.exists()
    # `imatch score` / `imatch.Scorer` (a user's images, a bundle holding that model): the same
    # refusal, named, no traceback
    from imatch import levels
    from imatch.errors import InputError
    from imatch.scorer import Scorer

    ens = tmp_path / "ens"
    shutil.copytree(broken, ens / "models" / "m")
    (ens / "bundle.json").write_text(json.dumps({
        "format": 1, "tau": 3.0, "overall": {"members": ["m"], "weights": [1.0]},
        "element": {"members": [], "weights": []}, "element_levels_from": None,
        "models": {"m": {"task": "overall", "arch": "internvl", "folder": "models/m", "base": None,
                         "settings": {"metadata": [], "prompt_type": False, "element_levels": False},
                         "alphabet": levels.OVERALL_LETTERS, "image_budget": {"max_pixels": 16384, "max_tiles": None}}}}))
    seal(ens)
    with pytest.raises(InputError, match="non-finite") as refused:
        Scorer(ens, device="cpu")(images=[first_image := pd.read_parquet(parquet)["image"].iloc[0]], prompts=["a car"])
    assert str(ens / "models" / "m") in str(refused.value) and f"row 0 ({first_image})" in str(refused.value)


def _processes_mentioning(text: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_sigterm_stops_training_and_its_swift_process(backbone, tables, tmp_path):
    """`scancel` sends SIGTERM first: imatch train used to die alone and leave `swift sft` training
    on as an orphan. Now the whole process tree stops, exit 143, no output; checkpoints stay."""
    samples, elements = tables
    _, jsonl = write_set(build_overall(samples, elements, "train").head(32), tmp_path, "t")
    scratch = tmp_path / "scratch"
    args = [PY, "-m", "imatch", "train", "--arch", "internvl", "--model", str(backbone), "--dataset", str(jsonl),
            "--out", str(tmp_path / "model"), "--scratch", str(scratch), "--max-steps", "400", "--batch-size", "4",
            "--save-steps", "5", "--learning-rate", "1e-3", *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (scratch / "checkpoint-5" / "trainer_state.json").is_file():
            time.sleep(0.5)
            assert proc.poll() is None, "training ended before the signal"
        assert len(_processes_mentioning(str(scratch))) >= 2  # imatch and swift
        proc.send_signal(signal.SIGTERM)  # to imatch alone, as a scheduler would
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        time.sleep(1)
        assert _processes_mentioning(str(scratch)) == []  # no orphan trains on
        assert not (tmp_path / "model").exists() and (scratch / "checkpoint-5").is_dir()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_during_scoring_leaves_no_temporary_folder(backbone, tables, tmp_path):
    """The grey control images live in a temporary folder: SIGTERM used to leave it behind."""
    samples, elements = tables
    table = build_overall(samples, elements, "train")
    parquet, _ = write_set(pd.concat([table] * 4, ignore_index=True).assign(id=lambda t: t.index.astype(str)),
                           tmp_path, "many")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = [PY, "-m", "imatch", "score-set", "--arch", "internvl", "--model", str(backbone), "--blank-instructions",
            str(parquet), "--out", str(tmp_path / "s.parquet"), "--dtype", "float32", "--max-pixels", "16384",
            "--batch-size", "1", "--threads", "1"]
    proc = subprocess.Popen(args, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp.glob("imatch-blank-*/blank_*.png")):
        time.sleep(0.2)
        assert proc.poll() is None, "scoring ended before the signal"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list(tmp.glob("imatch-blank-*")) and not (tmp_path / "s.parquet").exists()


def test_remote_code_is_claimed_only_for_a_folder_that_ships_code(backbone, tmp_path):
    """ms-swift warns "Loading model from DIR with trust_remote_code=True" for every model; the
    filter keeps that warning for a folder whose config.json has an auto_map, and only there."""
    import logging
    import shutil

    from swift.model.model_meta import _get_model_info

    from imatch import swift_log  # noqa: F401  (installs the filter)

    shipped = tmp_path / "shipped"
    shutil.copytree(backbone, shipped)
    config = json.loads((shipped / "config.json").read_text())
    (shipped / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    tokenizer_code = tmp_path / "tokenizer-code"  # custom code for the tokenizer only
    shutil.copytree(backbone, tokenizer_code)
    settings = json.loads((tokenizer_code / "tokenizer_config.json").read_text())
    (tokenizer_code / "tokenizer_config.json").write_text(json.dumps({**settings, "auto_map": {"AutoTokenizer": ["x.T", None]}}))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("swift").addHandler(handler)
    try:
        for folder in (backbone, shipped, tokenizer_code):
            _get_model_info(str(folder), "internvl", None)  # ms-swift's own type: no plug-in needed
    finally:
        logging.getLogger("swift").removeHandler(handler)
    said = {(r.levelname, r.getMessage().split(":")[0]) for r in records if "remote" in r.getMessage()}
    claim = ("with trust_remote_code=True. This will execute custom Python code shipped in the model repository (e.g. "
             "configuration_*.py, modeling_*.py, tokenization_*.py). Only proceed if you trust the source of this model.")
    assert said == {("INFO", f"Loading the model of {str(backbone)!r}"),
                    ("WARNING", f"Loading model from {str(shipped)!r} {claim}"),
                    ("WARNING", f"Loading model from {str(tokenizer_code)!r} {claim}")}, said



def test_a_lora_ensemble_exports_with_its_base_and_scores_like_combine(backbone, tables, tmp_path):
    """The real configuration fine-tunes LoRA adapters: a bundle carries each adapter with its base
    backbone (copied, or referenced by path and manifest checksum), and scores the queries the
    workflow's own commands scored (train -> score-set -> gather-scores -> combine, run here as
    the rules run them, relative paths from a working directory) within float32 noise."""
    import shutil

    from imatch.errors import InputError
    from imatch.scorer import Scorer

    samples, elements = tables
    data = tmp_path / "results" / "data"
    data.mkdir(parents=True)
    samples.to_parquet(data / "samples.parquet")
    elements.to_parquet(data / "elements.parquet")
    shutil.copytree(backbone, tmp_path / "results" / "backbones" / "tiny")
    run = {"cwd": tmp_path}
    scores = {}
    for task in ("overall", "element"):
        sets = f"results/instructions/{task}"
        for split in ("train", "val"):
            imatch("instructions", "--task", task, "--split", split, "--samples", "results/data/samples.parquet",
                   "--elements", "results/data/elements.parquet", "--out", f"{sets}/{split}.parquet",
                   "--jsonl", f"{sets}/{split}.jsonl", *(["--prompt-type"] if task == "element" else []), **run)
        model = f"results/models/tiny/{task}-r1"
        imatch("train", "--arch", "internvl", "--model", "results/backbones/tiny", "--dataset", f"{sets}/train.jsonl",
               "--out", model, "--scratch", f"results/scratch/{task}", "--tuner", "lora", "--lora-rank", "4",
               "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--dtype", "float32",
               "--max-pixels", "16384", "--no-gradient-checkpointing", **run)
        assert (tmp_path / model / "adapter_config.json").is_file()
        shard = f"results/scores/tiny/{task}-r1/shards/0.parquet"
        imatch("score-set", "--arch", "internvl", "--model", model, "--base", "results/backbones/tiny", "--instructions",
               f"{sets}/val.parquet", "--out", shard, "--dtype", "float32", "--max-pixels", "16384", "--device", "cpu",
               "--tau", "3", **run)
        scores[task] = f"results/scores/tiny/{task}-r1/scores.parquet"
        imatch("gather-scores", shard, "--instructions", f"{sets}/val.parquet", "--out", scores[task], **run)
    predicted = "results/predictions/ensemble/val"
    imatch("combine", "--overall", scores["overall"], "--element", scores["element"], "--split", "val", "--tau", "3",
           "--out-predictions", f"{predicted}/predictions.parquet",
           "--out-element-predictions", f"{predicted}/element_predictions.parquet", **run)
    imatch("export", "results", "--out", "ens", "--split", "val", **run)
    imatch("export", "results", "--out", "ens-ref", "--split", "val", "--reference-bases", **run)
    copied = json.loads((tmp_path / "ens" / "bundle.json").read_text())["models"]["tiny/overall-r1"]
    referenced = json.loads((tmp_path / "ens-ref" / "bundle.json").read_text())["models"]["tiny/overall-r1"]
    assert copied["base"] == "bases/tiny" and (tmp_path / "ens" / "bases" / "tiny" / "model.safetensors").is_file()
    assert referenced["base"]["path"] == str((tmp_path / "results" / "backbones" / "tiny").resolve())
    assert not (tmp_path / "ens-ref" / "bases").exists()

    val = samples[samples["split"] == "val"].reset_index(drop=True)
    keys = [elements.loc[elements["img_path"] == p, "element"].tolist() for p in val["img_path"]]
    pred = pd.read_parquet(tmp_path / predicted / "predictions.parquet").set_index("img_path")
    epred = pd.read_parquet(tmp_path / predicted / "element_predictions.parquet")
    for bundle in ("ens", "ens-ref"):
        out = Scorer(tmp_path / bundle, device="cpu")(images=list(val["image"]), prompts=list(val["prompt"]), elements=keys,
                                                      prompt_types=list(val["prompt_type"]))
        assert np.allclose(out["total_score"], pred.loc[val["img_path"], "total_score"], atol=1e-5, rtol=0), bundle
        mine = pd.DataFrame([{"img_path": p, **e} for p, row in zip(val["img_path"], out["elements"]) for e in row])
        joined = epred.merge(mine, on=["img_path", "element"], validate="one_to_one", suffixes=("", "_api"))
        assert len(joined) == len(epred) > 0
        assert np.allclose(joined["expected_level"], joined["expected_level_api"], atol=1e-5, rtol=0), bundle
    # a referenced base that is no longer the one exported is refused, named
    (tmp_path / "results" / "backbones" / "tiny" / "manifest.json").write_text("{}")
    with pytest.raises(InputError, match="not the one exported"):
        Scorer(tmp_path / "ens-ref", device="cpu")
