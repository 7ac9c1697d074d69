"""Stage `ingest`: EvalMuse-40K files (HF layout) -> samples.parquet + elements.parquet.

Reads train_list.json (labelled), test.json (the validation inputs, labels joined from eval.json
when given) and optionally a final-test list; unpacks the split image zip once (skipped when the
parts are unchanged) or uses an images/ folder as it is; validates every record and image; carves
a labelled `holdout` split out of train by prompt_id (no prompt on both sides, deterministic by
seed). Any bad record stops the stage with an error naming the file and the record; nothing is
written unless everything is valid. Ground truth is the mean over annotators.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from imatch.atomic import atomic_path, write_json, write_parquet
from imatch.errors import InputError, record_label
from imatch.zipparts import safe_extract

SPLITS = ["train", "holdout", "val", "test"]
PROMPT_TYPES = {"real", "synthetic"}
REQUIRED_FIELDS = ("prompt_id", "prompt", "type", "img_path")
# The real files spell it "promt_meaningless"; accept both spellings.
MEANINGLESS_KEYS = ("promt_meaningless", "prompt_meaningless")
SAMPLE_COLUMNS = [
    "img_path", "prompt_id", "prompt", "prompt_type", "split", "total_score", "n_annotators",
    "prompt_meaningless", "split_confidence", "attribute_confidence", "image", "width", "height",
]
ELEMENT_COLUMNS = ["img_path", "element", "phrase", "category", "score"]
UNPACK_STAMP = ".imatch-unpacked.json"


# ----------------------------------------------------------------------------------------------
# JSON records
# ----------------------------------------------------------------------------------------------
def load_records(path: Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, list):
        raise InputError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def split_element_key(key: str) -> tuple[str, str] | None:
    """`"<phrase> (<category>)"` -> (phrase, category), splitting on the LAST " (".

    Phrases may contain parentheses themselves (`"ring (donut) (object)"`). None if the key has
    no category.
    """
    head, sep, tail = key.rpartition(" (")
    if not sep or not head.strip() or not tail.endswith(")") or not tail[:-1].strip():
        return None
    return head, tail[:-1]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _score(value, *, lo: float, hi: float, field: str, path: Path, label: str) -> tuple[float | None, int]:
    """Annotator list (or an already averaged number) -> (mean, number of annotators)."""
    if value is None or value == []:
        return None, 0
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not _is_number(v):
            raise InputError(path, f"{field}: {v!r} is not a finite number", label)
        if not lo <= v <= hi:
            raise InputError(path, f"{field}: {v!r} is out of range [{lo:g}, {hi:g}]", label)
    return float(np.mean(values)), len(values)


def parse_record(rec, index: int, path: Path, *, require_labels: bool) -> tuple[dict, list[dict]]:
    label = record_label(index, rec)
    if not isinstance(rec, dict):
        raise InputError(path, f"expected a JSON object, got {type(rec).__name__}", label)
    for field in REQUIRED_FIELDS:
        if rec.get(field) in (None, ""):
            raise InputError(path, f"missing required field {field!r}", label)
    for field in ("prompt_id", "prompt", "img_path"):
        if not isinstance(rec[field], str):
            raise InputError(path, f"{field} must be a string, got {rec[field]!r}", label)
    if rec["type"] not in PROMPT_TYPES:
        raise InputError(path, f"type must be one of {sorted(PROMPT_TYPES)}, got {rec['type']!r}", label)
    img = PurePosixPath(rec["img_path"])
    if img.is_absolute() or ".." in img.parts:
        raise InputError(path, f"img_path must be relative to the images folder: {rec['img_path']!r}", label)

    total, n_ann = _score(rec.get("total_score"), lo=1, hi=5, field="total_score", path=path, label=label)
    if require_labels and total is None:
        raise InputError(path, "missing required field 'total_score' (labelled file)", label)
    elements = rec.get("element_score")
    if elements is None:
        elements = {}
    if not isinstance(elements, dict):
        raise InputError(path, f"element_score must be an object, got {type(elements).__name__}", label)
    if require_labels and not elements and "element_score" not in rec:
        raise InputError(path, "missing required field 'element_score' (labelled file)", label)

    meaningless = next((rec[k] for k in MEANINGLESS_KEYS if k in rec), None)
    row = {
        "img_path": rec["img_path"],
        "prompt_id": rec["prompt_id"],
        "prompt": rec["prompt"],
        "prompt_type": rec["type"],
        "total_score": total,
        "n_annotators": n_ann,
        "prompt_meaningless": _score(meaningless, lo=0, hi=1, field="promt_meaningless", path=path, label=label)[0],
        "split_confidence": _score(rec.get("split_confidence"), lo=0, hi=1, field="split_confidence", path=path, label=label)[0],
        "attribute_confidence": _score(rec.get("attribute_confidence"), lo=0, hi=1, field="attribute_confidence", path=path, label=label)[0],
    }
    element_rows = []
    for key, value in elements.items():
        parts = split_element_key(key)
        if parts is None:
            raise InputError(path, f"element key {key!r} has no ' (<category>)' suffix", label)
        score, _ = _score(value, lo=0, hi=1, field=f"element_score[{key!r}]", path=path, label=label)
        if require_labels and score is None:
            raise InputError(path, f"element {key!r} has no annotator scores (labelled file)", label)
        element_rows.append({"img_path": rec["img_path"], "element": key, "phrase": parts[0], "category": parts[1], "score": score})
    return row, element_rows


def parse_file(path: Path, split: str, *, require_labels: bool) -> tuple[list[dict], list[dict]]:
    rows, elements = [], []
    for i, rec in enumerate(load_records(path)):
        row, els = parse_record(rec, i, path, require_labels=require_labels)
        row["split"] = split
        rows.append(row)
        elements.extend(els)
    return rows, elements


def join_labels(rows: list[dict], elements: list[dict], eval_path: Path) -> list[dict]:
    """Fill the val rows' labels from eval.json (official means format); return new element rows."""
    by_img = {r["img_path"]: r for r in rows}
    given: dict[str, list[dict]] = {}
    for e in elements:
        given.setdefault(e["img_path"], []).append(e)
    seen: set[str] = set()
    joined = []
    for i, rec in enumerate(load_records(eval_path)):
        label = record_label(i, rec)
        if not isinstance(rec, dict) or not isinstance(rec.get("img_path"), str):
            raise InputError(eval_path, "missing required field 'img_path'", label)
        img = rec["img_path"]
        if img not in by_img:
            raise InputError(eval_path, "labels for an unknown image (not in the validation inputs)", label)
        if img in seen:
            raise InputError(eval_path, "duplicate img_path", label)
        seen.add(img)
        if rec.get("total_score") is None:
            raise InputError(eval_path, "missing required field 'total_score'", label)
        by_img[img]["total_score"], _ = _score(rec["total_score"], lo=1, hi=5, field="total_score", path=eval_path, label=label)
        scores = rec.get("element_score")
        if not isinstance(scores, dict):
            raise InputError(eval_path, "missing required field 'element_score'", label)
        keys = [e["element"] for e in given.get(img, [])]
        if keys and set(keys) != set(scores):
            raise InputError(eval_path, f"element keys {sorted(scores)} differ from the inputs' {sorted(keys)}", label)
        for key in keys or list(scores):
            parts = split_element_key(key)
            if parts is None:
                raise InputError(eval_path, f"element key {key!r} has no ' (<category>)' suffix", label)
            score, _ = _score(scores[key], lo=0, hi=1, field=f"element_score[{key!r}]", path=eval_path, label=label)
            joined.append({"img_path": img, "element": key, "phrase": parts[0], "category": parts[1], "score": score})
    missing = sorted(set(by_img) - seen)
    if missing:
        raise InputError(eval_path, f"{len(missing)} validation images have no labels, e.g. {missing[0]!r}")
    return joined


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def _parts_signature(parts: list[Path]) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in parts]


