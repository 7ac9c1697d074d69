"""Stages `element-levels`, `combine` and `ensemble-weights`: from per-model scores to predictions.

`element-levels` averages the expected element levels of one or more element models and rounds
them (half-up) to the integer levels 1..7 that the element-augmented overall queries state
(paper Eq. 9-10). `combine` turns the scores of overall and element models into the predictions
tables of a predictor (mean over models, the paper's ensemble of Fig. 6; one model is an ensemble
of one): total score = mean expected score; an element is a hit when the mean expected level is
greater than tau, written as 1.0 / 0.0 so that the official >= 0.5 binarisation agrees.
`ensemble-weights` optionally replaces the mean by non-negative weights fitted on the labelled
holdout (least squares of the truth on the models' expected scores / levels, normalised to sum
1); they are used for val and test, never for the holdout they were fitted on.
Every input must cover the same queries: row counts are checked, nothing is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import levels
from imatch.atomic import write_parquet
from imatch.errors import InputError

KEYS = {"overall": ["img_path"], "element": ["img_path", "element"]}
# what `score-set` can write: a value outside is a damaged or hand-edited table, never averaged in
RANGES = {("overall", "expected_level"): (1, 15), ("overall", "score"): (1, 5),
          ("element", "expected_level"): (1, 7), ("element", "score"): (0, 1)}


def check_range(values: pd.Series, low: float, high: float, path, what: str) -> None:
    """Refuse a non-finite or out-of-range value, naming the file and the first such row."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(numbers) | (numbers < low - 1e-9) | (numbers > high + 1e-9)
    if bad.any():
        first = values.index[bad.argmax()]
        raise InputError(path, f"{what} must be finite and in [{low}, {high}]; {int(bad.sum())} rows are not",
                         f"{first!r}: {values.iloc[bad.argmax()]!r}")


def by_model(paths: list[Path], task: str, column: str, *, split: str | None = None, view: str = "seen"
             ) -> pd.DataFrame:
    """`column` of each model's score table side by side (one column per model), same queries:
    the rows of one view (`seen` images or the `blank` control) and, if given, of one split."""
    keys = KEYS[task]
    frames = []
    for path in paths:
        table = pd.read_parquet(path)
        table = table[(table["view"] == view) & ((table["split"] == split) if split else True)]
        if table.empty:
            raise InputError(path, f"no {view} scores{f' of the {split} split' if split else ''}")
        # predictions are per image: rows of augmented copies (training sets only) are not images
        table = table[table["id"] == table["img_path"] + ("" if task == "overall" else "|" + table["element"])]
        if set(table["task"]) != {task}:
            raise InputError(path, f"expected {task} scores, found {sorted(set(table['task']))}")
        if table.duplicated(keys).any():
            raise InputError(path, "duplicate query", str(table.loc[table.duplicated(keys), keys].iloc[0].to_dict()))
        values = table.set_index(keys)[column]
        check_range(values, *RANGES[(task, column)], path, f"{task} {column}")
        frames.append(values.rename(str(path)))
    first = frames[0].index
    for path, frame in zip(paths[1:], frames[1:]):
        if not frame.index.sort_values().equals(first.sort_values()):
            raise InputError(path, f"covers other queries than {paths[0]} ({len(frame)} vs {len(first)} rows)")
    return pd.concat(frames, axis=1, join="inner")


