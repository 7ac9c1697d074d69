"""Stage `baseline`: the prior predictor, a floor every trained model must beat.

It never looks at an image or reads a prompt: the total score is the training mean for the
prompt's type (real/synthetic), an element's score is the training hit rate of its category
(falling back to the overall hit rate for unseen categories). Its metrics show how much of a
model's score is explained by label priors alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from imatch.atomic import write_parquet
from imatch.errors import InputError


def prior_predictions(samples: pd.DataFrame, elements: pd.DataFrame, fit_split: str = "train"):
    fit = samples[samples["split"] == fit_split]
    if fit["total_score"].isna().all():
        raise InputError("samples.parquet", f"split {fit_split!r} has no labels to fit the prior on")
    by_type = fit.groupby("prompt_type")["total_score"].mean()
    overall = fit["total_score"].mean()
    fit_el = elements[elements["img_path"].isin(fit["img_path"])]
    hit = fit_el["score"] >= 0.5
    by_cat = hit.groupby(fit_el["category"].str.lower()).mean()
    overall_hit = hit.mean()

    pred = samples[["img_path", "split"]].copy()
    pred["total_score"] = samples["prompt_type"].map(by_type).fillna(overall).astype("float64")
    pred_el = elements[["img_path", "element"]].copy()
    pred_el["score"] = elements["category"].str.lower().map(by_cat).fillna(overall_hit).astype("float64")
    return pred.reset_index(drop=True), pred_el.reset_index(drop=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="prior predictor (no image, no prompt text)", description=__doc__)
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--elements", type=Path, required=True)
    p.add_argument("--split", help="write predictions of this split only (default: all)")
    p.add_argument("--out-predictions", type=Path, required=True, help="parquet: img_path, split, total_score")
    p.add_argument("--out-element-predictions", type=Path, required=True, help="parquet: img_path, element, score")
    p.set_defaults(func=_run)


def _run(args) -> int:
    samples = pd.read_parquet(args.samples)
    elements = pd.read_parquet(args.elements)
    pred, pred_el = prior_predictions(samples, elements)
    if len(pred) != len(samples) or len(pred_el) != len(elements):
        raise AssertionError("prior baseline changed the row count")  # internal invariant
    if args.split:
        pred = pred[pred["split"] == args.split].reset_index(drop=True)
        pred_el = pred_el[pred_el["img_path"].isin(pred["img_path"])].reset_index(drop=True)
    write_parquet(pred, args.out_predictions)
    write_parquet(pred_el, args.out_element_predictions)
    print(json.dumps({"images": len(pred), "elements": len(pred_el)}))
    return 0
