"""Stage `backbone`: the model a fine-tune starts from.

`tiny-backbone` builds a random-weight backbone of a real architecture offline (tiny for tests and
the embedded default, real size for GPU benchmarks). `download-backbone` fetches a checkpoint from
the HF hub at a pinned revision through the hub boundary and writes a sha256 manifest, as
`download` does for the data. Both write the folder atomically; every job that loads the folder
checks it against the manifest first (`imatch.integrity`).
"""

from __future__ import annotations

import json
from pathlib import Path

from imatch import archs, hub
from imatch.atomic import atomic_path
from imatch.integrity import seal


def tiny_backbone(arch: str, out: Path, *, size: str, seed: int) -> None:
    spec = archs.get(arch)
    if size not in spec.sizes:
        raise ValueError(f"{arch} has sizes {spec.sizes}, not {size!r}")
    with atomic_path(out, directory=True) as tmp:
        spec.build(tmp, size=size, seed=seed)
        (tmp / "imatch-backbone.json").write_text(json.dumps({"arch": arch, "size": size, "seed": seed, "random_weights": True}))
        seal(tmp)  # checked by every job that loads it


def download_backbone(repo_id: str, revision: str, out: Path) -> dict:
    commit = hub.snapshot(repo_id, revision=revision, local_dir=out, repo_type="model")
    return seal(out, repo_id=repo_id, repo_type="model", revision=revision, commit=commit)


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("tiny-backbone", help="build a random-weight backbone of a real architecture offline",
                              description=__doc__)
    t.add_argument("--arch", required=True, help="qwen2_5_vl, internvl or ovis2")
    t.add_argument("--size", default="tiny", help="tiny (tests, demo) or a real size for GPU benchmarks (qwen2_5_vl: 7b; internvl: 7b; ovis2: 8b, 16b, 34b)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=_run_tiny)

    d = subparsers.add_parser("download-backbone", help="fetch a checkpoint from the HF hub with a sha256 manifest",
                              description=__doc__)
    d.add_argument("--repo-id", required=True)
    d.add_argument("--revision", required=True, help="commit sha (or tag) to pin")
    d.add_argument("--out", type=Path, required=True)
    d.set_defaults(func=_run_download)


def _run_tiny(args) -> int:
    tiny_backbone(args.arch, args.out, size=args.size, seed=args.seed)
    print(f"built {args.size} {args.arch} in {args.out}")
    return 0


def _run_download(args) -> int:
    manifest = download_backbone(args.repo_id, args.revision, args.out)
    print(f"fetched {len(manifest['files'])} files at {manifest['commit']}")
    return 0
