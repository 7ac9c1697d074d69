"""`imatch verify`: the sha256 manifests of folders that stages use but a later job could find damaged.

Downloads (data set, backbones), built and converted backbones and trained models each carry a
manifest.json (path, size and sha256 of every file, written last and atomically). `verify`
re-reads the files before they are used, so a truncated, altered or missing file (a copy cut
short, a bad disk, an edit by hand) stops the job with its name instead of loading a wrong model
or reading wrong data. Model folders are checked exactly: a file the manifest does not list is an
error too, since a loader might pick it up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from imatch.atomic import write_json
from imatch.download import MANIFEST, build_manifest, manifest_files, sha256_file
from imatch.errors import InputError


def seal(folder: Path, **meta) -> dict:
    """Write `folder`/manifest.json listing every file in it (call it last, inside the atomic write)."""
    manifest = {**meta, "files": build_manifest(Path(folder))}
    write_json(manifest, Path(folder) / MANIFEST)
    return manifest


def manifest_entries(path: Path) -> list[dict]:
    """The file entries (path, size, sha256) of a manifest.json, or an error naming it."""
    try:
        return json.loads(Path(path).read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"unreadable manifest: {exc}") from None


def check_file(target: Path, entry: dict, manifest: Path) -> None:
    """`target` against its `entry` of `manifest`: there, of the recorded size and sha256."""
    if not target.is_file():
        raise InputError(target, f"missing: listed in {manifest}")
    size = target.stat().st_size
    if size != entry["size"]:
        raise InputError(target, f"{size} bytes, {manifest} records {entry['size']} (truncated or replaced)")
    if sha256_file(target) != entry["sha256"]:
        raise InputError(target, f"sha256 differs from the one recorded in {manifest} (altered or corrupted)")


def verify(folder: Path, *, exact: bool = True, required: bool = False) -> int | None:
    """Check every file of `folder` against its manifest; the number of files checked, or None
    (after saying so) when there is no manifest and none is required."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise InputError(folder, f"no {MANIFEST}: its files cannot be checked")
        print(f"{folder}: no {MANIFEST}, files not verified")
        return None
    files = manifest_entries(path)
    for entry in files:
        check_file(folder / entry["path"], entry, path)
    if exact:
        listed = {entry["path"] for entry in files}
        extra = [p.relative_to(folder).as_posix() for p in manifest_files(folder)]
        extra = [name for name in extra if name not in listed]
        if extra:
            raise InputError(folder / extra[0], f"not listed in {path} ({len(extra)} unlisted files)")
    print(f"{folder}: {len(files)} files match {MANIFEST}")
    return len(files)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check folders against their sha256 manifest.json", description=__doc__)
    p.add_argument("folders", type=Path, nargs="+", help="folders holding a manifest.json")
    p.add_argument("--allow-unlisted", action="store_true", help="ignore files the manifest does not list")
    p.set_defaults(func=_run)

    p = subparsers.add_parser("seal", help="write a folder's sha256 manifest.json (e.g. pretrained/ after regenerating)",
                              description="Write FOLDER/manifest.json: path, size and sha256 of every file in it, for "
                                          "a folder that a person assembles rather than a stage (the shipped "
                                          "pretrained backbones); `imatch verify FOLDER` checks it.")
    p.add_argument("folder", type=Path)
    p.set_defaults(func=_run_seal)


def _run_seal(args: argparse.Namespace) -> int:
    manifest = seal(args.folder)
    print(f"{args.folder}: {len(manifest['files'])} files sealed in {MANIFEST}")
    return 0


def _run(args: argparse.Namespace) -> int:
    for folder in args.folders:
        verify(folder, exact=not args.allow_unlisted, required=True)
    return 0
