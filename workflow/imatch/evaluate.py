"""Stage `evaluate`: score predictions exactly as the NTIRE 2025 Track 1 judge does.

Official semantics (the challenge's evaluate.py, see README "Scoring"):
- ground truth and submission are both sorted by `img_path` and paired by position (this
  implementation refuses mismatched image sets instead of silently misaligning them);
- SRCC = scipy.stats.spearmanr on total scores;
- PLCC = Pearson after a 4-parameter logistic fit. The official script passes its arguments
  swapped, so the logistic is fitted FROM the ground truth TO the predictions, with
  p0 = [max(pred), min(pred), mean(gt), std(gt)], and PLCC = pearson(pred, f(gt)). We implement
  that and name it `plcc`; the textbook direction (pred -> gt) is reported as `plcc_pred_to_gt`;
- ACC pools every (image, element) pair of the ground truth (micro average), binarises ground
  truth and prediction with >= 0.5 and counts agreements;
- final = SRCC/4 + PLCC/4 + ACC/2.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np

from imatch.atomic import write_json
from imatch.errors import InputError, record_label

HIT_THRESHOLD = 0.5  # official binarisation of element scores (>=)
# The judge passes maxfev=1e8: on some predictions (tiny or huge totals) MINPACK never converges and
# runs for hours, then raises. Realistic fits need < 1e5 evaluations; past this cap PLCC is undefined.
MAXFEV = 10**6


def _finite(v) -> bool:
    """A JSON number usable as a float: not a bool, NaN, +-Infinity or an int beyond float range."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def logistic(x, b1, b2, b3, b4):
    """The judge's 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    return (b1 - b2) / (1.0 + np.exp(-(x - b3) / np.abs(b4))) + b2


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import OptimizeWarning, curve_fit  # scipy is slow to import: only when scoring

    p0 = [np.max(y), np.min(y), np.mean(x), np.std(x)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            popt, _ = curve_fit(logistic, x, y, p0=p0, maxfev=MAXFEV)
        except RuntimeError:  # no convergence within MAXFEV evaluations
            return np.full(len(x), np.nan)  # -> PLCC NaN
    return logistic(x, *popt)


def plcc_official(gt: np.ndarray, pred: np.ndarray) -> float:
    """PLCC as the judge computes it: logistic fitted gt -> pred, pearson(pred, f(gt))."""
    from scipy.stats import pearsonr

    return float(pearsonr(pred, _fit_logistic(gt, pred))[0])


def plcc_pred_to_gt(gt: np.ndarray, pred: np.ndarray) -> float:
    """PLCC in the usual IQA direction (logistic fitted pred -> gt), for reference."""
    from scipy.stats import pearsonr

    return float(pearsonr(gt, _fit_logistic(pred, gt))[0])


def element_accuracy(gt_elements: list[dict], pred_elements: list[dict]) -> tuple[float, int]:
    """Micro-averaged agreement of (gt >= 0.5) and (pred >= 0.5) over all gt element keys."""
    agree = total = 0
    for gt, pred in zip(gt_elements, pred_elements):
        for key, value in gt.items():
            agree += (value >= HIT_THRESHOLD) == (pred[key] >= HIT_THRESHOLD)
            total += 1
    return (agree / total if total else float("nan")), total


def _nan_to_none(x: float):
    return None if x is None or math.isnan(x) else x


def score(gt_records: list[dict], pred_records: list[dict], *, gt_path="ground truth", pred_path="predictions") -> dict:
    gt = sorted(gt_records, key=lambda r: r["img_path"])
    pred = sorted(pred_records, key=lambda r: r["img_path"])
    gt_imgs = [r["img_path"] for r in gt]
    pred_imgs = [r["img_path"] for r in pred]
    if gt_imgs != pred_imgs:
        only_gt = sorted(set(gt_imgs) - set(pred_imgs))
        only_pred = sorted(set(pred_imgs) - set(gt_imgs))
        raise InputError(
            pred_path,
            f"image set differs from {gt_path}: {len(only_gt)} missing (e.g. {only_gt[:3]}), "
            f"{len(only_pred)} unexpected (e.g. {only_pred[:3]})"
            + ("" if only_gt or only_pred else "; duplicate img_path entries"),
        )
    for g, p in zip(gt, pred):
        missing = [k for k in g["element_score"] if k not in p["element_score"]]
        if missing:
            raise InputError(pred_path, f"missing element keys {missing}", f"img_path={g['img_path']!r}")
    y = np.array([r["total_score"] for r in gt], dtype=float)
    x = np.array([r["total_score"] for r in pred], dtype=float)
    # correlation undefined for constant scores; the 4-parameter logistic needs >= 4 images
    # (curve_fit raises TypeError on fewer points)
    if len(y) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        srcc = plcc = plcc_rev = float("nan")
    else:
        from scipy.stats import spearmanr

        srcc = float(spearmanr(y, x)[0])
        plcc = plcc_official(y, x)
        plcc_rev = plcc_pred_to_gt(y, x)
    acc, n_elements = element_accuracy([r["element_score"] for r in gt], [r["element_score"] for r in pred])
    final = srcc / 4 + plcc / 4 + acc / 2
    if math.isnan(final):  # the judge's NaN; reported as null, but never silently
        undefined = ", ".join(k for k, v in (("SRCC", srcc), ("PLCC", plcc), ("ACC", acc)) if math.isnan(v))
        warnings.warn(f"{pred_path}: final score undefined ({undefined} undefined: fewer than 4 images, constant "
                      "total scores, a flat or non-converging logistic fit, or no elements); reported as null", stacklevel=2)
    return {
        "srcc": _nan_to_none(srcc),
        "plcc": _nan_to_none(plcc),
        "acc": _nan_to_none(acc),
        "final": _nan_to_none(final),
        "plcc_pred_to_gt": _nan_to_none(plcc_rev),
        "n_images": len(gt),
        "n_elements": n_elements,
    }


def load_official(path: Path) -> list[dict]:
    """Read an official-format list (eval.json, output.json, or submission.zip holding output.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if Path(n).name == "output.json"]
            if len(names) != 1:
                raise InputError(path, "submission zip must contain exactly one output.json")
            text = zf.read(names[0]).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise InputError(path, f"expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        label = record_label(i, rec)
        if not isinstance(rec, dict):
            raise InputError(path, "expected a JSON object", label)
        if not isinstance(rec.get("img_path"), str):
            raise InputError(path, "missing required field 'img_path'", label)
        value = rec.get("total_score")
        if not _finite(value):
            raise InputError(path, f"total_score must be a finite number, got {value!r}", label)
        elements = rec.get("element_score")
        if not isinstance(elements, dict):
            raise InputError(path, "missing required field 'element_score'", label)
        for key, v in elements.items():
            if not _finite(v):
                raise InputError(path, f"element_score[{key!r}] must be a finite number, got {v!r}", label)
    return data


def evaluate(gt_path: Path, pred_path: Path) -> dict:
    return score(load_official(gt_path), load_official(pred_path), gt_path=str(gt_path), pred_path=str(pred_path))


def evaluate_predictors(gt: Path, samples: Path, elements: Path, split: str, predictions: list[Path]) -> dict:
    """Metrics of several predictors on one labelled split. Each predictions table
    (`<predictor>/<split>/predictions.parquet`, element_predictions.parquet beside it) goes through
    the official submission format and the judge above, exactly as `submission` + `evaluate` would."""
    import tempfile

    from imatch.submission import submission

    metrics = {}
    with tempfile.TemporaryDirectory(prefix="imatch-eval-") as tmp:
        for path in map(Path, predictions):
            name = path.parent.parent.name
            if path.parent.name != split:
                raise InputError(path, f"is not a prediction of the {split} split")
            if name in metrics:
                raise InputError(path, f"predictor {name!r} given twice")
            zipped = Path(tmp) / f"{name}.zip"
            submission(samples, elements, split, path, path.with_name("element_predictions.parquet"), zipped,
                       runtime=0.0, cpu=0, extra_data=0, llm=1, description=name)
            metrics[name] = evaluate(gt, zipped)
    return {"split": split, "predictors": metrics}


def metrics_table(paths: list[Path]) -> "pd.DataFrame":
    """Collect `<...>/metrics/<split>.json` files (one entry per predictor) into one table."""
    import pandas as pd

    rows = []
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        rows += [{"predictor": name, "split": data["split"], **m} for name, m in data["predictors"].items()]
    return pd.DataFrame(rows).sort_values(["split", "predictor"], kind="stable").reset_index(drop=True)


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("metrics-table", help="collect metrics JSON files into one TSV table",
                              description=metrics_table.__doc__)
    t.add_argument("metrics", type=Path, nargs="+", help="metrics/<split>.json files")
    t.add_argument("--out", type=Path, required=True, help="TSV to write")
    t.add_argument("--html", type=Path, help="also an HTML page of the table (shown in the Snakemake report)")
    t.set_defaults(func=_run_table)

    p = subparsers.add_parser("evaluate", help="score predictions like the official Track 1 judge", description=__doc__)
    p.add_argument("--gt", type=Path, required=True, help="ground truth in the official format (eval.json)")
    p.add_argument("--pred", type=Path, required=True, help="output.json or submission.zip")
    p.add_argument("--out", type=Path, help="also write the metrics JSON here")
    p.set_defaults(func=_run)

    m = subparsers.add_parser("evaluate-predictors", help="metrics of several predictors on one labelled split",
                              description=evaluate_predictors.__doc__)
    m.add_argument("predictions", type=Path, nargs="+", help="<predictor>/<split>/predictions.parquet files")
    m.add_argument("--gt", type=Path, required=True, help="ground truth of the split (official format)")
    m.add_argument("--samples", type=Path, required=True, help="samples.parquet from ingest")
    m.add_argument("--elements", type=Path, required=True, help="elements.parquet from ingest")
    m.add_argument("--split", required=True)
    m.add_argument("--out", type=Path, required=True, help="metrics JSON: {split, predictors: {name: metrics}}")
    m.set_defaults(func=_run_predictors)


def _run_table(args) -> int:
    from imatch.atomic import write_text

    table = metrics_table(args.metrics)
    write_text(table.to_csv(sep="\t", index=False, float_format="%.4f"), args.out)
    if args.html:
        page = table.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="null", border=0)
        write_text("<!doctype html><html><head><meta charset='utf-8'><title>metrics</title><style>"
                   "body{font-family:sans-serif} td,th{padding:3px 8px;text-align:right} tr:nth-child(even){background:#f4f4f4}"
                   "</style></head><body><p>Official Track 1 metrics (PLCC: the judge's logistic fit; final = "
                   "SRCC/4 + PLCC/4 + ACC/2)</p>" + page + "</body></html>\n", args.html)
    print(table.to_string(index=False))
    return 0


def _run_predictors(args) -> int:
    metrics = evaluate_predictors(args.gt, args.samples, args.elements, args.split, args.predictions)
    write_json(metrics, args.out)
    print(json.dumps(metrics))
    return 0


def _run(args) -> int:
    metrics = evaluate(args.gt, args.pred)
    if args.out:
        write_json(metrics, args.out)
    print(json.dumps(metrics))
    return 0
