"""Splitting work between processes under `torchrun` / `accelerate launch`.

Each rank handles every `world`-th item and writes its own part file; rank 0 then appends the parts
to the one output file (skipping ids already there) and removes them. Part files left behind by a
crashed run are merged at the next start, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from longsum.jsonl import read_records, repair_torn_tail


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

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

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part{rank}")


def merge_parts(output: Path, key: str = "id") -> int:
    """Append the records of `output.part*` files to `output` (new ids only); returns how many."""
    parts = sorted(output.parent.glob(f"{output.name}.part*"))
    if not parts:
        return 0
    seen = set()
    if output.exists():
        repair_torn_tail(output)
        seen = {str(r.get(key)) for r in read_records(output)}
    added = 0
    with open(output, "a", encoding="utf-8") as out:
        for part in parts:
            for record in read_records(part):
                if str(record.get(key)) not in seen:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    seen.add(str(record.get(key)))
                    added += 1
    for part in parts:
        part.unlink()
    return added


def open_output(output: str, dist: Dist, overwrite: bool = False, key: str = "id"):
    """(writer, ids already done, repaired?) for `output`; under a launcher each rank writes a part.

    Rank 0 first folds in parts left by a crashed run, so every rank sees the same done ids.
    """
    from longsum.errors import LongsumError
    from longsum.jsonl import JsonlWriter

    if dist.world == 1:
        writer = JsonlWriter(output, overwrite=overwrite, key=key)
        return writer, set(writer.done), writer.repaired
    if output == "-":
        raise LongsumError("with several processes, write to a file (-o out.jsonl), not stdout")
    path = Path(output)
    repaired = False
    if dist.main:
        if overwrite and path.exists():
            path.unlink()
        merge_parts(path, key)
        probe = JsonlWriter(path, key=key)  # fails early (one line) if the output is not writable
        repaired = probe.repaired
        probe.close()
    dist.barrier()
    done = {str(r.get(key)) for r in read_records(path)} if path.exists() else set()
    return JsonlWriter(part_path(path, dist.rank), overwrite=True, key=key), done, repaired


def close_output(writer, output: str, dist: Dist, key: str = "id") -> None:
    """Close this rank's writer; rank 0 merges every part into `output` once all are done."""
    writer.close()
    if dist.world > 1:
        dist.barrier()
        if dist.main:
            merge_parts(Path(output), key)
