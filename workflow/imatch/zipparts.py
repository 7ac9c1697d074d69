"""Read a zip that was split into parts (`images.zip.part-aa`, `-ab`, ...) without joining it on disk.

The real EvalMuse image archive is 54 GB in six parts; `cat`-ing them first would need another
54 GB of scratch. `PartsFile` presents the parts as one seekable file, which is all `zipfile`
needs. `safe_extract` refuses members that would land outside the target folder.
"""

from __future__ import annotations

import bisect
import io
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from imatch.errors import InputError


class PartsFile(io.RawIOBase):
    """The concatenation of `parts` as one read-only, seekable binary file."""

    def __init__(self, parts: list[Path]):
        super().__init__()
        self.parts = [Path(p) for p in parts]
        self.sizes = [p.stat().st_size for p in self.parts]
        self.starts = [0]
        for size in self.sizes:
            self.starts.append(self.starts[-1] + size)
        self.size = self.starts[-1]
        self.pos = 0
        self._handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.size:
            k = bisect.bisect_right(self.starts, self.pos) - 1
            handle = self._handles.get(k)
            if handle is None:
                handle = self._handles[k] = open(self.parts[k], "rb")
            handle.seek(self.pos - self.starts[k])
            want = min(len(view) - done, self.starts[k + 1] - self.pos)
            got = handle.readinto(view[done:done + want])
            if not got:
                raise InputError(self.parts[k], "zip part ended early while reading")
            done += got
            self.pos += got
        return done

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        super().close()


def _check_member(info: zipfile.ZipInfo, archive: str) -> PurePosixPath:
    name = PurePosixPath(info.filename)
    mode = info.external_attr >> 16
    if name.is_absolute() or ".." in name.parts or ":" in info.filename.split("/")[0]:
        raise InputError(archive, "member would be written outside the target folder", f"member {info.filename!r}")
    if stat.S_ISLNK(mode):
        raise InputError(archive, "symbolic links are not unpacked", f"member {info.filename!r}")
    return name


def safe_extract(parts: list[Path], dest: Path, *, label: str) -> dict[str, int]:
    """Unpack the split zip `parts` into `dest`; return the size of each file written, by member name."""
    try:
        handle = PartsFile(parts)
        archive = zipfile.ZipFile(io.BufferedReader(handle, buffer_size=1 << 20))
    except zipfile.BadZipFile as exc:
        raise InputError(label, f"not a readable zip archive ({exc})") from None
    written = {}
    with archive:
        members = archive.infolist()
        dest_resolved = dest.resolve()
        for info in tqdm(members, desc="unpack", unit="file", mininterval=2):
            name = _check_member(info, label)
            target = (dest / name).resolve()
            if dest_resolved not in target.parents and target != dest_resolved:
                raise InputError(label, "member would be written outside the target folder", f"member {info.filename!r}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(info) as src, open(target, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
            except (zipfile.BadZipFile, EOFError) as exc:
                raise InputError(label, f"corrupt archive member ({exc})", f"member {info.filename!r}") from None
            written[name.as_posix()] = info.file_size
    return written
