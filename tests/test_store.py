"""Result files: only ours are touched, identity checked, one writer at a time, newest record wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longsum.errors import LongsumError
from longsum.store import ResultStore, compact, read_records, sidecar_for

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
    code = ("import sys; from longsum.store import ResultStore\n"
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
    store = ResultStore("-", IDENTITY)
    store.write({"id": "a", "summary": "s"})
    store.close()
    assert json.loads(capsys.readouterr().out) == {"id": "a", "summary": "s"}
    devnull = ResultStore(os.devnull, IDENTITY)
    devnull.write({"id": "a", "summary": "s"})
    devnull.close()
