"""`longsum summarize` on a tiny model built in code."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from longsum.cli import app
from longsum.data.store import read_records
from tests.conftest import CORPUS
from tests.helpers import run_longsum

runner = CliRunner()
SENTENCES = [s + " " for s in CORPUS[:5]]


def document(n_sentences: int, seed: int = 0) -> str:
    return "".join(SENTENCES[(seed + i) % len(SENTENCES)] for i in range(n_sentences))


def summarize(*args, input: str | None = None):
    result = runner.invoke(app, ["summarize", *map(str, args)], input=input, catch_exceptions=False)
    return result


def records(path: Path) -> list[dict]:
    return read_records(path)


def test_files_folder_and_ids(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text(document(3))
    (docs / "sub" / "b.md").write_text(document(20, seed=1))
    (docs / "skip.rst").write_text(document(2))
    single = tmp_path / "c.txt"
    single.write_text(document(5, seed=2))
    out = tmp_path / "out.jsonl"
    result = summarize(docs, single, "-m", tiny_model_dir, "-o", out, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    got = records(out)
    assert sorted(r["id"] for r in got) == sorted([str(docs / "a.txt"), str(docs / "sub" / "b.md"), str(single)])
    for r in got:
        assert set(r) == {"id", "path", "summary", "model", "input_tokens", "truncated", "seconds"}
        assert r["path"] == str(Path(r["id"]).resolve())
        assert isinstance(r["summary"], str) and r["input_tokens"] > 0 and r["model"] == str(tiny_model_dir)
    assert "done 3, skipped 0, failed 0" in result.output


def test_stdin_to_stdout(tiny_model_dir):
    result = summarize("-", "-m", tiny_model_dir, "-o", "-", input=document(4))
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["id"].startswith("stdin:") and "summary" in lines[0]


def test_jsonl_csv_records_fields_and_errors(tmp_path, tiny_model_dir):
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
    with open(csv_file, "w", newline="") as f:
        csv.writer(f).writerows([["doc", "content"], ["c1", document(2)]])
    out = tmp_path / "out.jsonl"
    result = summarize(src, "-m", tiny_model_dir, "-o", out)
    assert result.exit_code == 1  # some documents failed
    by_id = {r["id"]: r for r in records(out)}
    assert {r["source"] for r in by_id.values()} == {str(src)}
    assert "summary" in by_id["x1"] and "summary" in by_id["x2"]
    assert "no text field" in by_id["x3"]["error"] and "--text-field" in by_id["x3"]["error"]
    assert "invalid JSON" in by_id["records.jsonl:4"]["error"]
    assert by_id["x5"]["error"] == "empty document"
    result = summarize(csv_file, "-m", tiny_model_dir, "-o", out, "--text-field", "content", "--id-field", "doc")
    assert result.exit_code == 0 and "summary" in {r["id"]: r for r in records(out)}["c1"]


def test_bad_files_get_error_records_and_others_go_on(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text(document(3))
    (docs / "empty.txt").write_text("  \n")
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02abc")
    (docs / "latin1.txt").write_bytes("Le caf\xe9 cr\xe8me de la ville.".encode("latin-1"))
    (docs / "utf16.txt").write_bytes("A document saved as UTF-16 by Windows.".encode("utf-16"))
    out = tmp_path / "out.jsonl"
    result = summarize(docs, "-m", tiny_model_dir, "-o", out)
    assert result.exit_code == 1
    by_id = {Path(r["id"]).name: r for r in records(out)}
    assert "summary" in by_id["good.txt"] and "encoding" not in by_id["good.txt"]
    assert by_id["empty.txt"]["error"] == "empty document"
    assert "binary" in by_id["binary.txt"]["error"]
    assert "summary" in by_id["latin1.txt"] and by_id["latin1.txt"]["encoding"] == "cp1252"
    assert "summary" in by_id["utf16.txt"] and by_id["utf16.txt"]["encoding"] == "utf-16"
    assert "failed 2" in result.output


def test_fail_fast_stops_at_first_failure(tmp_path, tiny_model_dir):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text(document(3))
    out = tmp_path / "out.jsonl"
    result = summarize(tmp_path / "a.txt", tmp_path / "b.txt", "-m", tiny_model_dir, "-o", out, "--fail-fast")
    assert result.exit_code == 1
    assert [r["id"] for r in records(out)] == [str(tmp_path / "a.txt")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "input path does not exist: missing.txt"),
        (["{doc}", "-m", "{model}", "-o", "/proc/nope/out.jsonl"], "cannot write to /proc/nope/out.jsonl"),
        (["{doc}", "-m", "{model}", "-o", "{doc}"], "the output {doc} is also an input; choose another --output"),
        (["{empty}"], "no input documents: no file in {empty} matches '*.txt,*.md'"),
        (
            ["{doc}", "-m", "{model}", "-o", "{notes}"],
            "{notes} was not written by longsum (there is no notes.txt.run.json",
        ),
        (["{doc}", "-m", "{model}", "-o", "{notes}", "--overwrite"], "{notes} was not written by longsum"),
        (["{doc}", "--num-beams", "0"], "--num-beams must be >= 1, got 0"),
        (["{doc}", "--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
        (["{doc}", "-m", "/no/such/model"], "local path '/no/such/model' does not exist"),
        (["{doc}", "--long-input", "squash"], "Invalid value for '--long-input': Value error, 'squash' is not one"),
    ],
)
def test_one_line_errors_before_any_work(tmp_path, tiny_model_dir, args, message):
    doc = tmp_path / "d.txt"
    doc.write_text(document(2))
    (tmp_path / "empty").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\nlast line, no newline")
    names = {
        "{doc}": str(doc),
        "{model}": str(tiny_model_dir),
        "{empty}": str(tmp_path / "empty"),
        "{notes}": str(notes),
    }
    for name, value in names.items():
        args = [a.replace(name, value) for a in args]
        message = message.replace(name, value)
    before = doc.read_bytes()
    proc = run_longsum("summarize", *args, *([] if "-o" in args else ["-o", tmp_path / "o.jsonl"]), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert doc.read_bytes() == before and not (tmp_path / "o.jsonl").exists()
    assert notes.read_text() == "my own notes\nlast line, no newline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "empty", "notes.txt"]  # no lock, no sidecar


def test_chunking_a_document_longer_than_the_model(tmp_path, tiny_model_dir):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(document(60))  # ~1,000 tokens for a 256-position model
    out = tmp_path / "out.jsonl"
    result = summarize(long_doc, "-m", tiny_model_dir, "-o", out, "--long-input", "chunk")
    assert result.exit_code == 0
    (r,) = records(out)
    assert r["chunks"] >= 4 and r["input_tokens"] > 256 and isinstance(r["summary"], str)
    assert "documents longer than 256 tokens are split into chunks" in result.output
    result = summarize(long_doc, "-m", tiny_model_dir, "-o", out, "--overwrite")
    (r,) = records(out)
    assert r["truncated"] is True and "are truncated (use --long-input chunk" in result.output
    assert r["input_tokens"] == 256


def test_sentence_windows_fit_and_overlap(tokenizer):
    from longsum.data.text import sentence_windows

    text = document(80)
    windows = list(sentence_windows(text, tokenizer, 256))  # overlap budget ~25 tokens: one sentence
    assert len(windows) > 3
    assert all(len(tokenizer(w)["input_ids"]) <= 256 for w in windows)
    assert all(w.rstrip().endswith(".") for w in windows)  # cut at sentence ends
    assert windows[0][-40:] in windows[1]  # consecutive windows overlap by whole sentences
    assert text.startswith(windows[0]) and text.rstrip().endswith(windows[-1].rstrip())


@pytest.mark.slow
def test_resume_after_kill_each_document_once(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i:02}.txt").write_text(document(8, seed=i))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "longsum", "summarize", str(docs), "-m", str(tiny_model_dir), "-o", str(out),
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
def test_two_processes_one_output(tmp_path, tiny_model_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(7):
        (docs / f"d{i}.txt").write_text(document(5, seed=i))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "longsum", "summarize", str(docs), "-m", str(tiny_model_dir), "-o", str(out)]  # fmt: skip
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
    proc = run_longsum(
        "summarize", tmp_path / "empty.txt", tmp_path / "good.txt", "-m", tmp_path / "no-model", "-o", out
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not out.exists() or out.read_text() == ""


# ------------------------------------------------------------------------------------------ integrity
def run_cli(*args, input: str | None = None):
    """`longsum summarize` through the console script's main(), in this process: (exit code, stderr)."""
    run = run_longsum("summarize", *args, input=input)
    return run.returncode, run.stderr


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_colliding_and_duplicate_ids_give_one_record_per_document(tmp_path, tiny_model_dir):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": document(2, i)} for i in range(1, 6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "text": document(2, i + 1)} for i in range(1, 6)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": document(2)}, {"id": "a", "text": document(3)},
                                           {"id": 7, "text": document(2)}, {"id": "7", "text": document(3)}])  # fmt: skip
    out = tmp_path / "out.jsonl"
    result = summarize(a, b, c, "-m", tiny_model_dir, "-o", out)
    assert result.exit_code == 1  # the true duplicates failed
    got = records(out)
    assert len(got) == 14 and len({(r["source"], r["id"]) for r in got}) == 14
    assert sum("summary" in r for r in got if r["source"] in (str(a), str(b))) == 10
    errors = {r["id"]: r["error"] for r in got if "error" in r}
    assert set(errors) == {"c.jsonl:2", "c.jsonl:4"} and all(e.startswith("duplicate id") for e in errors.values())
    assert "done 12, skipped 0, failed 2" in result.output
    result = summarize(a, b, c, "-m", tiny_model_dir, "-o", out)  # a rerun: nothing new, duplicates still reported
    assert result.exit_code == 1 and "done 0, skipped 12, failed 2, retried 2" in result.output
    assert len(records(out)) == 14


