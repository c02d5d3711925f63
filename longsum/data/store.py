"""Result files: JSONL records that survive crashes, reruns and concurrent runs, and never touch
a file that longsum did not write.

A result file (`summaries.jsonl`, an eval's `predictions.jsonl`) gets one JSON record per line,
flushed as each is written. Beside it, a sidecar (`summaries.jsonl.run.json`; `run.json` for eval)
says what produced it: the model's weights fingerprint and every setting that changes outputs (the
"identity"), plus informational fields. Opening a result file (`ResultStore`):

* `-` or a path that is not a regular file (`/dev/null`, a FIFO): records are streamed, no resume.
* a missing or empty file: the sidecar is written first, then the records.
* an existing file must be longsum's (our sidecar next to it, every complete line a JSON record with
  an `id`), else it is refused with one line and left untouched, `--overwrite` included. Its
  identity must equal this run's: a different model, weights or setting is refused with a line
  naming the difference (settings that do not change outputs, like the batch size, are not part
  of the identity). A torn last line (a crash mid-write) is cut off.
* `<file>.lock` is locked (`flock`) for the whole run, so a second run into the same file stops
  with one line instead of writing every record twice. The kernel drops the lock when the process
  dies, even on `kill -9`; the lock file is removed at the end.
* a symlink is written through: the path is resolved once, and the file, its sidecar, its lock
  and the compaction's temporary file all live beside the target, so every name of one file (the
  link, the target) finds the same sidecar and lock, and the link stays a link. A sidecar that an
  older longsum put beside the link is read from there and copied beside the target (left as is).

Records are keyed by `record_key` (the resolved path of the file they came from, and their id). A key whose newest record is a success is
`done` (skipped on reruns); one whose newest record is an `error` is retried. When a run has
replaced records, `close()` compacts the file so that every key keeps only its newest record:
the new file (`.<file>.<pid>.compact`) is written beside it, fsynced and renamed over it. A crash
or a full disk leaves the old one whole (a full disk is one line; a rerun compacts it), and what a
killed run left behind (that temporary file, or the sidecar's `.<sidecar>.<pid>.tmp`) is removed at
the next start: only under the lock, only files whose name is exactly ours, whose writer is gone and
whose content is ours.

A record is written as UTF-8 JSON; one that holds a lone surrogate (a file name that is not UTF-8,
decoded with `surrogateescape`) or that the stream's encoding cannot hold is written with `\\uXXXX`
escapes instead, which read back as the same strings, so the record is found done on a rerun.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from longsum.errors import LongsumError

FORMAT = "longsum-results"
FORMAT_VERSION = 1

Key = tuple  # (source or None, id)


def record_key(record: dict) -> Key:
    """(resolved file path, id) of a record from a record file; (path, None) of a text file's
    record; (None, id) of stdin, pipes and eval examples. See `longsum.data.inputs`."""
    path = record.get("path")
    if path is None:
        return (None, str(record["id"]))
    return (path, str(record["id"]) if "source" in record else None)


def sidecar_for(path: Path) -> Path:
    return path.with_name(path.name + ".run.json")


def to_json_line(record: dict, encoding: str | None = "utf-8") -> str:
    """`record` as one JSON line that `encoding` can hold: readable UTF-8 when it can be, else escaped.

    A lone surrogate (a name that is not UTF-8) cannot be encoded, and `write` must not fail for one
    record's content; `\\udce9` escapes read back as the same string, so `record_key` is unchanged.
    """
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode(encoding or "utf-8")
    except (UnicodeError, LookupError):
        line = json.dumps(record) + "\n"
    return line


def _non_empty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def is_failure(record: dict) -> bool:
    return "error" in record


# ------------------------------------------------------------------------------------------ reading
class NotOurs(LongsumError):
    pass


def iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of a file; a last line without newline comes last as-is."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            yield n, offset, raw
            offset += len(raw)


def scan(path: Path, first: int = 1) -> Iterator[tuple[int, int, dict | None]]:
    """(line number, offset, record) of a result file from line `first` on (a part file's header
    line comes before); record None for a torn last line.

    Raises NotOurs at the first complete line that is not a JSON object with an `id`.
    """
    for n, offset, raw in iter_lines(path):
        if n < first:
            continue
        if not raw.endswith(b"\n"):
            yield n, offset, None  # torn: a crash mid-write (only ever the last line)
            return
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "id" not in record:
            raise NotOurs(f"line {n} of {path} is not a longsum record")
        yield n, offset, record


def statuses(path: Path) -> tuple[set[Key], set[Key]]:
    """(keys whose newest record is a success, keys whose newest record is an error) of a result file."""
    status: dict[Key, bool] = {}
    if path.exists():
        for _, _, record in scan(path):
            if record is not None:
                status[record_key(record)] = is_failure(record)
    return {k for k, f in status.items() if not f}, {k for k, f in status.items() if f}


def read_records(path: str | Path) -> list[dict]:
    """Every complete record of a result file, in file order (for tests and small files)."""
    return [r for _, _, r in scan(Path(path)) if r is not None]


def latest_records(path: str | Path) -> Iterator[dict]:
    """The newest record of each key, streamed in file order (memory: one small entry per key)."""
    path = Path(path)
    last: dict[Key, int] = {}
    for n, _, record in scan(path):
        if record is not None:
            last[record_key(record)] = n
    for n, _, record in scan(path):
        if record is not None and last.get(record_key(record)) == n:
            yield record


# ------------------------------------------------------------------------------------------ locking
class OutputLock:
    """An exclusive, non-blocking lock on `path` (a lock file), released by the kernel if we die."""

    def __init__(self, path: Path, what: Path):
        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise LongsumError(f"another longsum run (pid {holder}) is writing {what}; wait for it to finish "
                                   f"or choose another output")  # fmt: skip
            try:  # the file we locked may have been removed by the run that just finished: lock the new one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ identity
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_difference(old: dict, new: dict) -> str:
    """'num_beams 4 then, 2 now; ...' for the identity keys that differ."""
    a, b = _flat(old), _flat(new)
    parts = [f"{k} {json.dumps(a.get(k))} then, {json.dumps(b.get(k))} now"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]  # fmt: skip
    return "; ".join(parts)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: `path` is as it was, and no temporary file stays
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ leftovers
def remove_leftovers(path: Path, sidecar: Path) -> list[Path]:
    """Remove what a killed run left beside `path` (compaction) and `sidecar` (its atomic write); hold the lock.

    A file goes only if all of this holds: its name is exactly `.<name>.<pid>.compact` /
    `.<sidecar name>.<pid>.tmp` for this output (compared as strings: a user's file name is never a
    pattern), the process `pid` is gone (or is this one: a reused pid), it is a regular file, and its
    content is ours (result records / the start of a sidecar). The lock says no other run writes this
    output now; the pid and the content guard against anything else that happens to share the name.
    """
    removed = []
    for folder, prefix, suffix, ours in ((path.parent, f".{path.name}.", ".compact", _records_only),
                                         (sidecar.parent, f".{sidecar.name}.", ".tmp", _sidecar_start)):  # fmt: skip
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            pid = name[len(prefix) : len(name) - len(suffix)]
            if not (name.startswith(prefix) and name.endswith(suffix) and pid.isascii() and pid.isdigit()):
                continue
            leftover = Path(entry.path)
            try:
                if entry.is_file(follow_symlinks=False) and _gone(int(pid)) and ours(leftover):
                    leftover.unlink()
                    removed.append(leftover)
            except OSError:  # unreadable, or gone meanwhile: leave it be, it costs nothing but space
                pass
    return removed


def _gone(pid: int) -> bool:
    """Is no other process `pid` running now (so none can be writing a file that carries its pid)?"""
    if pid == os.getpid():
        return True  # this run has not compacted yet: the file is an earlier process's with our pid
    if pid <= 0 or os.name == "nt":  # no writer's pid / os.kill would terminate it there: keep the file
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: alive, someone else's; or no pid we can judge
        pass
    return False


def _records_only(path: Path) -> bool:
    """Every complete line a result record, and a torn last one the start of a JSON object."""
    try:
        for _, offset, record in scan(path):
            if record is None:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return b'{"'.startswith(f.read(2))
    except NotOurs:
        return False
    return True


_SIDECAR_START = b'{\n  "format": "' + FORMAT.encode() + b'"'


def _sidecar_start(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(len(_SIDECAR_START))
    return _SIDECAR_START.startswith(head)  # empty (killed before its first write), or cut short


# ------------------------------------------------------------------------------------------ the store
class ResultStore:
    """A result file opened for a run; see the module docstring.

    Args:
        path: the JSONL file, or "-" for stdout.
        identity: what must match to resume (model fingerprint, output-changing settings).
        info: written to the sidecar too, not compared (model name, longsum version...).
        overwrite: start over (only on a file that is longsum's).
        sidecar: where the sidecar goes [default: `<path>.run.json`].
        other: how the user chooses another output ("another --output"), for messages.
    """

    def __init__(self, path: str | Path, identity: dict, *, info: dict | None = None, overwrite: bool = False,
                 sidecar: Path | None = None, other: str = "another --output"):  # fmt: skip
        self.identity, self.other = identity, other
        self.done: set[Key] = set()  # keys whose newest record is a success
        self.failed: set[Key] = set()  # keys whose newest record is an error (retried)
        self.repaired = False
        self._status: dict[Key, bool] = {}  # key -> its newest record is a failure
        self._replaced = 0  # records replaced by a newer one of the same key (found or written)
        self._lock: OutputLock | None = None
        self._created = False  # this run created the file (removed again if it ends without a record)
        self._written = 0
        self.streaming = str(path) == "-" or (Path(path).exists() and not Path(path).is_file())
        self.path = None if str(path) == "-" else Path(path)
        self.shown = "stdout" if self.path is None else str(path)  # the name the user gave, for messages
        if self.streaming:  # stdout, /dev/null, a FIFO: nothing to resume or lock
            try:
                self._file = sys.stdout if self.path is None else open(self.path, "a", encoding="utf-8")
            except OSError as err:
                raise LongsumError(f"cannot write to {path}: {err.strerror or err}; choose {other}") from None
            return
        named = self.path
        if named.is_symlink():
            # Write through the link: compacting by renaming over the link would replace it by a plain file
            # and leave its target stale. Resolved once, so the link, lock and sidecar agree for the whole run.
            self.path = Path(os.path.realpath(named))
            self.shown = f"{named} (a link to {self.path})"
        self.sidecar = sidecar or sidecar_for(self.path)
        self._legacy = None  # a sidecar beside the link, where longsum put it before links were resolved
        legacy = sidecar_for(named)
        if sidecar is None and named != self.path and not self.sidecar.exists() and legacy.exists():
            if _non_empty(self.path):  # it vouches for the records in the target
                self.sidecar, self._legacy = legacy, legacy
        self._open(overwrite, info or {})

    def _open(self, overwrite: bool, info: dict) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = OutputLock(path.with_name(path.name + ".lock"), self.shown)
        except OSError as err:
            raise LongsumError(f"cannot write to {self.shown}: {err.strerror or err}; choose {self.other}") from None
        try:
            self._check_ours(overwrite)
            remove_leftovers(path, self.sidecar)  # the output is ours and locked: what a killed run left goes
            if self._legacy is not None:  # checked where it was; from now on beside the target, for every name
                self.sidecar = sidecar_for(path)
                if not overwrite:
                    write_json_atomic(self.sidecar, self._previous)
            if overwrite or not path.exists() or path.stat().st_size == 0:
                self._start_fresh(info)
            else:
                self._resume()
            self._file = open(path, "a", encoding="utf-8")
        except OSError as err:
            if self._created:  # made by this run, and its sidecar could not be written: leave no trace
                self.path.unlink(missing_ok=True)
            self._lock.release()
            raise LongsumError(f"cannot write to {self.shown}: {err.strerror or err}; choose {self.other}") from None
        except LongsumError:
            self._lock.release()
            raise

    def _check_ours(self, overwrite: bool) -> None:
        """Refuse (before touching anything) a non-empty file that longsum did not write."""
        path, shown = self.path, self.shown
        if not path.exists() or path.stat().st_size == 0:
            return
        refuse = f"not touching it: choose {self.other} (or delete it yourself)"
        try:
            meta = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError:
            where = self.sidecar.name if shown == str(path) else self.sidecar
            raise NotOurs(f"{shown} was not written by longsum (there is no {where} beside it); "
                          f"{refuse}") from None  # fmt: skip
        except (OSError, ValueError) as err:
            raise NotOurs(f"cannot read {self.sidecar} ({err}), so {shown} may not be longsum's; {refuse}") from None
        if not isinstance(meta, dict):
            raise NotOurs(f"{self.sidecar} is not longsum's, so neither is {shown}; {refuse}")
        try:
            for _ in scan(path):
                pass
        except NotOurs as err:
            raise NotOurs(f"{err}; {refuse}") from None
        self._previous = meta
        if not overwrite and meta.get("identity") != self.identity:
            if meta.get("format") != FORMAT:
                why = f"{self.sidecar.name} has no identity (an older longsum wrote it)"
            else:
                why = identity_difference(meta.get("identity") or {}, self.identity)
            raise LongsumError(f"{shown} holds results of another model or settings ({why}); resuming would mix "
                               f"them: use the same model and settings, --overwrite to start over, or "
                               f"{self.other}")  # fmt: skip

    def _start_fresh(self, info: dict) -> None:
        from longsum.data.provenance import now

        created = not self.path.exists()
        # Empty the file before the new sidecar is written: the other way round, a file that cannot be
        # truncated would keep its old records under a sidecar that vouches for this run's identity.
        with open(self.path, "w"):
            pass
        self._created = created  # only now: `_open` removes the file on failure only if this run made it
        write_json_atomic(self.sidecar, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                         "identity": self.identity, **info, "created": now()})  # fmt: skip

    def _resume(self) -> None:
        torn_at = None
        for _, offset, record in scan(self.path):
            if record is None:
                torn_at = offset
                continue
            key = record_key(record)
            self._replaced += key in self._status
            self._status[key] = is_failure(record)
        if torn_at is not None:
            with open(self.path, "rb+") as f:
                f.truncate(torn_at)
            self.repaired = True
        self.refresh()

    def refresh(self) -> None:
        """Recompute `done` / `failed` from what the file holds now."""
        self.done = {k for k, failed in self._status.items() if not failed}
        self.failed = {k for k, failed in self._status.items() if failed}

    # -- writing ----------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        try:
            self._file.write(to_json_line(record, getattr(self._file, "encoding", None)))
            self._file.flush()
        except OSError as err:
            raise LongsumError(f"cannot write to {self.shown}: {err.strerror or err}") from None
        self._written += 1
        if not self.streaming:
            key = record_key(record)
            self._replaced += key in self._status
            self._status[key] = is_failure(record)

    def close(self, drop: Callable[[dict], bool] | None = None) -> None:
        """Finish the run: compact if records were replaced (or `drop(record)` says so), unlock."""
        if self.streaming:
            if self._file is not sys.stdout:
                try:
                    self._file.close()
                except OSError:  # a write already failed and said so (a full disk, /dev/full)
                    pass
            return
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            except OSError as err:
                raise LongsumError(f"cannot write to {self.shown}: {err.strerror or err}") from None
            if self._created and not self._written:  # the run failed before its first record: leave no trace
                self.path.unlink(missing_ok=True)
                self.sidecar.unlink(missing_ok=True)
            elif self._replaced or (drop is not None and any(self._status.values())):
                try:
                    compact(self.path, drop)
                except OSError as err:  # a full disk: the file is whole (newest records last), only longer
                    raise LongsumError(f"could not compact {self.shown}: {err.strerror or err}; it is whole and "
                                       f"resumable but still holds the records this run replaced: free some "
                                       f"space and rerun to compact it") from None  # fmt: skip
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def compact(path: Path, drop: Callable[[dict], bool] | None = None) -> int:
    """Keep only each key's newest record (and not those `drop` rejects), atomically; returns lines removed."""
    last: dict[Key, int] = {}
    for n, _, record in scan(path):
        if record is not None:
            last[record_key(record)] = n
    tmp = path.with_name(f".{path.name}.{os.getpid()}.compact")  # `remove_leftovers` knows this name
    removed = 0
    try:
        with open(tmp, "wb") as out:
            for n, _, raw in iter_lines(path):
                if not raw.endswith(b"\n"):
                    continue
                record = json.loads(raw)
                if last.get(record_key(record)) == n and not (drop is not None and drop(record)):
                    out.write(raw)
                else:
                    removed += 1
            out.flush()
            os.fsync(out.fileno())
        if removed:
            os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: `path` is untouched, and its half copy must not stay
        tmp.unlink(missing_ok=True)
        raise
    if removed:
        _fsync_dir(path.parent)
    else:
        tmp.unlink()
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartWriter:
    """A plain JSONL writer for one rank's part file under a launcher (merged by rank 0)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "w", encoding="utf-8")
        except OSError as err:
            raise LongsumError(f"cannot write to {path}: {err.strerror or err}") from None

    def write(self, record: dict) -> None:
        try:
            self._file.write(to_json_line(record))
            self._file.flush()
        except OSError as err:
            raise LongsumError(f"cannot write to {self.path}: {err.strerror or err}") from None

    def close(self, drop=None) -> None:
        self._file.close()
