"""`imatch score`: score new image-prompt pairs with a trained ensemble, as a T2I team would.

Input: a folder of images and a prompts file (CSV or JSON records with `image`, `prompt` and
optionally `elements`, a list of element keys like "red car (object)" or a `;`-separated string).
The models are the final-round overall and element models found in a results folder. As in the
workflow (Eq. 9-10): the element models rate each listed element, their mean expected level is
stated in the overall query, the overall models give the total score; everything is averaged over
models. Output: a table (`scores.csv`: total score per image, hit and expected level per element)
and a short HTML summary with the images.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import archs, levels
from imatch.atomic import write_text
from imatch.errors import InputError
from imatch.ingest import split_element_key
from imatch.instructions import build_element, build_overall


def read_prompts(path: Path, images: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.read_json(path) if path.suffix == ".json" else pd.read_csv(path)
    for column in ("image", "prompt"):
        if column not in table:
            raise InputError(path, f"missing column {column!r}")
    samples, elements = [], []
    for i, row in table.iterrows():
        image = images / str(row["image"])
        if not image.is_file():
            raise InputError(path, f"image not found: {image}", f"row {i}")
        samples.append({"img_path": str(row["image"]), "prompt_id": str(i), "prompt": row["prompt"],
                        "prompt_type": row.get("prompt_type", "real"), "split": "test", "total_score": np.nan,
                        "prompt_meaningless": np.nan, "split_confidence": np.nan, "attribute_confidence": np.nan,
                        "image": str(image.resolve())})
        keys = row.get("elements", [])
        keys = [k.strip() for k in keys.split(";")] if isinstance(keys, str) else list(keys if keys is not None else [])
        for key in filter(None, keys):
            parts = split_element_key(key)
            if parts is None:
                raise InputError(path, f"element {key!r} has no ' (<category>)' suffix", f"row {i}")
            elements.append({"img_path": str(row["image"]), "element": key, "phrase": parts[0], "category": parts[1],
                             "score": np.nan})
    return pd.DataFrame(samples), pd.DataFrame(elements, columns=["img_path", "element", "phrase", "category", "score"])


def find_models(results: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Final-round models per task: {task: [(folder, training record)]}."""
    found: dict[str, list] = {"overall": [], "element": []}
    for task in found:
        folders = sorted(f for f in results.glob(f"models/*/{task}-r*") if f.is_dir())  # not the .prov.json
        final = max((int(f.name.rsplit("-r", 1)[1]) for f in folders), default=None)
        for folder in folders:
            if int(folder.name.rsplit("-r", 1)[1]) == final and (folder / "training.json").is_file():
                found[task].append((folder, json.loads((folder / "training.json").read_text())))
    if not found["overall"]:
        raise InputError(results, "no trained overall models under models/*/overall-r*")
    return found


def _settings(record: dict) -> dict:
    """Query settings the model was trained with, read back from its training set's record."""
    sidecar = Path(record["dataset"][0] if isinstance(record["dataset"], list) else record["dataset"])
    sidecar = sidecar.with_suffix(".parquet.json")
    return json.loads(sidecar.read_text())["settings"] if sidecar.is_file() else {}


def _max_pixels(record: dict) -> int | None:
    cmd = record.get("swift_command", [])
    return int(cmd[cmd.index("--max_pixels") + 1]) if "--max_pixels" in cmd else None


def _max_tiles(record: dict) -> int | None:
    """The tile budget the model was trained with (None: the architecture's default)."""
    return (record.get("image_budget") or {}).get("max_tiles")


def _score(models, table: pd.DataFrame, task: str, device: str, dtype: str, batch_size: int) -> np.ndarray:
    import os

    from imatch.score import ScoringError, load, score_table

    expected = []
    for folder, record in models:
        arch = archs.get(record["arch"])
        max_pixels = _max_pixels(record)  # the image budget the model was trained with
        os.environ.update(arch.env)
        if max_pixels:
            os.environ["MAX_PIXELS"] = str(max_pixels)
        model, processor, template = load(folder, arch, device=device, dtype=dtype, base=Path(record["base_model"]),
                                          max_pixels=max_pixels, max_tiles=_max_tiles(record))
        try:
            out = score_table(table, model, processor, template, task=task, batch_size=batch_size,
                              tau=levels.DEFAULT_TAU)
        except ScoringError as exc:  # a diverged model: named, nothing written
            raise InputError(folder, f"scoring {task} queries: {exc}") from None
        expected.append(out["expected_level"].to_numpy())
    return np.mean(expected, axis=0)


