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
