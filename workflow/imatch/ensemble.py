"""Stages `element-levels` and `combine`: from per-model scores to what the next stage needs.

`element-levels` averages the expected element levels of one or more element models and rounds
them (half-up) to the integer levels 1..7 that the element-augmented overall queries state
(paper Eq. 9-10). `combine` turns the scores of overall and element models into the predictions
tables of a predictor (mean over models, the paper's ensemble of Fig. 6; one model is an ensemble
of one): total score = mean expected score; an element is a hit when the mean expected level is
greater than tau, written as 1.0 / 0.0 so that the official >= 0.5 binarisation agrees.
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


def mean_over_models(paths: list[Path], task: str, column: str) -> pd.DataFrame:
    """Mean of `column` over the models' score tables, which must hold the same queries."""
    keys = KEYS[task]
    frames = []
    for path in paths:
        table = pd.read_parquet(path)
        # predictions are per image: rows of augmented copies (training sets only) are not images
        table = table[table["id"] == table["img_path"] + ("" if task == "overall" else "|" + table["element"])]
        if set(table["task"]) != {task}:
            raise InputError(path, f"expected {task} scores, found {sorted(set(table['task']))}")
        if table.duplicated(keys).any():
            raise InputError(path, "duplicate query", str(table.loc[table.duplicated(keys), keys].iloc[0].to_dict()))
        frames.append(table.set_index(keys)[column].rename(str(path)))
    first = frames[0].index
    for path, frame in zip(paths[1:], frames[1:]):
        if not frame.index.sort_values().equals(first.sort_values()):
            raise InputError(path, f"covers other queries than {paths[0]} ({len(frame)} vs {len(first)} rows)")
    joined = pd.concat(frames, axis=1, join="inner")
    return joined.mean(axis=1).rename(column).reset_index()


def element_levels(paths: list[Path]) -> pd.DataFrame:
    mean = mean_over_models(paths, "element", "expected_level")
    mean["level"] = np.clip(levels.round_half_up(mean["expected_level"].to_numpy()), 1, 7).astype("int64")
    return mean[["img_path", "element", "level", "expected_level"]].sort_values(["img_path", "element"]).reset_index(drop=True)


def combine(overall: list[Path], element: list[Path], tau: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    total = mean_over_models(overall, "overall", "score").rename(columns={"score": "total_score"})
    split_of = pd.concat([pd.read_parquet(p, columns=["img_path", "split"]) for p in overall]).drop_duplicates("img_path")
    total = total.merge(split_of, on="img_path", how="left", validate="one_to_one")
    el = mean_over_models(element, "element", "expected_level")
    el["score"] = levels.is_hit(el["expected_level"].to_numpy(), tau).astype("float64")
    return (total[["img_path", "split", "total_score"]].sort_values("img_path").reset_index(drop=True),
            el[["img_path", "element", "score", "expected_level"]].sort_values(["img_path", "element"]).reset_index(drop=True))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("element-levels", help="element models' scores -> integer element levels 1..7",
                              description=__doc__)
    p.add_argument("scores", type=Path, nargs="+", help="element score parquets (one per model)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_run_levels)

    c = subparsers.add_parser("combine", help="overall and element scores -> a predictor's predictions tables",
                              description=__doc__)
    c.add_argument("--overall", type=Path, nargs="+", required=True, help="overall score parquets")
    c.add_argument("--element", type=Path, nargs="+", required=True, help="element score parquets")
    c.add_argument("--tau", type=float, default=levels.DEFAULT_TAU)
    c.add_argument("--out-predictions", type=Path, required=True)
    c.add_argument("--out-element-predictions", type=Path, required=True)
    c.set_defaults(func=_run_combine)


def _run_levels(args) -> int:
    table = element_levels(args.scores)
    write_parquet(table, args.out)
    print(json.dumps({"elements": len(table), "models": len(args.scores)}))
    return 0


def _run_combine(args) -> int:
    total, el = combine(args.overall, args.element, args.tau)
    write_parquet(total, args.out_predictions)
    write_parquet(el, args.out_element_predictions)
    print(json.dumps({"images": len(total), "elements": len(el)}))
    return 0
