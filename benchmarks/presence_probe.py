"""Does a backbone know whether a demo element is in the image, and does the element query reach it?

Two checks of a backbone (no fine-tuning) on the element instruction sets of a finished demo run
(`results/instructions/element-*/{train-*,val}.parquet`), truth = label >= 0.5 (the judge's
binarisation):

- `ask`: each colour / object element of the val set asked in the pretraining corpus' own form
  ("Is there anything red?", "Is there a star?"); AUC of the logit margin between the first tokens
  of "yes" and "no".
- `probe`: a logistic regression (C = 0.1, standardised) on the hidden state of the element query's
  last position, per layer, fitted on the training set and scored on val (AUC); `--blank` replaces
  every image with a grey one (what the query text alone carries).

Measured: benchmarks/results/2026-12-01-cpu-demo-perceiving-backbones/.

    .venv/bin/python benchmarks/presence_probe.py ask --arch ovis2 --model results/backbones/tiny-ovis2 \\
        --val results/instructions/element-<hash>/val.parquet
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from imatch import archs, score  # noqa: E402
from imatch.pretrain_corpus import HAS_COLOUR, HAS_SHAPE, SHAPE_WORDS  # noqa: E402

PIXELS = 16384  # the demo's image budget


def _load(arch, model):
    os.environ.update(arch.swift_environment(PIXELS, None))
    return score.load(Path(model), arch, device="cpu", dtype="float32", max_pixels=PIXELS, varlen=False,
                      allow_unsealed=True)


def _question(element: str) -> str | None:
    """The corpus' own has_colour / has_shape question about a colour or object element, else None."""
    m = re.match(r"(.+) \((color|object)\)$", element)
    if not m:
        return None
    if m.group(2) == "color":
        return HAS_COLOUR.format(m.group(1))
    return HAS_SHAPE.format(SHAPE_WORDS.get(m.group(1), m.group(1)))  # "ring (donut)" -> "ring"


def ask(args) -> None:
    from sklearn.metrics import roc_auc_score

    arch = archs.get(args.arch)
    model, processor, template = _load(arch, args.model)
    val = pd.read_parquet(args.val)
    val = val.assign(q=val["element"].map(_question)).dropna(subset=["q"]).reset_index(drop=True)
    tok = getattr(processor, "tokenizer", processor)
    first = [tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")]
    if first[0] == first[1]:
        raise SystemExit(f"'yes' and 'no' start with the same token in {args.model}")
    logits = score.answer_logits(model, template, list(val["image"]), list(val["q"]), first, batch_size=16,
                                 bucket=False)
    margin, truth = logits[:, 0] - logits[:, 1], (val["label"] >= 0.5).to_numpy()
    for kind in ("color", "object"):
        k = val["element"].str.endswith(f"({kind})").to_numpy()
        print(f"ask {args.model} {kind}: n {k.sum()} AUC {roc_auc_score(truth[k], margin[k]):.3f}")


def _last_states(model, template, table: pd.DataFrame, blank: bool) -> np.ndarray:
    import torch

    cache = {"_dir": tempfile.mkdtemp()}
    images = [score._blank(p, cache) if blank else p for p in table["image"]]
    out = []
    with torch.inference_mode():
        for i in range(0, len(table), 16):
            encoded = [template.encode({"messages": [{"role": "user", "content": q}], "images": [im]})
                       for q, im in zip(table["query"].iloc[i:i + 16], images[i:i + 16])]
            _, kwargs = template.pre_forward_hook(model, None, template.data_collator(encoded))
            states = model(**kwargs, output_hidden_states=True).hidden_states  # left padded: -1 is the answer's
            out.append(torch.stack([h[:, -1, :] for h in states], 1).float().numpy())
    return np.concatenate(out)


def probe(args) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    arch = archs.get(args.arch)
    model, _, template = _load(arch, args.model)
    train, val = pd.read_parquet(args.train), pd.read_parquet(args.val)
    x_train, x_val = (_last_states(model, template, t, args.blank) for t in (train, val))
    y_train, y_val = ((t["label"] >= 0.5).to_numpy() for t in (train, val))
    for layer in range(1, x_train.shape[1]):  # 0: the input embedding of the last token, the same for all
        scaler = StandardScaler().fit(x_train[:, layer])
        fit = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_train[:, layer]), y_train)
        p = fit.predict_proba(scaler.transform(x_val[:, layer]))[:, 1]
        print(f"probe {args.model} {'grey' if args.blank else 'seen'} layer {layer}: val AUC "
              f"{roc_auc_score(y_val, p):.3f} (n {len(y_val)}, present {y_val.mean():.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    for name, func in (("ask", ask), ("probe", probe)):
        p = sub.add_parser(name)
        p.add_argument("--arch", required=True)
        p.add_argument("--model", required=True, help="a backbone folder")
        p.add_argument("--val", required=True, help="the element instruction set of val (parquet)")
        if name == "probe":
            p.add_argument("--train", required=True, help="the element instruction set of training (parquet)")
            p.add_argument("--blank", action="store_true", help="grey images instead of the real ones")
        p.set_defaults(func=func)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
