"""Stage `backbone`: the model a fine-tune starts from.

`tiny-backbone` builds a random-weight backbone of a real architecture offline (tiny for tests and
config/random.yaml, real size for GPU benchmarks). `pretrained-backbone` restores a tiny backbone
that `imatch pretrain-tiny` taught to see and `--pack` packed (the files shipped in `pretrained/`,
`source: pretrained`, the embedded default): the packed file is first checked against the sha256
manifest of the folder it ships in, then its unpacked files against the backbone's own seal.
`download-backbone` fetches a checkpoint from the HF hub at a pinned revision through the hub
boundary and writes a sha256 manifest, as `download` does for the data. All write the folder
atomically; every job that loads the folder checks it against the manifest first
(`imatch.integrity`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from imatch import archs, hub, integrity
from imatch.atomic import atomic_path
from imatch.download import MANIFEST
from imatch.errors import InputError
from imatch.integrity import seal

ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def tiny_backbone(arch: str, out: Path, *, size: str, seed: int) -> None:
    spec = archs.get(arch)
    if size not in spec.sizes:
        raise ValueError(f"{arch} has sizes {spec.sizes}, not {size!r}")
    with atomic_path(out, directory=True) as tmp:
        spec.build(tmp, size=size, seed=seed)
        (tmp / "imatch-backbone.json").write_text(json.dumps({"arch": arch, "size": size, "seed": seed, "random_weights": True}))
        seal(tmp)  # checked by every job that loads it


def pack(backbone: Path, file: Path) -> int:
    """A deterministic deflated zip of a backbone folder (sorted names, fixed times): the same folder
    gives the same bytes, so a regenerated file can be compared with the shipped one."""
    backbone = Path(backbone)
    with atomic_path(file) as tmp:
        with zipfile.ZipFile(tmp, "w") as zf:
            for path in sorted(p for p in backbone.rglob("*") if p.is_file()):
                info = zipfile.ZipInfo(path.relative_to(backbone).as_posix(), date_time=ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes(), compresslevel=9)
    return Path(file).stat().st_size


def check_shipped(file: Path) -> dict:
    """`file` against the manifest.json of the folder it ships in (`imatch verify` of that folder
    checks them all): it must be listed, with its size and sha256."""
    file = Path(file)
    manifest = file.parent / MANIFEST
    if not manifest.is_file():
        raise InputError(file, f"no {manifest} beside it: a shipped backbone is sealed by its folder's manifest")
    entry = next((e for e in integrity.manifest_entries(manifest) if e["path"] == file.name), None)
    if entry is None:
        raise InputError(file, f"not listed in {manifest} (a regenerated file is sealed with `imatch seal "
                               f"{file.parent}`)")
    integrity.check_file(file, entry, manifest)
    return entry


def pretrained_backbone(file: Path, out: Path) -> None:
    """The backbone folder of a shipped packed file, checked twice: the file against its folder's
    manifest, the unpacked files against the backbone's own seal (exact: nothing unlisted)."""
    from imatch.zipparts import safe_extract

    check_shipped(file)
    with atomic_path(out, directory=True) as tmp:
        safe_extract([Path(file)], tmp, label=str(file))
        integrity.verify(tmp, required=True)


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

    u = subparsers.add_parser("pretrained-backbone", help="restore a shipped pretrained tiny backbone (checked against its manifests)",
                              description=__doc__)
    u.add_argument("--packed", type=Path, required=True, help="the packed file (`imatch pretrain-tiny --pack`), e.g. pretrained/tiny-internvl.zip")
    u.add_argument("--out", type=Path, required=True, help="backbone folder to write (atomically)")
    u.set_defaults(func=_run_pretrained)

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


def _run_pretrained(args) -> int:
    pretrained_backbone(args.packed, args.out)
    print(f"unpacked {args.packed} to {args.out}")
    return 0


def _run_download(args) -> int:
    manifest = download_backbone(args.repo_id, args.revision, args.out)
    print(f"fetched {len(manifest['files'])} files at {manifest['commit']}")
    return 0
