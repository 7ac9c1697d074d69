"""Stage `ablation-table`: the paper's ablation tables (Tables 4 and 5) from models trained per row.

Each row of `ablation.overall` (Table 4) or `ablation.element` (Table 5) in the config is an
instruction variant: the workflow trains every backbone on it (rows that share settings share
the model) and scores the ablation split. This stage reads those scores and the split's labels
and writes one row per ablation row, one column per backbone and metric, with the judge's
functions: SRCC and PLCC (logistic fitted from ground truth to prediction, as the official
script does) of the total score, ACC of the element hits (ground truth >= 0.5 vs expected level
> tau). `qalign: false` reads the model's most likely letter instead of the expectation over
all fifteen (Eq. 5-7): the same model without the QAlign read-out. With several backbones an
`ensemble` column scores the mean of their levels per row (and seed), as the workflow's ensemble
does with `weights: mean`.

`--effects`: what the paper's tables are read for, the effect of each augmentation. For every pair
of rows that differ in one switch turned on, the change of each metric, paired by seed (the same
seed trains both rows' models), with its sample standard deviation over the seeds and a paired
t-test (scipy); and, in Table 4, ensembling: the ensemble's metric minus the mean of its members'
in each row. The paper reports every one of these as an improvement; the verdict says whether the
seeds show that ("holds", p < 0.05), the opposite ("reversed"), or cannot tell ("within noise";
"one seed" without `ablation.seeds`; "undefined" where a metric has no value, such as the SRCC of
constant predictions).
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

ENSEMBLE = "ensemble"
SIGNIFICANCE = 0.05  # two-sided paired t-test over the seeds

FLAGS = {"overall": ["qalign", "validation", "element_levels", "image_augmentation"],
         "element": ["prompt_type", "score_perturbation"]}
OPTIONAL = {"metadata": True}  # a flag a row may leave out (its default); a column once a row turns it off


def flags_of(kind: str, plan: list[dict]) -> list[str]:
    """The table's switches: the task's, and the optional ones that some row sets off its default."""
    extra = [f for f, default in OPTIONAL.items() if any(item["row"].get(f, default) != default for item in plan)]
    return FLAGS[kind] + extra


def _scores(path: Path, split: str, expected_ids: pd.Index) -> pd.DataFrame:
    table = pd.read_parquet(path)
    table = table[(table["view"] == "seen") & (table["split"] == split) & (table["id"].isin(expected_ids))]
    missing = expected_ids.difference(table["id"])
    if len(missing):
        raise InputError(path, f"{len(missing)} queries of the {split} split were not scored", f"id={missing[0]!r}")
    return table.set_index("id").loc[expected_ids]


def _overall_levels(path: Path, samples: pd.DataFrame, split: str, qalign: bool) -> tuple[np.ndarray, np.ndarray]:
    """(total score, level read) of the split's images, in the samples' order."""
    truth = samples.loc[samples["split"] == split].set_index("img_path")["total_score"]
    if truth.isna().any():
        raise InputError("samples.parquet", f"the {split} split is not labelled", f"img_path={truth.index[truth.isna()][0]!r}")
    table = _scores(path, split, pd.Index(truth.index))
    level = table["expected_level"] if qalign else table["argmax_level"].astype(float)
    return truth.to_numpy(), level.to_numpy()


def _overall_from(truth: np.ndarray, level: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    pred = levels.level_to_total(level)
    return {"srcc": float(spearmanr(truth, pred)[0]), "plcc": plcc_official(truth, pred)}


def _element_levels(path: Path, samples: pd.DataFrame, elements: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labelled hit, expected level) of the split's elements, in the elements' order."""
    images = samples.loc[samples["split"] == split, "img_path"]
    truth = elements[elements["img_path"].isin(images)]
    if truth["score"].isna().any():
        raise InputError("elements.parquet", f"the {split} split is not labelled")
    ids = pd.Index(truth["img_path"] + "|" + truth["element"])
    table = _scores(path, split, ids)
    return truth["score"].to_numpy() >= HIT_THRESHOLD, table["expected_level"].to_numpy()


def _element_from(hit: np.ndarray, level: np.ndarray, tau: float) -> dict:
    return {"acc": float(np.mean(levels.is_hit(level, tau) == hit))}


def _per_seed(kind: str, plan: list[dict], samples: Path, elements: Path, split: str, tau: float):
    """rows: flags -> {flag: bool}; values: flags -> "<model> <metric>" -> {seed: value} (the
    ensemble's too, with several backbones); seeds: flags -> the seeds trained."""
    s = pd.read_parquet(samples)
    e = pd.read_parquet(elements)
    names = flags_of(kind, plan)
    rows: dict[tuple, dict] = {}
    values: dict[tuple, dict[str, dict]] = {}  # by the seed: a row listed twice counts once
    seeds: dict[tuple, list[int]] = {}
    read: dict[tuple, dict[str, tuple]] = {}  # (flags, seed) -> backbone -> (truth, levels)
    for item in plan:
        flags = tuple(bool({**OPTIONAL, **item["row"]}[f]) for f in names)
        if kind == "overall":
            truth, level = _overall_levels(Path(item["scores"]), s, split, item["row"]["qalign"])
            metrics = _overall_from(truth, level)
        else:
            truth, level = _element_levels(Path(item["scores"]), s, e, split)
            metrics = _element_from(truth, level, tau)
        read.setdefault((flags, item.get("seed")), {})[item["backbone"]] = (truth, level)
        rows.setdefault(flags, dict(zip(names, flags)))
        for name, value in metrics.items():
            values.setdefault(flags, {}).setdefault(f"{item['backbone']} {name}", {})[item.get("seed")] = value
        if "seed" in item and item["seed"] not in seeds.setdefault(flags, []):
            seeds[flags].append(item["seed"])
    for (flags, seed), members in read.items():
        if len(members) < 2:
            continue
        truth = next(iter(members.values()))[0]
        level = np.mean([lv for _, lv in members.values()], axis=0)  # the same queries, in the same order
        metrics = _overall_from(truth, level) if kind == "overall" else _element_from(truth, level, tau)
        for name, value in metrics.items():
            values[flags].setdefault(f"{ENSEMBLE} {name}", {})[seed] = value
    return rows, values, seeds


