"""Stage `pseudo-labels`: validation set augmentation (paper Sec. 3.2.2, Eq. 8).

Round-1 predictions on the unlabelled validation split become its labels for round 2: the total
score is the ensemble's expected score, an element's score is (E[l] - 1) / 6, the value whose
Eq. 4 level is the rounded expected level. The output tables have the shape of ingest's, holding
only the val split, so the same `imatch instructions` builds the pseudo-labelled set that round 2
trains on together with the training set. Ground-truth labels of val, where they exist, are never
read: the pseudo labels come from the models alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch.atomic import write_parquet
from imatch.errors import InputError


def pseudo_label(samples: pd.DataFrame, elements: pd.DataFrame, predictions: pd.DataFrame,
                 element_predictions: pd.DataFrame, split: str = "val") -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = samples[samples["split"] == split].copy()
    totals = predictions.set_index("img_path")["total_score"]
    missing = sorted(set(rows["img_path"]) - set(totals.index))
    if missing:
        raise InputError("predictions", f"{len(missing)} {split} images have no prediction", f"img_path={missing[0]!r}")
    rows["total_score"] = np.clip(totals.reindex(rows["img_path"]).to_numpy(), 1, 5)
    rows["n_annotators"] = 0  # no human rated these
    els = elements[elements["img_path"].isin(rows["img_path"])].copy()
    expected = element_predictions.set_index(["img_path", "element"])["expected_level"]
    keys = pd.MultiIndex.from_frame(els[["img_path", "element"]])
    absent = keys.difference(expected.index)
    if len(absent):
        raise InputError("element predictions", f"{len(absent)} {split} elements have no prediction",
                         f"img_path={absent[0][0]!r} element={absent[0][1]!r}")
    els["score"] = np.clip((expected.reindex(keys).to_numpy() - 1) / 6, 0, 1)
    return rows.reset_index(drop=True), els.reset_index(drop=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pseudo-labels", help="round-1 predictions on val -> pseudo-labelled val tables",
                              description=__doc__)
    p.add_argument("--samples", type=Path, required=True, help="samples.parquet from ingest")
    p.add_argument("--elements", type=Path, required=True, help="elements.parquet from ingest")
    p.add_argument("--predictions", type=Path, required=True, help="val predictions (img_path, total_score)")
    p.add_argument("--element-predictions", type=Path, required=True,
                   help="val element predictions (img_path, element, expected_level)")
    p.add_argument("--out-samples", type=Path, required=True)
    p.add_argument("--out-elements", type=Path, required=True)
    p.set_defaults(func=_run)


def _run(args) -> int:
    rows, els = pseudo_label(pd.read_parquet(args.samples), pd.read_parquet(args.elements),
                             pd.read_parquet(args.predictions), pd.read_parquet(args.element_predictions))
    write_parquet(rows, args.out_samples)
    write_parquet(els, args.out_elements)
    print(json.dumps({"images": len(rows), "elements": len(els)}))
    return 0
