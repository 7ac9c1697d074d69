"""Atomic writes: a temp name beside the target, renamed into place only on success.

A killed or failed job therefore never leaves an artifact that looks complete, which is what
Snakemake's staleness checks (and users reading results/) rely on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target, *, directory: bool = False):
    """Yield a temporary path next to `target`; move it onto `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create owner-only files; give the artifact the permissions of a normal
    # file so a group sharing a results tree on a cluster can read it.
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    try:
        yield tmp
        if directory and target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a refused permission: say which artifact
            message = f"{target} not written: {exc}"
            raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc
        raise


def write_parquet(df: pd.DataFrame, target) -> None:
    """Write a DataFrame as parquet deterministically (no index, fixed row groups)."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)


def write_json(obj, target, *, indent: int | None = 1) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def write_text(text: str, target) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
