"""Result files: only ours are touched, identity checked, one writer at a time, newest record wins."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from longsum.data.store import PartWriter, ResultStore, compact, read_records, sidecar_for
from longsum.errors import LongsumError

IDENTITY = {"model_fingerprint": "abc", "num_beams": 4, "generation": {"max_new_tokens": 8}}


def fill(path, records, identity=IDENTITY, **kwargs):
    store = ResultStore(path, identity, **kwargs)
    for record in records:
        store.write(record)
    store.close()
    return store


@pytest.mark.parametrize("content", [b"my notes\nsecond line without newline", b"\x89PNG\x00\x01garbage\xff\xfe",
                                     b'{"id": "x", "summary": "looks like ours"}\n'])  # fmt: skip
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_longsum_did_not_write_is_refused_and_untouched(tmp_path, content, overwrite):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(LongsumError, match="was not written by longsum .*not touching it"):
        ResultStore(path, IDENTITY, overwrite=overwrite)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no lock, no sidecar left behind


def test_a_line_that_is_not_a_record_is_refused_even_with_a_sidecar(tmp_path):
    path = tmp_path / "out.jsonl"
    fill(path, [{"id": "a", "summary": "s"}])
    with open(path, "a") as f:
        f.write("someone appended prose\nand more\n")
    before = path.read_bytes()
    with pytest.raises(LongsumError, match="line 2 of .* is not a longsum record"):
        ResultStore(path, IDENTITY)
    assert path.read_bytes() == before


def test_an_empty_file_is_taken_and_a_torn_line_repaired(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("")
    fill(path, [{"id": "a", "summary": "s"}])
    with open(path, "a") as f:
        f.write('{"id": "b", "summ')
    store = ResultStore(path, IDENTITY)
    assert store.repaired and store.done == {(None, "a")}
    store.close()
    assert [r["id"] for r in read_records(path)] == ["a"]


def test_identity_mismatch_names_the_difference(tmp_path):
    path = tmp_path / "out.jsonl"
    fill(path, [{"id": "a", "summary": "s"}])
    before = path.read_bytes()
    other = {**IDENTITY, "num_beams": 2, "generation": {"max_new_tokens": 16}}
    with pytest.raises(LongsumError) as err:
        ResultStore(path, other)
    message = str(err.value)
    assert "generation.max_new_tokens 8 then, 16 now; num_beams 4 then, 2 now" in message
    assert "--overwrite" in message and "\n" not in message
    assert path.read_bytes() == before
    fill(path, [{"id": "b", "summary": "t"}], identity=other, overwrite=True)  # ours: --overwrite starts over
    assert [r["id"] for r in read_records(path)] == ["b"]
    assert json.loads(sidecar_for(path).read_text())["identity"] == other


def test_errors_are_retried_and_the_newest_record_wins(tmp_path):
    path = tmp_path / "out.jsonl"
    fill(
        path,
        [
            {"id": "a", "summary": "s"},
            {"id": "b", "error": "bad"},
            {"id": "c", "source": "f", "path": "/f", "error": "x"},
        ],
    )
    store = ResultStore(path, IDENTITY)
    assert store.done == {(None, "a")} and store.failed == {(None, "b"), ("/f", "c")}
    store.write({"id": "b", "summary": "fixed"})
    store.close()
    records = read_records(path)
    assert [(r["id"], "error" in r) for r in records] == [("a", False), ("c", True), ("b", False)]


def test_compaction_drops_what_it_is_told_and_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "error": "e"}, {"id": "a", "summary": "s"},
                                                            {"id": "z", "error": "stale"}]))  # fmt: skip
    assert compact(path, drop=lambda r: r["id"] == "z") == 2
    assert read_records(path) == [{"id": "a", "summary": "s"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / "out.jsonl"
    first = ResultStore(path, IDENTITY)
    code = ("import sys; from longsum.data.store import ResultStore\n"
            "try:\n    ResultStore(sys.argv[1], {'model_fingerprint': 'abc', 'num_beams': 4, "
            "'generation': {'max_new_tokens': 8}})\nexcept Exception as e:\n    print(e)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True).stdout
    assert f"another longsum run (pid {os.getpid()}) is writing {path}" in out
    first.write({"id": "a", "summary": "s"})
    first.close()
    assert not (tmp_path / "out.jsonl.lock").exists()
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == ""  # free again once the first run ended


def test_streams_are_written_without_resume(tmp_path, capsys):
    """stdout, /dev/null and a FIFO get each record as it comes: no lock, no sidecar, nothing resumed
    (a second run into the same stream writes its records again)."""
    import threading
    from pathlib import Path

    record = {"id": "a", "summary": "s"}
    for _ in range(2):
        store = ResultStore("-", IDENTITY)
        assert store.streaming and not store.done
        store.write(record)
        store.close()
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [record, record]
    devnull = Path(os.devnull)
    store = ResultStore(devnull, IDENTITY)
    assert store.streaming and not store.done
    store.write(record)
    store.close()
    assert devnull.is_char_device()  # still /dev/null, not replaced by a file
    assert not devnull.with_name("null.lock").exists() and not sidecar_for(devnull).exists()
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    with open(fifo, "w"):  # held open: the reader sees the end only after both runs
        for _ in range(2):
            store = ResultStore(fifo, IDENTITY)
            assert store.streaming and not store.done
            store.write(record)
            store.close()
    reader.join(timeout=30)
    assert [json.loads(line) for line in received[0].splitlines()] == [record, record]
    assert [p.name for p in tmp_path.iterdir()] == ["out.fifo"]  # no lock, no sidecar beside it


# ------------------------------------------------------------------------------ issue 22, round 2
def _dead_pid() -> int:
    """The pid of a process that has exited (reaped, so no process has it until the kernel reuses it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _with_a_replaced_record(path):
    """An output whose next close() compacts: `a` failed, then succeeded."""
    fill(path, [{"id": "a", "error": "e"}, {"id": "b", "summary": "t"}])
    store = ResultStore(path, IDENTITY)
    store.write({"id": "a", "summary": "s"})
    return store


def test_22_10_enospc_during_compaction_is_one_line_and_the_output_stays_whole(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    store = _with_a_replaced_record(path)
    before = path.read_bytes()
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up while the compacted copy is written (any file but the output itself)
        if os.fstat(fd).st_ino != path.stat().st_ino:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LongsumError) as err:
        store.close()
    message = str(err.value)
    assert "No space left on device" in message and "rerun" in message and "\n" not in message
    assert path.read_bytes() == before  # whole: every record still there, the newest of `a` last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.run.json"]  # no temp, no lock
    monkeypatch.setattr(os, "fsync", real_fsync)
    resumed = ResultStore(path, IDENTITY)  # resumable, and compacted once there is room
    assert resumed.done == {(None, "a"), (None, "b")} and not resumed.failed
    resumed.close()
    assert read_records(path) == [{"id": "b", "summary": "t"}, {"id": "a", "summary": "s"}]


def test_22_10_what_a_crashed_compaction_left_is_removed_at_the_next_start_and_nothing_else(tmp_path):
    path = tmp_path / "out[1].jsonl"  # glob characters in the name are matched literally
    fill(path, [{"id": "a", "summary": "s"}])
    dead, other = _dead_pid(), _dead_pid()
    leftovers = [f".out[1].jsonl.{dead}.compact", f".out[1].jsonl.{os.getpid()}.compact",  # ours, crashed
                 f".out[1].jsonl.run.json.{dead}.tmp"]  # fmt: skip
    (tmp_path / leftovers[0]).write_text('{"id": "a", "summary": "s"}\n{"id": "b", "su')  # killed mid-write
    (tmp_path / leftovers[1]).write_text("")  # killed before its first write (a pid reused by this run)
    (tmp_path / leftovers[2]).write_text('{\n  "format": "longsum-results",\n  "ident')
    kept = {f".out1.jsonl.{dead}.compact": '{"id": "a"}\n',  # what the glob `.out[1].jsonl.*` would match
            f".out[1].jsonl.{os.getppid()}.compact": '{"id": "a"}\n',  # a live process's (not ours to judge)
            f".out[1].jsonl.{dead}.compact.bak": '{"id": "a"}\n', f".out[1].jsonl.x{dead}.compact": "",
            f".out[1].jsonl.{other}.compact": "the user's own notes\n",  # our name, not our content
            f".out[1].jsonl.{other + 1}.compact": '{"id": "a"}\nmore notes',  # nor a torn record
            f".out[1].jsonl.run.json.{other}.tmp": "[1, 2]\n"}  # fmt: skip
    for name, text in kept.items():
        (tmp_path / name).write_text(text)
    store = ResultStore(path, IDENTITY)
    assert store.done == {(None, "a")}
    store.close()
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(leftovers)
    assert names == {"out[1].jsonl", "out[1].jsonl.run.json", *kept}
    assert all((tmp_path / name).read_text() == text for name, text in kept.items())


def test_22_10_a_sidecar_that_cannot_be_written_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LongsumError, match="cannot write to .*No space left on device"):
        ResultStore(path, IDENTITY)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_22_11_a_symlinked_output_is_written_through_on_every_rerun(tmp_path):
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "out.jsonl"
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    fill(link, [{"id": "a", "error": "e"}, {"id": "b", "summary": "t"}])
    fill(link, [{"id": "a", "summary": "s"}])  # a rerun retries `a`: the file is compacted
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert read_records(target) == [{"id": "b", "summary": "t"}, {"id": "a", "summary": "s"}]
    # The sidecar, the lock and the compaction's temp file live beside the target, whichever name is used.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.jsonl", "runs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.jsonl", "out.jsonl.run.json"]
    via_target = ResultStore(target, IDENTITY)
    assert via_target.done == {(None, "a"), (None, "b")}
    with pytest.raises(LongsumError, match="another longsum run"):  # one lock, whichever name is used
        ResultStore(link, IDENTITY)
    via_target.close()


