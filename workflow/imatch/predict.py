"""`imatch score`: score new image-prompt pairs with a trained ensemble, as a T2I team would.

Input: a folder of images and a prompts file (CSV, JSON records or JSONL) with the columns `image`
(a file name in the folder) and `prompt`, and optionally `elements` (element keys like
"red car (object)", a list or a `;`-separated string; blank: none), `prompt_type` (real /
synthetic) and the query metadata the models were trained with (`prompt_meaningless`,
`split_confidence`, `attribute_confidence`; blank: unknown). One image may appear in several rows
with other prompts. Every row is checked (images decoded, prompts non-empty, element keys well
formed) before a model loads. The models: a bundle (`imatch export`) or a results folder.

Output, written only into --out (replaced as a whole): `scores.csv` (the input's columns in its
order, plus `total_score`), `elements.csv` (one row per input row and element: expected level,
hit) and `summary.html` (self-contained: thumbnails embedded, sortable). The scoring is
`imatch.Scorer`'s, also usable from Python.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

import pandas as pd

from imatch import prompts as prompt_text
from imatch.atomic import atomic_path
from imatch.errors import InputError

READERS = {".csv": lambda p: pd.read_csv(p, keep_default_na=False, na_values=[""]),
           ".json": lambda p: pd.read_json(p, orient="records", dtype=False),
           ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False)}


def read_prompts(path: Path) -> pd.DataFrame:
    """The prompts table, or an error naming the file: unknown format, empty, missing columns."""
    path = Path(path)
    if path.suffix.lower() not in READERS:
        raise InputError(path, f"prompts must be {', '.join(READERS)}, not {path.suffix or 'a file without suffix'}")
    if not path.is_file():
        raise InputError(path, "prompts file not found")
    try:
        table = READERS[path.suffix.lower()](path)
    except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise InputError(path, f"not readable as {path.suffix.lower()[1:].upper()}: {str(exc).splitlines()[0]}") from None
    for column in ("image", "prompt"):
        if column not in table:
            raise InputError(path, f"missing column {column!r} (columns: {list(table.columns)})")
    if table.empty:
        raise InputError(path, "no rows to score")
    return table.reset_index(drop=True)


def score_files(images: Path, prompts: Path, models: Path, *, device: str = "auto", dtype: str | None = None,
                batch_size: int = 8, verbose: bool = False, share_prefix: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, elements) of a prompts file; the inputs are checked before the models load."""
    from imatch.scorer import Scorer, check_inputs

    table = read_prompts(prompts)
    paths = [Path(images) / str(name) for name in table["image"]]
    metadata = {f: [None if pd.isna(v) else v for v in table[f]] for f in prompt_text.METADATA_FIELDS if f in table}
    types = [v if isinstance(v, str) and v else "real" for v in table["prompt_type"]] if "prompt_type" in table else None
    samples, element_rows = check_inputs(paths, table["prompt"].tolist(),
                                         table["elements"].tolist() if "elements" in table else None,
                                         prompt_types=types, metadata=metadata, label=str(prompts))
    scorer = Scorer(models, device=device, dtype=dtype, batch_size=batch_size, verbose=verbose, share_prefix=share_prefix)
    result = scorer.score(samples, element_rows, images=paths)
    scores = table.copy()
    scores["total_score"] = result["total_score"].to_numpy()
    elements = pd.DataFrame([{"row": i, "image": table["image"][i], "element": e["element"],
                              "expected_level": e["expected_level"], "hit": e["hit"]}
                             for i, els in enumerate(result["elements"]) for e in els],
                            columns=["row", "image", "element", "expected_level", "hit"])
    return scores, elements


