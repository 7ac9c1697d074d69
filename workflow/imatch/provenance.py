"""Provenance records and `imatch audit`: what every artifact was made from, checked later.

After a command succeeds, the CLI writes `<output>.prov.json` beside each of its outputs: the
command line, the config values it received (its arguments), the sha256 (or, for folders and
files over 256 MiB, size and modification time) of every input path it was given and of the output
itself, package versions, the git revision of the workflow, the seed and the device. `imatch
audit RESULTS` recomputes those fingerprints and reports every artifact whose bytes, or whose
inputs, changed since it was made, and every record whose artifact is gone.
"""

from __future__ import annotations

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
HASH_LIMIT = 256 * 2**20
PACKAGES = ["imatch", "pandas", "pyarrow", "numpy", "torch", "transformers", "ms-swift", "peft", "albumentations"]


def fingerprint(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {"missing": True}
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"kind": "dir", "files": len(files), "bytes": sum(p.stat().st_size for p in files),
                "mtime_ns": max((p.stat().st_mtime_ns for p in files), default=0)}
    size = path.stat().st_size
    if size > HASH_LIMIT:
        return {"kind": "file", "bytes": size, "mtime_ns": path.stat().st_mtime_ns}
    return {"kind": "file", "bytes": size, "sha256": sha256_file(path)}


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
    """The outputs of a command: its --out* and --jsonl arguments."""
    found = []
    for key, value in vars(args).items():
        if (key.startswith("out") or key in {"jsonl", "images"}) and isinstance(value, Path):
            found.append(value)
    return found


def input_paths(args, outputs: list[Path]) -> list[Path]:
    found = []
    for key, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, Path) and v not in outputs and v.exists():
                found.append(v)
    return found


def record(args, argv: list[str]) -> None:
    outputs = [p for p in output_paths(args) if p.exists()]
    if not outputs:
        return
    inputs = input_paths(args, outputs)
    base = {
        "command": ["imatch", *argv],
        "arguments": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                      for k, v in vars(args).items() if k != "func"},
        "inputs": {str(p): fingerprint(p) for p in inputs},
        "seed": getattr(args, "seed", None),
        "git_revision": _git_revision(),
        "versions": _versions(),
        "python": sys.version.split()[0],
        "device": _device(),
        "host": platform.node(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for out in outputs:
        write_json({**base, "output": str(out), "output_fingerprint": fingerprint(out)}, Path(f"{out}{SUFFIX}"))


def audit(results: Path) -> list[dict]:
    """Problems found under `results`: changed or missing artifacts and inputs."""
    problems = []
    for prov in sorted(Path(results).rglob(f"*{SUFFIX}")):
        rec = json.loads(prov.read_text())
        out = Path(rec["output"])
        if not out.is_absolute():
            out = Path(os.getcwd()) / out
        now = fingerprint(out)
        if now.get("missing"):
            problems.append({"artifact": rec["output"], "problem": "artifact missing"})
            continue
        if now != rec["output_fingerprint"]:
            problems.append({"artifact": rec["output"], "problem": "artifact changed since it was made"})
        for path, was in rec["inputs"].items():
            if fingerprint(Path(path)) != was:
                problems.append({"artifact": rec["output"], "problem": f"input changed or missing: {path}"})
    return problems


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="verify a results tree against its provenance records", description=__doc__)
    p.add_argument("results", type=Path, help="results folder (run from the workflow's working directory)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    records = list(Path(args.results).rglob(f"*{SUFFIX}"))
    problems = audit(args.results)
    for p in problems:
        print(f"{p['artifact']}: {p['problem']}")
    print(json.dumps({"records": len(records), "problems": len(problems)}))
    return 1 if problems else 0
