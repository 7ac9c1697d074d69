"""Stages `submission` and `ground-truth`: tables -> the official Track 1 JSON format.

`submission` turns a predictions table into `submission.zip` (`output.json` + `readme.txt`), as
the challenge server expects. `ground-truth` writes a labelled split in the same format as
eval.json, so every labelled split (holdout, val) is scored by the one official scorer.
Both check row counts against the ingested split: one record per image and every element key
exactly as given, or a clear error.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd

from imatch.atomic import atomic_path, write_json
from imatch.ensemble import check_range
from imatch.errors import InputError

ZIP_TIME = (1980, 1, 1, 0, 0, 0)
README_TEMPLATE = """runtime per image [s] : {runtime:.4f}
CPU[1] / GPU[0] : {cpu}
Extra Data [1] / No Extra Data [0] : {extra_data}
LLM[1] / Non-LLM[0] : {llm}
Other description : {description}
"""


def _split_tables(samples: Path, elements: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    s = pd.read_parquet(samples)
    s = s[s["split"] == split]
    if s.empty:
        raise InputError(samples, f"split {split!r} has no images")
    e = pd.read_parquet(elements)
    e = e[e["img_path"].isin(s["img_path"])]
    return s, e


def records(samples: pd.DataFrame, elements: pd.DataFrame, totals: pd.Series, element_scores: pd.Series) -> list[dict]:
    """Official records in img_path order; `totals` by img_path, `element_scores` by (img_path, element)."""
    by_img = {img: grp for img, grp in elements.groupby("img_path", sort=False)}
    out = []
    for row in samples.sort_values("img_path").itertuples(index=False):
        grp = by_img.get(row.img_path)
        keys = [] if grp is None else grp["element"].tolist()
        out.append({
            "prompt": row.prompt,
            "img_path": row.img_path,
            "total_score": float(totals[row.img_path]),
            "element_score": {k: float(element_scores[(row.img_path, k)]) for k in keys},
        })
    return out


def ground_truth(samples: Path, elements: Path, split: str, out: Path) -> int:
    s, e = _split_tables(samples, elements, split)
    unlabelled = s[s["total_score"].isna()]
    if len(unlabelled):
        raise InputError(samples, f"split {split!r} has {len(unlabelled)} unlabelled images", f"img_path={unlabelled['img_path'].iloc[0]!r}")
    if e["score"].isna().any():
        bad = e[e["score"].isna()].iloc[0]
        raise InputError(elements, f"split {split!r} has unlabelled elements", f"img_path={bad['img_path']!r} element={bad['element']!r}")
    recs = records(s, e, s.set_index("img_path")["total_score"], e.set_index(["img_path", "element"])["score"])
    write_json(recs, out, indent=None)
    return len(recs)


def _check_predictions(s, e, pred: pd.DataFrame, pred_el: pd.DataFrame, pred_path: Path, el_path: Path):
    if pred["img_path"].duplicated().any():
        raise InputError(pred_path, "duplicate img_path", f"img_path={pred.loc[pred['img_path'].duplicated(), 'img_path'].iloc[0]!r}")
    missing = sorted(set(s["img_path"]) - set(pred["img_path"]))
    if missing:
        raise InputError(pred_path, f"{len(missing)} images of the split have no prediction", f"img_path={missing[0]!r}")
    totals = pred.set_index("img_path")["total_score"]
    if totals.reindex(s["img_path"]).isna().any():
        raise InputError(pred_path, "total_score is null or NaN")
    check_range(totals.reindex(s["img_path"]), 1, 5, pred_path, "total_score")  # the judge's 1-5 scale
    if pred_el.duplicated(["img_path", "element"]).any():
        dup = pred_el[pred_el.duplicated(["img_path", "element"])].iloc[0]
        raise InputError(el_path, "duplicate element prediction", f"img_path={dup['img_path']!r} element={dup['element']!r}")
    scores = pred_el.set_index(["img_path", "element"])["score"]
    wanted = pd.MultiIndex.from_frame(e[["img_path", "element"]])
    absent = wanted.difference(scores.index)
    if len(absent):
        img, key = absent[0]
        raise InputError(el_path, f"{len(absent)} element keys have no prediction", f"img_path={img!r} element={key!r}")
    if scores.reindex(wanted).isna().any():
        raise InputError(el_path, "element score is null or NaN")
    check_range(scores.reindex(wanted), 0, 1, el_path, "element score")
    return totals, scores


def submission(samples: Path, elements: Path, split: str, predictions: Path, element_predictions: Path, out: Path,
               *, runtime: float, cpu: int, extra_data: int, llm: int, description: str) -> int:
    s, e = _split_tables(samples, elements, split)
    pred = pd.read_parquet(predictions)
    pred_el = pd.read_parquet(element_predictions)
    pred = pred[pred["img_path"].isin(s["img_path"])]
    pred_el = pred_el[pred_el["img_path"].isin(s["img_path"])]
    totals, scores = _check_predictions(s, e, pred, pred_el, predictions, element_predictions)
    recs = records(s, e, totals, scores)
    readme = README_TEMPLATE.format(runtime=runtime, cpu=cpu, extra_data=extra_data, llm=llm, description=description)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, text in (("output.json", json.dumps(recs, ensure_ascii=False)), ("readme.txt", readme)):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, text)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buf.getvalue())
    return len(recs)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("submission", help="predictions table -> official submission.zip", description=__doc__)
    p.add_argument("--samples", type=Path, required=True, help="samples.parquet from ingest")
    p.add_argument("--elements", type=Path, required=True, help="elements.parquet from ingest")
    p.add_argument("--split", required=True, help="split to submit (val, test, holdout)")
    p.add_argument("--predictions", type=Path, required=True, help="parquet with img_path, total_score")
    p.add_argument("--element-predictions", type=Path, required=True,
                   help="parquet with img_path, element, score (hit when >= 0.5)")
    p.add_argument("--out", type=Path, required=True, help="submission.zip to write")
    p.add_argument("--runtime", type=float, default=0.0, help="runtime per image [s] for readme.txt")
    p.add_argument("--cpu", type=int, choices=[0, 1], default=0, help="CPU[1] / GPU[0]")
    p.add_argument("--extra-data", type=int, choices=[0, 1], default=0, help="Extra Data [1] / No Extra Data [0]")
    p.add_argument("--llm", type=int, choices=[0, 1], default=1, help="LLM[1] / Non-LLM[0]")
    p.add_argument("--description", default="iMatch reproduction (imatch workflow)", help="Other description")
    p.set_defaults(func=_run_submission)

    g = subparsers.add_parser("ground-truth", help="labelled split -> official eval.json format", description=__doc__)
    g.add_argument("--samples", type=Path, required=True)
    g.add_argument("--elements", type=Path, required=True)
    g.add_argument("--split", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(func=_run_ground_truth)


def _run_submission(args) -> int:
    n = submission(args.samples, args.elements, args.split, args.predictions, args.element_predictions, args.out,
                   runtime=args.runtime, cpu=args.cpu, extra_data=args.extra_data, llm=args.llm,
                   description=args.description)
    print(f"wrote {args.out} with {n} records")
    return 0


def _run_ground_truth(args) -> int:
    n = ground_truth(args.samples, args.elements, args.split, args.out)
    print(f"wrote {args.out} with {n} records")
    return 0
