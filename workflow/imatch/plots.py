"""Stage `plots`: the figures of the Snakemake report.

- `scatter`: predicted vs true total score of each predictor on a labelled split (with SRCC/PLCC);
- `categories`: element accuracy by category (official >= 0.5 binarisation) for each predictor;
- `curves`: the training loss of every fine-tuned model (from its training.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch.atomic import atomic_path
from imatch.evaluate import HIT_THRESHOLD


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def _predictor_of(path: Path) -> str:
    return Path(path).parent.parent.name  # predictions/<predictor>/<split>/predictions.parquet


def scatter(samples: pd.DataFrame, predictions: list[Path], split: str, out: Path) -> None:
    from scipy.stats import pearsonr, spearmanr

    plt = _figure()
    truth = samples.set_index("img_path")["total_score"]
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.2 * len(predictions), 3.2), squeeze=False)
    for ax, path in zip(axes[0], predictions):
        pred = pd.read_parquet(path).set_index("img_path")["total_score"]
        y = truth.reindex(pred.index).to_numpy()
        ax.scatter(y, pred.to_numpy(), s=8, alpha=0.6)
        ax.plot([1, 5], [1, 5], lw=0.8, color="grey")
        ok = np.ptp(pred.to_numpy()) > 0 and len(y) > 2
        stats = f"SRCC {spearmanr(y, pred)[0]:.3f}  PLCC {pearsonr(y, pred)[0]:.3f}" if ok else "constant prediction"
        ax.set_title(f"{_predictor_of(path)}\n{stats}", fontsize=8)
        ax.set_xlabel(f"true total score ({split})", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.set_xlim(0.8, 5.2)
        ax.set_ylim(0.8, 5.2)
    _save(fig, out)
    plt.close(fig)


def categories(elements: pd.DataFrame, predictions: list[Path], split: str, out: Path) -> None:
    plt = _figure()
    truth = elements.set_index(["img_path", "element"])
    rows = []
    for path in predictions:
        pred = pd.read_parquet(path).set_index(["img_path", "element"])["score"]
        t = truth.reindex(pred.index)
        agree = (t["score"] >= HIT_THRESHOLD) == (pred >= HIT_THRESHOLD)
        acc = agree.groupby(t["category"].str.lower()).mean()
        rows.append(acc.rename(_predictor_of(path)))
    table = pd.concat(rows, axis=1).sort_index()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(table) * len(rows)), 3.2))
    table.plot.bar(ax=ax, width=0.8)
    ax.set_ylabel(f"element accuracy ({split})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, out)
    plt.close(fig)


def curves(records: list[Path], out: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path in records:
        path = Path(path) / "training.json" if Path(path).is_dir() else Path(path)
        record = json.loads(path.read_text())
        curve = record["loss_curve"]
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], lw=1,
                label=f"{Path(path).parent.parent.name}/{Path(path).parent.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    _save(fig, out)
    plt.close(fig)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plots", help="figures of the Snakemake report", description=__doc__)
    p.add_argument("kind", choices=["scatter", "categories", "curves"])
    p.add_argument("inputs", type=Path, nargs="+", help="predictions parquets (scatter, categories) or model folders / training.json files (curves)")
    p.add_argument("--samples", type=Path, help="samples.parquet (scatter)")
    p.add_argument("--elements", type=Path, help="elements.parquet (categories)")
    p.add_argument("--split", default="holdout")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.kind == "scatter":
        scatter(pd.read_parquet(args.samples), args.inputs, args.split, args.out)
    elif args.kind == "categories":
        categories(pd.read_parquet(args.elements), args.inputs, args.split, args.out)
    else:
        curves(args.inputs, args.out)
    print(f"wrote {args.out}")
    return 0