def resolve_images(source: Path, out: Path) -> Path:
    """Folder that `img_path`s are relative to: source/images, or the unpacked split zip."""
    folder = source / "images"
    if folder.is_dir():
        return folder.resolve()
    parts = sorted(source.glob("images.zip.part-*")) or sorted(source.glob("images.zip"))
    if not parts:
        raise InputError(source, "no images: expected an images/ folder, images.zip.part-* or images.zip")
    unpacked = out / "unpacked"
    stamp = unpacked / UNPACK_STAMP
    signature = _parts_signature(parts)
    if stamp.is_file() and json.loads(stamp.read_text()) == signature:
        print(f"images already unpacked in {unpacked} (parts unchanged)")
    else:
        label = f"{parts[0].parent}/{{{','.join(p.name for p in parts)}}}"
        with atomic_path(unpacked, directory=True) as tmp:
            n = safe_extract(parts, tmp, label=label)
            (tmp / UNPACK_STAMP).write_text(json.dumps(signature))
        print(f"unpacked {n} files from {len(parts)} zip parts into {unpacked}")
    return (unpacked / "images" if (unpacked / "images").is_dir() else unpacked).resolve()


def check_images(rows: list[dict], images_root: Path, source_of: dict[str, Path]) -> None:
    """Every record's image exists and decodes; record absolute path and size."""
    for row in tqdm(rows, desc="check images", unit="img", mininterval=2):
        path = images_root / row["img_path"]
        label = f"img_path={row['img_path']!r}"
        if not path.is_file():
            raise InputError(source_of[row["img_path"]], f"image not found: {path}", label)
        try:
            with Image.open(path) as im:
                row["width"], row["height"] = im.size
                im.verify()
        except Exception as exc:  # PIL raises many types for unreadable files
            raise InputError(source_of[row["img_path"]], f"unreadable image {path}: {exc}", label) from None
        row["image"] = str(path)


