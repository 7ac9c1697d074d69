"""Provenance records and `imatch audit`: what every artifact was made from, checked later.

After a command succeeds, the CLI writes `<output>.prov.json` beside each of its outputs: the
command line, the config values it received (its arguments), a fingerprint of every input path it
was given and of the output itself, package versions, the git revision of the workflow, the seed
and the device. `imatch audit RESULTS` recomputes those fingerprints and names every file of an
artifact that changed since it was made, every artifact whose inputs changed, and every record
whose artifact is gone.

Fingerprints hold content only (sha256 and size; for files over 256 MiB the size and the sha256 of
their first and last 4 MiB: `imatch verify` re-hashes sealed model folders whole), never times or
absolute paths, so a tree copied or moved (`cp -a`, rsync to scratch) audits clean. Hidden files
(Snakemake's `.snakemake_timestamp`, hub caches) and artifacts nested in a folder artifact (with a
record of their own) are not part of the folder's fingerprint. An input that is itself an artifact
is fingerprinted by its record (cheap; the artifact is audited on its own); a sealed folder (with
`manifest.json`) by its manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from imatch.atomic import write_json
from imatch.download import sha256_file

SUFFIX = ".prov.json"
FORMAT = 2
HASH_LIMIT = 256 * 2**20
SAMPLE = 4 * 2**20
PACKAGES = ["imatch", "pandas", "pyarrow", "numpy", "torch", "transformers", "ms-swift", "peft", "albumentations"]


def _file_print(path: Path) -> dict:
    size = path.stat().st_size
    if size <= HASH_LIMIT:
        return {"bytes": size, "sha256": sha256_file(path)}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:  # a weights file: its ends and its size (manifests hash it whole)
        digest.update(fh.read(SAMPLE))
        fh.seek(size - SAMPLE)
        digest.update(fh.read(SAMPLE))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def _members(folder: Path) -> list[Path]:
    """The files that make a folder artifact: not hidden, not provenance records, not inside an
    artifact nested in it (one with a record of its own, written by another command)."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (base / f"{d}{SUFFIX}").exists())
        for name in sorted(files):
            if not name.startswith(".") and not name.endswith(SUFFIX) and not (base / f"{name}{SUFFIX}").exists():
                found.append(base / name)
    return found


def fingerprint(path: Path) -> dict:
    """An artifact's content: per file for a folder, so that a change names the file."""
    path = Path(path)
    if not path.exists():
        return {"missing": True}
    if path.is_dir():
        return {"kind": "dir", "files": {p.relative_to(path).as_posix(): _file_print(p) for p in _members(path)}}
    return {"kind": "file", **_file_print(path)}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def input_print(path: Path) -> dict:
    """An input's identity: its own record's fingerprint when it is an artifact, its manifest when
    it is a sealed folder, else its content."""
    path = Path(path)
    if not path.exists():
        return {"missing": True}
    record = Path(f"{path}{SUFFIX}")
    if record.is_file():
        try:
            return {"artifact": _digest(json.loads(record.read_text())["output_fingerprint"])}
        except (ValueError, KeyError):
            pass  # an unreadable record: fall back to the content
    if path.is_dir() and (path / "manifest.json").is_file():
        return {"sealed": sha256_file(path / "manifest.json")}
    return {"content": _digest(fingerprint(path))}


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _device() -> str:
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"cpu ({platform.processor() or platform.machine()})"


def output_paths(args) -> list[Path]:
    """The outputs of a command: the artifacts it names itself (`args.artifacts`, for a command
    whose --out folder holds several), else its --out*, --jsonl and --images arguments."""
    if getattr(args, "artifacts", None):
        return list(args.artifacts)
    found = []
    for key, value in vars(args).items():
        if (key.startswith("out") or key in {"jsonl", "images"}) and isinstance(value, Path):
            found.append(value)
    return found


NOT_INPUTS = {"scratch", "step_times"}  # working folders and logs a command writes, not what it reads


