"""Splitting work between processes under `torchrun` / `accelerate launch`.

Every rank reads the same inputs and takes every `world`-th pending document; each writes its own
part file (`<output>.part<rank>`). Rank 0 alone opens the real output (checks, lock, resume state:
`longsum.data.store.ResultStore`) and, at the end, appends the parts to it and compacts it. Part files
left behind by a crashed run are folded in at the next start, so nothing is lost or duplicated.
A check that fails on rank 0 fails on every rank (`Dist.agree`), so no rank waits forever.

Part files (`<output>.part<N>`, N digits; found by listing the folder and comparing names as
strings, so a name like `out[1].jsonl` is never a pattern) are JSONL whose first line is a header,
`{"format": "longsum-part", "format_version": 1, "identity": {...}}`, with the same identity the
output's sidecar holds; the records follow. They live beside the file the output's lock guards (a
symlinked output's target). At every start (under that lock, launcher or not), rank 0 looks at them:

* ours (a complete header, every complete line after it a record) of this run's identity: folded
  into the output, then removed; with `--overwrite`, removed unread (the user starts over).
* ours of another identity: never merged. With `--overwrite` they are removed; without it the run
  is refused with the difference, as an output of other settings is (a crashed launched run leaves
  its output empty, so its parts are the only record of its work and its settings).
* a torn header (killed while writing it: no records): removed.
* anything else (a file longsum did not write, an older longsum's part without a header, an empty
  file): left alone. Where it stands in the way of this run's parts the run is refused, except for
  an empty file, which holds nothing to lose.

So every record that reaches the output was written under this run's identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from longsum.errors import LongsumError

PART_FORMAT = "longsum-part"
PART_FORMAT_VERSION = 1
# How every part file starts (json.dumps writes keys in this order): a file killed mid-header is
# recognised by it. A header is one short line; a first line longer than the limit is not ours.
_HEADER_START = b'{"format": "' + PART_FORMAT.encode() + b'"'
_HEADER_LIMIT = 1 << 20


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        """Is the `index`-th pending item this rank's?"""
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, fn):
        """Run `fn()` on rank 0; every rank returns its result or raises its LongsumError."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        payload: list = [None]
        if self.main:
            try:
                payload = [("ok", fn())]
            except LongsumError as err:
                payload = [("error", str(err))]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise LongsumError(value)
        return value

    def device(self, device: str) -> str:
        """One GPU per process under a launcher."""
        if self.world > 1 and device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return device


def init() -> Dist:
    """Join the process group when launched by torchrun/accelerate (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # object collectives use the current device
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


# ------------------------------------------------------------------------------------------ part files
def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part{rank}")


def _parts(output: Path) -> list[Path]:
    """The `<output>.part<N>` files beside `output`, by N.

    The folder is listed and names compared as strings: a user's file name is not a pattern
    (`out[1].jsonl` as a glob matches `out1.jsonl`, never itself; `out*.jsonl` matches other outputs).
    """
    prefix = output.name + ".part"
    folder = output.parent
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise LongsumError(f"cannot list {folder} to find the part files of {output}: {err.strerror or err}") from None
    found = []
    for name in names:
        rank = name[len(prefix) :]
        if name.startswith(prefix) and rank.isascii() and rank.isdigit():  # isascii: '²'.isdigit() is True
            found.append((int(rank), name))
    return [output.with_name(name) for _, name in sorted(found)]


def _plain(identity: dict) -> dict:
    """`identity` as it reads back from JSON (tuples become lists), so that equal means equal."""
    return json.loads(json.dumps(identity))


def _part_header(part: Path) -> tuple[str, dict | None]:
    """What `part` holds: ("ours", its identity), ("torn", None) for a header cut short (no records),
    ("empty", None) or ("other", None)."""
    try:
        with open(part, "rb") as f:
            first = f.readline(_HEADER_LIMIT)
    except OSError:  # a folder, unreadable: not something we can vouch for
        return "other", None
    if not first:
        return "empty", None
    if not first.endswith(b"\n"):  # the only line: killed while writing the header?
        torn = len(first) < _HEADER_LIMIT and (first.startswith(_HEADER_START) or _HEADER_START.startswith(first))
        return ("torn" if torn else "other"), None
    try:
        header = json.loads(first)
    except ValueError:
        return "other", None
    if isinstance(header, dict) and header.get("format") == PART_FORMAT and isinstance(header.get("identity"), dict):
        return "ours", header["identity"]
    return "other", None


def _part_records(part: Path):
    """The records after a part's header; a torn last line (a crash mid-write) is skipped.

    Raises NotOurs at a complete line that is not a record.
    """
    from longsum.data.store import scan

    return (record for _, _, record in scan(part, first=2) if record is not None)  # (None: a torn last line)


def _mergeable(part: Path, identity: dict) -> bool:
    """Is `part` ours, of `identity`, and every line after its header a record?"""
    from longsum.data.store import NotOurs

    kind, found = _part_header(part)
    if kind != "ours" or found != identity:
        return False
    try:
        for _ in _part_records(part):
            pass
    except (NotOurs, OSError):
        return False
    return True


def merge_parts(store, output: Path) -> int:
    """Append the records of the `output.part<N>` files of `store`'s identity to `store`, removing each
    part once appended; returns how many records. Any other part file is left as it is."""
    identity = _plain(store.identity)
    added = 0
    for part in _parts(output):
        if not _mergeable(part, identity):  # checked whole first: a part is merged entirely or not at all
            continue
        for record in _part_records(part):
            store.write(record)
            added += 1
        part.unlink()
    return added


def _tidy_parts(store, output: Path, ranks: int, overwrite: bool, other: str) -> None:
    """At the start of a run, on rank 0 with the output locked: see the module docstring. `ranks`: how
    many part files this run writes (none without a launcher)."""
    try:
        _tidy(store, output, ranks, overwrite, other)
    except OSError as err:  # a part we may not remove or read: one line, not a traceback
        raise LongsumError(f"cannot read or remove the part files beside {output}: {err.strerror or err}; "
                           f"choose {other}") from None  # fmt: skip


def _tidy(store, output: Path, ranks: int, overwrite: bool, other: str) -> None:
    from longsum.data.store import identity_difference

    identity = _plain(store.identity)
    stale: list[Path] = []
    foreign: list[tuple[Path, dict]] = []  # ours, of another identity
    for part in _parts(output):
        kind, found = _part_header(part)
        if kind == "torn" or (kind == "ours" and overwrite):
            stale.append(part)
        elif kind == "ours" and found != identity:
            foreign.append((part, found))
    if foreign:
        part, found = foreign[0]
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise LongsumError(f"{output} has part files of an interrupted run with other settings "
                           f"({identity_difference(found, identity)}): {part.name}{more}; merging them would mix "
                           f"results: use the same model and settings to finish that run, --overwrite to start "
                           f"over, or {other}")  # fmt: skip
    for part in stale:
        part.unlink(missing_ok=True)
    if not overwrite and merge_parts(store, output):  # a crashed run's parts
        store.refresh()
    for rank in range(ranks):
        part = part_path(output, rank)
        if os.path.lexists(part) and not (part.is_file() and not part.is_symlink() and part.stat().st_size == 0):
            raise LongsumError(f"{part} is where this run writes its part file, and longsum did not write it (or an "
                               f"older longsum did, without a run identity); not touching it: move it away or "
                               f"choose {other}")  # fmt: skip


class _PartWriter:
    """This rank's part file: its header first, then the records (`longsum.data.store.PartWriter`)."""

    def __init__(self, path: Path, identity: dict):
        from longsum.data.store import PartWriter

        self._writer = PartWriter(path)  # rank 0 made sure nothing but an empty file stood there
        self._writer.write({"format": PART_FORMAT, "format_version": PART_FORMAT_VERSION, "identity": identity})

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def close(self, drop=None) -> None:
        self._writer.close()


class Results:
    """Where a run writes its records: the store itself, or this rank's part file under a launcher.

    `done` / `failed`: keys whose newest record in the output is a success / an error.
    """

    def __init__(self, store, writer, done: set, failed: set, dist: Dist, output: Path | None):
        self.store, self.writer, self.done, self.failed = store, writer, done, failed
        self.dist, self.output = dist, output
        self.repaired = bool(store is not None and store.repaired)

    def write(self, record: dict) -> None:
        self.writer.write(record)

    def close(self, drop=None) -> None:
        """Finish: under a launcher, rank 0 merges every part once all ranks are done."""
        if self.dist.world == 1:
            self.store.close(drop)
            return
        self.writer.close()
        self.dist.barrier()
        if self.dist.main:
            merge_parts(self.store, self.output)
            self.store.close(drop)


def open_results(output: str, identity: dict, dist: Dist, *, info: dict, overwrite: bool = False,
                 sidecar: Path | None = None, other: str = "another --output") -> Results:  # fmt: skip
    """Open `output` for this run on every rank (see the module docstring)."""
    from longsum.data.store import ResultStore, statuses

    kwargs = {"info": info, "overwrite": overwrite, "sidecar": sidecar, "other": other}
    if dist.world == 1:
        store = ResultStore(output, identity, **kwargs)
        if not store.streaming:  # a launched run's parts belong to this file: fold them in or clear them
            try:
                _tidy_parts(store, store.path, 0, overwrite, other)
            except LongsumError:
                store.close()
                raise
        return Results(store, store, store.done, store.failed, dist, None)
    if output == "-":
        raise LongsumError("with several processes, write to a file (-o out.jsonl), not stdout")
    holder: dict = {}

    def open_main() -> Path:
        store = ResultStore(Path(output), identity, **kwargs)
        try:
            _tidy_parts(store, store.path, dist.world, overwrite, other)
        except LongsumError:
            store.close()  # unlocks; an output this run created and never wrote is removed again
            raise
        holder["store"] = store
        return store.path  # where the parts go: beside the file the lock guards

    path = dist.agree(open_main)
    store = holder.get("store")
    done, failed = (store.done, store.failed) if store else statuses(path)
    return Results(store, _PartWriter(part_path(path, dist.rank), identity), done, failed, dist, path)