# ----------------------------------------------------------------------------------------------
# Holdout and assembly
# ----------------------------------------------------------------------------------------------
def holdout_prompts(prompt_ids, fraction: float, seed: int) -> set[str]:
    """A seeded, input-order-independent choice of `fraction` of the distinct prompt ids."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    ids = sorted(set(prompt_ids))
    n = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) > 1:
        n = min(max(n, 1), len(ids) - 1)
    rng = np.random.default_rng(seed)
    return set(np.asarray(ids, dtype=object)[rng.permutation(len(ids))[:n]].tolist())


def ingest(
    source: Path,
    out: Path,
    *,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    eval_json: Path | None = None,
    final_test: Path | None = None,
) -> dict:
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise InputError(source, "source folder not found")
    files = {"train": source / "train_list.json", "val": source / "test.json"}
    rows, elements = parse_file(files["train"], "train", require_labels=True)
    val_rows, val_elements = parse_file(files["val"], "val", require_labels=False)
    if eval_json is not None:
        val_elements = join_labels(val_rows, val_elements, eval_json)
    rows += val_rows
    elements += val_elements
    if final_test is not None:
        test_rows, test_elements = parse_file(final_test, "test", require_labels=False)
        files["test"] = final_test
        rows += test_rows
        elements += test_elements

    source_of: dict[str, Path] = {}
    for row in rows:
        split_file = files["train" if row["split"] == "train" else row["split"]]
        if row["img_path"] in source_of:
            raise InputError(split_file, f"duplicate img_path (also in {source_of[row['img_path']]})", f"img_path={row['img_path']!r}")
        source_of[row["img_path"]] = split_file

    held = holdout_prompts([r["prompt_id"] for r in rows if r["split"] == "train"], holdout_fraction, seed)
    for row in rows:
        if row["split"] == "train" and row["prompt_id"] in held:
            row["split"] = "holdout"

    images_root = resolve_images(source, out)
    check_images(rows, images_root, source_of)

    samples = pd.DataFrame(rows, columns=SAMPLE_COLUMNS)
    samples["split"] = pd.Categorical(samples["split"], categories=SPLITS)
    samples = samples.sort_values(["split", "img_path"], kind="stable").reset_index(drop=True)
    samples["split"] = samples["split"].astype(str)
    for col in ("n_annotators", "width", "height"):
        samples[col] = samples[col].astype("int64")
    order = {img: i for i, img in enumerate(samples["img_path"])}
    element_df = pd.DataFrame(elements, columns=ELEMENT_COLUMNS)
    element_df["_order"] = element_df["img_path"].map(order)
    element_df = element_df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)
    element_df["score"] = element_df["score"].astype("float64")
    samples["total_score"] = samples["total_score"].astype("float64")

    if element_df["img_path"].nunique() > len(samples) or not element_df["img_path"].isin(order).all():
        raise AssertionError("element rows refer to images outside samples")  # internal invariant
    write_parquet(samples, out / "samples.parquet")
    write_parquet(element_df, out / "elements.parquet")
    summary = {
        "source": str(source),
        "images_root": str(images_root),
        "holdout_fraction": holdout_fraction,
        "seed": seed,
        "samples": {s: int((samples["split"] == s).sum()) for s in SPLITS},
        "labelled": {s: int(samples.loc[samples["split"] == s, "total_score"].notna().sum()) for s in SPLITS},
        "elements": {s: int(element_df["img_path"].isin(samples.loc[samples["split"] == s, "img_path"]).sum()) for s in SPLITS},
        "prompts": {s: int(samples.loc[samples["split"] == s, "prompt_id"].nunique()) for s in SPLITS},
    }
    write_json(summary, out / "ingest_summary.json")
    return summary


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="EvalMuse-40K files (HF layout) -> samples.parquet + elements.parquet",
        description=__doc__,
    )
    p.add_argument("--source", type=Path, required=True,
                   help="folder with train_list.json, test.json and images.zip.part-* or images/")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="fraction of train prompts moved to the labelled holdout split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout choice (default: %(default)s)")
    p.add_argument("--eval-json", type=Path,
                   help="labels of test.json in the official format (default: SOURCE/eval.json when present); "
                        "relative paths are taken from SOURCE")
    p.add_argument("--no-eval-json", action="store_true", help="leave the val split unlabelled")
    p.add_argument("--final-test", type=Path,
                   help="final-test input list in the test.json format (default: SOURCE/final_test.json when "
                        "present); relative paths are taken from SOURCE")
    p.add_argument("--no-final-test", action="store_true", help="ingest no test split")
    p.set_defaults(func=_run)


def _optional_file(source: Path, given: Path | None, default_name: str, disabled: bool) -> Path | None:
    """An explicit path (relative to SOURCE), else SOURCE/default_name when present."""
    if disabled:
        return None
    if given is not None:
        return given if given.is_absolute() else source / given
    default = source / default_name
    return default if default.is_file() else None


def _run(args) -> int:
    summary = ingest(
        args.source, args.out, holdout_fraction=args.holdout_fraction, seed=args.seed,
        eval_json=_optional_file(args.source, args.eval_json, "eval.json", args.no_eval_json),
        final_test=_optional_file(args.source, args.final_test, "final_test.json", args.no_final_test),
    )
    print(json.dumps({k: summary[k] for k in ("samples", "labelled", "elements")}))
    return 0
