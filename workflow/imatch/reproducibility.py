"""`imatch compare-runs`: are two runs' artifacts the same, and where not, by how much do they differ?

Used for the determinism claims: two CPU runs of the same configuration must agree byte for byte
on every deterministic artifact (tables of every stage, metrics, submissions); two GPU runs may
not (non-deterministic kernels in training and scoring), and the table says by how much each
stage's numbers move. Tables are compared after the run folders' absolute paths are cut out of
their text (image columns hold absolute paths; a copied run still names the original); provenance records, logs, benchmarks and hidden
files hold times and are not compared. Model folders are compared by tensor values
(safetensors), since the training records beside them hold wall times.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch.atomic import write_text

STAGES = ("data", "instructions", "models", "scores", "element_levels", "pseudo", "predictions", "metrics")


def _files(results: Path, stages) -> dict[str, Path]:
    out = {}
    for stage in stages:
        for path in sorted((results / stage).rglob("*")):
            rel = path.relative_to(results)
            if not path.is_file() or path.name.endswith(".prov.json") or any(p.startswith(".") for p in rel.parts):
                continue  # provenance records hold times; hidden files are caches (mtime stamps)
            if stage == "models" and path.suffix != ".safetensors":
                continue  # the weights; training records beside them hold wall times
            out[rel.as_posix()] = path
    return out


def _unrooted(text: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        text = text.replace(root, "<run>")
    return text


def _table(path: Path, roots: tuple[str, ...]) -> pd.DataFrame:
    table = pd.read_parquet(path)
    for column in table.columns:
        if pd.api.types.is_string_dtype(table[column]) or table[column].dtype == object:
            table[column] = [_unrooted(v, roots) if isinstance(v, str) else v for v in table[column]]
    return table


def _canonical(path: Path, roots: tuple[str, ...]) -> bytes:
    """The artifact's bytes with the run folders' paths replaced, parquet re-encoded after that."""
    if path.suffix == ".parquet":
        buffer = io.BytesIO()
        _table(path, roots).to_parquet(buffer)
        return buffer.getvalue()
    data = path.read_bytes()
    for root in roots:
        data = data.replace(root.encode(), b"<run>")
    return data


def _numbers(value) -> list[float]:
    """Every number in a table cell or JSON value (lists, arrays and dicts flattened)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [x for v in value for x in _numbers(v)]
    if value is None:
        return []
    if isinstance(value, (bool, np.bool_)):  # a flipped hit counts as a difference of 1
        return [float(value)]
    if isinstance(value, (int, float, np.integer, np.floating)):
        return [float(value)]
    return []


def _column_diffs(x: pd.DataFrame, y: pd.DataFrame) -> dict[str, tuple[float, int, int]] | None:
    """{column: (max |difference|, rows that differ, rows)} over the numeric columns (list cells
    flattened) of two tables of the same shape whose other columns are equal; None when they
    differ in more than numbers."""
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return None
    out = {}
    for column in x.columns:
        nx, ny = [_numbers(v) for v in x[column]], [_numbers(v) for v in y[column]]
        if not any(nx) or any(len(p) != len(q) for p, q in zip(nx, ny)):
            if x[column].astype(str).tolist() != y[column].astype(str).tolist():
                return None
            continue
        per_row = [float(np.nanmax(np.abs(np.subtract(p, q)), initial=0)) if p else 0.0 for p, q in zip(nx, ny)]
        out[column] = (max(per_row, default=0.0), sum(d > 0 for d in per_row), len(per_row))
    return out


def _diffs(a: Path, b: Path, roots: tuple[str, ...]) -> dict[str, tuple[float, int, int]] | None:
    """Per part (table column, tensors, JSON numbers) of two artifacts of the same shape: (largest
    absolute difference, rows that differ, rows); None when they differ in more than numbers."""
    if a.suffix == ".safetensors":
        from safetensors.numpy import load_file

        ta, tb = load_file(str(a)), load_file(str(b))
        if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
            return None
        worst = max((float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)), initial=0)) for k in ta),
                    default=0.0)
        return {"tensors": (worst, int(worst > 0), 1)}
    if a.suffix == ".parquet":
        return _column_diffs(_table(a, roots), _table(b, roots))
    if a.suffix == ".tsv":
        return _column_diffs(pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t"))
    if a.suffix == ".json":
        x, y = _numbers(json.loads(a.read_text())), _numbers(json.loads(b.read_text()))
        return {"numbers": (float(np.max(np.abs(np.subtract(x, y)), initial=0)), 1, 1)} if len(x) == len(y) else None
    return None


def compare(results_a: Path, results_b: Path, stages=STAGES) -> pd.DataFrame:
    """One row per artifact of either run: identical, differs (max |difference| of its numbers,
    NaN when more than numbers differ; `detail`: the parts that moved, largest first) or present
    in one run only."""
    results_a, results_b = Path(results_a), Path(results_b)
    roots = tuple(sorted({str(r.resolve().parent) for r in (results_a, results_b)}, key=len, reverse=True))
    fa, fb = _files(results_a, stages), _files(results_b, stages)
    rows = []
    for rel in sorted(fa.keys() | fb.keys()):
        row = {"artifact": rel, "stage": rel.split("/", 1)[0], "status": "", "max_abs_diff": np.nan, "detail": ""}
        if rel not in fb or rel not in fa:
            row["status"] = "only in " + ("a" if rel in fa else "b")
        elif _canonical(fa[rel], roots) == _canonical(fb[rel], roots):
            row["status"], row["max_abs_diff"] = "identical", 0.0
        else:
            diffs = _diffs(fa[rel], fb[rel], roots)
            row["status"] = "differs"
            if diffs is not None:
                row["max_abs_diff"] = max((d[0] for d in diffs.values()), default=0.0)
                moved = sorted(((d, k) for k, d in diffs.items() if d[0] > 0), reverse=True)
                row["detail"] = ", ".join(f"{k} {d:.3g}" + (f" ({n}/{rows} rows)" if rows > 1 else "")
                                          for (d, n, rows), k in moved)
            else:
                row["detail"] = "differs in more than numbers"
        rows.append(row)
    return pd.DataFrame(rows, columns=["artifact", "stage", "status", "max_abs_diff", "detail"])


def by_stage(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage: artifacts compared, how many are identical, the largest numeric difference."""
    grouped = table.groupby("stage", sort=False)
    return pd.DataFrame({
        "artifacts": grouped.size(),
        "identical": grouped["status"].apply(lambda s: int((s == "identical").sum())),
        "max_abs_diff": grouped["max_abs_diff"].apply(lambda s: s.max(skipna=False)),
    }).reset_index()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compare-runs", help="compare the artifacts of two runs (determinism)",
                              description=__doc__)
    p.add_argument("a", type=Path, help="results/ folder of one run")
    p.add_argument("b", type=Path, help="results/ folder of the other run")
    p.add_argument("--stages", nargs="+", default=list(STAGES), help="folders of results/ to compare (default: all)")
    p.add_argument("--out", type=Path, help="write the per-artifact table here (.tsv)")
    p.add_argument("--require-identical", action="store_true", help="exit 1 unless every artifact is identical")
    p.set_defaults(func=_run)


def _run(args) -> int:
    table = compare(args.a, args.b, args.stages)
    if args.out:
        write_text(table.to_csv(sep="\t", index=False), args.out)
    print(by_stage(table).to_string(index=False))
    different = table[table["status"] != "identical"]
    if len(different):
        print(f"\n{len(different)} of {len(table)} artifacts are not identical, e.g.:")
        print(different.head(10).to_string(index=False))
    return 1 if args.require_identical and len(different) else 0
