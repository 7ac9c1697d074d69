"""The fast paths of the GPU stages give the same answers as the plain ones, and the benchmark that
measures them runs end to end (tiny models on the CPU: the GPU figures are docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("swift")

from imatch import archs, attention, levels, naive, score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench_cli(*argv: str) -> None:
    """benchmarks/bench.py (the benchmark driver, outside the package) with these arguments."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_driver", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0


def per_segment(q, k, v, cu, scale):
    """What transformers does without a flash implementation: one sdpa call per window."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return torch.cat([sdpa(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                           scale=scale).transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])


def test_segments_in_one_call_equal_one_call_per_segment():
    torch.manual_seed(0)
    q, k, v = (torch.randn(71, 3, 8) for _ in range(3))
    cu = torch.tensor([0, 1, 17, 64, 71], dtype=torch.int32)  # uneven windows, one of a single token
    got = attention.padded_segments_attention(q, k, v, cu, 0.25)
    assert torch.allclose(got, per_segment(q, k, v, cu, 0.25), atol=1e-6)
    # and a token attends only within its own window
    v2 = v.clone()
    v2[20:64] += 100.0
    changed = (attention.padded_segments_attention(q, k, v2, cu, 0.25) - got).abs().amax(dim=(1, 2)) > 1e-3
    assert changed[17:64].all() and not changed[:17].any() and not changed[64:].any()


def test_calls_without_segments_are_plain_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    ours, _ = attention.varlen_attention_forward(module, q, k, v, mask, scaling=0.3)
    plain, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert torch.equal(ours, plain)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("perf") / "qwen"
    archs.get("qwen2_5_vl").build(folder, "tiny", seed=0)
    return folder


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    """Images of three sizes in a shuffled order, so that length bucketing reorders them."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("perf-images")
    rng = np.random.default_rng(0)
    images, texts = [], []
    for i, side in enumerate([56, 112, 56, 84, 112, 56, 84]):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
        texts.append("<image>Prompt: a red circle" + " and a blue square" * (i % 3) + "\nHow well? Answer a..o.")
    return images, texts


