"""Two optimizer steps of `imatch train` (a full fine-tune: LoRA's dropout would draw other masks
for other token layouts) and the check that two ways of feeding the same answers train alike: the
loss and gradient norm ms-swift logs at step 1, and the loss after the step."""

from __future__ import annotations

import json

PIXELS = 16384


def two_steps(imatch, arch, model, jsonl, out, scratch, *flags) -> list[dict]:
    """ms-swift's two logged optimizer steps of `imatch train ... flags` (float32, lr 1e-3 constant)."""
    code, _, err = imatch("train", "--arch", arch, "--model", model, "--dataset", jsonl, "--out", out,
                          "--scratch", scratch, *flags, "--tuner", "full", "--max-steps", "2",
                          "--dtype", "float32", "--max-pixels", PIXELS, "--learning-rate", "1e-3",
                          "--warmup-ratio", "0", "--lr-scheduler", "constant", "--keep-scratch", "--threads", "2")
    assert code == 0, err
    return [row for row in map(json.loads, (scratch / "logging.jsonl").read_text().splitlines()) if "grad_norm" in row]


def assert_trained_alike(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 2
    for key, tol in (("loss", 1e-5), ("grad_norm", 1e-4)):
        assert abs(float(a[0][key]) - float(b[0][key])) < tol * abs(float(b[0][key])), (key, a[0], b[0])
    assert abs(float(a[1]["loss"]) - float(b[1]["loss"])) < 1e-4 * abs(float(b[1]["loss"]))
    assert float(a[1]["loss"]) != float(a[0]["loss"])  # the step changed the model
