"""Reading inputs: unique stable keys, robust CSV, encodings, folders, pipes, bounded memory."""

from __future__ import annotations

import csv
import io
import json
import os
import tracemalloc

import pytest

from longsum.data.inputs import (
    CSV_FIELD_LIMIT,
    DocumentError,
    FileText,
    _binary_lines,
    decode_bytes,
    iter_documents,
    plan_inputs,
    read_text_file,
)
from longsum.errors import LongsumError


def documents(*inputs, **kwargs):
    return list(iter_documents(plan_inputs([str(i) for i in inputs]), **kwargs))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_ids_that_collide_across_files_stay_distinct(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": f"doc a{i}"} for i in range(1, 6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "text": f"doc b{i}"} for i in range(1, 6)])
    docs = documents(a, b)
    assert len(docs) == 10 and len({d.key for d in docs}) == 10
    assert [d.id for d in docs[:5]] == [1, 2, 3, 4, 5] == [d.id for d in docs[5:]]  # JSON numbers stay numbers
    assert {d.source for d in docs} == {str(a), str(b)} and all(d.error is None for d in docs)


def test_a_duplicate_id_inside_one_file_is_an_error_of_its_own(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": "one"}, {"id": "a", "text": "two"},
                                             {"id": 7, "text": "three"}, {"id": "7", "text": "four"},
                                             {"text": "no id"}])  # fmt: skip
    docs = documents(src)
    assert len(docs) == 5 and len({d.key for d in docs}) == 5  # one per record, none dropped
    assert [d.id for d in docs] == ["a", "r.jsonl:2", 7, "r.jsonl:4", "r.jsonl:5"]
    assert docs[1].error == f"duplicate id 'a' (first at line 1 of {src}); give every record its own id"
    assert docs[3].error.startswith("duplicate id '7' (first at line 3")
    assert docs[0].error is docs[2].error is docs[4].error is None
    assert documents(src)[1].key == docs[1].key  # the same key on every run


def test_a_positional_id_taken_by_a_record_is_not_reused(tmp_path):
    src = tmp_path / "r.jsonl"
    write_jsonl(src, [{"id": "r.jsonl:2", "text": "claims line 2's id"}, "{not json"])
    docs = documents(src)
    assert [d.id for d in docs] == ["r.jsonl:2", "r.jsonl:2#2"] and "invalid JSON" in docs[1].error


def test_csv_with_huge_fields_and_malformed_rows(tmp_path):
    path = tmp_path / "t.csv"
    big = "word " * 40_000  # 200 KB: over the csv module's default 128 KB field limit
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerow(["big", big])
        writer.writerow(["ok1", "a normal, quoted document"])
    with open(path, "a") as f:
        f.write('bad,"this quote never ends\n')
        f.write("ok2,after the bad row\n")
        f.write("extra,fields,here\n")
        f.write('ok3,"multi\nline text"\n')
    docs = documents(path)
    by_id = {d.id: d for d in docs}
    assert by_id["big"].text.read(None)[0] == big
    assert by_id["ok1"].text.read(None)[0] == "a normal, quoted document"
    assert by_id["ok2"].text.read(None)[0] == "after the bad row"  # not swallowed by the bad quote
    assert by_id["ok3"].text.read(None)[0] == "multi\nline text"
    assert "malformed CSV row" in by_id["t.csv:4"].error and "unterminated or stray quote" in by_id["t.csv:4"].error
    assert by_id["t.csv:6"].error.startswith("CSV row has 3 fields but the header has 2")
    assert len(docs) == 6


def test_csv_field_limit_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setattr("longsum.data.inputs.CSV_FIELD_LIMIT", 1000)
    path = tmp_path / "t.csv"
    path.write_text('id,text\nx,"' + "y" * 5000 + '"\nz,fine\n')
    docs = documents(path)
    assert "field larger than field limit" in docs[0].error and docs[1].id == "z"
    assert CSV_FIELD_LIMIT >= 32 << 20


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "cp1252", "latin-1", "utf-8-sig"])
def test_text_files_in_other_encodings_are_decoded_and_named(tmp_path, encoding):
    text = "Le café crème de Zoë était très bon. " * 30
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode(encoding))
    doc = read_text_file(path)
    assert doc.error is None and doc.text.read(None) == (text, True)
    assert doc.encoding in {"utf-16": ("utf-16",), "utf-16-le": ("utf-16-le",), "cp1252": ("cp1252",),
                            "latin-1": ("cp1252",), "utf-8-sig": ("utf-8-sig",)}[encoding]  # fmt: skip


def test_binary_empty_and_unreadable_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (tmp_path / "empty.txt").write_text(" \n\t")
    assert read_text_file(tmp_path / "bin.txt").error == "binary file, not text"
    assert read_text_file(tmp_path / "empty.txt").error == "empty document"
    with pytest.raises(DocumentError, match="binary"):
        decode_bytes(b"\x00\x01\x02\x03" * 100)