def test_vision_windows_run_in_one_kernel_call_with_the_same_logits(qwen):
    from transformers import AutoModelForImageTextToText

    arch = archs.get("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(qwen, attn_implementation="sdpa", dtype=torch.float32)
    processor = naive.load_plain(qwen, arch, "cpu", torch.float32)[1]
    from PIL import Image

    image = Path(qwen) / "probe.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(image)
    inputs = naive.plain_inputs(processor, [str(image)], ["<image>a red circle"], "cpu")

    def run():
        with torch.profiler.profile() as prof, torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        calls = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
        return logits, calls

    plain, plain_calls = run()
    assert attention.enable(model) == 1  # the vision tower only
    fast, fast_calls = run()
    assert torch.allclose(plain, fast, atol=1e-5)
    # 224 px: 16 x 16 patches in 2 x 2 windows of 8 x 8 -> 4 calls in the windowed layer, 1 in the full one
    text_layers = model.config.text_config.num_hidden_layers
    assert plain_calls == 4 + 1 + text_layers and fast_calls == 1 + 1 + text_layers


def test_bucketed_batches_with_workers_give_each_query_its_own_answer(qwen, queries):
    """The workflow's scoring path (length buckets, encoding in worker processes, logits at the
    answer only, the varlen kernel) equals a plain transformers forward per query, in set order."""
    arch = archs.get("qwen2_5_vl")
    images, texts = queries
    model, processor = naive.load_plain(qwen, arch, "cpu", torch.float32)
    ids = score.answer_token_ids(processor.tokenizer, levels.OVERALL_LETTERS)
    one_by_one = naive.naive_score(model, naive.plain_batches(processor, images, texts, 1), ids, "cpu")
    fast_model, _, template = score.load(qwen, arch, device="cpu", dtype="float32", max_pixels=200704)
    order = score.length_order(images, texts)
    assert list(order) != list(range(len(images)))  # the buckets do reorder this set
    got = score.score_probs(fast_model, template, images, texts, ids, batch_size=3, workers=2)
    assert np.allclose(got, one_by_one, atol=1e-5)
    assert np.allclose(got.sum(axis=1), 1.0)


def test_bench_measures_both_stages_on_tiny_models(tmp_path):
    bench_cli("--size", "tiny", "--device", "cpu", "--dtype", "float32", "--arch", "qwen2_5_vl",
           "--score-batches", "56:4", "--queries", "8", "--reference-queries", "4", "--prompts", "4",
           "--train-image", "56", "--train-batch", "4", "--train-steps", "2", "--workers", "1",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {(r["stage"], r["path"]): r for r in result["rows"]}
    assert set(rows) == {("score", "naive"), ("score", "workflow"), ("train", "naive"), ("train", "workflow")}
    assert rows[("score", "workflow")]["max_abs_prob_diff"] < 1e-5  # float32: the same answers
    for r in rows.values():
        assert r["per_second"] > 0 and r["tflop_per_item"] > 0 and r["pct_peak"] > 0
        # the rate is the measured items over the measured time (seconds are rounded to 1 ms)
        assert r["per_second"] == pytest.approx(r["items"] / r["seconds"], rel=0.02)
        assert r["tflops"] == pytest.approx(r["per_second"] * r["tflop_per_item"], rel=1e-9)
    assert rows[("train", "workflow")]["items"] == 4 * 2  # measured steps x batch, warm-up excluded
    table = (tmp_path / "out" / "bench.md").read_text()
    assert table.count("| qwen2_5_vl |") == 4 and "% peak" in table


def test_bench_element_stages_compare_shared_prefixes_with_per_query_work(tmp_path):
    """`benchmarks/bench.py --stages element-score element-train`: the same element queries per query and with shared
    prefixes, same run; in float32 the two scoring paths give the same probabilities, and a
    training step counts batch x accumulation answers either way."""
    bench_cli("--size", "tiny", "--device", "cpu", "--dtype", "float32", "--arch", "internvl",
           "--stages", "element-score", "element-train", "--score-batches", "56:4", "--prompts", "3",
           "--train-image", "56", "--element-queries", "24", "--element-batch", "8", "--element-image-batch", "2",
           "--train-batch", "2", "--train-steps", "2", "--workers", "0",
           "--train-variants", '{"share": false, "accum": 2}', '{"share": true, "accum": 2, "profile": "2-2"}',
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    score = {(r["path"], "CUDNN" in r["variant"]): r for r in rows if r["stage"] == "element-score"}
    assert set(score) == {("per query", False), ("shared prefix", False), ("shared prefix", True)}
    assert score["per query", False]["items"] == 24
    for cudnn in (False, True):  # the shared path with its own attention kernels and with cuDNN's allowed
        shared = score["shared prefix", cudnn]
        assert shared["max_abs_prob_diff"] < 1e-5
        assert shared["speedup"] == pytest.approx(shared["per_second"] / score["per query", False]["per_second"])
    train = [r for r in rows if r["stage"] == "element-train"]
    assert [("share=True" in r["variant"]) for r in train] == [False, True]
    assert all(r["items"] == 2 * 2 * 2 for r in train)  # steps x batch x accumulation, warm-up excluded
    assert train[1]["speedup"] == pytest.approx(train[1]["per_second"] / train[0]["per_second"])
    # the profiled variant: torch.profiler over its 2nd measured step (optimizer step 3 warm-up + 2 = 5)
    table = (tmp_path / "out" / "profile-train-internvl-shareTrue-accum2-profile2-2.txt").read_text()
    assert table.startswith("steps 5-5") and "aten::mm" in table and "Self CPU time total" in table


def test_bench_budget_counts_the_tiles_each_choice_makes(tmp_path):
    """`--stages budget`: after ms-swift's 200,704-pixel shrink 1024² is 448² and 1024x768 is
    517x388; the tiny InternVL (224-pixel tiles, 64 tokens each) makes every image 1 tile at
    max_tiles 1, and at ms-swift's default 12 the square one 2 x 2 + thumbnail = 5 and the 4:3 one
    4 x 3 + thumbnail = 13 (InternVL's closest aspect ratio)."""
    bench_cli("--size", "tiny", "--device", "cpu", "--dtype", "float32", "--arch", "internvl",
           "--stages", "budget", "--budget-tiles", "1", "12", "--budget-queries", "2", "--budget-batch", "2",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"))
    rows = {(r["variant"].rsplit(" ", 1)[1], r["image"]): r for r in json.loads((tmp_path / "out" / "bench.json")
                                                                                .read_text())["rows"]}
    assert {k[0] for k in rows} == {"1", "12"} and all(r["per_second"] > 0 for r in rows.values())
    assert all(rows[("1", shape)]["tiles"] == 1 for shape in ("1024x1024", "1024x768", "768x1344", "1536x640"))
    assert rows[("12", "1024x1024")]["tiles"] == 5 and rows[("12", "1024x768")]["tiles"] == 13
    assert rows[("12", "1024x768")]["tokens"] - rows[("1", "1024x768")]["tokens"] == 12 * 64


def test_profile_steps_need_a_timings_file_and_a_step_range(tmp_path):
    """`imatch train --profile-steps` writes beside --step-times, so it is refused without it
    (before anything loads); the range is 1-based and ordered."""
    import argparse

    from imatch import train

    def parse(*extra):
        p = argparse.ArgumentParser()
        train.add_parser(p.add_subparsers())
        return p.parse_args(["train", "--arch", "internvl", "--model", str(tmp_path), "--dataset",
                             str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--scratch", str(tmp_path / "s"),
                             *extra])

    with pytest.raises(SystemExit, match="--profile-steps needs --step-times"):
        train.train(parse("--profile-steps", "1-2"))
    for bad in ("2-1", "0-3", "3"):
        with pytest.raises(SystemExit):  # argparse's error for the type
            parse("--profile-steps", bad)
    args = parse("--profile-steps", "4-5", "--step-times", str(tmp_path / "t.jsonl"))
    env = train.swift_environment(args, archs.get("internvl"), tmp_path / "s")
    assert env["IMATCH_PROFILE_STEPS"] == "4-5" and env["IMATCH_STEP_TIMES"] == str(tmp_path / "t.jsonl")


def test_liger_flag_reaches_swift_sft_as_its_own_argument(tmp_path):
    """`imatch train --liger` must turn on ms-swift's (transformers') liger switch, read by swift's
    own argument parser, not a flag of ours that swift ignores; without it the switch stays off."""
    import argparse

    from swift.arguments import SftArguments
    from transformers import HfArgumentParser

    from imatch import train

    def swift_namespace(*extra):
        p = argparse.ArgumentParser()
        train.add_parser(p.add_subparsers())
        args = p.parse_args(["train", "--arch", "qwen2_5_vl", "--model", str(tmp_path), "--dataset", str(tmp_path / "d.jsonl"),
                             "--out", str(tmp_path / "o"), "--scratch", str(tmp_path / "s"), *extra])
        cmd = train.swift_command(args, archs.get("qwen2_5_vl"), tmp_path / "s", None)
        flags = cmd[cmd.index("sft") + 1:]
        namespace, unknown = HfArgumentParser(SftArguments).parse_known_args(flags)
        assert not unknown, unknown
        return namespace

    assert swift_namespace("--liger").use_liger_kernel is True
    assert swift_namespace().use_liger_kernel is False