def input_paths(args, outputs: list) -> list[Path]:
    """The paths a command read: those it names itself (`args.sources`, for a command given a
    whole results folder of which it reads a few artifacts), else every existing path argument."""
    if getattr(args, "sources", None) is not None:
        return [Path(p) for p in args.sources if Path(p).exists()]
    found = []
    for key, value in vars(args).items():
        if key in NOT_INPUTS:
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, Path) and v not in outputs and v not in found and v.exists():
                found.append(v)
    return found


def record(args, argv: list[str]) -> None:
    declared = output_paths(args)
    outputs = [p for p in declared if p.exists()]
    if not outputs:
        return
    inputs = input_paths(args, declared + [getattr(args, "out", None)])
    base = {
        "format": FORMAT,
        "command": ["imatch", *argv],
        "arguments": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                      for k, v in vars(args).items() if k not in {"func", "artifacts", "sources"}},
        "seed": getattr(args, "seed", None),
        "git_revision": _git_revision(),
        "versions": _versions(),
        "python": sys.version.split()[0],
        "device": _device(),
        "host": platform.node(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    prints = {p: input_print(p) for p in inputs}
    for out in outputs:
        here = Path(os.path.abspath(out)).parent
        # each input by its path as given, absolute, and relative to the record (a moved tree)
        listed = [{"path": str(p), "absolute": os.path.abspath(p), "relative": os.path.relpath(os.path.abspath(p), here),
                   "print": prints[p]} for p in inputs]
        write_json({**base, "output": str(out), "output_fingerprint": fingerprint(out), "inputs": listed},
                   Path(f"{out}{SUFFIX}"))


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def locate(entry: dict, record: Path, root: str) -> Path:
    """Where an input is now: beside the record as it was when the input lay in the audited tree
    (the tree may have been moved or copied), else where it was."""
    moved = os.path.normpath(os.path.join(os.path.abspath(record.parent), entry["relative"]))
    return Path(moved) if _inside(moved, root) else Path(entry["absolute"])


def _changed_files(was: dict, now: dict) -> list[str]:
    if was.get("kind") != "dir" or now.get("kind") != "dir":
        return []
    before, after = was["files"], now["files"]
    return ([f"{name}: missing" for name in sorted(set(before) - set(after))]
            + [f"{name}: changed" for name in sorted(set(before) & set(after)) if before[name] != after[name]]
            + [f"{name}: not part of the artifact when it was made" for name in sorted(set(after) - set(before))])


def audit(results: Path) -> list[dict]:
    """Problems found under `results`: changed or missing artifacts (naming the files) and inputs."""
    problems = []
    root = os.path.abspath(results)
    for prov in sorted(Path(results).rglob(f"*{SUFFIX}")):
        artifact = Path(str(prov)[: -len(SUFFIX)])  # the record lies beside its artifact
        name = str(artifact)
        try:
            rec = json.loads(prov.read_text())
        except ValueError as exc:
            problems.append({"artifact": name, "problem": f"unreadable provenance record {prov}: {exc}"})
            continue
        if rec.get("format") != FORMAT:
            problems.append({"artifact": name, "problem": "provenance record of an older imatch (rerun the stage)"})
            continue
        now = fingerprint(artifact)
        if now.get("missing"):
            problems.append({"artifact": name, "problem": "artifact missing"})
            continue
        if now != rec["output_fingerprint"]:
            files = _changed_files(rec["output_fingerprint"], now)
            for line in files or ["artifact changed since it was made"]:
                where = f"{name}/{line}" if files else f"{name}: {line}"
                problems.append({"artifact": name, "problem": line, "line": where})
        for entry in rec["inputs"]:
            path = locate(entry, prov, root)
            if input_print(path) != entry["print"]:
                state = "missing" if not path.exists() else "changed since the artifact was made"
                problems.append({"artifact": name, "problem": f"input {state}: {path}"})
    return problems


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="verify a results tree against its provenance records", description=__doc__)
    p.add_argument("results", type=Path, help="results folder (from any working directory; a moved or copied tree audits like the original)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    records = list(Path(args.results).rglob(f"*{SUFFIX}"))
    problems = audit(args.results)
    for p in problems:
        print(p.get("line") or f"{p['artifact']}: {p['problem']}")
    print(json.dumps({"records": len(records), "problems": len(problems)}))
    return 1 if problems else 0
