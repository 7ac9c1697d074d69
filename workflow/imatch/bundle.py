"""`imatch export`: a trained ensemble as a folder that can be copied to another machine.

A bundle holds everything scoring needs and nothing it must look up elsewhere:

    bundle.json     members of the ensemble (overall, element, element-level models), their
                    weights, tau, and per model its architecture, image budget, answer alphabet
                    and the instruction settings it was trained with (query metadata, prompt
                    type, element levels in the overall query)
    models/<backbone>/<task>-<round>/   the trained model folders (sealed, as the workflow made them)
    bases/<backbone>/                    the base backbone of a LoRA adapter (or, with
                                         --reference-bases, only its path and manifest checksum)
    manifest.json   sha256 of every file

Which models make the ensemble is read from the provenance records of the predictions the workflow
submitted (`predictions/<predictor>/<split>/predictions.parquet`): the `combine` that made them, the
score tables it averaged, the models and instruction sets those were scored with, and the
element-level table the overall queries stated. What is exported is what made the submission.
A results folder can also be read in place (`describe`), which is what `imatch score --models
RESULTS` does; both go through the same code.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from imatch import __version__, integrity, levels
from imatch.atomic import atomic_path, write_json
from imatch.errors import InputError
from imatch.provenance import SUFFIX, locate

FORMAT = 1
BUNDLE = "bundle.json"
ALPHABETS = {"overall": levels.OVERALL_LETTERS, "element": levels.ELEMENT_DIGITS}
SETTINGS = ("metadata", "prompt_type", "element_levels")


def _record(path: Path) -> dict:
    prov = Path(f"{path}{SUFFIX}")
    try:
        return json.loads(prov.read_text())
    except FileNotFoundError:
        raise InputError(path, f"no provenance record ({prov.name}): cannot tell which models made it") from None
    except ValueError as exc:
        raise InputError(prov, f"unreadable provenance record: {exc}") from None


def _input(path: Path, record: dict, given: str, root: str) -> Path:
    """Where the input `given` (as the command received it) of the artifact `path` lies now."""
    for entry in record.get("inputs", []):
        if entry["path"] == given:
            return locate(entry, Path(f"{path}{SUFFIX}"), root)
    raise InputError(f"{path}{SUFFIX}", f"does not record the input {given!r}")


def _sidecar_settings(instructions: Path) -> dict:
    sidecar = Path(f"{instructions}.json")
    try:
        settings = json.loads(sidecar.read_text())["settings"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(sidecar, f"instruction settings unreadable: {exc}") from None
    return settings


def _member(scores: Path, split: str, root: str) -> dict:
    """The model behind a score table, with the settings its `split` queries were built with."""
    gathered = _record(scores)
    shard = _input(scores, gathered, gathered["arguments"]["shards"][0], root)
    made = _record(shard)
    args = made["arguments"]
    model = _input(shard, made, args["model"], root)
    sets = [_input(shard, made, s, root) for s in args.get("instructions") or []]
    chosen = [s for s in sets if _sidecar_settings(s).get("split") == split] or sets
    if not chosen:
        raise InputError(shard, "scored no instruction set")
    settings = _sidecar_settings(chosen[0])
    levels_table = None
    if settings.get("element_levels"):
        levels_table = _input(chosen[0], _record(chosen[0]), settings["element_levels"], root)
    try:
        training = json.loads((model / "training.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(model, f"not a trained model folder (training.json: {exc})") from None
    task = "overall" if settings["task"] == "overall" else "element"
    base = _input(shard, made, args["base"], root) if args.get("base") and (model / "adapter_config.json").is_file() else None
    return {"name": f"{model.parent.name}/{model.name}", "task": task, "arch": args["arch"], "folder": str(model),
            "base": str(base) if base else None,
            "settings": {"metadata": list(settings.get("metadata") or []),
                         "prompt_type": bool(settings.get("prompt_type")),
                         "element_levels": bool(settings.get("element_levels"))},
            "alphabet": ALPHABETS[task],
            "image_budget": {"max_pixels": args.get("max_pixels"), "max_tiles": args.get("max_tiles")},
            "trained": {k: training.get(k) for k in ("global_step", "versions", "swift_args")},
            "_levels_table": str(levels_table) if levels_table else None}


def describe(results: Path, *, predictor: str = "ensemble", split: str = "test") -> dict:
    """The bundle description of `predictor` in a results folder, its model folders in place."""
    results = Path(results)
    root = os.path.abspath(results)
    predictions = results / "predictions" / predictor / split / "predictions.parquet"
    if not predictions.is_file():
        raise InputError(results, f"no predictions of {predictor!r} on {split!r} ({predictions}): run the workflow first")
    combined = _record(predictions)
    if combined["command"][:2] != ["imatch", "combine"]:
        raise InputError(predictions, "was not made by `imatch combine`")
    args = combined["arguments"]
    weights = None
    if args.get("weights"):
        weights = json.loads(_input(predictions, combined, args["weights"], root).read_text())
    models: dict[str, dict] = {}
    groups = {}
    for task in ("overall", "element"):
        members = [_member(_input(predictions, combined, s, root), split, root) for s in args[task]]
        for m in members:
            models.setdefault(m["name"], m)
        w = (weights or {}).get(task) or [1 / len(members)] * len(members)
        groups[task] = {"members": [m["name"] for m in members], "weights": [float(x) for x in w]}
    # the element levels the overall queries stated: the element-level table's own models
    tables = {m["_levels_table"] for n, m in models.items() if m["task"] == "overall" and m["_levels_table"]}
    if len(tables) > 1:
        raise InputError(predictions, f"the overall models stated element levels from several tables: {sorted(tables)}")
    levels_from = None
    if tables:
        table = Path(tables.pop())
        made = _record(table)
        levels_from = []
        for s in made["arguments"]["scores"]:
            m = _member(_input(table, made, s, root), split, root)
            models.setdefault(m["name"], m)
            levels_from.append(m["name"])
    for m in models.values():
        m.pop("_levels_table")
    return {"format": FORMAT, "imatch": __version__, "tau": float(args["tau"]), "overall": groups["overall"],
            "element": groups["element"], "element_levels_from": levels_from, "models": models,
            "source": {"results": root, "predictor": predictor, "split": split,
                       "git_revision": combined.get("git_revision")}}


def export(results: Path, out: Path, *, predictor: str = "ensemble", split: str = "test",
           reference_bases: bool = False) -> dict:
    """Copy the ensemble of `results` into the bundle folder `out` (atomically), sealed."""
    described = describe(results, predictor=predictor, split=split)
    with atomic_path(Path(out), directory=True) as tmp:
        bases: dict[str, str] = {}
        for name, m in described["models"].items():
            target = Path("models") / name
            shutil.copytree(m["folder"], tmp / target, ignore=shutil.ignore_patterns(".*", f"*{SUFFIX}"))
            m["folder"] = target.as_posix()
            if m["base"]:
                base = Path(m["base"])
                if reference_bases:
                    integrity.verify(base, required=True)
                    m["base"] = {"path": str(base.resolve()),
                                 "manifest_sha256": integrity.sha256_file(base / integrity.MANIFEST)}
                else:
                    if str(base) not in bases:
                        bases[str(base)] = (Path("bases") / base.name).as_posix()
                        shutil.copytree(base, tmp / bases[str(base)], ignore=shutil.ignore_patterns(".*", f"*{SUFFIX}"))
                    m["base"] = bases[str(base)]
        described["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(described, tmp / BUNDLE)
        integrity.seal(tmp, kind="imatch-bundle")
    return described


def load(source: Path) -> dict:
    """A bundle (verified against its manifest) or a results folder (described in place); every
    model's settings are required: a bundle that lacks them is an error, never a default."""
    source = Path(source)
    if not (source / BUNDLE).is_file():
        if (source / "predictions").is_dir():
            return _absolute(describe(source), None)
        raise InputError(source, f"neither a bundle ({BUNDLE}) nor a results folder (predictions/)")
    integrity.verify(source, required=True)
    try:
        described = json.loads((source / BUNDLE).read_text())
    except ValueError as exc:
        raise InputError(source / BUNDLE, f"not JSON: {exc}") from None
    if described.get("format") != FORMAT:
        raise InputError(source / BUNDLE, f"format {described.get('format')!r}; this imatch reads format {FORMAT}")
    for key in ("tau", "overall", "element", "models"):
        if key not in described:
            raise InputError(source / BUNDLE, f"missing {key!r}")
    for name, m in described["models"].items():
        for key in ("task", "arch", "folder", "settings", "alphabet", "image_budget"):
            if key not in m:
                raise InputError(source / BUNDLE, f"model {name!r} lacks {key!r}")
        missing = [k for k in SETTINGS if k not in m["settings"]]
        if missing:
            raise InputError(source / BUNDLE, f"model {name!r}: settings lack {missing}")
        if m["alphabet"] != ALPHABETS[m["task"]]:
            raise InputError(source / BUNDLE, f"model {name!r} answers in {m['alphabet']}, this imatch reads "
                                              f"{ALPHABETS[m['task']]}")
    return _absolute(described, source)


