"""`longsum summarize`: files, folders, stdin or records in; one JSON line per document out.

Records are flushed as documents finish; re-running with the same output skips the ids already
there (a torn last line from a crash is cut off first). A document that cannot be read or
summarized gets an `error` record and the others go on. Under `torchrun`/`accelerate launch` the
documents are split between processes and merged into the one output file.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from longsum.console import stderr_console
from longsum.errors import LongsumError
from longsum.generation import GenerationOptions, Result, Summarizer, keep_freed_memory

DEFAULT_MODEL = "ccdv/lsg-bart-base-4096-pubmed"
DEFAULT_GLOB = "*.txt,*.md"
TEXT_FIELDS = ("text", "article")
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class Document:
    id: str
    text: str | None = None
    error: str | None = None


@dataclass
class SummarizeConfig:
    inputs: list[str]
    output: str = "summaries.jsonl"
    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    glob: str = DEFAULT_GLOB
    text_field: str | None = None
    id_field: str | None = None
    overwrite: bool = False
    fail_fast: bool = False


# ------------------------------------------------------------------------------------------ inputs
def decode_text(data: bytes, source: str) -> Document:
    if b"\x00" in data[:8192]:
        return Document(source, error="binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return Document(source, error=f"not UTF-8 text (byte {err.start}): re-encode the file as UTF-8")
    if not text.strip():
        return Document(source, error="empty document")
    return Document(source, text)


def read_file(path: Path) -> Document:
    if path.suffix.lower() == ".pdf":
        return read_pdf(path)
    try:
        return decode_text(path.read_bytes(), str(path))
    except OSError as err:
        return Document(str(path), error=f"cannot read file: {err.strerror or err}")


def read_pdf(path: Path) -> Document:
    try:
        from pypdf import PdfReader
    except ImportError:
        return Document(str(path), error="PDF input needs pypdf: pip install 'longsum[pdf]'")
    try:
        text = "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    except Exception as err:  # noqa: BLE001  a broken PDF is this document's problem only
        return Document(str(path), error=f"cannot read PDF: {type(err).__name__}: {err}")
    return Document(str(path), text) if text.strip() else Document(str(path), error="PDF has no extractable text")


def _rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number, record or None, problem) for JSONL, CSV and parquet files."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield n, row, None
        return
    with open(path, encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            for n, row in enumerate(csv.DictReader(f), 1):
                yield n, row, None
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                yield n, None, f"invalid JSON: {err.msg}"
                continue
            yield (n, record, None) if isinstance(record, dict) else (n, None, "a JSON line must be an object")


def read_records(path: Path, text_field: str | None, id_field: str | None) -> Iterator[Document]:
    fields = (text_field,) if text_field else TEXT_FIELDS
    try:
        for n, record, problem in _rows(path):
            default_id = f"{path}:{n}"
            if record is None:
                yield Document(default_id, error=problem)
                continue
            key = record.get(id_field or "id")
            doc_id = default_id if key in (None, "") else str(key)
            text = next((record[f] for f in fields if isinstance(record.get(f), str)), None)
            if text is None:
                yield Document(doc_id, error=f"record has no text field {' or '.join(map(repr, fields))}"
                                             f" (fields: {', '.join(map(str, record))}); use --text-field")  # fmt: skip
            elif not text.strip():
                yield Document(doc_id, error="empty document")
            else:
                yield Document(doc_id, text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        yield Document(str(path), error=f"cannot read records: {err}")


def collect_documents(inputs: list[str], glob: str = DEFAULT_GLOB, text_field: str | None = None,
                      id_field: str | None = None) -> list[Document]:  # fmt: skip
    """Every document named by `inputs`, in order; a missing path is an error before any work."""
    missing = [p for p in inputs if p != "-" and not Path(p).exists()]
    if missing:
        raise LongsumError(f"input path does not exist: {missing[0]}")
    docs: list[Document] = []
    patterns = [p.strip() for p in glob.split(",") if p.strip()]
    for item in inputs:
        path = Path(item)
        if item == "-":
            docs.append(decode_text(sys.stdin.buffer.read(), "<stdin>"))
        elif path.is_dir():
            files = sorted({f for pattern in patterns for f in path.rglob(pattern) if f.is_file()})
            docs += [read_file(f) for f in files]
        elif path.suffix.lower() in RECORD_SUFFIXES:
            docs += read_records(path, text_field, id_field)
        else:
            docs.append(read_file(path))
    seen: set[str] = set()
    unique = []
    for doc in docs:  # the same file named twice is summarized once
        if doc.id not in seen:
            seen.add(doc.id)
            unique.append(doc)
    return unique


# ------------------------------------------------------------------------------------------ run
class _FailFast(Exception):
    pass


def run(cfg: SummarizeConfig) -> int:
    """Summarize `cfg.inputs` into `cfg.output`; returns the exit code (1 if any document failed)."""

    from longsum import distributed
    from longsum.models import locate

    console = stderr_console()
    dist = distributed.init()
    docs = collect_documents(cfg.inputs, cfg.glob, cfg.text_field, cfg.id_field)

    writer, done, repaired = distributed.open_output(cfg.output, dist, overwrite=cfg.overwrite)
    try:
        locate(cfg.model)  # an unknown model or unreachable Hub fails here, before any record is written
    except LongsumError:
        writer.close()
        raise
    if repaired:
        console.print(f"repaired a torn last line in {cfg.output} (interrupted run)")

    pending = [d for d in docs if d.id not in done]
    skipped = len(docs) - len(pending)
    todo = dist.shard(pending)
    stats = {"done": 0, "failed": 0, "tokens": 0}
    start = time.perf_counter()

    def emit(doc_id: str, result: Result) -> None:
        record: dict = {"id": doc_id, "model": cfg.model}
        if result.error:
            record["error"] = result.error
            stats["failed"] += 1
        else:
            record["summary"] = result.summary
            record["input_tokens"] = result.input_tokens
            if cfg.generation.long_input == "chunk":
                record["chunks"] = result.chunks
            else:
                record["truncated"] = result.truncated
            record["seconds"] = round(result.seconds, 3)
            stats["done"] += 1
            stats["tokens"] += result.input_tokens
        writer.write(record)
        if result.error and cfg.fail_fast:
            raise _FailFast(f"{doc_id}: {result.error}")

    try:
        for doc in todo:
            if doc.error:
                emit(doc.id, Result(error=doc.error))
        readable = [(doc.id, doc.text) for doc in todo if not doc.error]
        if readable:
            _summarize(cfg, readable, emit, console, dist)
    except _FailFast as err:
        console.print(f"[red]stopped at the first failure (--fail-fast):[/red] {err}")
    finally:
        distributed.close_output(writer, cfg.output, dist)

    elapsed = max(time.perf_counter() - start, 1e-9)
    if dist.main or dist.world == 1:
        console.print(
            f"done {stats['done']}, skipped {skipped}, failed {stats['failed']} in {elapsed:.1f}s: "
            f"{stats['done'] / elapsed:.2f} docs/s, {stats['tokens'] / elapsed:,.0f} tokens/s"
            + (f" (this process; {dist.world} processes)" if dist.world > 1 else "")
        )
    return 1 if stats["failed"] else 0


def _summarize(cfg: SummarizeConfig, items: list[tuple[str, str]], emit, console, dist) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from longsum.models import load_model

    model, tokenizer = load_model(cfg.model, device=dist.device(cfg.device), dtype=cfg.dtype)
    if model.device.type == "cpu":
        keep_freed_memory()  # batched generation on CPU: reuse freed buffers (see its docstring)
    summarizer = Summarizer(model, tokenizer, cfg.generation)
    if dist.main:
        settings = ", ".join(f"{k}={v}" for k, v in summarizer.settings().items())
        console.print(f"model {cfg.model} on {model.device} ({next(model.parameters()).dtype}); {settings}")

    def warn_long(n_long: int) -> None:
        if n_long:
            action = "split into chunks (map-reduce)" if cfg.generation.long_input == "chunk" else (
                "truncated (use --long-input chunk to summarize them whole)")  # fmt: skip
            console.print(f"[yellow]{n_long} document(s) longer than {summarizer.max_source_length} tokens: {action}")

    progress = Progress(TextColumn("summarizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[rate]}"), console=console, disable=not console.is_terminal)  # fmt: skip
    start, tokens = time.perf_counter(), 0
    with progress:
        task = progress.add_task("docs", total=len(items), rate="")

        def on_result(doc_id, result: Result) -> None:
            nonlocal tokens
            emit(doc_id, result)
            tokens += result.input_tokens
            elapsed = time.perf_counter() - start
            rate = f"{(progress.tasks[0].completed + 1) / elapsed:.2f} docs/s, {tokens / elapsed:,.0f} tok/s"
            progress.update(task, advance=1, rate=rate)

        summarizer.summarize(items, on_result, on_plan=warn_long)
