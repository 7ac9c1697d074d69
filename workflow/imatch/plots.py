"""Stage `plots`: the figures of the Snakemake report.

- `scatter`: predicted vs true total score of each predictor on a labelled split, with SRCC and the
  judge's PLCC (`imatch.evaluate.plcc_official`: the same number as the metrics table);
- `categories`: element accuracy by category (official >= 0.5 binarisation) for each predictor;
- `curves`: the training loss of every fine-tuned model (from its training.json), one panel per
  backbone so that no two curves of a panel share a colour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch.atomic import atomic_path
from imatch.evaluate import HIT_THRESHOLD, plcc_official


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


def scatter_stats(truth: np.ndarray, pred: np.ndarray) -> str:
    """The panel title's numbers: SRCC and the judge's PLCC, as in the metrics table."""
    from scipy.stats import spearmanr

    if not (np.ptp(pred) > 0 and len(truth) > 2):
        return "constant prediction"
    return f"SRCC {spearmanr(truth, pred)[0]:.3f}  PLCC {plcc_official(truth, pred):.3f} (judge's)"


def scatter(samples: pd.DataFrame, predictions: list[Path], split: str, out: Path) -> None:
    plt = _figure()
    truth = samples.set_index("img_path")["total_score"]
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.2 * len(predictions), 3.2), squeeze=False)
    for ax, path in zip(axes[0], predictions):
        pred = pd.read_parquet(path).set_index("img_path")["total_score"]
        y = truth.reindex(pred.index).to_numpy()
        ax.scatter(y, pred.to_numpy(), s=8, alpha=0.6)
        ax.plot([1, 5], [1, 5], lw=0.8, color="grey")
        ax.set_title(f"{_predictor_of(path)}\n{scatter_stats(y, pred.to_numpy())}", fontsize=8)
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
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the bars
    _save(fig, out)
    plt.close(fig)


def curves(records: list[Path], out: Path) -> None:
    plt = _figure()
    by_backbone: dict[str, list[tuple[str, list]]] = {}
    for path in records:
        path = Path(path) / "training.json" if Path(path).is_dir() else Path(path)
        record = json.loads(path.read_text())
        by_backbone.setdefault(path.parent.parent.name, []).append((path.parent.name, record["loss_curve"]))
    fig, axes = plt.subplots(1, len(by_backbone), figsize=(3.4 * len(by_backbone), 3.2), squeeze=False, sharey=True)
    for ax, (backbone, runs) in zip(axes[0], sorted(by_backbone.items())):
        for colour, (name, curve) in enumerate(sorted(runs)):  # at most 10 runs a panel: distinct colours
            ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], lw=1, color=f"C{colour % 10}", label=name)
        ax.set_title(backbone, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("training loss")
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