def test_failed_documents_are_retried_after_the_fix_and_replaced(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "x1", "body": document(2)}, {"id": "x2", "body": document(3)},
                                             "{broken json"])  # fmt: skip
    out = tmp_path / "out.jsonl"
    assert summarize(src, "-m", tiny_model_dir, "-o", out).exit_code == 1
    assert sum("error" in r for r in records(out)) == 3
    write_jsonl(src, [{"id": "x1", "body": document(2)}, {"id": "x2", "body": document(3)},
                      {"id": "x3", "body": document(4)}])  # the user fixes the broken line  # fmt: skip
    result = summarize(src, "-m", tiny_model_dir, "-o", out, "--text-field", "body")  # as the error message advised
    assert result.exit_code == 0, result.output
    assert "retried 2 that had failed" in result.output
    got = records(out)
    assert sorted(r["id"] for r in got) == ["x1", "x2", "x3"] and all("summary" in r for r in got)


def copy_model(tiny_model_dir, dst):
    import shutil

    shutil.copytree(tiny_model_dir, dst)
    return dst


def perturb_weights(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_rerun_with_other_weights_or_settings_is_refused(tmp_path, tiny_model_dir):
    model = copy_model(tiny_model_dir, tmp_path / "model")
    doc = tmp_path / "d.txt"
    doc.write_text(document(3))
    out = tmp_path / "out.jsonl"
    assert run_cli(doc, "-m", model, "-o", out, "--num-beams", "1")[0] == 0
    before = out.read_bytes()
    code, err = run_cli(doc, "-m", model, "-o", out, "--num-beams", "2")
    assert code == 2 and err.count("\n") == 1 and "num_beams 1 then, 2 now" in err and "--overwrite" in err
    code, err = run_cli(doc, "-m", model, "-o", out, "--num-beams", "1", "--batch-size", "7")  # no effect on output
    assert code == 0 and "skipped 1" in err
    perturb_weights(model)
    code, err = run_cli(doc, "-m", model, "-o", out, "--num-beams", "1")
    assert code == 2 and "model_fingerprint" in err and "resuming would mix them" in err
    assert out.read_bytes() == before


def test_concurrent_runs_into_one_output_are_refused(tmp_path, tiny_model_dir):
    fifo = tmp_path / "corpus.jsonl"  # the first run waits on its input, holding the output
    os.mkfifo(fifo)
    other = tmp_path / "other.txt"
    other.write_text(document(3))
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen([sys.executable, "-m", "longsum", "summarize", str(fifo), "-m", str(tiny_model_dir), "-o",
                              str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with open(fifo, "w") as f:
        f.write(json.dumps({"id": "r0", "text": document(2)}) + "\n")
        f.flush()
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "out.jsonl.lock").exists():
            time.sleep(0.05)
        code, err = run_cli(other, "-m", tiny_model_dir, "-o", out)
        assert first.poll() is None, "the first run should still be writing"
        assert code == 2
        assert err == f"error: another longsum run (pid {first.pid}) is writing {out}; wait for it to finish or " \
                      f"choose another output\n"  # fmt: skip
        f.write(json.dumps({"id": "r1", "text": document(3)}) + "\n")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert sorted(r["id"] for r in records(out)) == ["r0", "r1"]
    assert not (tmp_path / "out.jsonl.lock").exists()
    assert run_cli(other, "-m", tiny_model_dir, "-o", out)[0] == 0  # free once the first run ended
    assert len(records(out)) == 3


def test_two_piped_documents_are_two_documents(tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    assert run_cli("-", "-m", tiny_model_dir, "-o", out, input=document(3))[0] == 0
    assert run_cli("-", "-m", tiny_model_dir, "-o", out, input=document(4, seed=2))[0] == 0
    code, err = run_cli("-", "-m", tiny_model_dir, "-o", out, input=document(3))
    assert code == 0 and "skipped 1" in err
    ids = [r["id"] for r in records(out)]
    assert len(ids) == 2 and len(set(ids)) == 2 and all(i.startswith("stdin:") for i in ids)


def test_a_folder_without_matches_next_to_good_input_warns_and_fails(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "LOUD.TXT").write_text(document(2))
    out = tmp_path / "out.jsonl"
    result = summarize(tmp_path / "empty", tmp_path / "docs", "-m", tiny_model_dir, "-o", out)
    assert result.exit_code == 1
    assert f"no file in {tmp_path / 'empty'} matches" in result.output
    assert [r["id"] for r in records(out)] == [str(tmp_path / "docs" / "LOUD.TXT")]


def peak_rss_mib(cmd: list[str]) -> tuple[int, float]:
    """(exit code, peak RSS in MiB) of `cmd`, measured in a fresh parent (RUSAGE_CHILDREN)."""
    code = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]) / 1024


@pytest.mark.slow
def test_memory_stays_bounded_with_a_20mb_document(tmp_path, tiny_model_dir):
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for i in range(20_000):
            f.write(document(8, seed=i) + "\n")  # ~20 MB, ~4.5M tokens
    small = tmp_path / "small.txt"
    small.write_text(document(3))
    out = tmp_path / "out.jsonl"
    code, peak = peak_rss_mib([sys.executable, "-m", "longsum", "summarize", str(big), str(small), "-m",
                               str(tiny_model_dir), "-o", str(out)])  # fmt: skip
    assert code == 0
    got = {Path(r["id"]).name: r for r in records(out)}
    assert got["big.txt"]["truncated"] is True and got["big.txt"]["input_tokens"] == 256
    assert got["small.txt"]["truncated"] is False
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"  # whole-text tokenization took ~9 GiB here


def test_records_are_summarized_while_the_input_is_still_being_written(tmp_path, tiny_model_dir):
    """The first records come out before the input ends: nothing waits for the whole corpus."""
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "longsum", "summarize", str(fifo), "-m", str(tiny_model_dir), "-o",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    with open(fifo, "w") as f:
        for i in range(300):  # more than one window of documents
            f.write(json.dumps({"id": f"r{i}", "text": document(2, seed=i)}) + "\n")
        f.flush()
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 10):
            time.sleep(0.05)
        assert len(out.read_text().splitlines()) >= 10, "no record while the input was still open"
        for i in range(300, 320):
            f.write(json.dumps({"id": f"r{i}", "text": document(2, seed=i)}) + "\n")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(r["id"] for r in records(out)) == sorted(f"r{i}" for i in range(320))


