"""The one boundary to the Hugging Face Hub.

Everything that needs files from the hub calls `snapshot()`. Tests (and users with a
pre-mirrored copy on a cluster without internet) set ``IMATCH_HUB_MIRROR`` to a local folder
laid out as ``<mirror>/<repo_type>s/<repo_id>/<files>``; then the files are copied from there
instead of downloaded. Nothing else in the package touches the network.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

MIRROR_ENV = "IMATCH_HUB_MIRROR"


def mirror_root() -> Path | None:
    value = os.environ.get(MIRROR_ENV)
    return Path(value) if value else None


def snapshot(
    repo_id: str,
    *,
    revision: str,
    local_dir: Path,
    repo_type: str = "dataset",
    allow_patterns: list[str] | None = None,
) -> str:
    """Materialise `repo_id` at `revision` in `local_dir`; return the resolved commit id.

    huggingface_hub resumes interrupted downloads and skips files already complete in
    `local_dir`, so rerunning after a kill only fetches what is missing.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    mirror = mirror_root()
    if mirror is not None:
        return _copy_from_mirror(mirror / f"{repo_type}s" / repo_id, revision, local_dir, allow_patterns)

    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision)
    snapshot_download(
        repo_id,
        repo_type=repo_type,
        revision=info.sha,
        local_dir=local_dir,
        allow_patterns=allow_patterns,
    )
    return info.sha


def _copy_from_mirror(source: Path, revision: str, local_dir: Path, allow_patterns) -> str:
    if not source.is_dir():
        raise FileNotFoundError(f"{MIRROR_ENV} is set but {source} does not exist")
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source).as_posix()
        if not path.is_file() or rel.startswith("."):
            continue
        if allow_patterns and not any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
            continue
        dest = local_dir / rel
        if dest.is_file() and dest.stat().st_size == path.stat().st_size:
            continue  # like the hub client: a complete file is not fetched again
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return f"mirror:{revision}"