def test_file_text_reads_only_a_prefix(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("é" * 1000 + "x" * 100_000)
    text = read_text_file(path).text
    assert isinstance(text, FileText)
    head, complete = text.read(1500)
    assert head == "é" * 1000 + "x" * 500 and not complete
    assert text.read(None) == ("é" * 1000 + "x" * 100_000, True)


def test_folders_match_suffixes_case_insensitively(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "UPPER.TXT").write_text("upper")
    (docs / "sub" / "Mixed.Md").write_text("mixed")
    (docs / "notes.rst").write_text("skipped")
    assert sorted(d.id for d in documents(docs)) == sorted([str(docs / "UPPER.TXT"), str(docs / "sub" / "Mixed.Md")])


def test_nothing_matched_is_an_error_and_an_empty_folder_a_warning(tmp_path):
    empty, docs = tmp_path / "empty", tmp_path / "docs"
    empty.mkdir(), docs.mkdir()
    (docs / "a.rst").write_text("not matched")
    with pytest.raises(LongsumError, match=r"no input documents: no file in .*empty matches '\*.txt,\*.md'"):
        plan_inputs([str(empty), str(docs)])
    (docs / "b.txt").write_text("matched")
    plan = plan_inputs([str(empty), str(docs)])
    assert plan.unmatched == [str(empty)] and len(plan.items) == 1


def test_the_same_file_named_twice_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    plan = plan_inputs([str(tmp_path), str(tmp_path / "a.txt"), str(tmp_path / "." / "a.txt")])
    assert len(plan.items) == 1 and "read once" in plan.warnings[0]


def test_stdin_and_pipes_get_content_ids(tmp_path):
    first = list(iter_documents(plan_inputs(["-"]), stdin=io.BytesIO(b"first document")))[0]
    second = list(iter_documents(plan_inputs(["-"]), stdin=io.BytesIO(b"second document")))[0]
    again = list(iter_documents(plan_inputs(["-"]), stdin=io.BytesIO(b"first document")))[0]
    assert first.id.startswith("stdin:") and len(first.id) == len("stdin:") + 12
    assert first.id != second.id and first.id == again.id
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    pid = os.fork()
    if pid == 0:  # the writer end of a pipe, as `<(cat doc)` would be
        with open(fifo, "wb") as f:
            f.write(b"piped document")
        os._exit(0)
    (doc,) = documents(fifo)
    os.waitpid(pid, 0)
    assert doc.id.startswith("pipe:") and doc.text.read(None)[0] == "piped document"


def test_records_are_streamed_not_loaded(tmp_path):
    """Iterating 40,000 records (16 MB) holds about one record, not the file."""
    path = tmp_path / "many.jsonl"
    text = "word " * 80
    with open(path, "w") as f:
        for i in range(40_000):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    tracemalloc.start()
    n = 0
    for doc in iter_documents(plan_inputs([str(path)])):
        n += 1
        doc.text.read(None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 40_000 and peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"  # ids of 40k records, ~3 MiB


def test_csv_unterminated_quote_to_the_end_costs_one_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,text\na,fine\nb,"never closed\nc,next row\nd,another row\n')
    docs = documents(path)
    assert [d.id for d in docs] == ["a", "t.csv:3", "c", "d"]
    assert "unexpected end of data" in docs[1].error
    assert docs[2].text.read(None)[0] == "next row" and docs[3].text.read(None)[0] == "another row"


def test_keys_do_not_depend_on_how_a_path_is_written(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "r.jsonl", [{"id": 1, "text": "one"}, {"text": "no id"}])
    (folder / "a.txt").write_text("text")
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    spellings = [["corpus/r.jsonl", "corpus/a.txt"], [str(folder / "r.jsonl"), str(folder / "a.txt")],
                 ["./link/r.jsonl", "link/../corpus/a.txt"]]  # fmt: skip
    keys = [[d.key for d in documents(*names)] for names in spellings]
    assert keys[0] == keys[1] == keys[2] and len(set(keys[0])) == 3
    assert [d.id for d in documents(*spellings[0])] == [1, "r.jsonl:2", "corpus/a.txt"]  # ids as given


# ------------------------------------------------------------------------------------------ issue 22
def test_22_3_utf8_with_a_bad_byte_after_the_head_stays_utf8(tmp_path):
    """One invalid byte past the sniffed 64 KB: that byte becomes U+FFFD and the encoding says so; the
    valid UTF-8 around it is not re-decoded as cp1252 (mojibake)."""
    before, after = "Le café crème de Zoë était très bon. " * 2000, " Ça va, Noël ? " * 10  # 76 KB, then more
    path = tmp_path / "doc.txt"
    path.write_bytes(before.encode() + b"\xff" + after.encode())
    doc = read_text_file(path)
    assert doc.error is None and doc.encoding == "utf-8"
    assert doc.text.read(1000) == (before[:1000], False) and doc.encoding == "utf-8"  # the bad byte not read yet
    assert doc.text.read(None) == (before + "\ufffd" + after, True)
    assert doc.encoding == "utf-8 (1 invalid byte replaced)"


def test_22_3_a_few_bad_bytes_are_replaced_wherever_they_are(tmp_path):
    """Inside the sniffed head too, and for piped text: UTF-8 with replacements, not cp1252."""
    text = "Ünïcödé text, mostly fine. " * 20
    data = text[:34].encode() + b"\x80\xfe" + text[34:].encode()
    assert decode_bytes(data) == (text[:34] + "\ufffd\ufffd" + text[34:], "utf-8 (2 invalid bytes replaced)")
    (doc,) = list(iter_documents(plan_inputs(["-"]), stdin=io.BytesIO(data)))
    assert doc.text.read(None)[0] == text[:34] + "\ufffd\ufffd" + text[34:]
    assert doc.encoding == "utf-8 (2 invalid bytes replaced)"
    # Legacy 8-bit text is still told apart: its accents are all invalid UTF-8, even past an ASCII head.
    path = tmp_path / "cp1252.txt"
    path.write_bytes(b"plain ascii. " * 6000 + "Le café crème de Zoë.".encode("cp1252"))
    assert read_text_file(path).text.read(None) == ("plain ascii. " * 6000 + "Le café crème de Zoë.", True)
    assert decode_bytes("Le café crème de Zoë était très bon.".encode("cp1252"))[1] == "cp1252"


def test_22_7_file_names_that_are_not_utf8_are_escaped(tmp_path):
    """`caf\\xe9.txt` (latin-1 bytes in the name): id, source and path are valid Unicode, with the byte
    written `\\xe9`, the same on every run; the text is read."""
    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/d\xe9r")
    with open(root + b"/d\xe9r/caf\xe9.txt", "wb") as f:
        f.write(b"un texte")
    with open(root + b"/d\xe9r/r\xe9c.jsonl", "wb") as f:
        f.write(b'{"text": "un enregistrement"}\n')
    folder = os.fsdecode(root + b"/d\xe9r")
    plan = plan_inputs([folder], glob="*.txt,*.jsonl")
    docs = list(iter_documents(plan))
    assert len(docs) == 2 and all(d.error is None for d in docs)
    for doc in docs:
        json.dumps([doc.id, doc.source, doc.path], ensure_ascii=False).encode("utf-8")  # no lone surrogate
    by_name = {d.id.rsplit("/", 1)[-1]: d for d in docs}
    assert by_name["caf\\xe9.txt"].path == os.path.realpath(tmp_path) + "/d\\xe9r/caf\\xe9.txt"
    assert by_name["r\\xe9c.jsonl:1"].source == str(tmp_path) + "/d\\xe9r/r\\xe9c.jsonl"
    assert by_name["caf\\xe9.txt"].text.read(None) == ("un texte", True)
    assert [d.key for d in iter_documents(plan_inputs([folder], glob="*.txt,*.jsonl"))] == [d.key for d in docs]
    (tmp_path / "d\\xe9r").mkdir()  # a name that is the escaped form of another: reported, never a duplicate key
    (tmp_path / "d\\xe9r" / "caf\\xe9.txt").write_text("un autre texte")
    plan = plan_inputs([folder, str(tmp_path / "d\\xe9r")], glob="*.txt,*.jsonl")
    assert len(plan.items) == 2 and "is skipped: its name, escaped, is that of" in plan.warnings[0]


def test_22_7_lone_surrogates_in_records(tmp_path):
    """A lone surrogate (`\\ud800` in JSON) in a text is replaced by U+FFFD and said in `encoding`; in an
    id, the record is an error of its own under NAME:LINE; the other records are read."""
    src = tmp_path / "r.jsonl"
    src.write_text('{"id": "a", "text": "bad \\ud800 text"}\n{"id": "b\\udc00", "text": "fine"}\n'
                   '{"id": "c", "text": "fine too"}\n')  # fmt: skip
    docs = documents(src)
    assert [d.id for d in docs] == ["a", "r.jsonl:2", "c"]
    assert docs[0].text.read(None) == ("bad \ufffd text", True)
    assert docs[0].encoding == "utf-8 (1 lone surrogate replaced)"
    assert docs[1].error == "id 'b\\udc00' is not valid Unicode (a lone surrogate): give the record a valid id"
    assert docs[2].text.read(None) == ("fine too", True) and docs[2].encoding == "utf-8"


def test_22_7_summarize_writes_records_for_bad_names_and_surrogates(tmp_path, tiny_model_dir):
    """End to end: neither the tokenizer nor the writer stops the batch; every document has its record."""
    from typer.testing import CliRunner

    from longsum.cli import app
    from longsum.data.store import read_records

    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/docs")
    with open(root + b"/docs/caf\xe9.txt", "wb") as f:
        f.write(b"Solar microgrids bring electricity to rural districts.")
    write_jsonl(tmp_path / "docs" / "r.jsonl", ['{"id": "s", "text": "Rivers \\ud800 and towns."}',
                                                '{"id": "x\\ud800", "text": "Bridges."}', {"id": "ok", "text": "Ok."}])  # fmt: skip
    out = tmp_path / "out.jsonl"
    args = ["summarize", os.fsdecode(root + b"/docs"), "--glob", "*.txt,*.jsonl", "-m", str(tiny_model_dir), "-o"]
    result = CliRunner().invoke(app, [*args, str(out)], catch_exceptions=False)
    assert result.exit_code == 1, result.output  # the bad id
    by_id = {r["id"].rsplit("/", 1)[-1]: r for r in read_records(out)}
    assert set(by_id) == {"caf\\xe9.txt", "s", "r.jsonl:2", "ok"}
    assert "summary" in by_id["caf\\xe9.txt"] and "summary" in by_id["ok"]
    assert "summary" in by_id["s"] and by_id["s"]["encoding"] == "utf-8 (1 lone surrogate replaced)"
    assert "not valid Unicode" in by_id["r.jsonl:2"]["error"]
    result = CliRunner().invoke(app, [*args, str(out)], catch_exceptions=False)  # a rerun resumes: the same keys
    assert "done 0, skipped 3" in result.output


class _Endless(io.RawIOBase):
    """A stream that never ends (like /dev/zero or `yes`), counting what was read from it."""

    def __init__(self, byte: bytes):
        self.byte, self.served = byte, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = self.byte * len(buffer)
        self.served += len(buffer)
        return len(buffer)


@pytest.mark.parametrize("byte", [b"\x00", b"y"])
def test_22_8_an_endless_stdin_is_an_error_record_after_a_bounded_read(byte, monkeypatch):
    """`- < /dev/zero` (binary: stops at the sniffed head) and `yes | longsum summarize -` (text: stops
    past the document limit, settable with LONGSUM_MAX_DOCUMENT_MB)."""
    monkeypatch.setenv("LONGSUM_MAX_DOCUMENT_MB", "1")
    stream = io.BufferedReader(_Endless(byte))
    (doc,) = list(iter_documents(plan_inputs(["-"]), stdin=stream))
    assert doc.id.startswith("stdin:") and doc.text is None
    expected = "binary file, not text" if byte == b"\x00" else "document larger than 1 MB (LONGSUM_MAX_DOCUMENT_MB)"
    assert doc.error == expected
    assert stream.raw.served <= (1 << 20) + (1 << 17)  # the limit and a read-ahead, not the endless rest


def test_22_8_devices_are_error_records_and_files_are_read_to_the_limit(tmp_path, monkeypatch):
    """`summarize /dev/zero` reads nothing; a text file past the limit is read in truncate mode (a
    prefix) but whole it is an error, not a memory blow-up."""
    docs = documents("/dev/zero", "/dev/urandom")
    assert [d.error for d in docs] == ["not a regular file: character device"] * 2
    assert [d.key for d in docs] == [("/dev/zero", None), ("/dev/urandom", None)]
    path = tmp_path / "big.txt"
    path.write_bytes(b"word " * 300_000)  # 1.5 MB
    monkeypatch.setattr("longsum.data.inputs.MAX_DOCUMENT_BYTES", 1 << 20)
    text = read_text_file(path).text
    assert text.read(1000) == ("word " * 200, False)
    with pytest.raises(DocumentError, match=r"^document larger than 1 MB \(LONGSUM_MAX_DOCUMENT_MB\)$"):
        text.read(None)
    with pytest.raises(DocumentError, match="larger than 1 MB"):
        text.read(1_200_000)  # more than the limit holds: reading on would never end on an endless file
    monkeypatch.setenv("LONGSUM_MAX_DOCUMENT_MB", "2")
    assert text.read(None) == ("word " * 300_000, True)
    monkeypatch.setenv("LONGSUM_MAX_DOCUMENT_MB", "lots")
    with pytest.raises(LongsumError, match="LONGSUM_MAX_DOCUMENT_MB"):
        plan_inputs([str(path)])


def test_22_8_a_record_line_past_the_limit_is_an_error_and_the_next_lines_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSUM_MAX_DOCUMENT_MB", "1")
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": "x " * 600_000}, {"id": "b", "text": "small"}])
    docs = documents(src)
    assert [d.id for d in docs] == ["r.jsonl:1", "b"]
    assert docs[0].error == "line longer than the document limit of 1 MB (LONGSUM_MAX_DOCUMENT_MB)"
    assert docs[1].text.read(None) == ("small", True)
    endless = io.BufferedReader(_Endless(b"y"))  # a record pipe that never ends: its line is the last read
    assert list(_binary_lines(endless, "utf-8")) == [
        (1, None, "line longer than the document limit of 1 MB (LONGSUM_MAX_DOCUMENT_MB); the rest of the stream "
         "is not read")]  # fmt: skip
    assert endless.raw.served <= (1 << 20) + (1 << 17)


# 12: the output inside an input folder ------------------------------------------------------------
def _own_files_by_the_store(out):
    """The files longsum itself makes beside the output `out`, made by the functions that make them (so
    a name changed there is a name this test looks for): sidecar, lock, part file, the leftovers of
    a compaction and of the sidecar's atomic write that a killed run leaves."""
    from longsum.data import store
    from longsum.data.distributed import part_path

    made = []

    def keep(src, dst):  # os.replace that leaves the temporary file where a killed run would leave it
        made.append(os.path.basename(src))

    store.write_json_atomic(store.sidecar_for(out), {"format": "longsum-results"})
    out.write_text('{"id": "a", "summary": "s"}\n{"id": "a", "summary": "t"}\n')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", keep)
        store.write_json_atomic(store.sidecar_for(out), {"format": "longsum-results"})
        store.compact(out)
    part_path(out, 3).write_text("")
    lock = store.OutputLock(out.with_name(out.name + ".lock"), out)  # (unlocked and removed at release: kept here)
    os.close(lock.fd)
    assert len(made) == 2 and made[0].endswith(".tmp") and made[1].endswith(".compact")
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(("out", ".out")))


def test_22_12_every_file_beside_the_output_is_left_out(tmp_path):
    """`summarize docs/ --glob '*' -o docs/out.jsonl`: the output, its sidecar, lock, part files and
    what a killed run left are never inputs, alike before the first run (none there) and after it;
    files whose names only look alike are inputs."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a document")
    out = docs / "out.jsonl"
    first = plan_inputs([str(docs)], glob="*", output=str(out))
    own = _own_files_by_the_store(out)
    pid = os.getpid()
    assert own == sorted([f".out.jsonl.{pid}.compact", f".out.jsonl.run.json.{pid}.tmp", "out.jsonl",
                          "out.jsonl.lock", "out.jsonl.part3", "out.jsonl.run.json"])  # fmt: skip
    alike = ["out.jsonl.part", "out.jsonl.partx", "out.jsonl.bak", "out.jsonl.run.json.bak", ".out.jsonl.compact",
             ".out.jsonl.x.compact", "out.jsonl2", "xout.jsonl"]  # fmt: skip
    for name in alike:
        (docs / name).write_text("a user's file")
    plan = plan_inputs([str(docs)], glob="*", output=str(out))
    assert sorted(p.name for _, p in plan.items) == sorted(["a.txt", *alike])
    assert [p for _, p in first.items] == [docs / "a.txt"]
    assert plan.warnings == [f"left out of {docs}: .out.jsonl.{pid}.compact, .out.jsonl.run.json.{pid}.tmp "
                             f"and 4 more (the output {out} and the files beside it are not "
                             f"inputs)"]  # fmt: skip
    assert [p.name for _, p in plan_inputs([str(docs)], glob="*").items] == sorted([*own, *alike, "a.txt"])


def test_22_12_a_linked_output_and_a_link_to_it_are_left_out(tmp_path):
    """A symlinked output writes beside its target: those files are left out too, and so is a link in the
    folder that leads to the output (dangling before the first run: left out then as well)."""
    docs, elsewhere = tmp_path / "docs", tmp_path / "elsewhere"
    docs.mkdir(), elsewhere.mkdir()
    (docs / "a.txt").write_text("a document")
    (docs / "out.jsonl").symlink_to(elsewhere / "real.jsonl")
    (docs / "to-output.txt").symlink_to(docs / "out.jsonl")
    for folder in (docs, elsewhere):
        assert [p.name for _, p in plan_inputs([str(folder), str(docs / "a.txt")], glob="*",
                                               output=str(docs / "out.jsonl")).items] == ["a.txt"]  # fmt: skip
    (elsewhere / "real.jsonl").write_text("")
    (elsewhere / "real.jsonl.run.json").write_text("{}")
    (docs / "out.jsonl.run.json").write_text("{}")  # an older longsum's sidecar beside the link
    for folder in (docs, elsewhere):
        assert [p.name for _, p in plan_inputs([str(folder), str(docs / "a.txt")], glob="*",
                                               output=str(docs / "out.jsonl")).items] == ["a.txt"]  # fmt: skip


def test_22_12_summarize_into_an_input_folder_resumes(tmp_path, tiny_model_dir):
    """End to end: the first run and every rerun read the same documents, so a rerun resumes instead of
    being refused; naming the output itself as an input is still refused in one line."""
    from typer.testing import CliRunner

    from longsum.cli import app
    from longsum.data.store import read_records

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Solar microgrids bring electricity to rural districts.")
    write_jsonl(docs / "r.jsonl", [{"id": "r1", "text": "Rivers and towns."}])
    out = docs / "out.jsonl"
    args = ["summarize", str(docs), "-m", str(tiny_model_dir), "-o", str(out), "--glob"]
    runs = [
        CliRunner().invoke(app, [*args, glob], catch_exceptions=False)
        for glob in ("*.jsonl,*.txt", "*.jsonl,*.txt", "*")
    ]
    assert [r.exit_code for r in runs] == [0, 0, 0], runs[1].output
    assert "done 2, skipped 0" in runs[0].output and "left out" not in runs[0].output
    assert "done 0, skipped 2, failed 0" in runs[1].output and "done 0, skipped 2, failed 0" in runs[2].output
    assert f"left out of {docs}: out.jsonl (the output {out}" in runs[1].output
    assert sorted(r["id"] for r in read_records(out)) == sorted([str(docs / "a.txt"), "r1"])
    with pytest.raises(LongsumError, match=r"^the output .*out.jsonl is also an input; choose another --output$"):
        CliRunner().invoke(app, [*args, "*.txt", str(out)], catch_exceptions=False)


# 15: one record per unreadable file, links, gzip, CSV delimiters, JSON ids ------------------------
def test_22_15a_a_corrupt_record_file_is_one_error_record(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file at all")
    (doc,) = documents(bad)
    assert doc.id == "bad.parquet" and doc.error.startswith("cannot read records: ") and "magic bytes" in doc.error
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert [(d.id, d.error) for d in documents(empty)] == [("empty.jsonl", "no records in this file")]


def test_22_15b_dangling_links_and_loops_in_a_folder_are_error_records(tmp_path):
    """Matched by the glob, they are documents that cannot be read: each gets its record, with the same
    key on every run (its resolved path: once the target is there, the document's own)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("fine")
    (docs / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (docs / "loop.md").symlink_to("loop.md")
    (docs / "gone.rst").symlink_to(tmp_path / "nowhere.rst")  # not matched: not a document
    os.mkfifo(docs / "fifo.txt")  # never read: it would block with no writer
    docs_found = documents(docs)
    assert [(d.id, d.error) for d in docs_found] == [
        (str(docs / "fifo.txt"), "not a regular file: FIFO"),
        (str(docs / "gone.txt"), f"broken link: its target {tmp_path / 'nowhere.txt'} does not exist"),
        (str(docs / "loop.md"), "broken link: a loop of symbolic links"),
        (str(docs / "ok.txt"), None),
    ]
    assert docs_found[1].key == (os.path.realpath(tmp_path / "nowhere.txt"), None)
    assert [d.key for d in documents(docs)] == [d.key for d in docs_found]
    (tmp_path / "nowhere.txt").write_text("here now")
    assert documents(docs)[1].key == docs_found[1].key and documents(docs)[1].error is None


def gz(path, data: bytes):
    import gzip

    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def test_22_15c_gzip_files_are_read_decompressed_by_the_name_under_gz(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    gz(docs / "a.txt.gz", "Le café, compressé.".encode())
    gz(docs / "b.MD.GZ", b"# Markdown, compressed")
    gz(docs / "c.rst.gz", b"not matched by *.txt,*.md")
    by_name = {os.path.basename(d.id): d for d in documents(docs)}  # the default --glob finds them
    assert sorted(by_name) == ["a.txt.gz", "b.MD.GZ"]
    assert by_name["a.txt.gz"].text.read(None) == ("Le café, compressé.", True)
    assert by_name["b.MD.GZ"].text.read(5) == ("# Mar", False)
    records = gz(tmp_path / "r.jsonl.gz", b'{"id": "x", "text": "one"}\n{"id": "y", "text": "two"}\n')
    table = gz(tmp_path / "t.csv.gz", b"id,text\nz,three\n")
    assert [(d.id, d.text.read(None)[0]) for d in documents(records, table)] == [("x", "one"), ("y", "two"),
                                                                                ("z", "three")]  # fmt: skip
    assert [d.source for d in documents(records)] == [str(records)] * 2
    gz(tmp_path / "p.parquet.gz", b"PAR1")
    gz(tmp_path / "d.pdf.gz", b"%PDF-1.4")
    assert [d.error for d in documents(tmp_path / "p.parquet.gz", tmp_path / "d.pdf.gz")] == [
        "a gzipped parquet file is not read (parquet is compressed inside): gunzip it first",
        "a gzipped PDF is not read: gunzip it first"]  # fmt: skip
    (tmp_path / "unnamed.txt").write_bytes((docs / "a.txt.gz").read_bytes())
    assert documents(tmp_path / "unnamed.txt")[0].error == (
        "binary file, not text (gzip data: name it unnamed.txt.gz to have it decompressed)"
    )


def test_22_15c_a_corrupt_gzip_is_one_error_record(tmp_path):
    whole = gz(tmp_path / "w.txt.gz", b"a text " * 50_000)
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole.read_bytes()[:-200])  # cut short past its sniffed head
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"plain text, not gzip")
    bad_records = tmp_path / "r.jsonl.gz"
    bad_records.write_bytes(b"\x1f\x8b\x08\x00garbage")
    got = documents(cut, garbage, bad_records)
    assert len(got) == 3
    assert got[0].error is None and got[0].text.read(10) == ("a text a t", False)
    with pytest.raises(DocumentError, match="^corrupt gzip data: Compressed file ended before the end-of-stream"):
        got[0].text.read(None)
    assert got[1].error == "corrupt gzip data: Not a gzipped file (b'pl')"
    assert got[2].id == "r.jsonl.gz" and got[2].error.startswith("cannot read records: corrupt gzip data: ")
    rows = b"".join(json.dumps({"id": i, "text": "word " * 20}).encode() + b"\n" for i in range(5000))
    cut_records = tmp_path / "cut.jsonl.gz"
    cut_records.write_bytes(gz(tmp_path / "x.jsonl.gz", rows).read_bytes()[:-500])
    got = documents(cut_records)  # the rows before the damage, then one record for the rest
    assert [d.error for d in got[:-1]] == [None] * (len(got) - 1) and 1000 < len(got) < 5000
    assert got[-1].id == "cut.jsonl.gz" and "corrupt gzip data" in got[-1].error


def test_22_15c_the_document_limit_bounds_the_decompressed_size(tmp_path, monkeypatch):
    """A gzip bomb (40 MB of text in 40 KB) costs what the limit allows, not what it inflates to."""
    monkeypatch.setenv("LONGSUM_MAX_DOCUMENT_MB", "1")
    bomb = gz(tmp_path / "bomb.txt.gz", b"y " * (20 << 20))
    line_bomb = gz(
        tmp_path / "bomb.jsonl.gz", b'{"id": "a", "text": "' + b"y" * (40 << 20) + b'"}\n{"id": "b", "text": "ok"}\n'
    )
    assert bomb.stat().st_size < 100_000 and line_bomb.stat().st_size < 100_000
    tracemalloc.start()
    text = read_text_file(bomb).text
    assert text.read(1000) == ("y " * 500, False)
    with pytest.raises(DocumentError, match=r"^document larger than 1 MB \(LONGSUM_MAX_DOCUMENT_MB\)$"):
        text.read(None)
    got = [(d.id, d.error) for d in documents(line_bomb)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got == [("bomb.jsonl.gz:1", "line longer than the document limit of 1 MB (LONGSUM_MAX_DOCUMENT_MB)"),
                   ("b", None)]  # fmt: skip
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])  # (commas: the tests above)
def test_22_15d_the_csv_delimiter_is_the_headers(tmp_path, delimiter):
    path = tmp_path / "t.csv"
    rows = [["id", "text", "notes"], ["a", "one, with a comma; and a semicolon", "n"], ["b", "two", "n|x"]]
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    with open(path, "a") as f:
        f.write(delimiter.join(["c", "an extra", "field", "here"]) + "\n")
    docs = documents(path)
    assert [(d.id, d.text and d.text.read(None)[0]) for d in docs[:2]] == [("a", rows[1][1]), ("b", "two")]
    name = {";": "semicolon", "\t": "tab", "|": "'|'"}[delimiter]
    assert docs[2].error == f"CSV row has 4 fields but the header has 3 (an unquoted {name} or quote?)"


def test_22_15d_a_header_is_split_where_it_has_the_most_fields(tmp_path):
    """Quotes honoured; a tie (one column, or as many fields either way) is a comma's."""
    path = tmp_path / "t.csv"
    cases = [("id;text;notes,more\n1;a, b;n\n", {}, ("1", "a, b")),
             ('id,"text;body"\n2,"x;y"\n', {"text_field": "text;body"}, ("2", "x;y")),
             ('"id,key";text\n"3,4";z\n', {"id_field": "id,key"}, ("3,4", "z")),
             ("text\njust one column\n", {}, ("t.csv:2", "just one column"))]  # fmt: skip
    for content, fields, expected in cases:
        path.write_text(content)
        assert [(d.id, d.text.read(None)[0]) for d in documents(path, **fields)] == [expected], content


def test_22_15e_ids_keep_their_json_view_and_their_key(tmp_path):
    """`true` and `{"a":1}` are not Python's `True` and `{'a': 1}`: a record carries the id as the input
    has it, and the key of the record as written and read back is the document's (a rerun finds it done)."""
    from longsum.data.store import record_key, to_json_line

    src = write_jsonl(tmp_path / "r.jsonl", ['{"id": true, "text": "t"}', '{"id": {"a": 1}, "text": "t"}',
                                             '{"id": [1, "x"], "text": "t"}', '{"id": 1.5, "text": "t"}',
                                             '{"id": 0, "text": "t"}', '{"id": false, "text": "t"}',
                                             '{"id": "plain", "text": "t"}', '{"id": 1e400, "text": "t"}',
                                             '{"id": true, "text": "t"}'])  # fmt: skip
    docs = documents(src)
    assert [d.id for d in docs] == [True, {"a": 1}, [1, "x"], 1.5, 0, False, "plain", "inf", "r.jsonl:9"]
    assert docs[-1].error == f"duplicate id true (first at line 1 of {src}); give every record its own id"
    for doc in docs:
        written = json.loads(to_json_line({"id": doc.id, "source": doc.source, "path": doc.path, "summary": "s"}))
        assert written["id"] == doc.id and record_key(written) == doc.key
    assert len({d.key for d in docs}) == len(docs)


def test_22_15e_parquet_ids(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2], "when": [datetime.datetime(2024, 1, 2)] * 2,
                             "m": pa.array([[("k", 1)], [("k", 2)]], pa.map_(pa.string(), pa.int64())),
                             "text": ["a", "b"]}), path)  # fmt: skip
    assert [d.id for d in documents(path)] == [1, 2]
    assert [d.id for d in documents(path, id_field="when")] == ["2024-01-02 00:00:00", "t.parquet:2"]
    assert [d.id for d in documents(path, id_field="m")] == [[["k", 1]], [["k", 2]]]  # as JSON reads it back


