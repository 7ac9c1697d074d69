"""Stage `download`: fetch the EvalMuse-40K data set repo and record what was fetched.

The files land in a folder that Snakemake does not own (so a killed download resumes instead of
being deleted); the declared output is the sha256 manifest, written last and atomically.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm import tqdm

from imatch import hub
from imatch.atomic import write_json

DEFAULT_REPO = "DY-Evalab/EvalMuse"
# Files iMatch uses; prompt_t2i.json is for ranking T2I models and is skipped.
DEFAULT_PATTERNS = ["train_list.json", "test.json", "images.zip.part-*"]
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_files(root: Path, *, exclude=(MANIFEST,)) -> list[Path]:
    """The files a manifest of `root` lists: all but hidden ones (hub caches) and provenance records."""
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name not in exclude and not p.name.endswith(".prov.json")
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def build_manifest(root: Path, *, exclude=(MANIFEST,)) -> list[dict]:
    files = manifest_files(root, exclude=exclude)
    return [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in tqdm(files, desc="sha256", unit="file")
    ]


def download(out_dir: Path, *, repo_id: str, revision: str, patterns: list[str]) -> dict:
    out_dir = Path(out_dir)
    commit = hub.snapshot(repo_id, revision=revision, local_dir=out_dir, allow_patterns=patterns)
    manifest = {
        "repo_id": repo_id,
        "repo_type": "dataset",
        "revision": revision,
        "commit": commit,
        "files": build_manifest(out_dir),
    }
    if not manifest["files"]:
        raise RuntimeError(f"nothing was fetched from {repo_id}@{revision} with patterns {patterns}")
    write_json(manifest, out_dir / MANIFEST)
    return manifest


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "download",
        help="fetch the EvalMuse-40K HF dataset repo at a pinned revision, with a sha256 manifest",
        description=__doc__,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to download into (manifest.json is written there)")
    p.add_argument("--repo-id", default=DEFAULT_REPO, help="HF dataset repo (default: %(default)s)")
    p.add_argument("--revision", required=True, help="commit sha (or tag) to pin; the resolved commit is recorded")
    p.add_argument("--pattern", action="append", dest="patterns", help="file pattern to fetch (repeatable)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    manifest = download(args.out, repo_id=args.repo_id, revision=args.revision, patterns=args.patterns or DEFAULT_PATTERNS)
    total = sum(f["size"] for f in manifest["files"])
    print(f"fetched {len(manifest['files'])} files ({total / 2**20:.1f} MiB) at {manifest['commit']}")
    return 0