def _absolute(described: dict, root: Path | None) -> dict:
    for m in described["models"].values():
        if root is not None:
            m["folder"] = str((root / m["folder"]).resolve())
            if isinstance(m["base"], str):
                m["base"] = str((root / m["base"]).resolve())
        if isinstance(m["base"], dict):  # a referenced base: where it was, checked by its manifest
            base = Path(m["base"]["path"])
            if not (base / integrity.MANIFEST).is_file() or integrity.sha256_file(base / integrity.MANIFEST) != m["base"]["manifest_sha256"]:
                raise InputError(base, f"the base backbone of {m['folder']} is missing or not the one exported "
                                       "(its manifest differs)")
            m["base"] = str(base)
    return described


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="copy a trained ensemble into a portable bundle folder", description=__doc__)
    p.add_argument("results", type=Path, help="results folder of the workflow")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--predictor", default="ensemble", help="predictor whose models to export (default: %(default)s)")
    p.add_argument("--split", default="test", help="split whose predictions name the models (default: %(default)s)")
    p.add_argument("--reference-bases", action="store_true",
                   help="record LoRA base backbones by path and checksum instead of copying them")
    p.set_defaults(func=_run)


def sources(described: dict) -> list[Path]:
    """What a described ensemble is read from: its model folders and bases (provenance inputs)."""
    found = [Path(m["folder"]) for m in described["models"].values()]
    found += [Path(m["base"]) for m in described["models"].values() if isinstance(m["base"], str)]
    return sorted(set(found))


def _run(args) -> int:
    # the inputs are the exported models, not the whole results folder (which later jobs change)
    args.sources = sources(describe(args.results, predictor=args.predictor, split=args.split))
    described = export(args.results, args.out, predictor=args.predictor, split=args.split,
                       reference_bases=args.reference_bases)
    print(json.dumps({"models": sorted(described["models"]), "tau": described["tau"],
                      "element_levels_from": described["element_levels_from"]}))
    return 0