def test_22_11_a_sidecar_beside_the_link_from_an_older_longsum_is_still_found(tmp_path):
    target = tmp_path / "out.jsonl"
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target.name)
    fill(target, [{"id": "a", "summary": "s"}, {"id": "b", "error": "e"}])
    sidecar_for(target).rename(sidecar_for(link))  # where longsum put it when it wrote through the link
    store = ResultStore(link, IDENTITY)
    assert store.done == {(None, "a")} and store.failed == {(None, "b")}
    store.write({"id": "b", "summary": "t"})
    store.close()  # compacts
    assert link.is_symlink() and read_records(target) == [{"id": "a", "summary": "s"}, {"id": "b", "summary": "t"}]
    # Copied beside the target, where the target's own name finds it too; the old one is left as it was.
    assert sidecar_for(target).read_bytes() == sidecar_for(link).read_bytes()
    ResultStore(target, IDENTITY).close()


def test_22_7_a_record_with_a_lone_surrogate_is_written_and_found_done_again(tmp_path, capsys):
    name = b"caf\xe9.jsonl".decode("utf-8", "surrogateescape")  # a file name that is not UTF-8
    record = {"id": f"{name}:1", "source": name, "path": f"/docs/{name}", "summary": "résumé"}
    path = tmp_path / "out.jsonl"
    fill(path, [{"id": "x", "summary": "naïve"}, record])
    raw = path.read_bytes()
    assert "naïve".encode() in raw and raw.decode("utf-8")  # UTF-8 as before; the odd record is escaped
    assert read_records(path)[1] == record  # reversibly
    store = ResultStore(path, IDENTITY)
    assert store.done == {(None, "x"), (f"/docs/{name}", f"{name}:1")}  # so a rerun skips it
    store.close()
    part = PartWriter(tmp_path / "out.jsonl.part1")
    part.write(record)
    part.close()
    assert read_records(tmp_path / "out.jsonl.part1") == [record]
    stream = ResultStore("-", IDENTITY)
    stream.write(record)
    stream.close()
    assert json.loads(capsys.readouterr().out) == record


def test_22_10_an_output_that_cannot_be_emptied_keeps_the_sidecar_of_its_records(tmp_path, monkeypatch):
    import longsum.data.store

    path = tmp_path / "out.jsonl"
    fill(path, [{"id": "a", "summary": "s"}])
    before = sidecar_for(path).read_bytes()

    def refusing_open(file, mode="r", *args, **kwargs):  # e.g. a read-only file in a writable folder
        if str(file) == str(path) and "w" in mode:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(longsum.data.store, "open", refusing_open, raising=False)
    other = {**IDENTITY, "num_beams": 2}
    with pytest.raises(LongsumError, match="cannot write to .*Permission denied"):
        ResultStore(path, other, overwrite=True)
    assert sidecar_for(path).read_bytes() == before  # else a rerun would take the old records for this identity
    monkeypatch.undo()
    with pytest.raises(LongsumError, match="another model or settings"):
        ResultStore(path, other)
