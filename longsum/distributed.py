"""Splitting work between processes under `torchrun` / `accelerate launch`.

Every rank reads the same inputs and takes every `world`-th pending document; each writes its own
part file (`<output>.part<rank>`). Rank 0 alone opens the real output (checks, lock, resume state:
`longsum.store.ResultStore`) and, at the end, appends the parts to it and compacts it. Part files
left behind by a crashed run are folded in at the next start, so nothing is lost or duplicated.
A check that fails on rank 0 fails on every rank (`Dist.agree`), so no rank waits forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from longsum.errors import LongsumError


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


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part{rank}")


def _parts(output: Path) -> list[Path]:
    return sorted(p for p in output.parent.glob(f"{output.name}.part*") if p.name[len(output.name) + 5 :].isdigit())


def merge_parts(store, output: Path) -> int:
    """Append the records of `output.part<N>` files (ours: each line a record) to `store`; returns how many."""
    from longsum.store import NotOurs, scan

    added = 0
    for part in _parts(output):
        try:
            records = [r for _, _, r in scan(part) if r is not None]
        except NotOurs:
            continue  # not a part file of ours: leave it alone
        for record in records:
            store.write(record)
            added += 1
        part.unlink()
    return added


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
    from longsum.store import PartWriter, ResultStore, statuses

    kwargs = {"info": info, "overwrite": overwrite, "sidecar": sidecar, "other": other}
    if dist.world == 1:
        store = ResultStore(output, identity, **kwargs)
        return Results(store, store, store.done, store.failed, dist, None)
    if output == "-":
        raise LongsumError("with several processes, write to a file (-o out.jsonl), not stdout")
    path = Path(output)
    holder: dict = {}

    def open_main() -> None:
        store = ResultStore(path, identity, **kwargs)
        if overwrite:
            for part in _parts(path):
                part.unlink()
        elif merge_parts(store, path):  # a crashed run's parts
            store.refresh()
        holder["store"] = store

    dist.agree(open_main)
    store = holder.get("store")
    done, failed = (store.done, store.failed) if store else statuses(path)
    return Results(store, PartWriter(part_path(path, dist.rank)), done, failed, dist, path)
