"""Reading inputs: unique stable keys, robust CSV, encodings, folders, pipes, bounded memory."""

from __future__ import annotations

import csv
import io
import json
import os
import tracemalloc

import pytest

from longsum.errors import LongsumError
from longsum.inputs import (
    CSV_FIELD_LIMIT,
    DocumentError,
    FileText,
    _binary_lines,
    decode_bytes,
    iter_documents,
    plan_inputs,
    read_text_file,
)


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
    assert [d.id for d in docs[:5]] == ["1", "2", "3", "4", "5"] == [d.id for d in docs[5:]]
    assert {d.source for d in docs} == {str(a), str(b)} and all(d.error is None for d in docs)


def test_a_duplicate_id_inside_one_file_is_an_error_of_its_own(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": "one"}, {"id": "a", "text": "two"},
                                             {"id": 7, "text": "three"}, {"id": "7", "text": "four"},
                                             {"text": "no id"}])  # fmt: skip
    docs = documents(src)
    assert len(docs) == 5 and len({d.key for d in docs}) == 5  # one per record, none dropped
    assert [d.id for d in docs] == ["a", "r.jsonl:2", "7", "r.jsonl:4", "r.jsonl:5"]
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
    monkeypatch.setattr("longsum.inputs.CSV_FIELD_LIMIT", 1000)
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
    assert [d.id for d in documents(*spellings[0])] == ["1", "r.jsonl:2", "corpus/a.txt"]  # ids as given


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
    from longsum.store import read_records

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
    monkeypatch.setattr("longsum.inputs.MAX_DOCUMENT_BYTES", 1 << 20)
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
