"""One error type for bad input, so every stage reports file and record the same way."""

from __future__ import annotations


class InputError(Exception):
    """Bad input: names the file and, when known, the record that is wrong."""

    def __init__(self, path, message: str, record: str | None = None):
        self.path = str(path)
        self.record = record
        self.message = message
        where = self.path if record is None else f"{self.path}: {record}"
        super().__init__(f"{where}: {message}")


def record_label(index: int, record) -> str:
    """Human-readable pointer to a JSON record: its position and img_path when it has one."""
    img = record.get("img_path") if isinstance(record, dict) else None
    return f"record {index}" + (f" (img_path={img!r})" if img is not None else "")