def score_new(images: Path, prompts: Path, results: Path, out: Path, *, device: str, dtype: str, batch_size: int,
              tau: float) -> pd.DataFrame:
    samples, elements = read_prompts(prompts, images)
    models = find_models(results)
    el_rows = pd.DataFrame()
    levels_table = None
    if len(elements) and models["element"]:
        settings = _settings(models["element"][0][1])
        el_q = build_element(samples, elements, "test", metadata=settings.get("metadata", []),
                             prompt_type=settings.get("prompt_type", False))
        el_q["expected_level"] = _score(models["element"], el_q, "element", device, dtype, batch_size)
        el_q["hit"] = levels.is_hit(el_q["expected_level"], tau)
        el_rows = el_q[["img_path", "element", "expected_level", "hit"]]
        levels_table = out / "element_levels.parquet"
        out.mkdir(parents=True, exist_ok=True)
        el_rows.assign(level=np.clip(levels.round_half_up(el_rows["expected_level"]), 1, 7))[
            ["img_path", "element", "level"]].to_parquet(levels_table)
    settings = _settings(models["overall"][0][1])
    use_levels = settings.get("element_levels") is not None and levels_table is not None
    ov_q = build_overall(samples, elements, "test", metadata=settings.get("metadata", []),
                         element_levels=str(levels_table) if use_levels else None)
    ov_q["total_score"] = levels.level_to_total(_score(models["overall"], ov_q, "overall", device, dtype, batch_size))
    result = samples[["img_path", "prompt"]].merge(ov_q[["img_path", "total_score"]], on="img_path")
    out.mkdir(parents=True, exist_ok=True)
    write_text(result.to_csv(index=False), out / "scores.csv")
    if len(el_rows):
        write_text(el_rows.to_csv(index=False), out / "elements.csv")
    write_text(_html(result, el_rows, images), out / "summary.html")
    return result


def _html(result: pd.DataFrame, el_rows: pd.DataFrame, images: Path) -> str:
    rows = []
    for r in result.sort_values("total_score", ascending=False).itertuples():
        els = el_rows[el_rows["img_path"] == r.img_path] if len(el_rows) else el_rows
        items = "".join(f"<li>{'&#10003;' if e.hit else '&#10007;'} {html.escape(e.element)} "
                        f"(level {e.expected_level:.1f})</li>" for e in els.itertuples())
        rows.append(f"<tr><td><img src='{(images / r.img_path).resolve().as_uri()}' width=160></td>"
                    f"<td>{html.escape(r.prompt)}</td><td><b>{r.total_score:.2f}</b> / 5</td><td><ul>{items}</ul></td></tr>")
    return ("<html><head><meta charset='utf-8'><title>imatch scores</title></head><body>"
            "<h1>Image-text alignment (imatch ensemble)</h1><table border=1 cellpadding=4>"
            "<tr><th>image</th><th>prompt</th><th>alignment</th><th>elements</th></tr>"
            + "".join(rows) + "</table></body></html>\n")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("score", help="score new image-prompt pairs with a trained ensemble", description=__doc__)
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--prompts", type=Path, required=True, help="CSV or JSON: image, prompt[, elements, prompt_type]")
    p.add_argument("--models", type=Path, required=True, help="a results folder of the workflow (models/*/*-r*)")
    p.add_argument("--out", type=Path, required=True, help="folder for scores.csv, elements.csv, summary.html")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tau", type=float, default=levels.DEFAULT_TAU)
    p.set_defaults(func=_run)


def _run(args) -> int:
    result = score_new(args.images, args.prompts, args.models, args.out, device=args.device, dtype=args.dtype,
                       batch_size=args.batch_size, tau=args.tau)
    args.artifacts = [args.out]  # --images is the user's input: nothing is written beside it
    print(result.to_string(index=False))
    return 0
