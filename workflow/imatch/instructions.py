"""Stage `instructions`: ingested tables -> one instruction set (parquet + ms-swift jsonl).

Two tasks (Sec. 3.1.2): `overall` asks for a letter a..o (Eq. 3), `element` asks, per element,
for a digit 1..7 (Eq. 4). Switches: query metadata (Fig. 2), element levels in the overall query
(Sec. 3.2.3; ground truth for training, a table of predicted levels for other splits), prompt
type in the element query (Sec. 3.3.1), score perturbation of element training targets
(Sec. 3.3.2, Eq. 17) and augmented training images (Sec. 3.2.4, from `imatch augment`).

The parquet has one row per query (sorted by `id`); the jsonl has the same rows in the same
order as ms-swift expects them: `{"messages": [user, assistant?], "images": [abs path]}`, the
assistant turn present when the row has a target. A sidecar `<out>.json` records the settings
and row counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from imatch import levels, prompts
from imatch.atomic import atomic_path, write_json, write_parquet
from imatch.errors import InputError

COLUMNS = ["id", "task", "split", "img_path", "element", "image", "augmentation", "aug_parameter",
           "query", "label", "level", "target_level", "delta", "target"]
GROUND_TRUTH = "ground-truth"


def _with_augmented(split_rows: pd.DataFrame, augmented: pd.DataFrame | None) -> pd.DataFrame:
    """Original rows plus one row per augmented image (D_final = D_train U D_aug, Eq. 15)."""
    base = split_rows.assign(id=split_rows["img_path"], augmentation=None, aug_parameter=np.nan)
    if augmented is None or augmented.empty:
        return base
    unknown = set(augmented["img_path"]) - set(split_rows["img_path"])
    if unknown:
        raise InputError("augmented table", f"{len(unknown)} augmented images are not in this split", f"img_path={sorted(unknown)[0]!r}")
    extra = split_rows.drop(columns="image").merge(augmented[["img_path", "aug_id", "image", "augmentation", "parameter"]],
                                                   on="img_path", validate="one_to_many")
    extra = extra.rename(columns={"aug_id": "id", "parameter": "aug_parameter"})
    return pd.concat([base, extra[base.columns]], ignore_index=True)


def _element_levels(elements: pd.DataFrame, images, source: str | Path) -> dict[str, list[tuple[str, int]]]:
    """Per image, its elements (order as given) with a level 1..7: ground truth or a given table."""
    wanted = elements[elements["img_path"].isin(images)]
    if source == GROUND_TRUTH:
        if wanted["score"].isna().any():
            bad = wanted[wanted["score"].isna()].iloc[0]
            raise InputError("elements.parquet", "ground-truth element levels need labels",
                             f"img_path={bad['img_path']!r} element={bad['element']!r}")
        lv = pd.Series(levels.element_level(wanted["score"].to_numpy()), index=wanted.index)
    else:
        table = pd.read_parquet(source)
        if table.duplicated(["img_path", "element"]).any():
            bad = table[table.duplicated(["img_path", "element"])].iloc[0]
            raise InputError(source, "duplicate element level", f"img_path={bad['img_path']!r} element={bad['element']!r}")
        merged = wanted.merge(table[["img_path", "element", "level"]], on=["img_path", "element"], how="left")
        if merged["level"].isna().any():
            bad = merged[merged["level"].isna()].iloc[0]
            raise InputError(source, f"{int(merged['level'].isna().sum())} elements have no level",
                             f"img_path={bad['img_path']!r} element={bad['element']!r}")
        if not merged["level"].between(1, 7).all():
            bad = merged[~merged["level"].between(1, 7)].iloc[0]
            raise InputError(source, f"level {bad['level']:g} outside 1..7", f"img_path={bad['img_path']!r} element={bad['element']!r}")
        lv = pd.Series(np.rint(merged["level"].to_numpy()).astype(int), index=wanted.index)
    out: dict[str, list[tuple[str, int]]] = {}
    for (img, key), level in zip(wanted[["img_path", "element"]].itertuples(index=False), lv):
        out.setdefault(img, []).append((key, int(level)))
    return out


def build_overall(samples, elements, split, *, metadata=(), element_levels=None, augmented=None) -> pd.DataFrame:
    rows = _with_augmented(samples[samples["split"] == split], augmented)
    by_img = _element_levels(elements, rows["img_path"], element_levels) if element_levels is not None else None
    out = rows.assign(task="overall", element=None, label=rows["total_score"])
    out["query"] = [prompts.overall_query(r, metadata=metadata, element_levels=by_img.get(r["img_path"], []) if by_img is not None else None)
                    for _, r in out.iterrows()]
    labelled = out["label"].notna()
    out["level"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[labelled, "level"] = levels.overall_level(out.loc[labelled, "label"].to_numpy())
    out["target_level"] = out["level"]
    out["delta"] = pd.array([0 if ok else pd.NA for ok in labelled], dtype="Int64")
    out["target"] = [levels.overall_letter(v) if pd.notna(v) else None for v in out["target_level"]]
    return _finish(out)


def build_element(samples, elements, split, *, metadata=(), prompt_type=False, augmented=None,
                  perturb: dict | None = None) -> pd.DataFrame:
    rows = _with_augmented(samples[samples["split"] == split], augmented)
    els = elements[elements["img_path"].isin(rows["img_path"])]
    out = rows.merge(els[["img_path", "element", "score"]], on="img_path", validate="many_to_many")
    out = out.assign(task="element", id=out["id"] + "|" + out["element"], label=out["score"])
    out["query"] = [prompts.element_query(r, r["element"], metadata=metadata, prompt_type=prompt_type)
                    for _, r in out.iterrows()]
    labelled = out["label"].notna()
    out["level"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[labelled, "level"] = levels.element_level(out.loc[labelled, "label"].to_numpy())
    out["delta"] = pd.array([0 if ok else pd.NA for ok in labelled], dtype="Int64")
    out = out.sort_values("id", kind="stable").reset_index(drop=True)  # perturbation order = id order
    if perturb:
        mask = out["level"].notna().to_numpy()
        perturbed, delta = levels.perturb_levels(out.loc[mask, "level"].astype(int).to_numpy(), **perturb)
        out["target_level"] = out["level"].copy()
        out.loc[mask, "target_level"] = perturbed
        out.loc[mask, "delta"] = delta
    else:
        out["target_level"] = out["level"]
    out["target"] = [levels.element_digit(v) if pd.notna(v) else None for v in out["target_level"]]
    return _finish(out)


def _finish(out: pd.DataFrame) -> pd.DataFrame:
    out = out[COLUMNS].sort_values("id", kind="stable").reset_index(drop=True)
    if out["id"].duplicated().any():
        raise AssertionError(f"duplicate instruction id {out.loc[out['id'].duplicated(), 'id'].iloc[0]!r}")
    return out


def to_swift_rows(table: pd.DataFrame) -> list[dict]:
    """ms-swift rows, checked strictly: one <image> tag per image, an absolute existing image,
    and a target from the task's closed set when present."""
    allowed = {"overall": set(levels.OVERALL_LETTERS), "element": set(levels.ELEMENT_DIGITS)}
    rows = []
    for r in table.itertuples(index=False):
        image = Path(r.image)
        if r.query.count(prompts.IMAGE_TAG) != 1:
            raise AssertionError(f"{r.id}: query must hold exactly one {prompts.IMAGE_TAG} tag")
        if not image.is_absolute() or not image.is_file():
            raise InputError(image, "image of an instruction row is missing", f"id={r.id!r}")
        messages = [{"role": "user", "content": r.query}]
        if r.target is not None:
            if r.target not in allowed[r.task]:
                raise AssertionError(f"{r.id}: target {r.target!r} outside the {r.task} answer set")
            messages.append({"role": "assistant", "content": r.target})
        rows.append({"messages": messages, "images": [str(image)]})
    return rows


