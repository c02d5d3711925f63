"""`longsum summarize` on a tiny model built in code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longsum.cli import app
from longsum.jsonl import read_records
from tests.conftest import CORPUS

runner = CliRunner()
SENTENCES = [s + " " for s in CORPUS[:5]]


def document(n_sentences: int, seed: int = 0) -> str:
    return "".join(SENTENCES[(seed + i) % len(SENTENCES)] for i in range(n_sentences))


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def summarize(*args, input: str | None = None):
    result = runner.invoke(app, ["summarize", *map(str, args)], input=input, catch_exceptions=False)
    return result


def records(path: Path) -> list[dict]:
    return read_records(path)


def test_files_folder_and_ids(tmp_path, model_dir):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(document(3))
    (docs / "sub" / "b.md").write_text(document(20, seed=1))
    (docs / "skip.rst").write_text(document(2))
    single = tmp_path / "c.txt"
    single.write_text(document(5, seed=2))
    out = tmp_path / "out.jsonl"
    result = summarize(docs, single, "-m", model_dir, "-o", out, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    got = records(out)
    assert sorted(r["id"] for r in got) == sorted([str(docs / "a.txt"), str(docs / "sub" / "b.md"), str(single)])
    for r in got:
        assert set(r) == {"id", "summary", "model", "input_tokens", "truncated", "seconds"}
        assert isinstance(r["summary"], str) and r["input_tokens"] > 0 and r["model"] == str(model_dir)
    assert "done 3, skipped 0, failed 0" in result.output


def test_stdin_to_stdout(model_dir):
    result = summarize("-", "-m", model_dir, "-o", "-", input=document(4))
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["id"] == "<stdin>" and "summary" in lines[0]


def test_jsonl_csv_records_fields_and_errors(tmp_path, model_dir):
    src = tmp_path / "records.jsonl"
    src.write_text(
        "\n".join([
            json.dumps({"id": "x1", "text": document(3)}),
            json.dumps({"id": "x2", "article": document(4)}),
            json.dumps({"id": "x3", "body": "no text field here"}),
            "{not json",
            json.dumps({"id": "x5", "text": "   "}),
        ]) + "\n"
    )  # fmt: skip
    csv_file = tmp_path / "t.csv"
    csv_file.write_text(f"doc,content\nc1,{document(2)}\n")
    out = tmp_path / "out.jsonl"
    result = summarize(src, "-m", model_dir, "-o", out)
    assert result.exit_code == 1  # some documents failed
    by_id = {r["id"]: r for r in records(out)}
    assert "summary" in by_id["x1"] and "summary" in by_id["x2"]
    assert "no text field" in by_id["x3"]["error"] and "--text-field" in by_id["x3"]["error"]
    assert "invalid JSON" in by_id[f"{src}:4"]["error"]
    assert by_id["x5"]["error"] == "empty document"
    result = summarize(csv_file, "-m", model_dir, "-o", out, "--text-field", "content", "--id-field", "doc")
    assert result.exit_code == 0 and "summary" in {r["id"]: r for r in records(out)}["c1"]


def test_bad_files_get_error_records_and_others_go_on(tmp_path, model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(document(3))
    (docs / "empty.txt").write_text("  \n")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02abc")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    out = tmp_path / "out.jsonl"
    result = summarize(docs, "-m", model_dir, "-o", out)
    assert result.exit_code == 1
    by_id = {Path(r["id"]).name: r for r in records(out)}
    assert "summary" in by_id["good.txt"]
    assert by_id["empty.txt"]["error"] == "empty document"
    assert "binary" in by_id["binary.txt"]["error"]
    assert "not UTF-8" in by_id["latin1.txt"]["error"]
    assert "failed 3" in result.output


def test_fail_fast_stops_at_first_failure(tmp_path, model_dir):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text(document(3))
    out = tmp_path / "out.jsonl"
    result = summarize(tmp_path / "a.txt", tmp_path / "b.txt", "-m", model_dir, "-o", out, "--fail-fast")
    assert result.exit_code == 1
    assert [r["id"] for r in records(out)] == [str(tmp_path / "a.txt")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "input path does not exist: missing.txt"),
        (["{doc}", "-o", "/proc/nope/out.jsonl"], "cannot write to /proc/nope/out.jsonl"),
        (["{doc}", "-m", "/no/such/model"], "local path '/no/such/model' does not exist"),
        (["{doc}", "--long-input", "squash"], "--long-input must be one of truncate, chunk"),
    ],
)
def test_one_line_errors_before_any_work(tmp_path, args, message):
    doc = tmp_path / "d.txt"
    doc.write_text(document(2))
    args = [a.replace("{doc}", str(doc)) for a in args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "longsum", "summarize", *args, "-o", str(tmp_path / "o.jsonl")]
                          if "-o" not in args else [sys.executable, "-m", "longsum", "summarize", *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {message}"] or message in proc.stderr.strip()
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_chunking_a_document_longer_than_the_model(tmp_path, model_dir):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(document(60))  # ~1,000 tokens for a 256-position model
    out = tmp_path / "out.jsonl"
    result = summarize(long_doc, "-m", model_dir, "-o", out, "--long-input", "chunk")
    assert result.exit_code == 0
    (r,) = records(out)
    assert r["chunks"] >= 4 and r["input_tokens"] > 256 and isinstance(r["summary"], str)
    assert "1 document(s) longer than 256 tokens: split into chunks" in result.output
    result = summarize(long_doc, "-m", model_dir, "-o", out, "--overwrite")
    (r,) = records(out)
    assert r["truncated"] is True and "truncated (use --long-input chunk" in result.output


def test_sentence_windows_fit_and_overlap(tokenizer):
    from longsum.text import sentence_windows

    text = document(80)
    windows = sentence_windows(text, tokenizer, 256)  # overlap budget ~25 tokens: one sentence
    assert len(windows) > 3
    assert all(len(tokenizer(w)["input_ids"]) <= 256 for w in windows)
    assert all(w.rstrip().endswith(".") for w in windows)  # cut at sentence ends
    assert windows[0][-40:] in windows[1]  # consecutive windows overlap by whole sentences
    assert text.startswith(windows[0]) and text.rstrip().endswith(windows[-1].rstrip())


def test_resume_after_kill_each_document_once(tmp_path, model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i:02}.txt").write_text(document(8, seed=i))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "longsum", "summarize", str(docs), "-m", str(model_dir), "-o", str(out),
           "--batch-size", "1", "--num-beams", "4", "--max-new-tokens", "24", "--min-new-tokens", "24"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = len(records(out))
    assert 2 <= first < 12, "the run should be killed midway"
    with open(out, "a") as f:
        f.write('{"id": "torn-by-the-crash", "summ')  # a crash mid-write
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == sorted(str(p) for p in docs.iterdir())  # every document exactly once
    assert f"skipped {first}" in result.stderr and "repaired a torn last line" in result.stderr


@pytest.mark.slow
def test_two_processes_one_output(tmp_path, model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(7):
        (docs / f"d{i}.txt").write_text(document(5, seed=i))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "longsum", "summarize", str(docs), "-m", str(model_dir), "-o", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == sorted(str(p) for p in docs.iterdir())
    assert not list(tmp_path.glob("out.jsonl.part*"))


def test_unknown_model_fails_before_any_record(tmp_path):
    (tmp_path / "empty.txt").write_text("")  # would get an error record if anything ran
    (tmp_path / "good.txt").write_text(document(3))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "longsum", "summarize", str(tmp_path / "empty.txt"),
                           str(tmp_path / "good.txt"), "-m", str(tmp_path / "no-model"), "-o", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not out.exists() or out.read_text() == ""