def mean_over_models(paths: list[Path], task: str, column: str, weights=None, **rows) -> pd.DataFrame:
    """(Weighted) mean of `column` over the models' score tables (`rows`: split / view, see by_model)."""
    joined = by_model(paths, task, column, **rows)
    w = np.full(len(paths), 1 / len(paths)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(paths):
        raise ValueError(f"{len(w)} weights for {len(paths)} models")
    return (joined @ w).rename(column).reset_index()


def fit_weights(predictions: pd.DataFrame, truth: pd.Series) -> list[float]:
    """Non-negative least squares of the truth on the models' predictions, normalised to sum 1
    (equal weights if the fit puts weight on none)."""
    from scipy.optimize import nnls

    x = predictions.to_numpy(dtype=float)
    w, _ = nnls(x, truth.reindex(predictions.index).to_numpy(dtype=float))
    return (w / w.sum()).tolist() if w.sum() > 0 else [1 / x.shape[1]] * x.shape[1]


def element_levels(paths: list[Path], view: str = "seen") -> pd.DataFrame:
    """Integer levels of every scored element (all splits) for the element-augmented overall queries."""
    mean = mean_over_models(paths, "element", "expected_level", view=view)
    mean["level"] = np.clip(levels.round_half_up(mean["expected_level"].to_numpy()), 1, 7).astype("int64")
    return mean[["img_path", "element", "level", "expected_level"]].sort_values(["img_path", "element"]).reset_index(drop=True)


def combine(overall: list[Path], element: list[Path], tau: float, weights: dict | None = None, *,
            split: str | None = None, view: str = "seen") -> tuple[pd.DataFrame, pd.DataFrame]:
    weights = weights or {}
    rows = {"split": split, "view": view}
    total = mean_over_models(overall, "overall", "score", weights.get("overall"), **rows)
    total = total.rename(columns={"score": "total_score"})
    split_of = pd.concat([pd.read_parquet(p, columns=["img_path", "split"]) for p in overall]).drop_duplicates("img_path")
    total = total.merge(split_of, on="img_path", how="left", validate="one_to_one")
    el = mean_over_models(element, "element", "expected_level", weights.get("element"), **rows)
    el["score"] = levels.is_hit(el["expected_level"].to_numpy(), tau).astype("float64")
    return (total[["img_path", "split", "total_score"]].sort_values("img_path").reset_index(drop=True),
            el[["img_path", "element", "score", "expected_level"]].sort_values(["img_path", "element"]).reset_index(drop=True))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("element-levels", help="element models' scores -> integer element levels 1..7",
                              description=__doc__)
    p.add_argument("scores", type=Path, nargs="+", help="element score parquets (one per model)")
    p.add_argument("--view", choices=["seen", "blank"], default="seen", help="levels from the real or the grey images")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_run_levels)

    c = subparsers.add_parser("combine", help="overall and element scores -> a predictor's predictions tables",
                              description=__doc__)
    c.add_argument("--overall", type=Path, nargs="+", required=True, help="overall score parquets")
    c.add_argument("--element", type=Path, nargs="+", required=True, help="element score parquets")
    c.add_argument("--split", required=True, help="the split to predict")
    c.add_argument("--view", choices=["seen", "blank"], default="seen", help="blank: the grey-image control")
    c.add_argument("--tau", type=float, default=levels.DEFAULT_TAU)
    c.add_argument("--weights", type=Path, help="weights.json from ensemble-weights (default: the mean)")
    c.add_argument("--out-predictions", type=Path, required=True)
    c.add_argument("--out-element-predictions", type=Path, required=True)
    c.set_defaults(func=_run_combine)

    w = subparsers.add_parser("ensemble-weights", help="fit ensemble weights on the labelled holdout",
                              description=__doc__)
    w.add_argument("--overall", type=Path, nargs="+", required=True, help="overall score parquets")
    w.add_argument("--element", type=Path, nargs="+", required=True, help="element score parquets")
    w.add_argument("--split", default="holdout", help="the labelled split to fit on")
    w.add_argument("--samples", type=Path, required=True)
    w.add_argument("--elements", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True, help="weights.json")
    w.set_defaults(func=_run_weights)


def _run_levels(args) -> int:
    table = element_levels(args.scores, args.view)
    write_parquet(table, args.out)
    print(json.dumps({"elements": len(table), "models": len(args.scores)}))
    return 0


def _run_combine(args) -> int:
    weights = json.loads(args.weights.read_text()) if args.weights else None
    if weights and (len(weights["overall"]) != len(args.overall) or len(weights["element"]) != len(args.element)):
        raise InputError(args.weights, "weights do not match the number of models")
    total, el = combine(args.overall, args.element, args.tau, weights, split=args.split, view=args.view)
    write_parquet(total, args.out_predictions)
    write_parquet(el, args.out_element_predictions)
    print(json.dumps({"images": len(total), "elements": len(el)}))
    return 0


def _run_weights(args) -> int:
    samples = pd.read_parquet(args.samples).set_index("img_path")
    elements = pd.read_parquet(args.elements).set_index(["img_path", "element"])
    if samples.loc[samples["split"] == args.split, "total_score"].isna().any():
        raise InputError(args.samples, f"the {args.split} split must be labelled to fit weights")
    overall = by_model(args.overall, "overall", "score", split=args.split)
    element = by_model(args.element, "element", "expected_level", split=args.split)
    truth_level = pd.Series(levels.element_level(elements["score"].fillna(0).to_numpy()), index=elements.index)
    weights = {"overall": fit_weights(overall, samples["total_score"]), "element": fit_weights(element, truth_level),
               "models": {"overall": [str(p) for p in args.overall], "element": [str(p) for p in args.element]}}
    from imatch.atomic import write_json

    write_json(weights, args.out)
    print(json.dumps({k: weights[k] for k in ("overall", "element")}))
    return 0