def write_set(table: pd.DataFrame, out: Path, jsonl: Path, settings: dict) -> None:
    rows = to_swift_rows(table)
    write_parquet(table, out)
    with atomic_path(jsonl) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = {"rows": len(table), "with_target": int(table["target"].notna().sum()),
              "augmented": int(table["augmentation"].notna().sum()),
              "perturbed": int((table["delta"].fillna(0) != 0).sum())}
    # `imatch train` checks the jsonl's row count against `counts` before training on it (a cut file);
    # no hash of the jsonl here: it holds absolute image paths, so it differs between two checkouts
    write_json({"settings": settings, "counts": counts}, Path(f"{out}.json"))


def _levels_source(value: str):
    """'ground-truth', or a table: a path, so that provenance records it as an input."""
    return value if value == GROUND_TRUTH else Path(value)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("instructions", help="build one instruction set (parquet + ms-swift jsonl)",
                              description=__doc__)
    p.add_argument("--task", choices=["overall", "element"], required=True)
    p.add_argument("--samples", type=Path, required=True, help="samples.parquet from ingest")
    p.add_argument("--elements", type=Path, required=True, help="elements.parquet from ingest")
    p.add_argument("--split", choices=["train", "holdout", "val", "test"], required=True)
    p.add_argument("--out", type=Path, required=True, help="instruction parquet to write")
    p.add_argument("--jsonl", type=Path, required=True, help="ms-swift jsonl to write (same rows, same order)")
    p.add_argument("--metadata", nargs="*", default=[], choices=sorted(prompts.METADATA_FIELDS),
                   help="metadata fields shown in the query (Fig. 2)")
    p.add_argument("--element-levels", type=_levels_source, help=f"overall task: list element levels in the query, from "
                   f"'{GROUND_TRUTH}' (Eq. 4 of the labels) or a parquet of img_path, element, level")
    p.add_argument("--prompt-type", action="store_true", help="element task: state real/synthetic (Sec. 3.3.1)")
    p.add_argument("--augmented", type=Path, help="augmented.parquet from `imatch augment` (training only)")
    p.add_argument("--perturb-epsilon", type=int, help="element task: score perturbation epsilon (Eq. 17)")
    p.add_argument("--perturb-rate", type=float, default=1.0, help="fraction of elements perturbed")
    p.add_argument("--perturb-seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args) -> int:
    samples = pd.read_parquet(args.samples)
    elements = pd.read_parquet(args.elements)
    n_images = int((samples["split"] == args.split).sum())
    if n_images == 0:
        raise InputError(args.samples, f"split {args.split!r} has no images")
    augmented = pd.read_parquet(args.augmented) if args.augmented else None
    if augmented is not None and args.split != "train":
        raise InputError(args.augmented, "augmented images belong to the training set only")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    if args.task == "overall":
        if args.prompt_type or args.perturb_epsilon is not None:
            raise ValueError("--prompt-type and --perturb-* apply to the element task")
        table = build_overall(samples, elements, args.split, metadata=args.metadata,
                              element_levels=args.element_levels, augmented=augmented)
        expected = n_images + (0 if augmented is None else len(augmented))
    else:
        if args.element_levels:
            raise ValueError("--element-levels applies to the overall task")
        perturb = None
        if args.perturb_epsilon is not None:
            if args.split != "train":
                raise ValueError("score perturbation applies to training targets only")
            perturb = {"epsilon": args.perturb_epsilon, "rate": args.perturb_rate, "seed": args.perturb_seed}
        table = build_element(samples, elements, args.split, metadata=args.metadata, prompt_type=args.prompt_type,
                              augmented=augmented, perturb=perturb)
        in_split = elements["img_path"].isin(samples.loc[samples["split"] == args.split, "img_path"])
        per_img = elements[in_split].groupby("img_path").size()
        expected = int(per_img.sum()) + (0 if augmented is None else int(augmented["img_path"].map(per_img).fillna(0).sum()))
    if len(table) != expected:  # row counts where stages meet
        raise AssertionError(f"{args.task} set for {args.split} has {len(table)} rows, expected {expected}")
    write_set(table, args.out, args.jsonl, settings)
    print(json.dumps({"rows": len(table), "with_target": int(table["target"].notna().sum())}))
    return 0