def _thumbnail(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((192, 192))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


SORT_SCRIPT = """
for (const th of document.querySelectorAll('th[data-sort]')) th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], i = th.cellIndex, num = th.dataset.sort === 'num';
  const dir = th.dataset.dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
  const key = r => num ? parseFloat(r.cells[i].dataset.value) : r.cells[i].textContent;
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (dir === 'asc' ? 1 : -1))
    .forEach(r => body.appendChild(r));
});"""


def summary_html(scores: pd.DataFrame, elements: pd.DataFrame, images: Path) -> str:
    """One self-contained page: thumbnails embedded, file names, scores, element hits; sortable."""
    rows = []
    by_row = {i: g for i, g in elements.groupby("row")} if len(elements) else {}
    for i, r in scores.iterrows():
        els = by_row.get(i)
        items = "".join(f"<li class='{'hit' if e.hit else 'miss'}'>{'&#10003;' if e.hit else '&#10007;'} "
                        f"{html.escape(e.element)} <small>(level {e.expected_level:.2f})</small></li>"
                        for e in els.itertuples()) if els is not None else ""
        hits = f"{int(els['hit'].sum())}/{len(els)}" if els is not None else ""
        rows.append(f"<tr><td data-value='{i}'>{i}</td>"
                    f"<td><img alt='{html.escape(str(r['image']))}' src='{_thumbnail(Path(images) / str(r['image']))}'></td>"
                    f"<td>{html.escape(str(r['image']))}</td><td>{html.escape(str(r['prompt']))}</td>"
                    f"<td data-value='{r['total_score']:.6f}'><b>{r['total_score']:.2f}</b></td>"
                    f"<td data-value='{els['hit'].mean() if els is not None else -1}'>{hits}<ul>{items}</ul></td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>imatch scores</title><style>"
            "body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px;"
            "vertical-align:top} th[data-sort]{cursor:pointer} .hit{color:#060} .miss{color:#a00} ul{margin:0}"
            "</style></head><body><h1>Image-text alignment (imatch ensemble)</h1>"
            "<p>Total score: 1 (no match) to 5 (perfect match), the ensemble's expected score. Elements: "
            "&#10003; present (expected level above tau), &#10007; not. Click a column header to sort.</p>"
            "<table><thead><tr><th data-sort='num'>row</th><th>image</th><th data-sort='text'>file</th>"
            "<th data-sort='text'>prompt</th><th data-sort='num'>total score</th><th data-sort='num'>elements</th>"
            "</tr></thead><tbody>" + "".join(rows) + f"</tbody></table><script>{SORT_SCRIPT}</script></body></html>\n")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score new image-prompt pairs with a trained ensemble", description=__doc__)
    p.add_argument("--images", type=Path, required=True, help="folder the prompts file's `image` names are in")
    p.add_argument("--prompts", type=Path, required=True,
                   help="CSV, JSON or JSONL: image, prompt[, elements, prompt_type, metadata columns]")
    p.add_argument("--models", type=Path, required=True,
                   help="a bundle from `imatch export`, or a results folder of the workflow")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for scores.csv, elements.csv, summary.html (replaced as a whole)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="model precision (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="queries per forward pass (default: %(default)s)")
    p.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="element queries of an image in one packed sequence, its image and prompt encoded once "
                        "(the same probabilities; --batch-size then counts images for them)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ms-swift's and transformers' logs")
    p.set_defaults(func=_run)


def _run(args) -> int:
    scores, elements = score_files(args.images, args.prompts, args.models, device=args.device, dtype=args.dtype,
                                   batch_size=args.batch_size, verbose=args.verbose, share_prefix=args.share_prefix)
    with atomic_path(args.out, directory=True) as tmp:  # no file of an earlier run survives
        scores.to_csv(tmp / "scores.csv", index=False)
        elements.to_csv(tmp / "elements.csv", index=False)
        (tmp / "summary.html").write_text(summary_html(scores, elements, args.images), encoding="utf-8")
    args.artifacts = [args.out]  # --images is the user's input: nothing is written beside it
    from imatch import bundle  # read: the prompts, the images, the bundle or the models of a results folder

    models = [args.models] if (args.models / bundle.BUNDLE).is_file() else bundle.sources(bundle.describe(args.models))
    args.sources = [args.prompts, args.images, *models]
    print(json.dumps({"images": len(scores), "elements": len(elements), "out": str(args.out)}))
    return 0
