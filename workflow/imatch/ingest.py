"""Stage `ingest`: EvalMuse-40K files (HF layout) -> samples.parquet + elements.parquet.

Reads train_list.json (labelled), test.json (the validation inputs, labels joined from eval.json
when given) and optionally a final-test list; unpacks the split image zip once (skipped when the
parts are unchanged) or uses an images/ folder as it is; validates every record and image; carves
a labelled `holdout` split out of train by prompt_id (no prompt on both sides, deterministic by
seed). Any bad record stops the stage with an error naming the file and the record; nothing is
written unless everything is valid. With `--skip-bad-records` (for a large download with a few
broken images) a bad record is left out instead and listed, with its reason, in the summary,
whose per-file counts add up: read = kept + skipped. Errors of a whole file (missing, not JSON)
stop the stage either way. Ground truth is the mean over annotators.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from PIL import Image
from tqdm import tqdm

from imatch import integrity
from imatch.atomic import atomic_path, write_json, write_parquet
from imatch.errors import InputError, record_label
from imatch.zipparts import safe_extract

SPLITS = ["train", "holdout", "val", "test"]
PROMPT_TYPES = {"real", "synthetic"}
REQUIRED_FIELDS = ("prompt_id", "prompt", "type", "img_path")
# Text that ms-swift's templates replace in a query (media and grounding tags): a prompt holding one
# would shift every image slot or be rendered as a box.
TEMPLATE_TAGS = ("<image>", "<video>", "<audio>", "<ref-object>", "<bbox>")
# PIL image modes whose conversion to RGB is not a picture: 16/32-bit integers saturate to white,
# floats to black (the model would see a blank image)
UNREADABLE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def blank_mode_problem(path, mode: str) -> str | None:
    """Why an image of this pixel mode cannot be shown to a model (None: it can)."""
    if mode in UNREADABLE_MODES:
        return (f"image {path} has pixel mode {mode!r} (16/32-bit or float): converted to RGB it would be blank; "
                "save it as 8-bit RGB")
    return None


# The real files spell it "promt_meaningless"; accept both spellings.
MEANINGLESS_KEYS = ("promt_meaningless", "prompt_meaningless")
SAMPLE_COLUMNS = [
    "img_path", "prompt_id", "prompt", "prompt_type", "split", "total_score", "n_annotators",
    "prompt_meaningless", "split_confidence", "attribute_confidence", "image", "width", "height",
]
ELEMENT_COLUMNS = ["img_path", "element", "phrase", "category", "score"]
UNPACK_STAMP = ".imatch-unpacked.json"


class Skips:
    """What to do with a bad record: raise its InputError (strict, the default), or, when skipping
    is allowed, remember file, record and reason and go on."""

    def __init__(self, allowed: bool):
        self.allowed = allowed
        self.rows: list[dict] = []

    def handle(self, exc: InputError, img_path: str | None = None) -> None:
        if not self.allowed:
            raise exc
        self.rows.append({"file": exc.path, "record": exc.record, "img_path": img_path, "reason": exc.message})

    def counts(self, read: dict[str, int]) -> dict[str, dict[str, int]]:
        """Per file: records read, kept and skipped (read = kept + skipped)."""
        out = {}
        for path, n in read.items():
            skipped = sum(r["file"] == path for r in self.rows)
            out[path] = {"read": n, "kept": n - skipped, "skipped": skipped}
        return out


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
    # an int is finite (math.isfinite(10**400) would raise OverflowError); the range check follows
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))


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
    for field in ("prompt_id", "prompt", "type", "img_path"):
        if not isinstance(rec[field], str):
            raise InputError(path, f"{field} must be a string, got {rec[field]!r}", label)
    tag = next((t for t in TEMPLATE_TAGS if t in rec["prompt"]), None)
    if tag:
        raise InputError(path, f"prompt holds {tag!r}, which ms-swift's templates read as a media or grounding "
                               "tag, not text", label)
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
    if require_labels and rec.get("element_score") is None:
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
        tag = next((t for t in TEMPLATE_TAGS if t in key), None)
        if tag:
            raise InputError(path, f"element key {key!r} holds {tag!r}, which ms-swift's templates read as a tag",
                             label)
        if parts is None:
            raise InputError(path, f"element key {key!r} has no ' (<category>)' suffix", label)
        score, _ = _score(value, lo=0, hi=1, field=f"element_score[{key!r}]", path=path, label=label)
        if require_labels and score is None:
            raise InputError(path, f"element {key!r} has no annotator scores (labelled file)", label)
        element_rows.append({"img_path": rec["img_path"], "element": key, "phrase": parts[0], "category": parts[1], "score": score})
    return row, element_rows


def parse_file(path: Path, split: str, *, require_labels: bool, skips: Skips | None = None
               ) -> tuple[list[dict], int]:
    """(rows, records read); each row carries its element rows under `_elements`."""
    skips = skips or Skips(False)
    records = load_records(path)
    rows = []
    for i, rec in enumerate(records):
        try:
            row, els = parse_record(rec, i, path, require_labels=require_labels)
        except InputError as exc:
            skips.handle(exc, rec.get("img_path") if isinstance(rec, dict) else None)
            continue
        row["split"] = split
        row["_elements"] = els
        rows.append(row)
    return rows, len(records)


def _eval_elements(rec: dict, row: dict, eval_path: Path, label: str) -> tuple[float, list[dict]]:
    """Total score and element rows of one eval.json record for its val input row."""
    if rec.get("total_score") is None:
        raise InputError(eval_path, "missing required field 'total_score'", label)
    total, _ = _score(rec["total_score"], lo=1, hi=5, field="total_score", path=eval_path, label=label)
    scores = rec.get("element_score")
    if not isinstance(scores, dict):
        raise InputError(eval_path, "missing required field 'element_score'", label)
    keys = [e["element"] for e in row["_elements"]]
    if keys and set(keys) != set(scores):
        raise InputError(eval_path, f"element keys {sorted(scores)} differ from the inputs' {sorted(keys)}", label)
    joined = []
    for key in keys or list(scores):
        parts = split_element_key(key)
        tag = next((t for t in TEMPLATE_TAGS if t in key), None)
        if tag:
            raise InputError(eval_path, f"element key {key!r} holds {tag!r}, which ms-swift's templates read as a tag",
                             label)
        if parts is None:
            raise InputError(eval_path, f"element key {key!r} has no ' (<category>)' suffix", label)
        score, _ = _score(scores[key], lo=0, hi=1, field=f"element_score[{key!r}]", path=eval_path, label=label)
        joined.append({"img_path": row["img_path"], "element": key, "phrase": parts[0], "category": parts[1], "score": score})
    return total, joined


def join_labels(rows: list[dict], eval_path: Path, *, skips: Skips | None = None, val_path: Path | None = None,
                skipped_inputs: frozenset = frozenset()) -> tuple[list[dict], int]:
    """Fill the val rows' labels from eval.json (official means format): (labelled rows, records read).
    When skipping, labels of skipped inputs are skipped too, and so are inputs left without labels."""
    skips = skips or Skips(False)
    by_img = {r["img_path"]: r for r in rows}
    labelled: dict[str, tuple[float, list[dict]]] = {}
    records = load_records(eval_path)
    for i, rec in enumerate(records):
        label = record_label(i, rec)
        img = rec.get("img_path") if isinstance(rec, dict) else None
        try:
            if not isinstance(img, str):
                raise InputError(eval_path, "missing required field 'img_path'", label)
            if img not in by_img:
                why = "its input record was skipped" if img in skipped_inputs else "not in the validation inputs"
                raise InputError(eval_path, f"labels for an unknown image ({why})", label)
            if img in labelled:
                raise InputError(eval_path, "duplicate img_path", label)
            labelled[img] = _eval_elements(rec, by_img[img], eval_path, label)
        except InputError as exc:
            skips.handle(exc, img if isinstance(img, str) else None)
    missing = [img for img in by_img if img not in labelled]
    if missing and not skips.allowed:
        raise InputError(eval_path, f"{len(missing)} validation images have no labels, e.g. {missing[0]!r}")
    kept = []
    for row in rows:
        if row["img_path"] in labelled:
            row["total_score"], row["_elements"] = labelled[row["img_path"]]
            kept.append(row)
        else:
            skips.handle(InputError(val_path or eval_path, f"no labels in {eval_path}",
                                    f"img_path={row['img_path']!r}"), row["img_path"])
    return kept, len(records)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def _parts_signature(parts: list[Path]) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in parts]


def _unpacked_damage(unpacked: Path, signature: list) -> list[str] | None:
    """None when `unpacked` holds exactly what the zip parts of `signature` unpacked to; else the
    member files missing or of another size (empty when the parts changed or nothing is unpacked)."""
    stamp = unpacked / UNPACK_STAMP
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(recorded, dict) or recorded.get("parts") != signature:
        return []
    damaged = []
    for name, size in recorded["files"].items():
        try:
            if (unpacked / name).stat().st_size != size:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return damaged or None


def resolve_images(source: Path, out: Path) -> Path:
    """Folder that `img_path`s are relative to: source/images, or the unpacked split zip."""
    folder = source / "images"
    if folder.is_dir():
        return folder.resolve()
    parts = sorted(source.glob("images.zip.part-*")) or sorted(source.glob("images.zip"))
    if not parts:
        raise InputError(source, "no images: expected an images/ folder, images.zip.part-* or images.zip")
    unpacked = out / "unpacked"
    signature = _parts_signature(parts)
    if (damaged := _unpacked_damage(unpacked, signature)) is None:
        print(f"images already unpacked in {unpacked} (parts unchanged, every file present)")
    else:
        if damaged:  # a purged scratch cache is the cache's fault, not the data set's
            print(f"{len(damaged)} unpacked files missing or changed in {unpacked} (first: {damaged[0]}): "
                  "unpacking again")
        label = f"{parts[0].parent}/{{{','.join(p.name for p in parts)}}}"
        with atomic_path(unpacked, directory=True) as tmp:
            files = safe_extract(parts, tmp, label=label)
            (tmp / UNPACK_STAMP).write_text(json.dumps({"parts": signature, "files": files}))
        print(f"unpacked {len(files)} files from {len(parts)} zip parts into {unpacked}")
    return (unpacked / "images" if (unpacked / "images").is_dir() else unpacked).resolve()


def _check_image(row: dict, images_root: Path, source: Path) -> None:
    path = images_root / row["img_path"]
    label = f"img_path={row['img_path']!r}"
    if not path.is_file():
        raise InputError(source, f"image not found: {path}", label)
    try:
        with Image.open(path) as im:
            row["width"], row["height"] = im.size
            mode = im.mode
            im.verify()
    except Exception as exc:  # PIL raises many types for unreadable files
        raise InputError(source, f"unreadable image {path}: {exc}", label) from None
    if problem := blank_mode_problem(path, mode):
        raise InputError(source, problem, label)
    row["image"] = str(path)


def check_images(rows: list[dict], images_root: Path, source_of: dict[str, Path], skips: Skips | None = None
                 ) -> list[dict]:
    """The rows whose image exists and decodes, with absolute path and size recorded."""
    skips = skips or Skips(False)
    kept = []
    for row in tqdm(rows, desc="check images", unit="img", mininterval=2):
        try:
            _check_image(row, images_root, source_of[row["img_path"]])
        except InputError as exc:
            skips.handle(exc, row["img_path"])
            continue
        kept.append(row)
    return kept


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


def ingest(source: Path, out: Path, **options) -> dict:
    """Ingest SOURCE into OUT (see `_ingest`), one run at a time per OUT: a second run while one is
    unpacking would see images vanish under it and blame the data set. The lock lies beside OUT (a
    hidden file), so a refused run leaves no OUT behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out.parent / f".{out.name}.imatch-ingest.lock", timeout=0)
    try:
        with lock:
            return _ingest(source, out, **options)
    except Timeout:
        raise InputError(out, f"another `imatch ingest` is writing this folder (it holds {lock.lock_file}); "
                              "wait for it to finish") from None