def test_22_15e_a_number_and_a_string_that_the_store_keys_alike_never_share_a_key(tmp_path):
    """The store keys ids by their text (`record_key`), so the number 1 and the string "1" of one file
    would be one document there: the later one is a duplicate, which its message explains."""
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "text": "t"}, {"id": "1", "text": "t"}])
    docs = documents(src)
    assert [d.id for d in docs] == [1, "r.jsonl:2"] and len({d.key for d in docs}) == 2
    assert docs[1].error == (f"duplicate id '1' (first at line 1 of {src}, not as a string there); give every "
                             f"record its own id")  # fmt: skip
    docs = documents(write_jsonl(src, [{"id": "1", "text": "t"}, {"id": 1, "text": "t"}]))
    assert docs[1].error.startswith("duplicate id 1 (first at line 1 of ") and ", as a string there); " in docs[1].error


def test_22_15_summarize_gzip_broken_links_and_json_ids(tmp_path, tiny_model_dir):
    """End to end: a gzipped text found by the default --glob, a dangling link's error record, gzipped
    records whose ids stay JSON values; a rerun finds every summary done and retries the error."""
    from typer.testing import CliRunner

    from longsum.cli import app
    from longsum.data.store import read_records

    docs = tmp_path / "docs"
    docs.mkdir()
    gz(docs / "t.txt.gz", b"Solar microgrids bring electricity to rural districts.")
    (docs / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    records = gz(
        tmp_path / "r.jsonl.gz",
        b'{"id": true, "text": "Rivers and towns."}\n'
        b'{"id": {"a": 1}, "text": "Bridges."}\n{"id": 7, "text": "Markets."}\n',
    )
    out = tmp_path / "out.jsonl"
    args = ["summarize", str(docs), str(records), "-m", str(tiny_model_dir), "-o", str(out)]
    first = CliRunner().invoke(app, args, catch_exceptions=False)
    assert first.exit_code == 1 and "done 4, skipped 0, failed 1" in first.output, first.output
    by_id = {json.dumps(r["id"]): r for r in read_records(out)}
    assert sorted(by_id) == sorted(['true', '{"a": 1}', "7", json.dumps(str(docs / "t.txt.gz")),
                                    json.dumps(str(docs / "gone.txt"))])  # fmt: skip
    assert by_id[json.dumps(str(docs / "gone.txt"))]["error"] == (
        f"broken link: its target {tmp_path / 'nowhere.txt'} does not exist"
    )
    assert all("summary" in r for k, r in by_id.items() if "gone" not in k)
    again = CliRunner().invoke(app, args, catch_exceptions=False)
    assert "done 0, skipped 4, failed 1, retried 1" in again.output, again.output
    assert len(read_records(out)) == 5
