"""Stage `baseline`: predictors that never look at the image, floors every model must beat.

- `prior`: the total score is the training mean for the prompt's type (real/synthetic), an
  element's score the training hit rate of its category (the overall hit rate for unseen ones);
- `text`: a text-only model fitted on the training labels: ridge regression of the total score on
  the words of the prompt, logistic regression of an element's hit on the words of the prompt
  and of the element key (scikit-learn). It reads everything the multimodal models read except
  the image, so the gap between it and them is what the image contributes.
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


def text_predictions(samples: pd.DataFrame, elements: pd.DataFrame, fit_split: str = "train", seed: int = 0):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    fit = samples[(samples["split"] == fit_split) & samples["total_score"].notna()]
    words = CountVectorizer(token_pattern=r"[A-Za-z0-9]+", ngram_range=(1, 2), min_df=1, binary=True)
    x_fit = words.fit_transform(fit["prompt"])
    total = Ridge(alpha=1.0).fit(x_fit, fit["total_score"])
    pred = samples[["img_path", "split"]].copy()
    pred["total_score"] = total.predict(words.transform(samples["prompt"])).clip(1, 5).astype("float64")

    el = elements.merge(samples[["img_path", "prompt", "split"]], on="img_path", validate="many_to_one")
    text = el["prompt"] + " || " + el["element"]
    keys = CountVectorizer(token_pattern=r"[A-Za-z0-9|]+", ngram_range=(1, 2), binary=True)
    train_el = (el["split"] == fit_split) & el["score"].notna()
    x_el = keys.fit_transform(text[train_el])
    hits = (el.loc[train_el, "score"] >= 0.5).astype(int)
    pred_el = elements[["img_path", "element"]].copy()
    if hits.nunique() < 2:  # one class only: predict it
        pred_el["score"] = float(hits.iloc[0]) if len(hits) else 0.0
    else:
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x_el, hits)
        pred_el["score"] = clf.predict_proba(keys.transform(text))[:, 1]
    return pred.reset_index(drop=True), pred_el.reset_index(drop=True)


PREDICTORS = {"prior": prior_predictions, "text": text_predictions}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="predictors without the image (prior, text-only)",
                              description=__doc__)
    p.add_argument("--predictor", choices=sorted(PREDICTORS), default="prior")
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--elements", type=Path, required=True)
    p.add_argument("--split", help="write predictions of this split only (default: all)")
    p.add_argument("--out-predictions", type=Path, required=True, help="parquet: img_path, split, total_score")
    p.add_argument("--out-element-predictions", type=Path, required=True, help="parquet: img_path, element, score")
    p.set_defaults(func=_run)


def _run(args) -> int:
    samples = pd.read_parquet(args.samples)
    elements = pd.read_parquet(args.elements)
    pred, pred_el = PREDICTORS[args.predictor](samples, elements)
    if len(pred) != len(samples) or len(pred_el) != len(elements):
        raise AssertionError(f"{args.predictor} baseline changed the row count")  # internal invariant
    if args.split:
        pred = pred[pred["split"] == args.split].reset_index(drop=True)
        pred_el = pred_el[pred_el["img_path"].isin(pred["img_path"])].reset_index(drop=True)
    write_parquet(pred, args.out_predictions)
    write_parquet(pred_el, args.out_element_predictions)
    print(json.dumps({"images": len(pred), "elements": len(pred_el)}))
    return 0