def _ingest(
    source: Path,
    out: Path,
    *,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    eval_json: Path | None = None,
    final_test: Path | None = None,
    skip_bad_records: bool = False,
) -> dict:
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise InputError(source, "source folder not found")
    integrity.verify(source, exact=False)  # a download: its files as fetched, before any is read
    skips = Skips(skip_bad_records)
    files = {"train": source / "train_list.json", "val": source / "test.json"}
    if final_test is not None:
        files["test"] = Path(final_test)
    read: dict[str, int] = {}
    rows = []
    for split, path in files.items():
        split_rows, read[str(path)] = parse_file(path, split, require_labels=split == "train", skips=skips)
        rows += split_rows

    # one record per image: the first one wins, a later one is the duplicate
    source_of: dict[str, Path] = {}
    unique = []
    for row in rows:
        split_file = files[row["split"]]
        if row["img_path"] in source_of:
            skips.handle(InputError(split_file, f"duplicate img_path (also in {source_of[row['img_path']]})",
                                    f"img_path={row['img_path']!r}"), row["img_path"])
            continue
        source_of[row["img_path"]] = split_file
        unique.append(row)
    rows = unique
    if eval_json is not None:
        skipped_inputs = frozenset(r["img_path"] for r in skips.rows if r["file"] == str(files["val"]))
        val_rows, read[str(eval_json)] = join_labels([r for r in rows if r["split"] == "val"], eval_json, skips=skips,
                                                     val_path=files["val"], skipped_inputs=skipped_inputs)
        rows = [r for r in rows if r["split"] != "val"] + val_rows

    held = holdout_prompts([r["prompt_id"] for r in rows if r["split"] == "train"], holdout_fraction, seed)
    for row in rows:
        if row["split"] == "train" and row["prompt_id"] in held:
            row["split"] = "holdout"

    images_root = resolve_images(source, out)
    rows = check_images(rows, images_root, source_of, skips)
    if not any(r["split"] in ("train", "holdout") for r in rows):
        raise InputError(files["train"], "no usable training records")
    elements = [e for row in rows for e in row.pop("_elements")]

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
        "skip_bad_records": skip_bad_records,
        "records": skips.counts(read),
        "skipped": skips.rows,
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
    p.add_argument("--skip-bad-records", action="store_true",
                   help="leave bad records out (listed with their reason in ingest_summary.json) instead of "
                        "stopping at the first one; errors of a whole file still stop")
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
        skip_bad_records=args.skip_bad_records,
    )
    # the artifacts in --out (other stages write beside them, e.g. ground_truth/; unpacked/ is a cache)
    args.artifacts = [args.out / name for name in ("samples.parquet", "elements.parquet", "ingest_summary.json")]
    print(json.dumps({k: summary[k] for k in ("samples", "labelled", "elements")}))
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} bad records (listed in {args.out / 'ingest_summary.json'}):", file=sys.stderr)
        for path, n in summary["records"].items():
            print(f"  {path}: read {n['read']}, kept {n['kept']}, skipped {n['skipped']}", file=sys.stderr)
    return 0
