"""Append-only JSONL results that survive crashes and resume.

Each record is written and flushed as soon as it exists. Re-opening an existing file repairs a torn
last line (a crash mid-write) by cutting it off, and reports which ids are already there so a
re-run skips them: every document ends up in the file exactly once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

from longsum.errors import LongsumError


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file (a torn or malformed line is skipped)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def repair_torn_tail(path: Path) -> bool:
    """Cut a last line that has no newline (an interrupted write). True if something was cut."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return False
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return False
        block = 1 << 16
        pos = size
        while pos > 0:  # find the last newline, reading backwards
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return True
            pos = start
        f.truncate(0)
        return True


class JsonlWriter:
    """Writes records to `path` ("-" = stdout), resuming an existing file unless `overwrite`."""

    def __init__(self, path: str | Path, overwrite: bool = False, key: str = "id"):
        self.path = None if str(path) == "-" else Path(path)
        self.key = key
        self.done: set[str] = set()
        self.repaired = False
        self._file: IO[str]
        if self.path is None:
            self._file = sys.stdout
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not overwrite:
                self.repaired = repair_torn_tail(self.path)
                self.done = {str(r[key]) for r in read_records(self.path) if key in r}
            self._file = open(self.path, "w" if overwrite else "a", encoding="utf-8")
        except OSError as err:
            raise LongsumError(f"cannot write to {path}: {err.strerror or err}; choose another --output") from None

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(str(record[self.key]))

    def close(self) -> None:
        if self.path is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