def test_a_rerun_naming_the_inputs_differently_skips_what_is_done(tmp_path, tiny_model_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "r.jsonl", [{"id": i, "text": document(2, i)} for i in range(3)])
    (corpus / "a.txt").write_text(document(3))
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    assert summarize("corpus/r.jsonl", "corpus", "-m", tiny_model_dir, "-o", out).exit_code == 0
    result = summarize(corpus / "r.jsonl", corpus / "a.txt", "-m", tiny_model_dir, "-o", out)  # absolute paths now
    assert result.exit_code == 0 and "done 0, skipped 4" in result.output
    got = records(out)
    assert len(got) == 4 and {r["path"] for r in got} == {str(corpus / "r.jsonl"), str(corpus / "a.txt")}


def test_a_lost_device_stops_summarize_and_the_rerun_finishes(tmp_path, tiny_model_dir, monkeypatch):
    """After a sticky device error the run stops (exit 2, one line); no document gets an error record
    for it, and the rerun of the same command summarizes exactly the ones left."""
    from longsum.errors import DeviceLostError
    from longsum.model import generation

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(document(2 + i, seed=i))
    out = tmp_path / "out.jsonl"
    real = generation.Summarizer._generate
    calls = []

    def poisoned(self, batch_ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(self, batch_ids)

    monkeypatch.setattr(generation.Summarizer, "_generate", poisoned)
    monkeypatch.setattr(generation, "device_lost", lambda device: "AcceleratorError: CUDA error: device-side assert")
    args = ["summarize", str(tmp_path), "-m", str(tiny_model_dir), "-o", str(out), "--batch-size", "1"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, DeviceLostError) and result.exception.exit_code == 2
    first = records(out)
    assert len(first) == 1 and "summary" in first[0]  # the one done before; none for the failing one
    monkeypatch.undo()  # a fresh process on a working device
    result = summarize(*args[1:])
    assert result.exit_code == 0, result.output
    assert "done 2, skipped 1, failed 0" in result.output
    assert sorted(r["id"] for r in records(out)) == sorted(str(tmp_path / f"{i}.txt") for i in range(3))
