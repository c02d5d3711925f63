"""Runs under a launcher: part files found by their literal names, and merged only into a run of their identity.

Most tests drive `open_results` for both ranks in this process (`FakeRank`: rank 0's checks run here
and their outcome is handed to rank 1, as the broadcast does); a crashed run is one killed in a
subprocess (`crash`), so the kernel drops its lock as it does after `kill -9`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from longsum.data.distributed import Dist, _parts, open_results
from longsum.data.store import read_records, sidecar_for
from longsum.errors import LongsumError

ROOT = Path(__file__).resolve().parents[1]
A = {"model_fingerprint": "A", "num_beams": 4, "generation": {"max_new_tokens": 8}}
B = {"model_fingerprint": "B", "num_beams": 2, "generation": {"max_new_tokens": 8}}


@dataclass(frozen=True)
class FakeRank(Dist):
    """One rank of a launched run without a process group; open rank 0 first, as the broadcast orders it."""

    board: dict = field(default_factory=dict, compare=False)  # shared by the ranks of one run

    def agree(self, fn):
        if self.main:
            try:
                self.board["agreed"] = ("ok", fn())
            except LongsumError as err:
                self.board["agreed"] = ("error", str(err))
        kind, value = self.board["agreed"]
        if kind == "error":
            raise LongsumError(value)
        return value

    def barrier(self) -> None:
        pass


def rec(key: str, identity: dict) -> dict:
    return {"id": key, "model": identity["model_fingerprint"], "summary": f"summary of {key}"}


def launched(output: Path, identity: dict, per_rank: list[list[str]], *, overwrite: bool = False, close=True):
    """A run of `len(per_rank)` ranks into `output`; rank r writes the records `per_rank[r]`."""
    board: dict = {}
    ranks = [open_results(str(output), identity, FakeRank(rank=r, world=len(per_rank), board=board), info={},
                          overwrite=overwrite) for r in range(len(per_rank))]  # fmt: skip
    for results, keys in zip(ranks, per_rank):
        for key in keys:
            results.write(rec(key, identity))
    if close:
        for results in reversed(ranks):  # rank 0 last: it merges once every rank is done
            results.close()


def single(output: Path, identity: dict, keys: list[str], *, overwrite: bool = False):
    """A run without a launcher."""
    results = open_results(str(output), identity, Dist(), info={}, overwrite=overwrite)
    for key in keys:
        results.write(rec(key, identity))
    results.close()


def crash(output: Path, identity: dict, per_rank: list[list[str]]) -> None:
    """A launched run killed after its ranks wrote `per_rank` (records in part files, none merged)."""
    code = ("import json, os, sys; from pathlib import Path; from tests.test_distributed import launched; "
            "out, identity, per_rank = json.loads(sys.argv[1]); "
            "launched(Path(out), identity, per_rank, close=False); os._exit(9)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([str(output), identity, per_rank])], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert [p.name for p in _parts(output)], "the crashed run should leave part files"


def parts_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


def models(output: Path) -> dict[str, str]:
    return {r["id"]: r["model"] for r in read_records(output)}


# ------------------------------------------------------------------------------ 22.1: names are not patterns
@pytest.mark.parametrize("name", ["out[1].jsonl", "out*.jsonl", "out?.jsonl", "o[!x]t.jsonl"])
def test_22_1_part_files_are_found_by_their_literal_name(tmp_path, name):
    wanted = [f"{name}.part{r}" for r in (0, 1, 2, 10)]
    others = [f"{name}.partx", f"{name}.part\u00b2", f"{name}.part1.tmp", f"{name}.part", "out1.jsonl.part0",
              "outX.jsonl.part3", "o[!x]t.jsonl.part0x"]  # fmt: skip
    for n in wanted + others:
        (tmp_path / n).write_text("")
    assert [p.name for p in _parts(tmp_path / name)] == wanted  # by rank, not by string


def test_22_1_a_launched_run_into_a_name_with_brackets_keeps_every_record(tmp_path):
    neighbour = tmp_path / "out1.jsonl.part0"  # what `out[1].jsonl.part*` means as a pattern: someone else's
    neighbour.write_text('{"id": "theirs"}\n')
    out = tmp_path / "out[1].jsonl"
    launched(out, A, [["a", "c"], ["b"]])
    assert models(out) == {"a": "A", "b": "A", "c": "A"}
    assert parts_left(tmp_path) == ["out1.jsonl.part0"] and neighbour.read_text() == '{"id": "theirs"}\n'


def test_22_1_parts_of_an_output_the_name_matches_as_a_pattern_are_not_merged(tmp_path):
    other = tmp_path / "outX.jsonl"
    crash(other, A, [["x0"], ["x1"]])
    before = {p.name: p.read_bytes() for p in _parts(other)}
    out = tmp_path / "out*.jsonl"
    launched(out, A, [["a"], ["b"]])
    assert models(out) == {"a": "A", "b": "A"}
    assert {p.name: p.read_bytes() for p in _parts(other)} == before  # still there for outX.jsonl's rerun
    launched(other, A, [["x2"], []])
    assert models(other) == {"x0": "A", "x1": "A", "x2": "A"}


@pytest.mark.slow
def test_22_1_torchrun_into_a_name_with_brackets(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"Document {i}. Rivers, towns, bridges and markets grew along the valley.")
    out = tmp_path / "out[1].jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29563",
           "-m", "longsum", "summarize", str(docs), "-m", str(tiny_model_dir), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(r["id"] for r in read_records(out)) == sorted(str(p) for p in docs.iterdir())
    assert parts_left(tmp_path) == []


# ------------------------------------------------------------------------------ 22.2: parts carry the run identity
def test_22_2_after_a_single_process_overwrite_a_crashed_runs_parts_do_not_join_other_settings(tmp_path):
    out = tmp_path / "out.jsonl"
    crash(out, A, [["a0"], ["a1"]])
    single(out, B, ["b0"], overwrite=True)  # starts over: the crashed run's parts go too
    assert parts_left(tmp_path) == []
    launched(out, B, [["b1"], ["b2"]])
    assert models(out) == {"b0": "B", "b1": "B", "b2": "B"}
    assert parts_left(tmp_path) == []


def test_22_2_after_the_output_is_deleted_parts_of_other_settings_are_refused_until_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    crash(out, A, [["a0"], ["a1"]])
    out.unlink()
    sidecar_for(out).unlink()
    before = {p.name: p.read_bytes() for p in _parts(out)}
    with pytest.raises(
        LongsumError, match=r"part files of an interrupted run with other settings \(.*num_beams 4 then"
    ):
        launched(out, B, [["b0"], ["b1"]])
    assert {p.name: p.read_bytes() for p in _parts(out)} == before  # the crashed run's work is kept
    assert not out.exists() and not sidecar_for(out).exists()
    launched(out, B, [["b0"], ["b1"]], overwrite=True)
    assert models(out) == {"b0": "B", "b1": "B"}
    assert parts_left(tmp_path) == []


def test_22_2_overwrite_without_a_launcher_removes_our_parts_of_the_same_settings(tmp_path):
    out = tmp_path / "out.jsonl"
    crash(out, A, [["a0"], ["a1"]])
    single(out, A, [], overwrite=True)
    launched(out, A, [["c"], []])
    assert models(out) == {"c": "A"}  # nothing from before the overwrite comes back


@pytest.mark.parametrize("next_run", ["launched", "single"])
def test_22_2_a_crashed_runs_parts_of_the_same_settings_are_folded_in(tmp_path, next_run):
    out = tmp_path / "out.jsonl"
    crash(out, A, [["a0"], ["a1"]])
    if next_run == "launched":
        launched(out, A, [["c"], []])
    else:
        single(out, A, ["c"])
    assert models(out) == {"a0": "A", "a1": "A", "c": "A"}
    assert parts_left(tmp_path) == []


def test_22_2_part_files_longsum_did_not_write_are_never_touched(tmp_path):
    out = tmp_path / "out.jsonl"
    blocker = tmp_path / "out.jsonl.part1"  # where rank 1 would write
    blocker.write_text("my notes\n")
    headless = tmp_path / "out.jsonl.part7"  # records without a run identity (a user's, or an older longsum's)
    headless.write_text(json.dumps(rec("h", B)) + "\n")
    with pytest.raises(LongsumError, match="out.jsonl.part1 .*not touching it"):
        launched(out, A, [["a0"], ["a1"]])
    assert blocker.read_text() == "my notes\n"
    single(out, A, ["s"])  # writes no part file: nothing is in its way
    assert blocker.read_text() == "my notes\n"
    blocker.unlink()
    launched(out, A, [["a0"], ["a1"]])
    assert models(out) == {"s": "A", "a0": "A", "a1": "A"}
    assert headless.read_text() == json.dumps(rec("h", B)) + "\n"
    assert parts_left(tmp_path) == ["out.jsonl.part7"]


def test_22_2_a_part_killed_mid_header_is_removed_and_an_empty_one_is_reused(tmp_path):
    """Guards the edges of the header check (these passed before the fix too): neither holds a record."""
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.part3").write_text('{"format": "longsum-pa')  # killed while writing its header
    (tmp_path / "out.jsonl.part1").write_text("")  # killed before its header: in rank 1's way, nothing to lose
    launched(out, A, [["a0"], ["a1"]])
    assert models(out) == {"a0": "A", "a1": "A"}
    assert parts_left(tmp_path) == []
