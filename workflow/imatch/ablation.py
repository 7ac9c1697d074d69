"""Stage `ablation-table`: the paper's ablation tables (Tables 4 and 5) from models trained per row.

Each row of `ablation.overall` (Table 4) or `ablation.element` (Table 5) in the config is an
instruction variant: the workflow trains every backbone on it (rows that share settings share
the model) and scores the ablation split. This stage reads those scores and the split's labels
and writes one row per ablation row, one column per backbone and metric, with the judge's
functions: SRCC and PLCC (logistic fitted from ground truth to prediction, as the official
script does) of the total score, ACC of the element hits (ground truth >= 0.5 vs expected level
> tau). `qalign: false` reads the model's most likely letter instead of the expectation over
all fifteen (Eq. 5-7): the same model without the QAlign read-out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import levels
from imatch.atomic import write_text
from imatch.errors import InputError
from imatch.evaluate import HIT_THRESHOLD, plcc_official

FLAGS = {"overall": ["qalign", "validation", "element_levels", "image_augmentation"],
         "element": ["prompt_type", "score_perturbation"]}


def _scores(path: Path, split: str, expected_ids: pd.Index) -> pd.DataFrame:
    table = pd.read_parquet(path)
    table = table[(table["view"] == "seen") & (table["split"] == split) & (table["id"].isin(expected_ids))]
    missing = expected_ids.difference(table["id"])
    if len(missing):
        raise InputError(path, f"{len(missing)} queries of the {split} split were not scored", f"id={missing[0]!r}")
    return table.set_index("id").loc[expected_ids]


def overall_metrics(path: Path, samples: pd.DataFrame, split: str, qalign: bool) -> dict:
    from scipy.stats import spearmanr

    truth = samples.loc[samples["split"] == split].set_index("img_path")["total_score"]
    if truth.isna().any():
        raise InputError("samples.parquet", f"the {split} split is not labelled", f"img_path={truth.index[truth.isna()][0]!r}")
    table = _scores(path, split, pd.Index(truth.index))
    level = table["expected_level"] if qalign else table["argmax_level"].astype(float)
    pred = levels.level_to_total(level.to_numpy())
    return {"srcc": float(spearmanr(truth.to_numpy(), pred)[0]), "plcc": plcc_official(truth.to_numpy(), pred)}


def element_metrics(path: Path, samples: pd.DataFrame, elements: pd.DataFrame, split: str, tau: float) -> dict:
    images = samples.loc[samples["split"] == split, "img_path"]
    truth = elements[elements["img_path"].isin(images)]
    if truth["score"].isna().any():
        raise InputError("elements.parquet", f"the {split} split is not labelled")
    ids = pd.Index(truth["img_path"] + "|" + truth["element"])
    table = _scores(path, split, ids)
    hit = levels.is_hit(table["expected_level"].to_numpy(), tau)
    return {"acc": float(np.mean(hit == (truth["score"].to_numpy() >= HIT_THRESHOLD)))}


def ablation_table(kind: str, plan: list[dict], samples: Path, elements: Path, split: str, tau: float) -> pd.DataFrame:
    """`plan`: one entry per (row, backbone, seed): {"row": {flag: bool}, "backbone": name,
    "scores": path} and, with `ablation.seeds`, "seed": N. Without seeds one value per backbone
    and metric; with them the mean over the seeds, `<backbone> <metric> sd` (sample standard
    deviation, ddof 1) and a `seeds` column."""
    s = pd.read_parquet(samples)
    e = pd.read_parquet(elements)
    rows: dict[tuple, dict] = {}
    values: dict[tuple, dict[str, dict]] = {}  # by the seed: a row listed twice counts once
    seeds: dict[tuple, list[int]] = {}
    for item in plan:
        flags = tuple(bool(item["row"][f]) for f in FLAGS[kind])
        if kind == "overall":
            metrics = overall_metrics(Path(item["scores"]), s, split, item["row"]["qalign"])
        else:
            metrics = element_metrics(Path(item["scores"]), s, e, split, tau)
        rows.setdefault(flags, dict(zip(FLAGS[kind], flags)))
        for name, value in metrics.items():
            values.setdefault(flags, {}).setdefault(f"{item['backbone']} {name}", {})[item.get("seed")] = value
        if "seed" in item and item["seed"] not in seeds.setdefault(flags, []):
            seeds[flags].append(item["seed"])
    for flags, out in rows.items():
        for column, by_seed in values[flags].items():
            found = list(by_seed.values())
            out[column] = float(np.mean(found))
            if flags in seeds:
                out[f"{column} sd"] = float(np.std(found, ddof=1)) if len(found) > 1 else float("nan")
        if flags in seeds:
            out["seeds"] = " ".join(map(str, sorted(seeds[flags])))
    return pd.DataFrame(list(rows.values()))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ablation-table", help="the paper's Table 4 / 5 from the ablation models' scores",
                              description=__doc__)
    p.add_argument("--kind", choices=sorted(FLAGS), required=True, help="overall (Table 4) or element (Table 5)")
    p.add_argument("--plan", required=True,
                   help="JSON list of {row, backbone, scores[, seed]} (written by the workflow)")
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--elements", type=Path, required=True)
    p.add_argument("--split", required=True, help="the labelled split the rows are compared on")
    p.add_argument("--tau", type=float, default=levels.DEFAULT_TAU)
    p.add_argument("--out", type=Path, required=True,
                   help="TSV: flags, then one column per backbone and metric (with seeds: their mean, sd and the seeds)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    table = ablation_table(args.kind, json.loads(args.plan), args.samples, args.elements, args.split, args.tau)
    write_text(table.to_csv(sep="\t", index=False, float_format="%.4f"), args.out)
    print(table.to_string(index=False))
    return 0