def ablation_table(kind: str, plan: list[dict], samples: Path, elements: Path, split: str, tau: float) -> pd.DataFrame:
    """`plan`: one entry per (row, backbone, seed): {"row": {flag: bool}, "backbone": name,
    "scores": path} and, with `ablation.seeds`, "seed": N. Without seeds one value per backbone
    and metric; with them the mean over the seeds, `<backbone> <metric> sd` (sample standard
    deviation, ddof 1) and a `seeds` column."""
    return _table(*_per_seed(kind, plan, samples, elements, split, tau))


def _table(rows: dict, values: dict, seeds: dict) -> pd.DataFrame:
    table = []
    for flags, row in rows.items():
        out = dict(row)
        for column, by_seed in values[flags].items():
            found = list(by_seed.values())
            out[column] = float(np.mean(found))
            if flags in seeds:
                out[f"{column} sd"] = float(np.std(found, ddof=1)) if len(found) > 1 else float("nan")
        if flags in seeds:
            out["seeds"] = " ".join(map(str, sorted(seeds[flags])))
        table.append(out)
    return pd.DataFrame(table)


def _label(row: dict) -> str:
    on = [f for f, v in row.items() if v]
    return "+".join(on) if on else "base"


def _effect(before: dict, after: dict) -> dict:
    """The change from `before` to `after` ({seed: value}), paired by seed."""
    from scipy.stats import ttest_rel

    common = sorted(set(before) & set(after), key=lambda x: (x is None, x))
    a = np.array([before[k] for k in common])
    b = np.array([after[k] for k in common])
    diff = b - a
    out = {"effect": float(np.mean(diff)), "sd": float("nan"), "seeds": len(common), "p": float("nan")}
    if not np.isfinite(diff).all():  # a metric without a value (SRCC of constant predictions)
        return {**out, "verdict": "undefined"}
    if len(common) < 2:
        return {**out, "verdict": "one seed"}
    out["sd"] = float(np.std(diff, ddof=1))
    if out["sd"] == 0:  # no spread: a t-test is undefined; an exact tie or a constant change
        return {**out, "verdict": "within noise" if out["effect"] == 0 else ("holds" if out["effect"] > 0 else "reversed")}
    out["p"] = float(ttest_rel(b, a).pvalue)
    verdict = "within noise" if out["p"] >= SIGNIFICANCE else ("holds" if out["effect"] > 0 else "reversed")
    return {**out, "verdict": verdict}


def ablation_effects(kind: str, plan: list[dict], samples: Path, elements: Path, split: str, tau: float) -> pd.DataFrame:
    """One row per (component, pair of rows, model, metric): the effect of switching the component
    on (every pair of rows that differ in that switch alone), paired by seed; in Table 4 also
    ensembling (the ensemble minus the mean of its members, per row). Every effect the paper
    reports is an improvement, so the paper's direction is "+" throughout."""
    return _effects(kind, *_per_seed(kind, plan, samples, elements, split, tau)[:2])


def _effects(kind: str, rows: dict, values: dict) -> pd.DataFrame:
    out = []
    for before in rows:
        for after in rows:
            changed = [i for i, (x, y) in enumerate(zip(before, after)) if x != y]
            if len(changed) != 1 or before[changed[0]]:
                continue
            for column in values[before]:
                if column in values[after]:
                    model, metric = column.rsplit(" ", 1)
                    out.append({"component": list(rows[after])[changed[0]], "from": _label(rows[before]),
                                "to": _label(rows[after]), "model": model, "metric": metric,
                                **_effect(values[before][column], values[after][column])})
    if kind == "overall":
        for flags, columns in values.items():
            for metric in ("srcc", "plcc"):
                members = [c for c in columns if c.endswith(f" {metric}") and not c.startswith(f"{ENSEMBLE} ")]
                if f"{ENSEMBLE} {metric}" not in columns:
                    continue
                seeds = set.intersection(*(set(columns[c]) for c in members))
                mean = {k: float(np.mean([columns[c][k] for c in members])) for k in seeds}
                out.append({"component": "ensembling", "from": "mean of members", "to": _label(rows[flags]),
                            "model": ENSEMBLE, "metric": metric, **_effect(mean, columns[f"{ENSEMBLE} {metric}"])})
    columns = ["component", "from", "to", "model", "metric", "effect", "sd", "seeds", "p", "verdict"]
    return pd.DataFrame(out, columns=columns)


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
    p.add_argument("--effects", type=Path,
                   help="also a TSV of each component's effect, paired by seed, with its spread and verdict")
    p.set_defaults(func=_run)


def _run(args) -> int:
    rows, values, seeds = _per_seed(args.kind, json.loads(args.plan), args.samples, args.elements, args.split, args.tau)
    table = _table(rows, values, seeds)
    write_text(table.to_csv(sep="\t", index=False, float_format="%.4f"), args.out)
    print(table.to_string(index=False))
    if args.effects:
        effects = _effects(args.kind, rows, values)
        write_text(effects.to_csv(sep="\t", index=False, float_format="%.4f"), args.effects)
        print(effects.to_string(index=False))
    return 0
